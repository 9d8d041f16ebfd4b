/* test_srv_struct.c - the server side of structured outputs and tools (server/srv_struct.c):
 * request shapes (api/api_struct.c), the grammar each constraint compiles to (checked by matching
 * texts against it), the tool prompt, and the tool-call scanner whole and streamed byte by byte
 * (the stream's deltas must reassemble to the whole answer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "api/api.h"
#include "engine/gram.h"
#include "engine/hy.h"
#include "server/srv_struct.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse(api_kind kind, const char *body, api_request *r, api_error *e)
{
    return api_parse_request(kind, body, strlen(body), r, e);
}

static void expect_400(api_kind kind, const char *body, const char *param, const char *needle)
{
    api_request r;
    api_error e;
    assert_int_equal(parse(kind, body, &r, &e), HY_EINVAL);
    assert_int_equal(e.status, 400);
    if (strcmp(e.param, param) || !strstr(e.message, needle))
        fail_msg("%s: param '%s' message '%s'", body, e.param, e.message);
}

static void test_shapes(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    assert_int_equal(parse(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                     "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\","
                                     "\"schema\":{\"type\":\"object\",\"properties\":{\"b\":{\"type\":\"integer\"}}}}},"
                                     "\"logit_bias\":{\"12\":-100,\"7\":2.5},\"user\":\"u\",\"store\":false}",
                           &r, &e), 0);
    assert_int_equal(r.st.rf, API_RF_JSON_SCHEMA);
    assert_string_equal(r.st.schema, "{\"type\":\"object\",\"properties\":{\"b\":{\"type\":\"integer\"}}}");
    assert_int_equal(r.st.n_bias, 2);
    assert_int_equal(r.st.bias_id[0], 12);
    assert_true(r.st.bias[1] == 2.5f);
    api_request_free(&r);
    const char *msgs = "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]";
    char b[1024];
    snprintf(b, sizeof b, "{%s,\"functions\":[]}", msgs);
    expect_400(API_CHAT, b, "functions", "not supported");
    snprintf(b, sizeof b, "{%s,\"logit_bias\":{\"5\":101}}", msgs);
    expect_400(API_CHAT, b, "logit_bias", "between -100 and 100");
    snprintf(b, sizeof b, "{%s,\"logit_bias\":{\"x\":1}}", msgs);
    expect_400(API_CHAT, b, "logit_bias", "not a token id");
    snprintf(b, sizeof b, "{%s,\"response_format\":{\"type\":\"xml\"}}", msgs);
    expect_400(API_CHAT, b, "response_format.type", "json_schema");
    snprintf(b, sizeof b, "{%s,\"tool_choice\":\"required\"}", msgs);
    expect_400(API_CHAT, b, "tool_choice", "needs 'tools'");
    snprintf(b, sizeof b, "{%s,\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a b\"}}]}", msgs);
    expect_400(API_CHAT, b, "tools[0]", "a-z");
    snprintf(b, sizeof b, "{%s,\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
             "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"g\"}}}", msgs);
    expect_400(API_CHAT, b, "tool_choice", "not in 'tools'");
    expect_400(API_COMPLETION, "{\"prompt\":\"x\",\"echo\":1}", "echo", "boolean");
    expect_400(API_COMPLETION, "{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens", "only with 'echo'");
    expect_400(API_COMPLETION, "{\"prompt\":\"x\",\"logprobs\":21,\"echo\":true}", "logprobs", "");
    assert_int_equal(parse(API_COMPLETION, "{\"prompt\":[[1,2],[3]],\"echo\":true,\"max_tokens\":0,\"logprobs\":2}", &r, &e), 0);
    assert_true(r.echo);
    assert_int_equal(r.max_tokens, 0);
    assert_int_equal(r.n_prompts, 2);
    assert_int_equal(r.prompts[1].n_ids, 1);
    api_request_free(&r);
    expect_400(API_COMPLETION, "{\"prompt\":\"x\",\"tools\":[]}", "tools", "chat");
    expect_400(API_COMPLETION, "{\"prompt\":\"x\",\"grammar\":\"root ::= \\\"a\\\"\",\"response_format\":{\"type\":\"json_object\"}}",
               "grammar", "not both");
}

static const char *k_tools =
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Weather now\","
    "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"},"
    "\"unit\":{\"enum\":[\"c\",\"f\"]}},\"required\":[\"city\",\"unit\"],\"additionalProperties\":false}}},"
    "{\"type\":\"function\",\"function\":{\"name\":\"now\"}}]";

static gram *constraint_of(const char *body, smp_constraint **cst)
{
    api_request r;
    api_error e;
    srv_gcache *gc;
    assert_int_equal(srv_gcache_create(4, &gc), 0);
    if (parse(API_CHAT, body, &r, &e))
        fail_msg("%s: %s", body, e.message);
    if (srv_struct_constraint(gc, &r, 49152, false, cst, &e))
        fail_msg("%s: %s", body, e.message);
    api_request_free(&r);
    srv_gcache_free(gc); /* the constraint keeps its own reference */
    return *cst ? (*cst)->g : NULL;
}

