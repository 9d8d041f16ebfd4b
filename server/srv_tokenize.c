/* srv_tokenize.c - POST /tokenize and /detokenize in both shapes clients send: vLLM's
 * ({"model", "prompt" | "messages", "add_special_tokens", "add_generation_prompt"} ->
 * {"tokens", "count", "max_model_len"}) and llama.cpp's server's ({"content", "add_special",
 * "with_pieces"} -> {"tokens"}, pieces as text, or as byte lists where a piece is not valid UTF-8),
 * and GET /tokenizer_info (vLLM's). HTTP threads; the vocabulary only, never the model. */
#include "server/srv_tokenize.h"

#include "api/api_struct.h"

#include "engine/hy.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static int get_flag(json_t *o, const char *k, bool dflt, bool *out, api_error *e)
{
    json_t *v = api_field(o, k);
    *out = dflt;
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return api_error_set(e, 400, "invalid_request_error", k, "invalid_type", "'%s' must be a boolean", k);
    *out = json_is_true(v);
    return 0;
}

static bool utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        int len = s[i] < 0x80 ? 1 : (s[i] & 0xE0) == 0xC0 && s[i] >= 0xC2 ? 2 : (s[i] & 0xF0) == 0xE0 ? 3
                : (s[i] & 0xF8) == 0xF0 && s[i] <= 0xF4 ? 4 : 0;
        if (!len || i + (size_t)len > n)
            return false;
        for (int k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
        i += (size_t)len;
    }
    return true;
}

/* llama.cpp's with_pieces: [{"id", "piece"}], piece a string or, where not UTF-8, its bytes. */
static json_t *pieces_json(const tok_vocab *v, const int32_t *ids, int n)
{
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        size_t len = 0;
        const unsigned char *b = tok_is_control(v, ids[i]) ? (const unsigned char *)tok_text(v, ids[i]) : tok_piece(v, ids[i], &len);
        if (tok_is_control(v, ids[i]))
            len = strlen((const char *)b);
        json_t *piece;
        if (utf8_ok(b, len)) {
            piece = json_stringn((const char *)b, len);
        } else {
            piece = json_array();
            for (size_t k = 0; k < len; k++)
                json_array_append_new(piece, json_integer(b[k]));
        }
        json_array_append_new(arr, json_pack("{s:i, s:o}", "id", ids[i], "piece", piece));
    }
    return arr;
}

static json_t *ids_json(const int32_t *ids, int n)
{
    json_t *arr = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(arr, json_integer(ids[i]));
    return arr;
}

/* vLLM's messages shape: rendered with the chat template (tools included) as a chat request is. */
static int render_messages(srv *s, json_t *root, char **text, api_error *e)
{
    if (!s->chat_ok)
        return api_error_set(e, 400, "invalid_request_error", "messages", "",
                             "this model has no supported chat template");
    bool gen;
    if (get_flag(root, "add_generation_prompt", true, &gen, e))
        return HY_EINVAL;
    json_t *copy = json_deep_copy(root);
    /* the chat parser knows nothing of these tokenize-only fields */
    json_object_del(copy, "add_generation_prompt");
    json_object_del(copy, "add_special_tokens");
    json_object_del(copy, "continue_final_message");
    json_object_del(copy, "return_token_strs");
    char *clean = json_dumps(copy, JSON_COMPACT);
    json_decref(copy);
    if (!clean)
        return api_error_set(e, 500, "server_error", "", "", "out of memory");
    api_request r;
    int rc = api_parse_request(API_CHAT, clean, strlen(clean), &r, e);
    free(clean);
    if (rc)
        return HY_EINVAL;
    tok_msg *msgs;
    char **owned;
    int n_owned, n = srv_tools_msgs(&r, &msgs, &owned, &n_owned);
    rc = n < 0 ? api_error_set(e, 500, "server_error", "", "", "out of memory")
               : tok_chat_apply(s->chat, msgs, n, gen, text);
    if (n >= 0 && rc)
        rc = api_error_set(e, 400, "invalid_request_error", "messages", "", "%s", hy_err_msg());
    if (n >= 0)
        srv_tools_msgs_free(msgs, owned, n_owned);
    api_request_free(&r);
    return rc;
}

