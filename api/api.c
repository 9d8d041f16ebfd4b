/* api.c - OpenAI wire format with jansson: request parsing/validation, OpenAI-shaped errors,
 * response and SSE chunk formatting. Pure functions only: no sockets, no engine, no globals. */
#include "api/api.h"
#include "api/api_hydra.h"
#include "api/api_lora.h"
#include "api/api_struct.h"
#include "engine/hy.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                  const char *fmt, ...)
{
    if (!e)
        return HY_EINVAL;
    va_list ap;
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "invalid_request_error");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return HY_EINVAL;
}

static json_t *str_or_null(const char *s)
{
    return (s && s[0]) ? json_string(s) : json_null();
}

char *api_error_json(const api_error *e)
{
    json_t *err = json_object(), *root = json_object();
    char *out = NULL;
    if (!err || !root)
        goto done;
    json_object_set_new(err, "message", json_string(e->message));
    json_object_set_new(err, "type", json_string(e->type));
    json_object_set_new(err, "param", str_or_null(e->param));
    json_object_set_new(err, "code", str_or_null(e->code));
    json_object_set(root, "error", err);
    out = json_dumps(root, JSON_COMPACT);
done:
    json_decref(err);
    json_decref(root);
    return out;
}

/* ---- parsing helpers: each returns 0, or fills err and returns HY_EINVAL ---- */

static int bad(api_error *err, const char *param, const char *fmt, const char *what)
{
    return api_error_set(err, 400, "invalid_request_error", param, "invalid_type", fmt, param, what);
}

json_t *api_field(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return (v && !json_is_null(v)) ? v : NULL;
}

static int get_bool(json_t *o, const char *k, bool *out, api_error *err)
{
    json_t *v = api_field(o, k);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return bad(err, k, "'%s' must be %s", "a boolean");
    *out = json_is_true(v);
    return 0;
}

static int get_int(json_t *o, const char *k, int64_t lo, int64_t hi, int64_t *out, bool *given,
                   api_error *err)
{
    json_t *v = api_field(o, k);
    if (!v)
        return 0;
    if (!json_is_integer(v))
        return bad(err, k, "'%s' must be %s", "an integer");
    int64_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return api_error_set(err, 400, "invalid_request_error", k, "invalid_value",
                             "'%s' must be between %lld and %lld, got %lld", k, (long long)lo,
                             (long long)hi, (long long)x);
    *out = x;
    if (given)
        *given = true;
    return 0;
}

static int get_num(json_t *o, const char *k, double lo, double hi, double *out, api_error *err)
{
    json_t *v = api_field(o, k);
    if (!v)
        return 0;
    if (!json_is_number(v))
        return bad(err, k, "'%s' must be %s", "a number");
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return api_error_set(err, 400, "invalid_request_error", k, "invalid_value",
                             "'%s' must be between %g and %g, got %g", k, lo, hi, x);
    *out = x;
    return 0;
}

static int dup_str(const char *s, size_t n, char **out, api_error *err)
{
    char *p = malloc(n + 1);
    if (!p)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    memcpy(p, s, n);
    p[n] = '\0';
    *out = p;
    return 0;
}

static int parse_ids(json_t *arr, const char *param, api_prompt *p, api_error *err)
{
    size_t n = json_array_size(arr);
    if (n == 0)
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                             "'%s' must not be empty", param);
    if (n > (1u << 20))
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                             "'%s' has too many tokens", param);
    p->ids = malloc(n * sizeof *p->ids);
    if (!p->ids)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    p->n_ids = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(arr, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) > INT32_MAX)
            return bad(err, param, "'%s' must be %s", "a string, a list of strings or a list of token ids");
        p->ids[i] = (int32_t)json_integer_value(t);
    }
    return 0;
}

