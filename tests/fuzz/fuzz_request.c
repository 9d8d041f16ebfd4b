/* fuzz_request.c - libFuzzer target for request bodies: the input is one HTTP body, handed to every
 * parser the server routes bodies to: api_parse_request as /v1/completions and as
 * /v1/chat/completions (structured outputs, tools, logit_bias, the hydra object included), then
 * api_hydra_check, and the chat messages of a parsed request through every chat template; the
 * admin bodies (api_parse_load_lora, api_parse_unload_lora). It aborts where a documented promise
 * breaks: a parsed request outside its documented ranges, or an error without a message or with a
 * body that is not JSON. Not a unit test. Build and run: tests/fuzz/fuzz.mk. */
#include "api/api.h"
#include "engine/hy.h"
#include "engine/tokenizer.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fz_fail(const char *what)
{
    fprintf(stderr, "fuzz_request: broken promise: %s\n", what);
    abort();
}

/* A refusal: HY_EINVAL with a 400 (bad input) or 500 (out of memory), a message, and an error body
 * that is JSON. */
static void fz_check_error(int rc, const api_error *e)
{
    if (rc != HY_EINVAL)
        fz_fail("parser returned something other than 0 or HY_EINVAL");
    if ((e->status != 400 && e->status != 500) || !e->message[0])
        fz_fail("error without status 400/500 or without a message");
    char *body = api_error_json(e);
    if (!body)
        return;
    json_error_t je;
    json_t *j = json_loads(body, 0, &je);
    if (!j || !json_is_object(json_object_get(j, "error")))
        fz_fail("api_error_json is not {\"error\": {...}}");
    json_decref(j);
    free(body);
}

static void fz_check_request(const api_request *r, api_kind kind)
{
    if (r->kind != kind)
        fz_fail("kind");
    if (r->n < 1 || r->n > API_MAX_N || r->n_stop < 0 || r->n_stop > API_MAX_STOP)
        fz_fail("n or n_stop out of range");
    if (r->top_logprobs < 0 || r->top_logprobs > API_MAX_TOP_LOGPROBS)
        fz_fail("top_logprobs out of range");
    if (r->max_tokens < -1 || (r->max_tokens == 0 && !r->echo))
        fz_fail("max_tokens out of range");
    if (kind == API_COMPLETION && (r->n_prompts < 1 || r->n_prompts > API_MAX_PROMPTS || !r->prompts))
        fz_fail("completions without prompts");
    if (kind == API_CHAT && (r->n_msgs < 1 || !r->msgs))
        fz_fail("chat without messages");
    for (int i = 0; i < r->n_stop; i++)
        if (!r->stop[i])
            fz_fail("NULL stop string");
    for (int i = 0; i < r->n_prompts; i++)
        if (!r->prompts[i].text && r->prompts[i].n_ids > 0 && !r->prompts[i].ids)
            fz_fail("prompt without text or ids");
    for (int i = 0; i < r->st.n_bias; i++)
        if (!(r->st.bias[i] >= -100.0f && r->st.bias[i] <= 100.0f))
            fz_fail("logit_bias out of [-100, 100]");
}

/* What the server does next with a chat request: render it with the model's template. */
static void fz_templates(const api_request *r)
{
    tok_msg *m = calloc((size_t)r->n_msgs, sizeof *m);
    if (!m)
        return;
    for (int i = 0; i < r->n_msgs; i++) {
        m[i].role = r->msgs[i].role;
        m[i].content = r->msgs[i].content ? r->msgs[i].content : "";
    }
    static const tok_chat_kind kinds[] = {TOK_CHAT_CHATML, TOK_CHAT_LLAMA3, TOK_CHAT_LLAMA2,
                                          TOK_CHAT_ZEPHYR, TOK_CHAT_CHATML_PLAIN};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        char *out = NULL;
        if (tok_chat_apply(kinds[k], m, r->n_msgs, true, &out) == HY_OK)
            free(out);
    }
    free(m);
}

static void fz_generation(api_kind kind, const char *body, size_t n)
{
    api_request r;
    api_error e;
    memset(&e, 0, sizeof e);
    int rc = api_parse_request(kind, body, n, &r, &e);
    if (rc) {
        fz_check_error(rc, &e);
        return;
    }
    fz_check_request(&r, kind);
    for (int K = 0; K <= 5; K += 5) {
        memset(&e, 0, sizeof e);
        if ((rc = api_hydra_check(&r.hydra, K, &e)))
            fz_check_error(rc, &e);
    }
    if (kind == API_CHAT)
        fz_templates(&r);
    api_request_free(&r);
}

static void fz_admin(const char *body, size_t n)
{
    char *name = NULL, *path = NULL, *sha = NULL;
    bool pinned = false;
    api_error e;
    memset(&e, 0, sizeof e);
    int rc = api_parse_load_lora(body, n, &name, &path, &sha, &pinned, &e);
    if (rc) {
        fz_check_error(rc, &e);
        if (name || path || sha)
            fz_fail("load_lora error left strings behind");
    } else if (!name || !path) {
        fz_fail("load_lora without name or path");
    }
    free(name);
    free(path);
    free(sha);
    name = NULL;
    memset(&e, 0, sizeof e);
    rc = api_parse_unload_lora(body, n, &name, &e);
    if (rc)
        fz_check_error(rc, &e);
    else if (!name)
        fz_fail("unload_lora without name");
    free(name);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* an exact-size copy (no NUL after it) so ASan sees any read past the body */
    char *body = malloc(size ? size : 1);
    if (!body)
        return 0;
    memcpy(body, data, size);
    fz_generation(API_COMPLETION, body, size);
    fz_generation(API_CHAT, body, size);
    fz_admin(body, size);
    hy_err_clear();
    free(body);
    return 0;
}