#define M(g, s) gram_match(g, s, strlen(s))

static void test_tool_grammars(void **state)
{
    (void)state;
    char b[2048];
    smp_constraint *c;
    snprintf(b, sizeof b, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s,\"tool_choice\":\"required\"}", k_tools);
    gram *g = constraint_of(b, &c);
    assert_non_null(g);
    assert_true(M(g, "<tool_call>[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\",\"unit\":\"c\"}}]</tool_call>"));
    assert_true(M(g, "<tool_call>[{\"name\":\"now\",\"arguments\":{}},{\"name\":\"now\",\"arguments\":{}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[{\"name\":\"other\",\"arguments\":{}}]</tool_call>"));
    assert_false(M(g, "Sure!"));
    smp_constraint_free(c);

    snprintf(b, sizeof b, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s,\"parallel_tool_calls\":false,"
             "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"now\"}}}", k_tools);
    g = constraint_of(b, &c);
    assert_true(M(g, "<tool_call>[{\"name\":\"now\",\"arguments\":{}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[{\"name\":\"now\",\"arguments\":{}},{\"name\":\"now\",\"arguments\":{}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"P\",\"unit\":\"c\"}}]</tool_call>"));
    smp_constraint_free(c);

    snprintf(b, sizeof b, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s}", k_tools); /* auto */
    g = constraint_of(b, &c);
    assert_true(M(g, "It is sunny."));
    assert_true(M(g, ""));
    assert_true(M(g, "<tool"));
    assert_true(M(g, "<toolbox> is a tag"));
    assert_true(M(g, "<tool_call>[{\"name\":\"now\",\"arguments\":{}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[{\"name\":\"now\",\"arguments\":{\"x\":1}}]</tool_call>"));
    assert_false(M(g, "<tool_call>[nonsense"));
    smp_constraint_free(c);

    snprintf(b, sizeof b, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s,\"tool_choice\":\"none\","
             "\"logit_bias\":{\"3\":1}}", k_tools);
    g = constraint_of(b, &c);
    assert_null(g);
    assert_non_null(c);
    assert_int_equal(c->n_bias, 1);
    smp_constraint_free(c);
}

static void test_tool_prompt(void **state)
{
    (void)state;
    char b[4096];
    snprintf(b, sizeof b, "{\"messages\":[{\"role\":\"user\",\"content\":\"weather?\"},"
             "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
             "\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\": \\\"Paris\\\", \\\"unit\\\": \\\"c\\\"}\"}}]},"
             "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"21 C\"}],%s}", k_tools);
    api_request r;
    api_error e;
    if (parse(API_CHAT, b, &r, &e))
        fail_msg("%s", e.message);
    tok_msg *m;
    char **owned;
    int n_owned, n = srv_tools_msgs(&r, &m, &owned, &n_owned);
    assert_int_equal(n, 4);
    assert_string_equal(m[0].role, "system");
    assert_non_null(strstr(m[0].content, "\"name\":\"get_weather\""));
    assert_non_null(strstr(m[0].content, "<tool_call>"));
    assert_string_equal(m[2].role, "assistant");
    assert_string_equal(m[2].content, "<tool_call>[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\",\"unit\":\"c\"}}]</tool_call>");
    assert_string_equal(m[3].role, "user");
    assert_string_equal(m[3].content, "<tool_response>\n21 C\n</tool_response>");
    srv_tools_msgs_free(m, owned, n_owned);
    api_request_free(&r);
}