static int parse_prompt(json_t *root, api_request *r, api_error *err)
{
    json_t *p = api_field(root, "prompt");
    const char *want = "a string, a list of strings or a list of token ids";
    if (!p)
        return api_error_set(err, 400, "invalid_request_error", "prompt", "missing_required_parameter",
                             "'prompt' is required");
    if (json_is_string(p)) {
        r->prompts = calloc(1, sizeof *r->prompts);
        if (!r->prompts)
            return api_error_set(err, 500, "server_error", "", "", "out of memory");
        r->n_prompts = 1;
        return dup_str(json_string_value(p), json_string_length(p), &r->prompts[0].text, err);
    }
    if (!json_is_array(p))
        return bad(err, "prompt", "'%s' must be %s", want);
    size_t n = json_array_size(p);
    if (n == 0)
        return api_error_set(err, 400, "invalid_request_error", "prompt", "invalid_value",
                             "'prompt' must not be empty");
    json_t *first = json_array_get(p, 0);
    if (json_is_integer(first)) { /* one prompt as token ids */
        r->prompts = calloc(1, sizeof *r->prompts);
        if (!r->prompts)
            return api_error_set(err, 500, "server_error", "", "", "out of memory");
        r->n_prompts = 1;
        return parse_ids(p, "prompt", &r->prompts[0], err);
    }
    if (n > API_MAX_PROMPTS)
        return api_error_set(err, 400, "invalid_request_error", "prompt", "invalid_value",
                             "'prompt' may hold at most %d prompts", API_MAX_PROMPTS);
    r->prompts = calloc(n, sizeof *r->prompts);
    if (!r->prompts)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    r->n_prompts = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(p, i);
        int rc;
        if (json_is_string(e))
            rc = dup_str(json_string_value(e), json_string_length(e), &r->prompts[i].text, err);
        else if (json_is_array(e))
            rc = parse_ids(e, "prompt", &r->prompts[i], err);
        else
            rc = bad(err, "prompt", "'%s' must be %s", want);
        if (rc)
            return rc;
    }
    return 0;
}

/* content: string, or list of {"type":"text","text":...} parts joined. */
static int parse_content(json_t *c, char **out, api_error *err)
{
    if (!c || json_is_null(c))
        return dup_str("", 0, out, err);
    if (json_is_string(c))
        return dup_str(json_string_value(c), json_string_length(c), out, err);
    if (!json_is_array(c))
        return bad(err, "messages", "'%s' content must be %s", "a string or a list of text parts");
    size_t total = 0, i;
    json_t *part;
    json_array_foreach(c, i, part) {
        json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) || strcmp(json_string_value(type), "text") != 0 ||
            !json_is_string(text))
            return api_error_set(err, 400, "invalid_request_error", "messages", "invalid_value",
                                 "only text content parts ({\"type\":\"text\",\"text\":...}) are supported");
        total += json_string_length(text);
    }
    char *s = malloc(total + 1);
    if (!s)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    size_t off = 0;
    json_array_foreach(c, i, part) {
        json_t *text = json_object_get(part, "text");
        memcpy(s + off, json_string_value(text), json_string_length(text));
        off += json_string_length(text);
    }
    s[off] = '\0';
    *out = s;
    return 0;
}

