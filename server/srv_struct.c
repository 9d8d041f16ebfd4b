/* srv_struct.c - structured outputs and tools for the HTTP side: grammar text for each kind of
 * constraint, the compiled-grammar LRU, the tool prompt, and the tool-call scanner. No engine
 * calls but compiling grammars; no sockets.
 *
 * Tool calls use one generic format whatever the model: the system message lists the tools as
 * JSON inside <tools></tools> and asks for calls as
 *     <tool_call>[{"name":"NAME","arguments":{...}}]</tool_call>
 * (the shape SmolLM2's own tool-calling data uses). With tool_choice required or a named function
 * decoding is constrained to exactly that, arguments by the function's parameters schema; with
 * auto the answer may be any text, or that call (constrained from its first byte). */
#include "server/srv_struct.h"

#include "engine/gram_schema.h"
#include "engine/hy.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------- compiled grammars, LRU by text ---------- */

typedef struct {
    char *text;
    uint64_t hash;
    gram *g;
    uint64_t used;
} gentry;

struct srv_gcache {
    pthread_mutex_t mu;
    gentry *e;
    int n, cap;
    uint64_t clock;
};

int srv_gcache_create(int cap, srv_gcache **out)
{
    srv_gcache *gc = calloc(1, sizeof *gc);
    if (!gc || !(gc->e = calloc((size_t)cap, sizeof *gc->e))) {
        free(gc);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&gc->mu, NULL);
    gc->cap = cap;
    *out = gc;
    return HY_OK;
}

void srv_gcache_free(srv_gcache *gc)
{
    if (!gc)
        return;
    for (int i = 0; i < gc->n; i++) {
        free(gc->e[i].text);
        gram_release(gc->e[i].g);
    }
    free(gc->e);
    pthread_mutex_destroy(&gc->mu);
    free(gc);
}