int srv_tokenize(srv *s, const char *body, size_t len, char **out, api_error *e)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    if (!json_is_object(root)) {
        json_decref(root);
        return api_error_set(e, 400, "invalid_request_error", "", "invalid_json", "request body is not a JSON object");
    }
    json_t *content = api_field(root, "content"), *prompt = api_field(root, "prompt"), *messages = api_field(root, "messages");
    bool llama = content != NULL, special, pieces = false;
    char *owned_text = NULL;
    const char *text = NULL;
    size_t n_text = 0;
    int rc = 0;
    int32_t *ids = NULL;
    int n = 0;
    if (!!content + !!prompt + !!messages != 1) {
        rc = api_error_set(e, 400, "invalid_request_error", "prompt", "missing_required_parameter",
                           "give exactly one of 'prompt', 'messages' (vLLM) or 'content' (llama.cpp)");
        goto done;
    }
    if ((rc = get_flag(root, llama ? "add_special" : "add_special_tokens", !llama && !messages, &special, e)) ||
        (rc = get_flag(root, "with_pieces", false, &pieces, e)))
        goto done;
    if (messages) {
        if ((rc = render_messages(s, root, &owned_text, e)))
            goto done;
        text = owned_text;
        n_text = strlen(text);
    } else {
        json_t *t = content ? content : prompt;
        if (!json_is_string(t)) {
            rc = api_error_set(e, 400, "invalid_request_error", content ? "content" : "prompt", "invalid_type",
                               "'%s' must be a string", content ? "content" : "prompt");
            goto done;
        }
        text = json_string_value(t);
        n_text = json_string_length(t);
    }
    if (tok_encode(s->vocab, text, n_text, true, special && tok_add_bos(s->vocab), &ids, &n)) {
        rc = api_error_set(e, 400, "invalid_request_error", "prompt", "", "%s", hy_err_msg());
        goto done;
    }
    json_t *reply = json_pack("{s:o}", "tokens", pieces ? pieces_json(s->vocab, ids, n) : ids_json(ids, n));
    if (!llama) {
        json_object_set_new(reply, "count", json_integer(n));
        json_object_set_new(reply, "max_model_len", json_integer(s->n_ctx));
    }
    *out = json_dumps(reply, JSON_COMPACT);
    json_decref(reply);
    if (!*out)
        rc = api_error_set(e, 500, "server_error", "", "", "out of memory");
done:
    free(ids);
    free(owned_text);
    json_decref(root);
    return rc;
}

int srv_detokenize(srv *s, const char *body, size_t len, char **out, api_error *e)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je), *toks = json_is_object(root) ? api_field(root, "tokens") : NULL;
    int rc = 0;
    int32_t *ids = NULL;
    if (!json_is_array(toks)) {
        json_decref(root);
        return api_error_set(e, 400, "invalid_request_error", "tokens", "missing_required_parameter",
                             "'tokens' must be a list of token ids");
    }
    size_t n = json_array_size(toks);
    if (n > (size_t)1 << 20) {
        rc = api_error_set(e, 400, "invalid_request_error", "tokens", "invalid_value", "too many tokens");
        goto done;
    }
    ids = malloc((n + 1) * sizeof *ids);
    if (!ids) {
        rc = api_error_set(e, 500, "server_error", "", "", "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(toks, i);
        json_int_t id = json_is_integer(t) ? json_integer_value(t) : -1;
        if (id < 0 || id >= tok_n_vocab(s->vocab)) {
            rc = api_error_set(e, 400, "invalid_request_error", "tokens", "invalid_value",
                               "tokens[%zu] is not a token id of this vocabulary (0..%d)", i, tok_n_vocab(s->vocab) - 1);
            goto done;
        }
        ids[i] = (int32_t)id;
    }
    char *text = NULL;
    size_t tl = 0;
    if (tok_decode(s->vocab, ids, (int)n, false, &text, &tl)) {
        rc = api_error_set(e, 500, "server_error", "", "", "%s", hy_err_msg());
        goto done;
    }
    /* vLLM answers {"prompt"}, llama.cpp's server {"content"}: both, so either client reads it */
    json_t *reply = json_pack("{s:s%, s:s%}", "prompt", text, tl, "content", text, tl);
    free(text);
    *out = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
    json_decref(reply);
    if (!*out)
        rc = api_error_set(e, 500, "server_error", "", "", "out of memory");
done:
    free(ids);
    json_decref(root);
    return rc;
}

/* A token's text as a string (its raw vocabulary text, as Hugging Face shows special tokens), or null. */
static json_t *token_or_null(const tok_vocab *v, int32_t id)
{
    const char *t = id >= 0 ? tok_text(v, id) : NULL;
    return t ? json_string(t) : json_null();
}

/* vLLM's shape (the tokenizer class plus the tokenizer_config.json-style fields): lm-eval's
 * RemoteTokenizer reads eos/bos/pad_token and chat_template, and turns tokens into ids through
 * /tokenize. json_string returns NULL on text that is not UTF-8: such a template becomes null. */
int srv_tokenizer_info(srv *s, char **out, api_error *e)
{
    const tok_vocab *v = s->vocab;
    const char *tmpl = tok_chat_template(v);
    json_t *t = tmpl ? json_string(tmpl) : NULL;
    json_t *reply = json_pack("{s:s, s:o, s:o, s:o, s:o, s:o, s:b, s:b, s:i, s:i}",
                              "tokenizer_class", tok_hf_class(v),
                              "bos_token", token_or_null(v, tok_bos(v)),
                              "eos_token", token_or_null(v, tok_eos(v)),
                              "pad_token", token_or_null(v, tok_pad(v)),
                              "unk_token", token_or_null(v, tok_unk(v)),
                              "chat_template", t ? t : json_null(),
                              "add_bos_token", tok_add_bos(v),
                              "add_eos_token", 0,
                              "model_max_length", s->n_ctx,
                              "vocab_size", tok_n_vocab(v));
    *out = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
    json_decref(reply);
    if (!*out)
        return api_error_set(e, 500, "server_error", "", "", "out of memory");
    return 0;
}