static int parse_messages(json_t *root, api_request *r, api_error *err)
{
    json_t *m = api_field(root, "messages");
    if (!m)
        return api_error_set(err, 400, "invalid_request_error", "messages", "missing_required_parameter",
                             "'messages' is required");
    if (!json_is_array(m))
        return bad(err, "messages", "'%s' must be %s", "a list of messages");
    size_t n = json_array_size(m);
    if (n == 0)
        return api_error_set(err, 400, "invalid_request_error", "messages", "invalid_value",
                             "'messages' must not be empty");
    if (n > 4096)
        return api_error_set(err, 400, "invalid_request_error", "messages", "invalid_value",
                             "too many messages");
    r->msgs = calloc(n, sizeof *r->msgs);
    if (!r->msgs)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    r->n_msgs = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(m, i), *role = json_object_get(e, "role");
        if (!json_is_object(e) || !json_is_string(role))
            return bad(err, "messages", "'%s' items must be %s", "objects with a string 'role'");
        const char *rs = json_string_value(role);
        if (strcmp(rs, "developer") == 0)
            rs = "system";
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") && strcmp(rs, "tool"))
            return api_error_set(err, 400, "invalid_request_error", "messages", "invalid_value",
                                 "unsupported message role '%s' (system, user, assistant, tool)", rs);
        int rc = dup_str(rs, strlen(rs), &r->msgs[i].role, err);
        if (!rc)
            rc = parse_content(json_object_get(e, "content"), &r->msgs[i].content, err);
        if (!rc)
            rc = api_parse_msg_tools(e, &r->msgs[i], err);
        if (rc)
            return rc;
    }
    return 0;
}

static int parse_stop(json_t *root, api_request *r, api_error *err)
{
    json_t *s = api_field(root, "stop");
    if (!s)
        return 0;
    size_t n = json_is_string(s) ? 1 : json_array_size(s);
    if (!json_is_string(s) && !json_is_array(s))
        return bad(err, "stop", "'%s' must be %s", "a string or a list of strings");
    if (n > API_MAX_STOP)
        return api_error_set(err, 400, "invalid_request_error", "stop", "invalid_value",
                             "'stop' may hold at most %d strings", API_MAX_STOP);
    if (n == 0)
        return 0;
    r->stop = calloc(n, sizeof *r->stop);
    if (!r->stop)
        return api_error_set(err, 500, "server_error", "", "", "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_string(s) ? s : json_array_get(s, i);
        if (!json_is_string(e))
            return bad(err, "stop", "'%s' must be %s", "a string or a list of strings");
        if (json_string_length(e) == 0)
            continue; /* an empty stop string would stop at once: ignore it */
        if (dup_str(json_string_value(e), json_string_length(e), &r->stop[r->n_stop], err))
            return HY_EINVAL;
        r->n_stop++;
    }
    return 0;
}

static int parse_logprobs(json_t *root, api_request *r, api_error *err)
{
    json_t *lp = api_field(root, "logprobs");
    int64_t v = 0;
    if (r->kind == API_COMPLETION) {
        if (!lp)
            return 0;
        if (get_int(root, "logprobs", 0, API_MAX_TOP_LOGPROBS, &v, NULL, err))
            return HY_EINVAL;
        r->logprobs = true;
        r->top_logprobs = (int)v;
        return 0;
    }
    if (get_bool(root, "logprobs", &r->logprobs, err) ||
        get_int(root, "top_logprobs", 0, API_MAX_TOP_LOGPROBS, &v, NULL, err))
        return HY_EINVAL;
    r->top_logprobs = (int)v;
    if (r->top_logprobs > 0 && !r->logprobs)
        return api_error_set(err, 400, "invalid_request_error", "top_logprobs", "invalid_value",
                             "'top_logprobs' requires 'logprobs' to be true");
    return 0;
}

