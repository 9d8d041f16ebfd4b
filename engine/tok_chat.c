/* tok_chat.c - chat templates: recognise the GGUF's jinja template by its distinctive text and
 * render messages exactly as that template would (ChatML as SmolLM2 ships it, Llama 3, Llama 2,
 * Zephyr). No jinja interpreter: each known template is written out as code. */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

static const char k_smollm_system[] = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

typedef struct {
    char *buf;
    size_t len, cap;
    int err;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = HY_MAX(2 * b->cap, b->len + n + 256);
        char *nb = realloc(b->buf, cap);
        if (!nb) {
            b->err = hy_err_set(HY_ENOMEM, "out of memory rendering the chat template");
            return;
        }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* Python's str.strip() for the ASCII white space it removes (jinja's trim and .strip()). */
static bool py_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F); }

static void sb_stripped(sbuf *b, const char *s, size_t n)
{
    while (n && py_space((unsigned char)s[0]))
        s++, n--;
    while (n && py_space((unsigned char)s[n - 1]))
        n--;
    sb_put(b, s, n);
}

static bool role_is(const tok_msg *m, const char *r) { return !strcmp(m->role, r); }

/* {% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<default system>
 * {% endif %}<|im_start|>{{role}}\n{{content}}<|im_end|>\n{% endfor %}
 * {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %} */
static void render_chatml(sbuf *b, const tok_msg *m, int n, bool gen, bool smollm_default)
{
    for (int i = 0; i < n; i++) {
        if (i == 0 && smollm_default && !role_is(&m[0], "system")) {
            sb_str(b, "<|im_start|>system\n");
            sb_str(b, k_smollm_system);
            sb_str(b, "<|im_end|>\n");
        }
        sb_str(b, "<|im_start|>");
        sb_str(b, m[i].role);
        sb_str(b, "\n");
        sb_str(b, m[i].content);
        sb_str(b, "<|im_end|>\n");
    }
    if (gen)
        sb_str(b, "<|im_start|>assistant\n");
}