static void test_toolscan(void **state)
{
    (void)state;
    const char *t = "<tool_call>[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Pa\\\"r}is\",\"n\":[1,{\"a\":2}]}},"
                    "{\"name\":\"now\",\"arguments\":{}}]</tool_call>";
    size_t n = strlen(t);
    srv_toolscan ts;
    srv_toolscan_init(&ts, "abc", 0);
    api_choice c = {0, t, n, "stop", 0, NULL, NULL, 0, NULL, 0};
    srv_toolscan_whole(&ts, t, n, &c);
    assert_int_equal(c.n_calls, 2);
    assert_string_equal(c.finish_reason, "tool_calls");
    assert_int_equal(c.text_len, 0);
    assert_string_equal(c.calls[0].name, "get_weather");
    assert_string_equal(c.calls[0].id, "call_abc_0_0");
    assert_int_equal(c.calls[0].args_len, strlen("{\"city\":\"Pa\\\"r}is\",\"n\":[1,{\"a\":2}]}"));
    assert_memory_equal(c.calls[0].args, "{\"city\":\"Pa\\\"r}is\",\"n\":[1,{\"a\":2}]}", c.calls[0].args_len);
    assert_string_equal(c.calls[1].name, "now");
    assert_memory_equal(c.calls[1].args, "{}", 2);

    /* streamed one byte at a time: names first, argument fragments reassemble */
    srv_toolscan_init(&ts, "abc", 0);
    char args[2][256] = {{0}}, names[2][80] = {{0}};
    const char *finish = NULL;
    for (size_t len = 1; len <= n; len++) {
        api_choice s = {0, t, len, len == n ? "stop" : NULL, 0, NULL, NULL, 0, NULL, 0};
        srv_toolscan_stream(&ts, t, len, len == n, &s);
        assert_int_equal(s.text_len, 0);
        for (int k = 0; k < s.n_calls; k++) {
            const api_tool_call *x = &s.calls[k];
            if (x->name) {
                assert_string_equal(names[x->index], "");
                snprintf(names[x->index], sizeof names[x->index], "%s", x->name);
            } else {
                assert_string_not_equal(names[x->index], "");
            }
            strncat(args[x->index], x->args, x->args_len);
        }
        if (len == n)
            finish = s.finish_reason;
    }
    assert_string_equal(finish, "tool_calls");
    assert_string_equal(names[0], "get_weather");
    assert_string_equal(args[0], "{\"city\":\"Pa\\\"r}is\",\"n\":[1,{\"a\":2}]}");
    assert_string_equal(names[1], "now");
    assert_string_equal(args[1], "{}");

    /* auto: plain text is content, held back only while it could still be the opening */
    srv_toolscan_init(&ts, "abc", 0);
    api_choice s = {0};
    srv_toolscan_stream(&ts, "<tool", 5, false, &s);
    assert_int_equal(s.text_len, 0);
    srv_toolscan_stream(&ts, "<toolbox", 8, false, &s);
    assert_int_equal(s.text_len, 8);
    assert_memory_equal(s.text, "<toolbox", 8);
    srv_toolscan_stream(&ts, "<toolbox!", 9, true, &s);
    assert_int_equal(s.text_len, 1);
    assert_int_equal(s.n_calls, 0);
    srv_toolscan_init(&ts, "abc", 0);
    api_choice w = {0, "Hi", 2, "stop", 0, NULL, NULL, 0, NULL, 0};
    srv_toolscan_whole(&ts, "Hi", 2, &w);
    assert_int_equal(w.n_calls, 0);
    assert_int_equal(w.text_len, 2);
    assert_string_equal(w.finish_reason, "stop");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shapes),
        cmocka_unit_test(test_tool_grammars),
        cmocka_unit_test(test_tool_prompt),
        cmocka_unit_test(test_toolscan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