static int parse_sampling(json_t *root, api_request *r, api_error *err)
{
    int64_t v;
    bool given = false;
    if (get_num(root, "temperature", 0.0, 2.0, &r->temperature, err) ||
        get_num(root, "top_p", 0.0, 1.0, &r->top_p, err) ||
        get_num(root, "min_p", 0.0, 1.0, &r->min_p, err) ||
        get_num(root, "presence_penalty", -2.0, 2.0, &r->presence_penalty, err) ||
        get_num(root, "frequency_penalty", -2.0, 2.0, &r->frequency_penalty, err) ||
        get_num(root, "repetition_penalty", 1e-3, 100.0, &r->repetition_penalty, err) ||
        get_bool(root, "ignore_eos", &r->ignore_eos, err) || get_bool(root, "stream", &r->stream, err) ||
        get_bool(root, "speculative", &r->speculative, err))
        return HY_EINVAL;
    if (api_field(root, "top_p") && r->top_p <= 0.0)
        return api_error_set(err, 400, "invalid_request_error", "top_p", "invalid_value",
                             "'top_p' must be in (0, 1]");
    v = 0;
    if (get_int(root, "top_k", -1, 1 << 20, &v, NULL, err))
        return HY_EINVAL;
    r->top_k = v < 0 ? 0 : (int)v;
    if (get_int(root, "seed", INT64_MIN, INT64_MAX, &r->seed, &r->has_seed, err))
        return HY_EINVAL;
    v = 1;
    if (get_int(root, "n", 1, API_MAX_N, &v, NULL, err))
        return HY_EINVAL;
    r->n = (int)v;
    /* max_completion_tokens (newer name) wins over max_tokens when both are given. */
    given = false;
    v = -1;
    if (get_int(root, "max_tokens", 0, INT32_MAX, &v, &given, err) ||
        get_int(root, "max_completion_tokens", 0, INT32_MAX, &v, &given, err))
        return HY_EINVAL;
    r->max_tokens = given ? (int)v : -1;
    if (r->kind == API_COMPLETION && get_bool(root, "echo", &r->echo, err))
        return HY_EINVAL;
    json_t *salt = api_field(root, "cache_salt");
    if (salt && (!json_is_string(salt) || json_string_length(salt) == 0))
        return bad(err, "cache_salt", "'%s' must be %s", "a non-empty string");
    if (salt && dup_str(json_string_value(salt), json_string_length(salt), &r->cache_salt, err))
        return HY_EINVAL;
    if (r->max_tokens == 0 && !r->echo)
        return api_error_set(err, 400, "invalid_request_error",
                             api_field(root, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens",
                             "invalid_value", "'max_tokens' must be at least 1 (0 only with 'echo': true, to score the prompt)");
    json_t *so = api_field(root, "stream_options");
    if (so) {
        if (!json_is_object(so))
            return bad(err, "stream_options", "'%s' must be %s", "an object");
        if (get_bool(so, "include_usage", &r->include_usage, err))
            return api_error_set(err, 400, "invalid_request_error", "stream_options.include_usage",
                                 "invalid_type", "'stream_options.include_usage' must be a boolean");
    }
    return 0;
}

static json_t *load_object(const char *body, size_t len, api_error *err)
{
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root && json_error_code(&je) == json_error_out_of_memory) {
        api_error_set(err, 500, "server_error", "", "", "out of memory while reading the request body");
        return NULL;
    }
    if (!root) {
        api_error_set(err, 400, "invalid_request_error", "", "invalid_json",
                      "request body is not valid JSON: %s (line %d, column %d)", je.text, je.line,
                      je.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        api_error_set(err, 400, "invalid_request_error", "", "invalid_json",
                      "request body must be a JSON object");
        return NULL;
    }
    return root;
}

int api_parse_request(api_kind kind, const char *body, size_t len, api_request *r, api_error *err)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->temperature = 1.0;
    r->top_p = 1.0;
    r->speculative = true;
    r->repetition_penalty = 1.0;
    r->n = 1;
    r->max_tokens = -1;
    json_t *root = load_object(body, len, err);
    if (!root)
        return HY_EINVAL;
    int rc = 0;
    json_t *model = api_field(root, "model");
    if (model && !json_is_string(model))
        rc = bad(err, "model", "'%s' must be %s", "a string");
    else if (model)
        rc = dup_str(json_string_value(model), json_string_length(model), &r->model, err);
    if (!rc)
        rc = kind == API_COMPLETION ? parse_prompt(root, r, err) : parse_messages(root, r, err);
    if (!rc)
        rc = parse_sampling(root, r, err);
    if (!rc)
        rc = parse_stop(root, r, err);
    if (!rc)
        rc = parse_logprobs(root, r, err);
    if (!rc)
        rc = api_parse_hydra(root, &r->hydra, err);
    if (!rc)
        rc = api_parse_lora(root, &r->lora, err);
    if (!rc)
        rc = api_parse_struct(root, kind, &r->st, err);
    json_decref(root);
    if (rc) {
        api_request_free(r);
        return HY_EINVAL;
    }
    return 0;
}

