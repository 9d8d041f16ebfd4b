/* api_struct.c - request fields for structured outputs and tools, as OpenAI (and vLLM, llama.cpp's
 * server for `grammar`) define them, and the tool_calls of responses. Shapes and limits only: the
 * server compiles schemas and grammars. No engine, no I/O. */
#include "api/api_struct.h"

#include "engine/hy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GRAMMAR_TEXT (256 * 1024)

static int oom(api_error *err) { return api_error_set(err, 500, "server_error", "", "", "out of memory"); }

static int invalid(api_error *err, const char *param, const char *msg)
{
    return api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "%s", msg);
}

/* Compact JSON text of v, or NULL (err filled). */
static char *dump(json_t *v, api_error *err)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);
    if (!s)
        oom(err);
    return s;
}

/* Parameters that change the output and that hydrad does not implement: refused, never ignored.
 * (`user`, `metadata`, `store`, `service_tier` change nothing and stay ignored.) */
static int refuse_unsupported(json_t *root, api_kind kind, api_error *err)
{
    static const char *const always[] = {
        "functions", "function_call", "prediction", "audio", "modalities", "web_search_options",
        "reasoning_effort", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "structured_outputs", "min_tokens", "stop_token_ids", "bad_words", "allowed_token_ids",
    };
    for (size_t i = 0; i < sizeof always / sizeof *always; i++)
        if (api_field(root, always[i]))
            return api_error_set(err, 400, "invalid_request_error", always[i], "unsupported_parameter",
                                 "'%s' is not supported by this server", always[i]);
    if (kind == API_COMPLETION) {
        json_t *v;
        if ((v = api_field(root, "suffix")) && !(json_is_string(v) && json_string_length(v) == 0))
            return api_error_set(err, 400, "invalid_request_error", "suffix", "unsupported_parameter",
                                 "'suffix' is not supported by this server");
        if ((v = api_field(root, "best_of")) && !(json_is_integer(v) && json_integer_value(v) == 1))
            return api_error_set(err, 400, "invalid_request_error", "best_of", "unsupported_parameter",
                                 "'best_of' other than 1 is not supported by this server");
        if (api_field(root, "tools") || api_field(root, "tool_choice"))
            return api_error_set(err, 400, "invalid_request_error", api_field(root, "tools") ? "tools" : "tool_choice",
                                 "unsupported_parameter", "tools belong to /v1/chat/completions");
    }
    return 0;
}

static int parse_response_format(json_t *root, api_struct *st, api_error *err)
{
    json_t *rf = api_field(root, "response_format");
    if (!rf)
        return 0;
    json_t *type = json_object_get(rf, "type");
    if (!json_is_object(rf) || !json_is_string(type))
        return api_error_set(err, 400, "invalid_request_error", "response_format", "invalid_type",
                             "'response_format' must be an object with a string 'type'");
    const char *t = json_string_value(type);
    st->param = "response_format";
    if (!strcmp(t, "text"))
        return 0;
    if (!strcmp(t, "json_object")) {
        st->rf = API_RF_JSON_OBJECT;
        return 0;
    }
    if (strcmp(t, "json_schema"))
        return invalid(err, "response_format.type", "'response_format.type' must be 'text', 'json_object' or 'json_schema'");
    json_t *js = json_object_get(rf, "json_schema");
    if (!json_is_object(js))
        return api_error_set(err, 400, "invalid_request_error", "response_format.json_schema",
                             "missing_required_parameter", "'response_format.json_schema' must be an object");
    json_t *name = json_object_get(js, "name"), *schema = api_field(js, "schema");
    if (name && !json_is_string(name))
        return invalid(err, "response_format.json_schema.name", "'response_format.json_schema.name' must be a string");
    if (!schema)
        return api_error_set(err, 400, "invalid_request_error", "response_format.json_schema.schema",
                             "missing_required_parameter", "'response_format.json_schema.schema' is required");
    if (!json_is_object(schema) && !json_is_boolean(schema))
        return invalid(err, "response_format.json_schema.schema", "'response_format.json_schema.schema' must be a JSON Schema object");
    st->rf = API_RF_JSON_SCHEMA;
    st->param = "response_format.json_schema.schema";
    return (st->schema = dump(schema, err)) ? 0 : HY_ENOMEM;
}

static int parse_grammar(json_t *root, api_struct *st, api_error *err)
{
    json_t *g = api_field(root, "grammar");
    if (!g)
        return 0;
    if (!json_is_string(g) || json_string_length(g) == 0 || strlen(json_string_value(g)) != json_string_length(g))
        return api_error_set(err, 400, "invalid_request_error", "grammar", "invalid_type",
                             "'grammar' must be a non-empty GBNF string");
    if (json_string_length(g) > MAX_GRAMMAR_TEXT)
        return invalid(err, "grammar", "'grammar' is longer than 256 KiB");
    if (st->rf != API_RF_TEXT)
        return invalid(err, "grammar", "give either 'grammar' or a JSON 'response_format', not both");
    st->rf = API_RF_GRAMMAR;
    st->param = "grammar";
    return (st->grammar = strdup(json_string_value(g))) ? 0 : oom(err);
}