static uint64_t fnv(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* A compiled grammar for text (one reference for the caller), from the cache or compiled now
 * (outside the lock) and added, evicting the least recently used. */
static int gcache_get(srv_gcache *gc, const char *text, gram **out, char *err, size_t errlen)
{
    uint64_t h = fnv(text);
    pthread_mutex_lock(&gc->mu);
    for (int i = 0; i < gc->n; i++)
        if (gc->e[i].hash == h && !strcmp(gc->e[i].text, text) && !gram_spent(gc->e[i].g)) {
            gc->e[i].used = ++gc->clock;
            gram_retain(gc->e[i].g);
            *out = gc->e[i].g;
            pthread_mutex_unlock(&gc->mu);
            return HY_OK;
        }
    pthread_mutex_unlock(&gc->mu);
    gram *g;
    int rc = gram_compile(text, strlen(text), &g, err, errlen);
    if (rc)
        return rc;
    char *copy = strdup(text);
    if (!copy) {
        gram_release(g);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    pthread_mutex_lock(&gc->mu);
    int slot = gc->n;
    if (gc->n == gc->cap) {
        slot = 0;
        for (int i = 1; i < gc->n; i++)
            if (gc->e[i].used < gc->e[slot].used)
                slot = i;
        free(gc->e[slot].text);
        gram_release(gc->e[slot].g); /* requests still running keep their own references */
    } else {
        gc->n++;
    }
    gram_retain(g);
    gc->e[slot] = (gentry){copy, h, g, ++gc->clock};
    pthread_mutex_unlock(&gc->mu);
    *out = g;
    return HY_OK;
}

/* ---------- grammar text of each constraint ---------- */

static const char k_open[] = "<tool_call>[";

static int schema_gbnf(const char *schema_text, const char *param, bool ws, char **gbnf, api_error *e)
{
    json_error_t je;
    json_t *schema = json_loads(schema_text, JSON_DECODE_ANY, &je);
    if (!schema)
        return api_error_set(e, 400, "invalid_request_error", param, "invalid_value", "the schema is not JSON");
    gram_json_opts o = {ws};
    gram_schema_err se;
    memset(&se, 0, sizeof se);
    int rc = gram_schema_gbnf(schema, &o, gbnf, &se);
    json_decref(schema);
    if (rc == HY_ENOMEM)
        return api_error_set(e, 500, "server_error", "", "", "out of memory");
    if (rc)
        return api_error_set(e, 400, "invalid_request_error", param, "invalid_value", "%s (at JSON pointer '%s')",
                             se.message, se.pointer);
    return HY_OK;
}

/* Text that does not start with the tool-call opening: for each proper prefix of it, the prefix
 * then a different character (then anything), or the prefix alone. */
static void plain_text_rules(char *buf, size_t cap)
{
    size_t w = (size_t)snprintf(buf, cap, "plain ::= \"\"");
    size_t n = strlen(k_open);
    for (size_t k = 0; k < n && w < cap; k++)
        w += (size_t)snprintf(buf + w, cap - w, " | \"%.*s\" ([^%s%c] any)?", (int)k, k_open,
                              k_open[k] == '[' ? "\\" : "", k_open[k]);
    if (w < cap)
        snprintf(buf + w, cap - w, "\nany ::= .*\n");
}

static int tools_gbnf(const api_struct *st, char **gbnf, api_error *e)
{
    size_t cap = 4096, w = 0;
    char *out = malloc(cap), *part = NULL;
    int rc = HY_OK;
#define EMIT(...)                                                                          \
    do {                                                                                   \
        int need_ = snprintf(NULL, 0, __VA_ARGS__);                                       \
        if (w + (size_t)need_ + 1 > cap) {                                                \
            cap = (w + (size_t)need_ + 1) * 2;                                            \
            char *p_ = realloc(out, cap);                                                  \
            if (!p_)                                                                       \
                goto nomem;                                                                \
            out = p_;                                                                      \
        }                                                                                  \
        w += (size_t)snprintf(out + w, cap - w, __VA_ARGS__);                             \
    } while (0)
    if (!out)
        goto nomem;
    out[0] = 0;
    if (st->tool_choice == API_TC_AUTO)
        EMIT("root ::= calls | plain\n");
    else
        EMIT("root ::= calls\n");
    EMIT("calls ::= \"<tool_call>\\[\" call %s \"]</tool_call>\"\ncall ::= ", st->parallel_tool_calls ? "(\",\" call)*" : "");
    for (int i = 0, first = 1; i < st->n_tools; i++) {
        if (st->tool_choice == API_TC_NAMED && i != st->tool_named)
            continue;
        EMIT("%st%d", first ? "" : " | ", i);
        first = 0;
    }
    EMIT("\n");
    for (int i = 0; i < st->n_tools; i++) {
        if (st->tool_choice == API_TC_NAMED && i != st->tool_named)
            continue;
        char param[64], prefix[32];
        snprintf(param, sizeof param, "tools[%d].function.parameters", i);
        snprintf(prefix, sizeof prefix, "t%d-", i);
        char *schema = NULL;
        if ((rc = schema_gbnf(st->tools[i].parameters, param, false, &schema, e)))
            goto fail;
        rc = gram_gbnf_prefix(schema, prefix, &part);
        free(schema);
        if (rc)
            goto nomem;
        EMIT("t%d ::= \"{\\\"name\\\":\\\"%s\\\",\\\"arguments\\\":\" t%d-root \"}\"\n%s\n", i, st->tools[i].name, i, part);
        free(part);
        part = NULL;
    }
    if (st->tool_choice == API_TC_AUTO) {
        char plain[1024];
        plain_text_rules(plain, sizeof plain);
        EMIT("%s", plain);
    }
#undef EMIT
    *gbnf = out;
    return HY_OK;
nomem:
    rc = api_error_set(e, 500, "server_error", "", "", "out of memory");
fail:
    free(part);
    free(out);
    return rc;
}

static int constraint_gbnf(const api_request *ar, bool ws, char **gbnf, api_error *e)
{
    const api_struct *st = &ar->st;
    *gbnf = NULL;
    if (st->tool_choice != API_TC_NONE && ar->kind == API_CHAT)
        return tools_gbnf(st, gbnf, e);
    gram_json_opts o = {ws};
    switch (st->rf) {
    case API_RF_TEXT:
        return HY_OK;
    case API_RF_JSON_OBJECT:
        return gram_json_object_gbnf(&o, gbnf) ? api_error_set(e, 500, "server_error", "", "", "out of memory") : HY_OK;
    case API_RF_JSON_SCHEMA:
        return schema_gbnf(st->schema, st->param, ws, gbnf, e);
    case API_RF_GRAMMAR:
        return (*gbnf = strdup(st->grammar)) ? HY_OK : api_error_set(e, 500, "server_error", "", "", "out of memory");
    }
    return HY_OK;
}

int srv_struct_constraint(srv_gcache *gc, const api_request *ar, int n_vocab, bool ws_flexible, smp_constraint **out,
                          api_error *e)
{
    *out = NULL;
    const api_struct *st = &ar->st;
    for (int i = 0; i < st->n_bias; i++)
        if (st->bias_id[i] >= n_vocab)
            return api_error_set(e, 400, "invalid_request_error", "logit_bias", "invalid_value",
                                 "'logit_bias' token %d is out of the vocabulary (%d)", st->bias_id[i], n_vocab);
    char *text;
    int rc = constraint_gbnf(ar, ws_flexible, &text, e);
    if (rc)
        return rc;
    gram *g = NULL;
    if (text) {
        char err[300];
        rc = gcache_get(gc, text, &g, err, sizeof err);
        free(text);
        if (rc == HY_ENOMEM)
            return api_error_set(e, 500, "server_error", "", "", "out of memory");
        if (rc)
            return api_error_set(e, 400, "invalid_request_error", st->tool_choice != API_TC_NONE ? "tools" : st->param,
                                 "invalid_value", "%s", err);
    }
    if (!g && !st->n_bias)
        return HY_OK;
    rc = smp_constraint_create(g, st->bias_id, st->bias, st->n_bias, out);
    gram_release(g);
    return rc ? api_error_set(e, 500, "server_error", "", "", "out of memory") : HY_OK;
}

/* ---------- the tool prompt ---------- */

static char *tools_system_text(const api_struct *st, const char *base)
{
    json_t *arr = json_array();
    for (int i = 0; i < st->n_tools; i++) {
        json_t *fn = json_object(), *t = json_object();
        json_object_set_new(fn, "name", json_string(st->tools[i].name));
        if (st->tools[i].description)
            json_object_set_new(fn, "description", json_string(st->tools[i].description));
        json_object_set_new(fn, "parameters", json_loads(st->tools[i].parameters, JSON_DECODE_ANY, NULL));
        json_object_set_new(t, "type", json_string("function"));
        json_object_set_new(t, "function", fn);
        json_array_append_new(arr, t);
    }
    char *list = json_dumps(arr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(arr);
    if (!list)
        return NULL;
    const char *fmt = "%s%s"
                      "You can call functions. Their signatures, as JSON, are inside <tools></tools>:\n"
                      "<tools>%s</tools>\n"
                      "To call one or more of them, answer with nothing but\n"
                      "<tool_call>[{\"name\":\"<function name>\",\"arguments\":<arguments as a JSON object>}]</tool_call>\n"
                      "A function's result comes back inside <tool_response></tool_response>.";
    size_t n = strlen(base) + strlen(list) + strlen(fmt) + 8;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, fmt, base, base[0] ? "\n\n" : "", list);
    free(list);
    return s;
}

void srv_tools_msgs_free(tok_msg *msgs, char **owned, int n_owned)
{
    for (int i = 0; i < n_owned; i++)
        free(owned[i]);
    free(owned);
    free(msgs);
}

static char *join3(const char *a, const char *b, const char *c)
{
    size_t n = strlen(a) + strlen(b) + strlen(c) + 1;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s%s%s", a, b, c);
    return s;
}

int srv_tools_msgs(const api_request *ar, tok_msg **msgs_out, char ***owned_out, int *n_owned)
{
    const api_struct *st = &ar->st;
    bool tools = st->tool_choice != API_TC_NONE;
    bool sys_first = ar->n_msgs > 0 && !strcmp(ar->msgs[0].role, "system");
    int n = ar->n_msgs + (tools && !sys_first);
    tok_msg *msgs = calloc((size_t)n, sizeof *msgs);
    char **owned = calloc((size_t)n + 1, sizeof *owned);
    int no = 0, k = 0;
    if (!msgs || !owned)
        goto nomem;
    if (tools && !sys_first) {
        if (!(owned[no] = tools_system_text(st, "")))
            goto nomem;
        msgs[k++] = (tok_msg){"system", owned[no++]};
    }
    for (int i = 0; i < ar->n_msgs; i++) {
        const api_msg *m = &ar->msgs[i];
        tok_msg t = {m->role, m->content};
        char *s = NULL;
        if (tools && i == 0 && sys_first) {
            s = tools_system_text(st, m->content);
        } else if (m->tool_calls) {
            char *call = join3("<tool_call>", m->tool_calls, "</tool_call>");
            s = m->content[0] && call ? join3(m->content, "\n", call) : call;
            if (s != call)
                free(call);
        } else if (!strcmp(m->role, "tool")) {
            s = join3("<tool_response>\n", m->content, "\n</tool_response>");
            t.role = "user";
        } else {
            msgs[k++] = t;
            continue;
        }
        if (!s)
            goto nomem;
        owned[no++] = s;
        t.content = s;
        msgs[k++] = t;
    }
    *msgs_out = msgs;
    *owned_out = owned;
    *n_owned = no;
    return k;
nomem:
    srv_tools_msgs_free(msgs, owned, no);
    return hy_err_set(HY_ENOMEM, "out of memory");
}

/* ---------- reading tool calls back ---------- */

enum { T_HEAD, T_OPEN, T_NAME, T_KEY, T_ARGS, T_CLOSE, T_SEP, T_TAIL, T_DONE, T_BAD };
static const char *const k_lit[] = {
    [T_HEAD] = "<tool_call>[", [T_OPEN] = "{\"name\":\"", [T_KEY] = ",\"arguments\":", [T_CLOSE] = "}",
    [T_TAIL] = "</tool_call>",
};

void srv_toolscan_init(srv_toolscan *ts, const char *id_base, int choice)
{
    memset(ts, 0, sizeof *ts);
    for (int i = 0; i < SRV_MAX_CALLS; i++)
        snprintf(ts->id[i], sizeof ts->id[i], "call_%.24s_%d_%d", id_base, choice, i);
}

static void scan_byte(srv_toolscan *ts, char c, size_t at)
{
    int k = ts->n_calls - 1;
    switch (ts->state) {
    case T_HEAD: case T_OPEN: case T_KEY: case T_CLOSE: case T_TAIL: {
        const char *lit = k_lit[ts->state];
        if (c != lit[ts->lit]) {
            ts->state = T_BAD;
            return;
        }
        if (lit[++ts->lit])
            return;
        ts->lit = 0;
        if (ts->state == T_OPEN) {
            if (ts->n_calls == SRV_MAX_CALLS) {
                ts->state = T_BAD;
                return;
            }
            ts->name_at[ts->n_calls] = at + 1;
            ts->state = T_NAME;
        } else {
            ts->state = ts->state == T_HEAD ? T_OPEN : ts->state == T_KEY ? T_ARGS : ts->state == T_CLOSE ? T_SEP : T_DONE;
            if (ts->state == T_ARGS) {
                ts->args_at[k] = at + 1;
                ts->depth = 0;
                ts->in_str = ts->esc = false;
            }
            ts->complete = ts->state == T_DONE;
        }
        return;
    }
    case T_NAME:
        if (c == '"') {
            ts->name_len[ts->n_calls] = at - ts->name_at[ts->n_calls];
            ts->name[ts->n_calls][0] = 0; /* filled by scan() from the text */
            ts->n_calls++;
            ts->state = T_KEY;
        }
        return;
    case T_ARGS:
        if (ts->esc)
            ts->esc = false;
        else if (ts->in_str && c == '\\')
            ts->esc = true;
        else if (ts->in_str && c == '"')
            ts->in_str = false;
        else if (ts->in_str)
            ;
        else if (c == '"') {
            ts->in_str = true;
            ts->esc = false;
        } else if (c == '{' || c == '[') {
            ts->depth++;
        } else if ((c == '}' || c == ']') && ts->depth > 0) {
            ts->depth--;
        } else if (c == '}' && ts->depth == 0) { /* the call object closes */
            ts->state = T_CLOSE;
            scan_byte(ts, c, at);
            return;
        }
        ts->args_len[k] = at + 1 - ts->args_at[k];
        return;
    case T_SEP:
        ts->state = c == ',' ? T_OPEN : c == ']' ? T_TAIL : T_BAD;
        return;
    default:
        if (ts->state == T_DONE && c != '\0')
            ts->state = T_BAD; /* text after the closing tag */
        return;
    }
}

static void scan(srv_toolscan *ts, const char *text, size_t len)
{
    for (; ts->pos < len && ts->state != T_BAD; ts->pos++) {
        int had = ts->n_calls;
        scan_byte(ts, text[ts->pos], ts->pos);
        if (ts->n_calls > had)
            snprintf(ts->name[had], sizeof ts->name[had], "%.*s", (int)ts->name_len[had], text + ts->name_at[had]);
    }
    if (ts->state == T_BAD) {
        ts->is_text = true;
        ts->complete = false;
    }
}

void srv_toolscan_whole(srv_toolscan *ts, const char *text, size_t len, api_choice *c)
{
    scan(ts, text, len);
    if (!ts->complete)
        return; /* content as it is: plain text, or a call cut short */
    for (int i = 0; i < ts->n_calls; i++)
        ts->out[i] = (api_tool_call){i, ts->id[i], ts->name[i], text + ts->args_at[i], ts->args_len[i]};
    c->n_calls = ts->n_calls;
    c->calls = ts->out;
    c->text = "";
    c->text_len = 0;
    c->finish_reason = "tool_calls";
}

void srv_toolscan_stream(srv_toolscan *ts, const char *text, size_t len, bool done, api_choice *c)
{
    scan(ts, text, len);
    c->n_calls = 0;
    c->calls = ts->out;
    c->text = "";
    c->text_len = 0;
    if (ts->is_text || (done && !ts->complete && ts->n_calls == 0)) {
        ts->is_text = true;
        c->text = text + ts->text_sent;
        c->text_len = len - ts->text_sent;
        ts->text_sent = len;
        return;
    }
    int n = 0;
    for (int i = 0; i < ts->n_calls; i++) {
        if (i >= ts->named) {
            ts->out[n++] = (api_tool_call){i, ts->id[i], ts->name[i], "", 0};
            ts->named = i + 1;
        }
        if (ts->args_len[i] > ts->args_sent[i]) {
            ts->out[n++] = (api_tool_call){i, NULL, NULL, text + ts->args_at[i] + ts->args_sent[i],
                                           ts->args_len[i] - ts->args_sent[i]};
            ts->args_sent[i] = ts->args_len[i];
        }
    }
    c->n_calls = n;
    if (done && ts->complete)
        c->finish_reason = "tool_calls";
}