void api_request_free(api_request *r)
{
    if (!r)
        return;
    free(r->model);
    free(r->cache_salt);
    api_lora_free(&r->lora);
    for (int i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    for (int i = 0; i < r->n_msgs; i++) {
        free(r->msgs[i].role);
        free(r->msgs[i].content);
        free(r->msgs[i].tool_calls);
        free(r->msgs[i].tool_call_id);
    }
    api_struct_free(&r->st);
    free(r->msgs);
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    memset(r, 0, sizeof *r);
}

static int get_req_str(json_t *root, const char *k, char **out, bool required, api_error *err)
{
    json_t *v = api_field(root, k);
    if (!v) {
        if (!required)
            return 0;
        return api_error_set(err, 400, "invalid_request_error", k, "missing_required_parameter",
                             "'%s' is required", k);
    }
    if (!json_is_string(v) || json_string_length(v) == 0)
        return bad(err, k, "'%s' must be %s", "a non-empty string");
    if (strlen(json_string_value(v)) != json_string_length(v))
        return bad(err, k, "'%s' must be %s", "a string without NUL bytes");
    return dup_str(json_string_value(v), json_string_length(v), out, err);
}

int api_parse_load_lora(const char *body, size_t len, char **name, char **path, char **sha256, bool *pinned,
                        api_error *err)
{
    *name = *path = *sha256 = NULL;
    bool pin = false;
    json_t *root = load_object(body, len, err);
    if (!root)
        return HY_EINVAL;
    int rc = get_req_str(root, "lora_name", name, true, err);
    if (!rc)
        rc = get_req_str(root, "lora_path", path, true, err);
    if (!rc)
        rc = get_req_str(root, "sha256", sha256, false, err);
    if (!rc)
        rc = get_bool(root, "pinned", &pin, err);
    if (pinned)
        *pinned = pin;
    json_decref(root);
    if (rc) {
        free(*name);
        free(*path);
        free(*sha256);
        *name = *path = *sha256 = NULL;
        return HY_EINVAL;
    }
    return 0;
}

int api_parse_unload_lora(const char *body, size_t len, char **name, api_error *err)
{
    *name = NULL;
    json_t *root = load_object(body, len, err);
    if (!root)
        return HY_EINVAL;
    int rc = get_req_str(root, "lora_name", name, true, err);
    json_decref(root);
    return rc ? HY_EINVAL : 0;
}

/* ---- formatting ---- */

static json_t *jstr_n(const char *s, size_t n)
{
    /* Token text can be a partial UTF-8 sequence; jansson refuses invalid UTF-8, so fall back
     * to a lossy copy with U+FFFD for bad bytes. */
    json_t *j = json_stringn(s ? s : "", s ? n : 0);
    if (j)
        return j;
    char *buf = malloc(n * 3 + 1);
    if (!buf)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        json_t *probe = len && i + (size_t)len <= n ? json_stringn(s + i, (size_t)len) : NULL;
        if (probe) {
            memcpy(buf + o, s + i, (size_t)len);
            o += (size_t)len;
            i += (size_t)len;
            json_decref(probe);
        } else {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    j = json_stringn(buf, o);
    free(buf);
    return j;
}

static json_t *jstr(const char *s)
{
    return jstr_n(s, s ? strlen(s) : 0);
}

static json_t *usage_json(const api_usage *u)
{
    json_t *o = json_object();
    json_object_set_new(o, "prompt_tokens", json_integer(u->prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(u->completion_tokens));
    json_object_set_new(o, "total_tokens", json_integer(u->prompt_tokens + u->completion_tokens));
    json_object_set_new(o, "prompt_tokens_details", json_pack("{s:i}", "cached_tokens", u->cached_tokens));
    return o;
}

static json_t *bytes_json(const char *s)
{
    json_t *a = json_array();
    for (const unsigned char *p = (const unsigned char *)s; p && *p; p++)
        json_array_append_new(a, json_integer(*p));
    return a;
}

/* Completions: {"tokens","token_logprobs","top_logprobs":[{tok:lp}],"text_offset"} */
static json_t *lp_completion(const api_choice *c)
{
    json_t *o = json_object(), *toks = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    size_t off = c->lp_offset;
    for (int i = 0; i < c->n_lp; i++) {
        const api_tokenlp *t = &c->lp[i];
        json_array_append_new(toks, jstr(t->token));
        json_array_append_new(lps, t->none ? json_null() : json_real(t->logprob));
        if (t->none) { /* the first prompt token: nothing before it to predict it from */
            json_array_append_new(tops, json_null());
            json_array_append_new(offs, json_integer((json_int_t)off));
            off += t->token ? strlen(t->token) : 0;
            continue;
        }
        json_t *top = json_object();
        for (int k = 0; k < t->n_top; k++) {
            json_t *key = jstr(t->top_token[k]);
            json_object_set_new(top, key ? json_string_value(key) : "", json_real(t->top_logprob[k]));
            json_decref(key);
        }
        json_array_append_new(tops, top);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += t->token ? strlen(t->token) : 0;
    }
    json_object_set_new(o, "tokens", toks);
    json_object_set_new(o, "token_logprobs", lps);
    json_object_set_new(o, "top_logprobs", tops);
    json_object_set_new(o, "text_offset", offs);
    return o;
}

/* Chat: {"content":[{"token","logprob","bytes","top_logprobs":[{"token","logprob","bytes"}]}]} */
static json_t *lp_chat(const api_choice *c)
{
    json_t *o = json_object(), *content = json_array();
    for (int i = 0; i < c->n_lp; i++) {
        const api_tokenlp *t = &c->lp[i];
        json_t *e = json_object(), *tops = json_array();
        json_object_set_new(e, "token", jstr(t->token));
        json_object_set_new(e, "logprob", json_real(t->logprob));
        json_object_set_new(e, "bytes", bytes_json(t->token));
        for (int k = 0; k < t->n_top; k++) {
            json_t *x = json_object();
            json_object_set_new(x, "token", jstr(t->top_token[k]));
            json_object_set_new(x, "logprob", json_real(t->top_logprob[k]));
            json_object_set_new(x, "bytes", bytes_json(t->top_token[k]));
            json_array_append_new(tops, x);
        }
        json_object_set_new(e, "top_logprobs", tops);
        json_array_append_new(content, e);
    }
    json_object_set_new(o, "content", content);
    return o;
}

/* Numbers in responses are float32 values (logprobs, router gates): 9 significant digits give
 * every float32 back exactly without printing a double's 17. */
#define API_REAL_DIGITS JSON_REAL_PRECISION(9)

static json_t *choice_json(api_kind kind, const api_choice *c, bool want_lp, bool stream, bool role)
{
    json_t *o = json_object();
    json_object_set_new(o, "index", json_integer(c->index));
    json_t *text = jstr_n(c->text, c->text ? c->text_len : 0);
    if (kind == API_COMPLETION) {
        json_object_set_new(o, "text", text);
    } else {
        json_t *m = json_object();
        if (!stream || role)
            json_object_set_new(m, "role", json_string("assistant"));
        if (stream && !role && c->text_len == 0 && (c->finish_reason || c->n_calls))
            json_decref(text); /* the final chunk carries an empty delta */
        else if (c->n_calls && c->text_len == 0)
            json_object_set_new(m, "content", (json_decref(text), json_null()));
        else
            json_object_set_new(m, "content", text);
        if (c->n_calls)
            json_object_set_new(m, "tool_calls", api_tool_calls_json(c, stream));
        json_object_set_new(o, stream ? "delta" : "message", m);
    }
    if (want_lp && (c->n_lp > 0 || !stream))
        json_object_set_new(o, "logprobs", kind == API_COMPLETION ? lp_completion(c) : lp_chat(c));
    else
        json_object_set_new(o, "logprobs", json_null());
    json_object_set_new(o, "finish_reason", c->finish_reason ? json_string(c->finish_reason) : json_null());
    if (c->router)
        json_object_set_new(o, "hydra", api_router_json(c->router));
    return o;
}

static json_t *envelope(api_kind kind, const char *id, int64_t created, const char *model, bool chunk)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "object",
                        json_string(kind == API_COMPLETION ? "text_completion"
                                    : chunk                ? "chat.completion.chunk"
                                                           : "chat.completion"));
    json_object_set_new(o, "created", json_integer(created));
    json_object_set_new(o, "model", jstr(model));
    json_object_set_new(o, "system_fingerprint", json_null());
    return o;
}

char *api_format_response(api_kind kind, const char *id, int64_t created, const char *model,
                          const api_choice *choices, int n_choices, const api_usage *usage,
                          bool want_logprobs)
{
    json_t *o = envelope(kind, id, created, model, false), *arr = json_array();
    for (int i = 0; i < n_choices; i++)
        json_array_append_new(arr, choice_json(kind, &choices[i], want_logprobs, false, false));
    json_object_set_new(o, "choices", arr);
    json_object_set_new(o, "usage", usage_json(usage));
    char *s = json_dumps(o, JSON_COMPACT | API_REAL_DIGITS);
    json_decref(o);
    return s;
}

static char *sse_wrap(json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT | API_REAL_DIGITS);
    json_decref(o);
    if (!s)
        return NULL;
    size_t n = strlen(s);
    char *out = malloc(n + 9);
    if (out) {
        memcpy(out, "data: ", 6);
        memcpy(out + 6, s, n);
        memcpy(out + 6 + n, "\n\n", 3);
    }
    free(s);
    return out;
}