/* Meta's Llama 3 template, less its leading {{ bos_token }}. */
static void render_llama3(sbuf *b, const tok_msg *m, int n, bool gen)
{
    for (int i = 0; i < n; i++) {
        sb_str(b, "<|start_header_id|>");
        sb_str(b, m[i].role);
        sb_str(b, "<|end_header_id|>\n\n");
        sb_stripped(b, m[i].content, strlen(m[i].content));
        sb_str(b, "<|eot_id|>");
    }
    if (gen)
        sb_str(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* Meta's Llama 2 template: an optional leading system message goes into the first user turn as
 * <<SYS>>...<</SYS>>; user turns are <s>[INST] ... [/INST] (the first <s> left to add_bos),
 * assistant turns ' answer </s>'. It has no generation prompt: the text ends with [/INST]. */
static int render_llama2(sbuf *b, const tok_msg *m, int n)
{
    const char *sys = NULL;
    if (n && role_is(&m[0], "system")) {
        sys = m[0].content;
        m++, n--;
    }
    for (int i = 0; i < n; i++) {
        bool user = role_is(&m[i], "user");
        if (user != (i % 2 == 0) || (!user && !role_is(&m[i], "assistant")))
            return hy_err_set(HY_EINVAL, "llama2 chat template: roles must alternate user/assistant/user/... "
                                         "after an optional first system message (message %d is '%s')",
                              i + (sys != NULL), m[i].role);
        if (!user) {
            sb_str(b, " ");
            sb_stripped(b, m[i].content, strlen(m[i].content));
            sb_str(b, " </s>");
            continue;
        }
        sb_str(b, i == 0 ? "[INST] " : "<s>[INST] ");
        if (i == 0 && sys) {
            /* .strip() applies to the whole '<<SYS>>...' + content string */
            sbuf tmp = {0};
            sb_str(&tmp, "<<SYS>>\n");
            sb_str(&tmp, sys);
            sb_str(&tmp, "\n<</SYS>>\n\n");
            sb_str(&tmp, m[i].content);
            if (tmp.err)
                return tmp.err;
            sb_stripped(b, tmp.buf, tmp.len);
            free(tmp.buf);
        } else {
            sb_stripped(b, m[i].content, strlen(m[i].content));
        }
        sb_str(b, " [/INST]");
    }
    return 0;
}

/* HuggingFaceH4/zephyr's template (trim_blocks): '<|role|>\n' + content + '</s>' + '\n'. */
static int render_zephyr(sbuf *b, const tok_msg *m, int n, bool gen)
{
    for (int i = 0; i < n; i++) {
        if (!role_is(&m[i], "system") && !role_is(&m[i], "user") && !role_is(&m[i], "assistant"))
            return hy_err_set(HY_EINVAL, "zephyr chat template: role '%s' of message %d is not system, user "
                                         "or assistant", m[i].role, i);
        sb_str(b, "<|");
        sb_str(b, m[i].role);
        sb_str(b, "|>\n");
        sb_str(b, m[i].content);
        sb_str(b, "</s>\n");
    }
    if (gen)
        sb_str(b, "<|assistant|>\n");
    return 0;
}

int tok_chat_apply(tok_chat_kind kind, const tok_msg *msgs, int n, bool add_generation_prompt, char **out)
{
    sbuf b = {0};
    int rc = 0;
    *out = NULL;
    if (n < 0 || (n && !msgs))
        return hy_err_set(HY_EINVAL, "chat template: bad message list");
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content)
            return hy_err_set(HY_EINVAL, "chat template: message %d has no %s", i, msgs[i].role ? "content" : "role");
    sb_put(&b, "", 0);
    switch (kind) {
    case TOK_CHAT_CHATML:
    case TOK_CHAT_CHATML_PLAIN:
        render_chatml(&b, msgs, n, add_generation_prompt, kind == TOK_CHAT_CHATML);
        break;
    case TOK_CHAT_LLAMA3:
        render_llama3(&b, msgs, n, add_generation_prompt);
        break;
    case TOK_CHAT_LLAMA2:
        rc = render_llama2(&b, msgs, n);
        break;
    case TOK_CHAT_ZEPHYR:
        rc = render_zephyr(&b, msgs, n, add_generation_prompt);
        break;
    default:
        rc = hy_err_set(HY_EINVAL, "chat template: no template chosen (kind %d)", (int)kind);
        break;
    }
    if (!rc)
        rc = b.err;
    if (rc) {
        free(b.buf);
        return rc;
    }
    *out = b.buf;
    return 0;
}

static const struct {
    const char *name;
    tok_chat_kind kind;
} k_names[] = {
    {"chatml", TOK_CHAT_CHATML}, {"chatml-plain", TOK_CHAT_CHATML_PLAIN}, {"llama3", TOK_CHAT_LLAMA3},
    {"llama2", TOK_CHAT_LLAMA2}, {"zephyr", TOK_CHAT_ZEPHYR},
};

const char *tok_chat_name(tok_chat_kind kind)
{
    for (size_t i = 0; i < HY_ARRAY_LEN(k_names); i++)
        if (k_names[i].kind == kind)
            return k_names[i].name;
    return "none";
}

static bool has(gguf_str s, const char *needle)
{
    return memmem(s.ptr, (size_t)s.len, needle, strlen(needle)) != NULL;
}

int tok_chat_detect(const gguf_file *f, const char *name, tok_chat_kind *out)
{
    *out = TOK_CHAT_NONE;
    if (name) {
        for (size_t i = 0; i < HY_ARRAY_LEN(k_names); i++) {
            if (!strcmp(name, k_names[i].name)) {
                *out = k_names[i].kind;
                return 0;
            }
        }
        return hy_err_set(HY_EUNSUPPORTED,
                          "chat template '%s' is unknown (known: chatml, chatml-plain, llama3, llama2, zephyr)", name);
    }
    gguf_str t;
    int rc = gguf_get_str(f, "tokenizer.chat_template", &t);
    if (rc == HY_ENOTFOUND)
        return hy_err_set(HY_ENOTFOUND, "the model has no tokenizer.chat_template: name one "
                                        "(chatml, chatml-plain, llama3, llama2, zephyr)");
    if (rc)
        return hy_err_wrap(rc, "tokenizer.chat_template");
    if (has(t, "<|im_start|>"))
        *out = has(t, k_smollm_system) ? TOK_CHAT_CHATML : TOK_CHAT_CHATML_PLAIN;
    else if (has(t, "<|start_header_id|>"))
        *out = TOK_CHAT_LLAMA3;
    else if (has(t, "[INST]"))
        *out = TOK_CHAT_LLAMA2;
    else if (has(t, "<|user|>"))
        *out = TOK_CHAT_ZEPHYR;
    else
        return hy_err_set(HY_EUNSUPPORTED, "the model's chat template is not one hydrad knows (ChatML, Llama 3, "
                                           "Llama 2, Zephyr): name one of chatml, chatml-plain, llama3, llama2, zephyr");
    return 0;
}
