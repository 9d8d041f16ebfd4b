/* test_api.c - unit tests of the OpenAI wire format (api/): parsing and validation of
 * completions/chat/admin bodies, OpenAI-shaped errors, response and SSE chunk JSON. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"
#include "engine/hy.h"

#define PARSE(kind, s, r, e) api_parse_request(kind, s, strlen(s), r, e)

static void test_completion_defaults(void **st)
{
    (void)st;
    api_request r;
    api_error e;
    assert_int_equal(PARSE(API_COMPLETION, "{\"model\":\"m\",\"prompt\":\"hi\",\"unknown\":[1,{}]}", &r, &e), 0);
    assert_string_equal(r.model, "m");
    assert_int_equal(r.n_prompts, 1);
    assert_string_equal(r.prompts[0].text, "hi");
    assert_int_equal(r.max_tokens, -1);
    assert_true(r.temperature == 1.0 && r.top_p == 1.0 && r.repetition_penalty == 1.0);
    assert_int_equal(r.n, 1);
    assert_false(r.stream);
    assert_false(r.logprobs);
    api_request_free(&r);
}

static void test_completion_fields(void **st)
{
    (void)st;
    api_request r;
    api_error e;
    const char *b = "{\"prompt\":[[1,2,3],\"x\"],\"max_tokens\":7,\"temperature\":0,\"top_p\":0.5,"
                    "\"top_k\":40,\"min_p\":0.1,\"seed\":-5,\"stop\":[\"a\",\"bc\"],\"n\":3,\"stream\":true,"
                    "\"stream_options\":{\"include_usage\":true},\"logprobs\":2,"
                    "\"presence_penalty\":0.5,\"frequency_penalty\":-1,\"repetition_penalty\":1.2,"
                    "\"ignore_eos\":true}";
    assert_int_equal(PARSE(API_COMPLETION, b, &r, &e), 0);
    assert_null(r.model);
    assert_int_equal(r.n_prompts, 2);
    assert_null(r.prompts[0].text);
    assert_int_equal(r.prompts[0].n_ids, 3);
    assert_int_equal(r.prompts[0].ids[2], 3);
    assert_string_equal(r.prompts[1].text, "x");
    assert_int_equal(r.max_tokens, 7);
    assert_true(r.temperature == 0.0 && r.top_p == 0.5 && r.min_p == 0.1);
    assert_int_equal(r.top_k, 40);
    assert_true(r.has_seed);
    assert_int_equal(r.seed, -5);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[1], "bc");
    assert_int_equal(r.n, 3);
    assert_true(r.stream && r.include_usage && r.logprobs && r.ignore_eos);
    assert_int_equal(r.top_logprobs, 2);
    assert_true(r.presence_penalty == 0.5 && r.frequency_penalty == -1.0 && r.repetition_penalty == 1.2);
    api_request_free(&r);

    assert_int_equal(PARSE(API_COMPLETION, "{\"prompt\":[5,6],\"max_completion_tokens\":3,\"stop\":\"zz\"}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 1);
    assert_int_equal(r.prompts[0].n_ids, 2);
    assert_int_equal(r.max_tokens, 3);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "zz");
    api_request_free(&r);
}

static void expect_400(api_kind k, const char *body, const char *param)
{
    api_request r;
    api_error e;
    memset(&e, 0, sizeof e);
    assert_int_equal(PARSE(k, body, &r, &e), HY_EINVAL);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    assert_string_equal(e.param, param);
    assert_true(strlen(e.message) > 0);
}

static void test_errors(void **st)
{
    (void)st;
    expect_400(API_COMPLETION, "not json", "");
    expect_400(API_COMPLETION, "[1,2]", "");
    expect_400(API_COMPLETION, "{}", "prompt");
    expect_400(API_COMPLETION, "{\"prompt\":5}", "prompt");
    expect_400(API_COMPLETION, "{\"prompt\":[]}", "prompt");
    expect_400(API_COMPLETION, "{\"prompt\":[1,-2]}", "prompt");
    expect_400(API_COMPLETION, "{\"prompt\":[\"a\",3]}", "prompt");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":\"5\"}", "max_tokens");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":0}", "max_tokens");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"temperature\":\"hot\"}", "temperature");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"temperature\":3}", "temperature");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"top_p\":0}", "top_p");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"n\":0}", "n");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"n\":1.5}", "n");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"stream\":1}", "stream");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"stop\":[1]}", "stop");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"stop\":7}", "stop");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"model\":3}", "model");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":true}", "logprobs");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"stream_options\":{\"include_usage\":\"y\"}}",
               "stream_options.include_usage");
    expect_400(API_CHAT, "{\"messages\":\"hi\"}", "messages");
    expect_400(API_CHAT, "{}", "messages");
    expect_400(API_CHAT, "{\"messages\":[]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":3}", "logprobs");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}", "top_logprobs");
    expect_400(API_COMPLETION, "{\"prompt\":\"a\",\"prompt\":\"b\"}", "");
}

static void test_chat(void **st)
{
    (void)st;
    api_request r;
    api_error e;
    const char *b = "{\"model\":\"a1\",\"messages\":[{\"role\":\"system\",\"content\":\"S\"},"
                    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"he\"},{\"type\":\"text\",\"text\":\"llo\"}]},"
                    "{\"role\":\"assistant\",\"content\":null},{\"role\":\"developer\",\"content\":\"D\"}],"
                    "\"logprobs\":true,\"top_logprobs\":3,\"max_tokens\":4}";
    assert_int_equal(PARSE(API_CHAT, b, &r, &e), 0);
    assert_int_equal(r.kind, API_CHAT);
    assert_int_equal(r.n_msgs, 4);
    assert_string_equal(r.msgs[1].role, "user");
    assert_string_equal(r.msgs[1].content, "hello");
    assert_string_equal(r.msgs[2].content, "");
    assert_string_equal(r.msgs[3].role, "system");
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 3);
    api_request_free(&r);
}

static void test_admin(void **st)
{
    (void)st;
    char *n, *p, *h;
    api_error e;
    const char *b = "{\"lora_name\":\"x\",\"lora_path\":\"/a/b\"}";
    assert_int_equal(api_parse_load_lora(b, strlen(b), &n, &p, &h, NULL, &e), 0);
    assert_string_equal(n, "x");
    assert_string_equal(p, "/a/b");
    assert_null(h);
    free(n);
    free(p);
    b = "{\"lora_name\":\"x\"}";
    assert_int_equal(api_parse_load_lora(b, strlen(b), &n, &p, &h, NULL, &e), HY_EINVAL);
    assert_string_equal(e.param, "lora_path");
    b = "{\"lora_name\":7,\"lora_path\":\"p\"}";
    assert_int_equal(api_parse_load_lora(b, strlen(b), &n, &p, &h, NULL, &e), HY_EINVAL);
    assert_string_equal(e.param, "lora_name");
    b = "{\"lora_name\":\"q\"}";
    assert_int_equal(api_parse_unload_lora(b, strlen(b), &n, &e), 0);
    assert_string_equal(n, "q");
    free(n);
}

static void test_error_json(void **st)
{
    (void)st;
    api_error e;
    api_error_set(&e, 404, "invalid_request_error", "model", "model_not_found", "The model `%s` does not exist.", "zz");
    char *s = api_error_json(&e);
    json_t *j = json_loads(s, 0, NULL);
    assert_non_null(j);
    json_t *er = json_object_get(j, "error");
    assert_string_equal(json_string_value(json_object_get(er, "message")), "The model `zz` does not exist.");
    assert_string_equal(json_string_value(json_object_get(er, "type")), "invalid_request_error");
    assert_string_equal(json_string_value(json_object_get(er, "param")), "model");
    assert_string_equal(json_string_value(json_object_get(er, "code")), "model_not_found");
    json_decref(j);
    free(s);
    api_error_set(&e, 500, "server_error", "", "", "boom");
    s = api_error_json(&e);
    j = json_loads(s, 0, NULL);
    assert_true(json_is_null(json_object_get(json_object_get(j, "error"), "param")));
    json_decref(j);
    free(s);
}

static void test_format_response(void **st)
{
    (void)st;
    const char *tops[2] = {"a", "b"};
    float toplp[2] = {-0.1f, -2.5f};
    api_tokenlp lp[2] = {{"a", -0.1f, 2, tops, toplp, false}, {"\xC3", -1.0f, 0, NULL, NULL, false}};
    api_choice c[2] = {{0, "hello", 5, "stop", 2, lp, NULL, 0, NULL, 0}, {1, "wor\xC3", 4, "length", 0, NULL, NULL, 0, NULL, 0}};
    api_usage u = {3, 9, 0};
    char *s = api_format_response(API_COMPLETION, "cmpl-1", 42, "base", c, 2, &u, true);
    json_t *j = json_loads(s, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "text_completion");
    assert_int_equal(json_integer_value(json_object_get(j, "created")), 42);
    json_t *ch = json_object_get(j, "choices");
    assert_int_equal(json_array_size(ch), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(ch, 0), "text")), "hello");
    assert_string_equal(json_string_value(json_object_get(json_array_get(ch, 1), "text")), "wor\xEF\xBF\xBD");
    assert_string_equal(json_string_value(json_object_get(json_array_get(ch, 1), "finish_reason")), "length");
    json_t *l = json_object_get(json_array_get(ch, 0), "logprobs");
    assert_int_equal(json_array_size(json_object_get(l, "tokens")), 2);
    assert_true(json_real_value(json_array_get(json_object_get(l, "token_logprobs"), 0)) < -0.09);
    assert_int_equal(json_object_size(json_array_get(json_object_get(l, "top_logprobs"), 0)), 2);
    json_t *us = json_object_get(j, "usage");
    assert_int_equal(json_integer_value(json_object_get(us, "total_tokens")), 12);
    json_decref(j);
    free(s);

    s = api_format_response(API_CHAT, "chatcmpl-1", 1, "base", c, 1, &u, true);
    j = json_loads(s, 0, NULL);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "chat.completion");
    assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "message"), "role")), "assistant");
    assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "message"), "content")), "hello");
    json_t *cont = json_object_get(json_object_get(c0, "logprobs"), "content");
    assert_int_equal(json_array_size(cont), 2);
    assert_int_equal(json_array_size(json_object_get(json_array_get(cont, 0), "top_logprobs")), 2);
    assert_int_equal(json_integer_value(json_array_get(json_object_get(json_array_get(cont, 0), "bytes"), 0)), 'a');
    json_decref(j);
    free(s);
}

static void test_sse(void **st)
{
    (void)st;
    api_choice c = {0, "he", 2, NULL, 0, NULL, NULL, 0, NULL, 0};
    char *s = api_format_chunk(API_CHAT, "id1", 5, "m", &c, true, false, true);
    assert_true(strncmp(s, "data: {", 7) == 0);
    size_t n = strlen(s);
    assert_true(n > 2 && s[n - 1] == '\n' && s[n - 2] == '\n');
    json_t *j = json_loads(s + 6, JSON_DISABLE_EOF_CHECK, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "chat.completion.chunk");
    json_t *d = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "delta");
    assert_string_equal(json_string_value(json_object_get(d, "role")), "assistant");
    assert_string_equal(json_string_value(json_object_get(d, "content")), "he");
    assert_true(json_is_null(json_object_get(j, "usage")));
    json_decref(j);
    free(s);

    api_usage u = {4, 2, 1};
    s = api_format_usage_chunk(API_COMPLETION, "id2", 5, "m", &u);
    j = json_loads(s + 6, JSON_DISABLE_EOF_CHECK, NULL);
    assert_int_equal(json_array_size(json_object_get(j, "choices")), 0);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens")), 2);
    json_t *det = json_object_get(json_object_get(j, "usage"), "prompt_tokens_details");
    assert_int_equal(json_integer_value(json_object_get(det, "cached_tokens")), 1);
    json_decref(j);
    free(s);
    assert_string_equal(api_sse_done(), "data: [DONE]\n\n");

    api_model_entry m[2] = {{"base", NULL, NULL, 1}, {"ad", "base", "/x", 2}};
    s = api_format_models(m, 2);
    j = json_loads(s, 0, NULL);
    json_t *d1 = json_array_get(json_object_get(j, "data"), 1);
    assert_string_equal(json_string_value(json_object_get(d1, "parent")), "base");
    assert_true(json_is_null(json_object_get(json_array_get(json_object_get(j, "data"), 0), "parent")));
    json_decref(j);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_completion_defaults), cmocka_unit_test(test_completion_fields),
        cmocka_unit_test(test_errors),              cmocka_unit_test(test_chat),
        cmocka_unit_test(test_admin),               cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_format_response),     cmocka_unit_test(test_sse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