static int parse_logit_bias(json_t *root, api_struct *st, api_error *err)
{
    json_t *lb = api_field(root, "logit_bias");
    if (!lb)
        return 0;
    if (!json_is_object(lb))
        return api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_type",
                             "'logit_bias' must be an object mapping token ids to numbers");
    size_t n = json_object_size(lb);
    if (n > API_MAX_BIAS)
        return invalid(err, "logit_bias", "'logit_bias' has more than 1024 entries");
    st->bias_id = malloc((n + 1) * sizeof *st->bias_id);
    st->bias = malloc((n + 1) * sizeof *st->bias);
    if (!st->bias_id || !st->bias)
        return oom(err);
    const char *key;
    json_t *v;
    json_object_foreach(lb, key, v) {
        char *end;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || id > INT32_MAX)
            return api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_value",
                                 "'logit_bias' key '%.40s' is not a token id", key);
        if (!json_is_number(v) || json_number_value(v) < -100 || json_number_value(v) > 100)
            return api_error_set(err, 400, "invalid_request_error", "logit_bias", "invalid_value",
                                 "'logit_bias' values must be numbers between -100 and 100 (token %ld)", id);
        st->bias_id[st->n_bias] = (int32_t)id;
        st->bias[st->n_bias++] = (float)json_number_value(v);
    }
    return 0;
}

static bool tool_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_' || s[i] == '-'))
            return false;
    return true;
}

static int parse_tool(json_t *t, size_t i, api_tool *out, api_error *err)
{
    char param[64];
    snprintf(param, sizeof param, "tools[%zu]", i);
    json_t *type = json_object_get(t, "type"), *fn = json_object_get(t, "function");
    if (!json_is_object(t) || !json_is_string(type) || strcmp(json_string_value(type), "function") || !json_is_object(fn))
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                             "%s must be {\"type\": \"function\", \"function\": {...}}", param);
    json_t *name = json_object_get(fn, "name"), *desc = api_field(fn, "description"), *params = api_field(fn, "parameters");
    if (!json_is_string(name) || !tool_name_ok(json_string_value(name)))
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_value",
                             "%s.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -", param);
    if (desc && !json_is_string(desc))
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_type",
                             "%s.function.description must be a string", param);
    if (params && !json_is_object(params))
        return api_error_set(err, 400, "invalid_request_error", param, "invalid_type",
                             "%s.function.parameters must be a JSON Schema object", param);
    if (!(out->name = strdup(json_string_value(name))) || (desc && !(out->description = strdup(json_string_value(desc)))))
        return oom(err);
    if (params)
        return (out->parameters = dump(params, err)) ? 0 : HY_ENOMEM;
    /* no parameters: the function takes none */
    return (out->parameters = strdup("{\"type\":\"object\",\"properties\":{},\"additionalProperties\":false}")) ? 0 : oom(err);
}

static int parse_tool_choice(json_t *root, api_struct *st, api_error *err)
{
    json_t *tc = api_field(root, "tool_choice");
    st->tool_choice = st->n_tools ? API_TC_AUTO : API_TC_NONE;
    if (!tc)
        return 0;
    if (json_is_string(tc)) {
        const char *s = json_string_value(tc);
        if (!strcmp(s, "none"))
            st->tool_choice = API_TC_NONE;
        else if (!strcmp(s, "auto"))
            st->tool_choice = st->n_tools ? API_TC_AUTO : API_TC_NONE;
        else if (!strcmp(s, "required"))
            st->tool_choice = API_TC_REQUIRED;
        else
            return invalid(err, "tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a named function");
    } else {
        json_t *fn = json_object_get(tc, "function");
        json_t *name = json_is_object(fn) ? json_object_get(fn, "name") : NULL;
        if (!json_is_object(tc) || !json_is_string(name))
            return invalid(err, "tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}");
        st->tool_choice = API_TC_NAMED;
        st->tool_named = -1;
        for (int i = 0; i < st->n_tools; i++)
            if (!strcmp(st->tools[i].name, json_string_value(name)))
                st->tool_named = i;
        if (st->tool_named < 0)
            return api_error_set(err, 400, "invalid_request_error", "tool_choice", "invalid_value",
                                 "tool_choice names '%.64s', which is not in 'tools'", json_string_value(name));
    }
    if (st->tool_choice != API_TC_NONE && !st->n_tools)
        return invalid(err, "tool_choice", "'tool_choice' needs 'tools'");
    return 0;
}