char *api_format_chunk(api_kind kind, const char *id, int64_t created, const char *model,
                       const api_choice *c, bool role_first, bool want_logprobs, bool usage_null)
{
    json_t *o = envelope(kind, id, created, model, true), *arr = json_array();
    json_array_append_new(arr, choice_json(kind, c, want_logprobs, true, role_first));
    json_object_set_new(o, "choices", arr);
    if (usage_null)
        json_object_set_new(o, "usage", json_null());
    return sse_wrap(o);
}

char *api_format_usage_chunk(api_kind kind, const char *id, int64_t created, const char *model,
                             const api_usage *usage)
{
    json_t *o = envelope(kind, id, created, model, true);
    json_object_set_new(o, "choices", json_array());
    json_object_set_new(o, "usage", usage_json(usage));
    return sse_wrap(o);
}

const char *api_sse_done(void) { return "data: [DONE]\n\n"; }

char *api_format_models(const api_model_entry *m, int n)
{
    json_t *o = json_object(), *arr = json_array();
    json_object_set_new(o, "object", json_string("list"));
    for (int i = 0; i < n; i++) {
        json_t *e = json_object();
        json_object_set_new(e, "id", jstr(m[i].id));
        json_object_set_new(e, "object", json_string("model"));
        json_object_set_new(e, "created", json_integer(m[i].created));
        json_object_set_new(e, "owned_by", json_string("hydrad"));
        json_object_set_new(e, "root", jstr(m[i].root ? m[i].root : m[i].id));
        json_object_set_new(e, "parent", m[i].parent ? jstr(m[i].parent) : json_null());
        json_array_append_new(arr, e);
    }
    json_object_set_new(o, "data", arr);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}