static int parse_tools(json_t *root, api_struct *st, api_error *err)
{
    json_t *tools = api_field(root, "tools");
    st->parallel_tool_calls = true;
    json_t *ptc = api_field(root, "parallel_tool_calls");
    if (ptc && !json_is_boolean(ptc))
        return api_error_set(err, 400, "invalid_request_error", "parallel_tool_calls", "invalid_type",
                             "'parallel_tool_calls' must be a boolean");
    if (ptc)
        st->parallel_tool_calls = json_is_true(ptc);
    if (tools) {
        if (!json_is_array(tools))
            return api_error_set(err, 400, "invalid_request_error", "tools", "invalid_type", "'tools' must be a list");
        size_t n = json_array_size(tools);
        if (n > API_MAX_TOOLS)
            return invalid(err, "tools", "more than 128 tools");
        if (n && !(st->tools = calloc(n, sizeof *st->tools)))
            return oom(err);
        for (size_t i = 0; i < n; i++, st->n_tools++)
            if (parse_tool(json_array_get(tools, i), i, &st->tools[i], err))
                return HY_EINVAL;
        for (int i = 0; i < st->n_tools; i++)
            for (int j = 0; j < i; j++)
                if (!strcmp(st->tools[i].name, st->tools[j].name))
                    return api_error_set(err, 400, "invalid_request_error", "tools", "invalid_value",
                                         "two tools are named '%s'", st->tools[i].name);
    }
    if (parse_tool_choice(root, st, err))
        return HY_EINVAL;
    if (st->tool_choice != API_TC_NONE && st->rf != API_RF_TEXT)
        return invalid(err, st->param, "tools cannot be combined with a JSON response_format or a grammar; use tool_choice 'none'");
    return 0;
}

int api_parse_struct(json_t *root, api_kind kind, api_struct *st, api_error *err)
{
    memset(st, 0, sizeof *st);
    if (refuse_unsupported(root, kind, err) || parse_response_format(root, st, err) || parse_grammar(root, st, err) ||
        parse_logit_bias(root, st, err) || parse_tools(root, st, err))
        return HY_EINVAL;
    return 0;
}

void api_struct_free(api_struct *st)
{
    free(st->schema);
    free(st->grammar);
    free(st->bias_id);
    free(st->bias);
    for (int i = 0; i < st->n_tools; i++) {
        free(st->tools[i].name);
        free(st->tools[i].description);
        free(st->tools[i].parameters);
    }
    free(st->tools);
    memset(st, 0, sizeof *st);
}

/* An assistant message's tool_calls are kept as [{"name","arguments"}] with arguments as the JSON
 * value (OpenAI sends them as a string holding JSON), the shape the prompt shows the model. */
int api_parse_msg_tools(json_t *msg, api_msg *m, api_error *err)
{
    json_t *id = api_field(msg, "tool_call_id"), *calls = api_field(msg, "tool_calls");
    if (!strcmp(m->role, "tool")) {
        if (!json_is_string(id))
            return api_error_set(err, 400, "invalid_request_error", "messages", "missing_required_parameter",
                                 "a 'tool' message needs a string 'tool_call_id'");
        return (m->tool_call_id = strdup(json_string_value(id))) ? 0 : oom(err);
    }
    if (!calls)
        return 0;
    if (strcmp(m->role, "assistant") || !json_is_array(calls))
        return invalid(err, "messages", "'tool_calls' must be a list, on assistant messages");
    json_t *out = json_array(), *c;
    size_t i;
    json_array_foreach(calls, i, c) {
        json_t *fn = json_object_get(c, "function");
        json_t *name = json_is_object(fn) ? json_object_get(fn, "name") : NULL;
        json_t *args = json_is_object(fn) ? json_object_get(fn, "arguments") : NULL;
        if (!json_is_string(name) || !json_is_string(args)) {
            json_decref(out);
            return invalid(err, "messages", "each tool call needs function.name and function.arguments strings");
        }
        json_t *a = json_loads(json_string_value(args), JSON_DECODE_ANY, NULL);
        if (!a) {
            json_decref(out);
            return invalid(err, "messages", "a tool call's function.arguments is not valid JSON");
        }
        json_t *o = json_object();
        json_object_set(o, "name", name);
        json_object_set_new(o, "arguments", a);
        json_array_append_new(out, o);
    }
    m->tool_calls = dump(out, err);
    json_decref(out);
    return m->tool_calls ? 0 : HY_ENOMEM;
}

json_t *api_tool_calls_json(const api_choice *c, bool stream)
{
    json_t *arr = json_array();
    for (int i = 0; i < c->n_calls; i++) {
        const api_tool_call *t = &c->calls[i];
        json_t *o = json_object(), *fn = json_object();
        if (stream)
            json_object_set_new(o, "index", json_integer(t->index));
        if (t->id) {
            json_object_set_new(o, "id", json_string(t->id));
            json_object_set_new(o, "type", json_string("function"));
        }
        if (t->name)
            json_object_set_new(fn, "name", json_string(t->name));
        json_object_set_new(fn, "arguments", json_stringn(t->args ? t->args : "", t->args ? t->args_len : 0));
        json_object_set_new(o, "function", fn);
        json_array_append_new(arr, o);
    }
    return arr;
}
