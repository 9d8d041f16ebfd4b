/* adapter.c - read, validate and hold one HydraLoRA / PEFT LoRA adapter (see adapter.h).
 * Every value from adapter_config.json and the safetensors header is checked against the
 * base model's shapes before use; a bad adapter is refused with a message naming the key.
 * It never touches the registry and only calls the backend from ad_upload/ad_unupload. */
#include "adapters/adapter.h"
#include "adapters/safetensors.h"
#include "engine/hy.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <regex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AD_PREFIX "base_model.model.model.layers."

static const char *const ad_parent[ENG_N_PROJ] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                                   "mlp", "mlp", "mlp"};
static const char *const ad_proj[ENG_N_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};

typedef struct {
    float *A; /* [r][in] */
    float *R; /* [K][in], NULL when K == 1 */
    float *B[AD_MAX_K]; /* [out][r] each, GGUF row order */
} ad_target;

struct ad_adapter {
    ad_config cfg;
    int n_layer, r, K;
    float scale;
    int64_t in[ENG_N_PROJ], out[ENG_N_PROJ];
    ad_target *tg;   /* [n_layer * ENG_N_PROJ]; A == NULL where not targeted */
    float *arena;    /* owns every A/R/B */
    size_t arena_n;  /* floats */
    be *be;          /* backend the loras live on; NULL when not uploaded */
    be_lora **lora;  /* [n_layer * ENG_N_PROJ] */
    be *pack_be;     /* the backend `pack` was made for (ad_opts.pack_for); NULL: none */
    be_lora_pack **pack; /* [n_layer * ENG_N_PROJ]: host-side upload work done ahead, taken by ad_upload */
    float *stats;    /* [n_layer * ENG_N_PROJ * (K + 1)] */
    eng_adapter eng;
    atomic_ullong n_tok;
    uint64_t load_id; /* unique per adapter object in this process (ad_load_id) */
    struct ad_stack *stack; /* a stack of other adapters (ad_stack_new); NULL for one read from files */
};

struct ad_stack {
    int n;
    ad_adapter *member[AD_STACK_MAX]; /* not owned */
    float weight[AD_STACK_MAX];
    eng_adapter chain[AD_STACK_MAX]; /* ad_stack_bind: member i's view times weight[i], then i + 1 */
};

static atomic_ullong next_load_id = 1;

/* ------------------------------------------------------------------ config */

void ad_config_clear(ad_config *c)
{
    if (!c)
        return;
    free(c->base_model);
    free(c->target_regex);
    for (int i = 0; i < c->n_targets; i++)
        free(c->targets[i]);
    free(c->targets);
    memset(c, 0, sizeof *c);
}

/* An integer-valued JSON number (PEFT writes ints; tolerate 8.0). */
static int ad_json_int(const json_t *v, long long *out)
{
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return HY_OK;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == floor(d) && fabs(d) < 1e15) {
            *out = (long long)d;
            return HY_OK;
        }
    }
    return HY_EFORMAT;
}

static int ad_json_bool(const json_t *root, const char *key, bool *out)
{
    const json_t *v = json_object_get(root, key);
    *out = false;
    if (!v || json_is_null(v))
        return HY_OK;
    if (!json_is_boolean(v))
        return hy_err_set(HY_EFORMAT, "adapter_config.json: \"%s\" must be true or false", key);
    *out = json_is_true(v);
    return HY_OK;
}

static int ad_parse_targets(const json_t *tm, ad_config *c)
{
    if (json_is_string(tm)) {
        const char *s = json_string_value(tm);
        if (!strcmp(s, "all-linear")) {
            c->all_linear = true;
            return HY_OK;
        }
        if (!(c->target_regex = strdup(s)))
            return hy_err_set(HY_ENOMEM, "out of memory");
        return HY_OK;
    }
    if (!json_is_array(tm) || json_array_size(tm) == 0)
        return hy_err_set(HY_EFORMAT,
                          "adapter_config.json: \"target_modules\" must be a non-empty list of module names "
                          "or a regex string");
    size_t n = json_array_size(tm);
    if (n > 64)
        return hy_err_set(HY_EFORMAT, "adapter_config.json: \"target_modules\" lists %zu modules (max 64)", n);
    c->targets = calloc(n, sizeof *c->targets);
    if (!c->targets)
        return hy_err_set(HY_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(tm, i);
        if (!json_is_string(e) || !json_string_value(e)[0])
            return hy_err_set(HY_EFORMAT, "adapter_config.json: \"target_modules\"[%zu] is not a module name", i);
        if (!(c->targets[i] = strdup(json_string_value(e))))
            return hy_err_set(HY_ENOMEM, "out of memory");
        c->n_targets = (int)i + 1;
    }
    return HY_OK;
}

/* Options that change the math in ways this server does not implement: refuse them clearly. */
static int ad_check_unsupported(const json_t *root)
{
    const json_t *v;
    if ((v = json_object_get(root, "peft_type")) && !json_is_null(v) &&
        (!json_is_string(v) || strcmp(json_string_value(v), "LORA")))
        return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: peft_type %s is not supported (only LORA)",
                          json_is_string(v) ? json_string_value(v) : "(not a string)");
    if ((v = json_object_get(root, "use_dora")) && json_is_true(v))
        return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: DoRA adapters (use_dora) are not supported");
    if ((v = json_object_get(root, "bias")) && json_is_string(v) && strcmp(json_string_value(v), "none"))
        return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: bias \"%s\" is not supported (only \"none\")",
                          json_string_value(v));
    static const char *const pat[] = {"rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < HY_ARRAY_LEN(pat); i++)
        if ((v = json_object_get(root, pat[i])) && json_is_object(v) && json_object_size(v) > 0)
            return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: a non-empty \"%s\" is not supported", pat[i]);
    if ((v = json_object_get(root, "modules_to_save")) && json_is_array(v) && json_array_size(v) > 0)
        return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: \"modules_to_save\" is not supported");
    if ((v = json_object_get(root, "layers_to_transform")) && !json_is_null(v))
        return hy_err_set(HY_EUNSUPPORTED, "adapter_config.json: \"layers_to_transform\" is not supported");
    return HY_OK;
}

static int ad_config_parse_obj(const json_t *root, ad_config *c)
{
    int rc;
    long long iv;
    if (!json_is_object(root))
        return hy_err_set(HY_EFORMAT, "adapter_config.json is not a JSON object");
    if ((rc = ad_check_unsupported(root)))
        return rc;
    const json_t *v = json_object_get(root, "r");
    if (!v)
        return hy_err_set(HY_EFORMAT, "adapter_config.json: \"r\" (the LoRA rank) is missing");
    if (ad_json_int(v, &iv) || iv < 1 || iv > AD_MAX_R)
        return hy_err_set(HY_EFORMAT, "adapter_config.json: \"r\" must be an integer in 1..%d", AD_MAX_R);
    c->r = (int)iv;
    c->alpha = c->r;
    if ((v = json_object_get(root, "lora_alpha")) && !json_is_null(v)) {
        if (!json_is_number(v) || !isfinite(json_number_value(v)))
            return hy_err_set(HY_EFORMAT, "adapter_config.json: \"lora_alpha\" must be a number");
        c->alpha = json_number_value(v);
    }
    if ((v = json_object_get(root, "lora_nums")) && !json_is_null(v)) {
        if (ad_json_int(v, &iv) || iv < 1 || iv > AD_MAX_K)
            return hy_err_set(HY_EFORMAT, "adapter_config.json: \"lora_nums\" (K) must be an integer in 1..%d",
                              AD_MAX_K);
        c->K = (int)iv;
    }
    if ((rc = ad_json_bool(root, "use_rslora", &c->use_rslora)) ||
        (rc = ad_json_bool(root, "fan_in_fan_out", &c->fan_in_fan_out)))
        return rc;
    if ((v = json_object_get(root, "base_model_name_or_path")) && json_is_string(v) &&
        !(c->base_model = strdup(json_string_value(v))))
        return hy_err_set(HY_ENOMEM, "out of memory");
    v = json_object_get(root, "target_modules");
    if (!v || json_is_null(v))
        return hy_err_set(HY_EFORMAT, "adapter_config.json: \"target_modules\" is missing");
    return ad_parse_targets(v, c);
}

int ad_config_parse(const char *text, size_t len, ad_config *c)
{
    memset(c, 0, sizeof *c);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return hy_err_set(HY_EFORMAT, "adapter_config.json is not valid JSON (%s, line %d)", jerr.text, jerr.line);
    int rc = ad_config_parse_obj(root, c);
    json_decref(root);
    if (rc)
        ad_config_clear(c);
    return rc;
}

/* Python `re` -> POSIX ERE for the forms PEFT configs use; fullmatch via ^(...)$. */
static int ad_regex_translate(const char *py, char **out)
{
    size_t n = strlen(py);
    size_t cap = n * 12 + 8;
    char *o = malloc(cap), *p = o;
    if (!o)
        return hy_err_set(HY_ENOMEM, "out of memory");
    p += sprintf(p, "^(");
    for (size_t i = 0; i < n; i++) {
        char ch = py[i];
        if (ch == '\\' && i + 1 < n) {
            char e = py[++i];
            const char *rep = e == 'd' ? "[0-9]" : e == 'w' ? "[A-Za-z0-9_]" : e == 's' ? "[[:space:]]" : NULL;
            if (rep) {
                p += sprintf(p, "%s", rep);
            } else if (strchr(".[]()*+?{}|^$\\/-_", e)) {
                *p++ = '\\';
                *p++ = e;
            } else {
                free(o);
                return hy_err_set(HY_EUNSUPPORTED, "target_modules regex: escape \\%c is not supported", e);
            }
        } else if (ch == '(' && i + 2 < n && py[i + 1] == '?') {
            if (py[i + 2] != ':') {
                free(o);
                return hy_err_set(HY_EUNSUPPORTED, "target_modules regex: group \"(?%c\" is not supported", py[i + 2]);
            }
            *p++ = '(';
            i += 2;
        } else if (ch == '?' && i > 0 && strchr("*+?}", py[i - 1]) && (i < 2 || py[i - 2] != '\\')) {
            /* lazy quantifier: same answer for a whole-string match */
        } else {
            *p++ = ch;
        }
    }
    p += sprintf(p, ")$");
    *out = o;
    return HY_OK;
}

static void ad_module_name(char *buf, size_t n, int layer, int proj)
{
    snprintf(buf, n, "model.layers.%d.%s.%s", layer, ad_parent[proj], ad_proj[proj]);
}

/* PEFT's list rule: the full name equals the entry or ends with "." + entry. */
static bool ad_name_matches(const char *name, const char *t)
{
    size_t ln = strlen(name), lt = strlen(t);
    if (ln == lt)
        return !strcmp(name, t);
    return ln > lt && name[ln - lt - 1] == '.' && !strcmp(name + ln - lt, t);
}

int ad_config_targets(const ad_config *c, const ad_shape *s, uint8_t *mask)
{
    size_t n = (size_t)s->n_layer * ENG_N_PROJ;
    memset(mask, 0, n);
    char name[128];
    if (c->all_linear) {
        memset(mask, 1, n);
        return HY_OK;
    }
    if (c->target_regex) {
        char *ere = NULL;
        int rc = ad_regex_translate(c->target_regex, &ere);
        if (rc)
            return rc;
        regex_t re;
        int e = regcomp(&re, ere, REG_EXTENDED | REG_NOSUB);
        free(ere);
        if (e) {
            char eb[128];
            regerror(e, &re, eb, sizeof eb);
            return hy_err_set(HY_EFORMAT, "target_modules regex \"%s\" does not compile: %s", c->target_regex, eb);
        }
        size_t hits = 0;
        for (int l = 0; l < s->n_layer; l++)
            for (int p = 0; p < ENG_N_PROJ; p++) {
                ad_module_name(name, sizeof name, l, p);
                if (regexec(&re, name, 0, NULL, 0) == 0) {
                    mask[(size_t)l * ENG_N_PROJ + p] = 1;
                    hits++;
                }
            }
        regfree(&re);
        if (!hits)
            return hy_err_set(HY_EINVAL,
                              "target_modules regex \"%s\" matches no projection of this model (names look like "
                              "\"model.layers.0.self_attn.q_proj\")", c->target_regex);
        return HY_OK;
    }
    for (int t = 0; t < c->n_targets; t++) {
        size_t hits = 0;
        for (int l = 0; l < s->n_layer; l++)
            for (int p = 0; p < ENG_N_PROJ; p++) {
                ad_module_name(name, sizeof name, l, p);
                if (ad_name_matches(name, c->targets[t])) {
                    mask[(size_t)l * ENG_N_PROJ + p] = 1;
                    hits++;
                }
            }
        if (!hits)
            return hy_err_set(HY_EINVAL,
                              "target module \"%s\" is not a projection of this model (expected q_proj, k_proj, "
                              "v_proj, o_proj, gate_proj, up_proj or down_proj)", c->targets[t]);
    }
    return HY_OK;
}

/* ------------------------------------------------------------------ tensor keys */

enum { AD_T_A, AD_T_B, AD_T_BK, AD_T_R };

/* Parse "base_model.model.model.layers.{i}.{parent}.{proj}.{suffix}". Returns 0 and fills
 * layer/proj/kind/head, or -1 when the key is not an adapter tensor name we know. */
static int ad_parse_key(const char *key, long *layer, int *proj, int *kind, int *head)
{
    size_t lp = strlen(AD_PREFIX);
    if (strncmp(key, AD_PREFIX, lp))
        return -1;
    const char *p = key + lp;
    if (*p < '0' || *p > '9')
        return -1;
    long l = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (l > 1000000)
            return -1;
        l = l * 10 + (*p - '0');
    }
    if (*p++ != '.')
        return -1;
    int pr = -1;
    for (int i = 0; i < ENG_N_PROJ && pr < 0; i++) {
        size_t a = strlen(ad_parent[i]), b = strlen(ad_proj[i]);
        if (!strncmp(p, ad_parent[i], a) && p[a] == '.' && !strncmp(p + a + 1, ad_proj[i], b) && p[a + 1 + b] == '.') {
            pr = i;
            p += a + b + 2;
        }
    }
    if (pr < 0)
        return -1;
    *layer = l;
    *proj = pr;
    *head = 0;
    if (!strcmp(p, "lora_A.weight"))
        *kind = AD_T_A;
    else if (!strcmp(p, "lora_B.weight"))
        *kind = AD_T_B;
    else if (!strcmp(p, "lora_route.weight"))
        *kind = AD_T_R;
    else if (!strncmp(p, "lora_B", 6) && p[6] >= '0' && p[6] <= '9') {
        char *end;
        long k = strtol(p + 6, &end, 10);
        if (strcmp(end, ".weight") || k < 0 || k > 1000 || (p[6] == '0' && p[7] != '.'))
            return -1;
        *kind = AD_T_BK;
        *head = (int)k;
    } else
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ loading */

typedef struct {
    const st_tensor *A, *R, *B[AD_MAX_K];
} ad_found;

static int ad_shape_str(const st_tensor *t, char *buf, size_t n)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (int i = 0; i < t->n_dims && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
    return 0;
}

/* Does t have shape [d0, d1] (or [d1, d0] when transposed is allowed)? *tr says which. */
static bool ad_fits(const st_tensor *t, int64_t d0, int64_t d1, bool allow_tr, bool *tr)
{
    *tr = false;
    if (t->n_dims != 2)
        return false;
    if (t->shape[0] == d0 && t->shape[1] == d1)
        return true;
    if (allow_tr && t->shape[0] == d1 && t->shape[1] == d0) {
        *tr = true;
        return true;
    }
    return false;
}

/* Convert t ([rows, cols] or its transpose) into dst [rows][cols] fp32, checking for NaN/Inf.
 * perm_heads > 0 reorders rows from Hugging Face order to GGUF's RoPE order for that many heads. */
static int ad_copy(const st_tensor *t, bool tr, int64_t rows, int64_t cols, int perm_heads, float *dst,
                   float *tmp)
{
    st_to_f32(t, tmp);
    size_t n = (size_t)rows * (size_t)cols;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(tmp[i]))
            return hy_err_set(HY_EFORMAT, "tensor '%s' contains NaN or Inf (element %zu)", t->name, i);
    int64_t hd = perm_heads > 0 ? rows / perm_heads : 0;
    for (int64_t row = 0; row < rows; row++) {
        int64_t src = row;
        if (hd) {
            /* GGUF row h*hd + 2j + a holds HF row h*hd + a*hd/2 + j */
            int64_t h = row / hd, w = row % hd, j = w / 2, a = w % 2;
            src = h * hd + a * (hd / 2) + j;
        }
        float *d = dst + row * cols;
        if (!tr)
            memcpy(d, tmp + src * cols, (size_t)cols * sizeof(float));
        else
            for (int64_t c = 0; c < cols; c++)
                d[c] = tmp[c * rows + src];
    }
    return HY_OK;
}

static int ad_bad_shape(const st_tensor *t, const char *what, int64_t d0, int64_t d1)
{
    char sh[96];
    ad_shape_str(t, sh, sizeof sh);
    return hy_err_set(HY_EFORMAT, "tensor '%s' has shape %s but %s needs [%lld, %lld]", t->name, sh, what,
                      (long long)d0, (long long)d1);
}

/* Sort the file's tensors into found[layer * ENG_N_PROJ + proj]; infer K. */
static int ad_collect(const st_file *st, const ad_shape *s, const uint8_t *mask, const ad_config *cfg,
                      ad_found *found, int *K_out)
{
    int kind_plain = 0, kind_heads = 0, max_head = -1;
    const char *first_plain = NULL, *first_head = NULL;
    size_t nt = st_n_tensors(st);
    if (nt == 0)
        return hy_err_set(HY_EFORMAT, "adapter_model.safetensors holds no tensors");
    for (size_t i = 0; i < nt; i++) {
        const st_tensor *t = st_tensor_at(st, i);
        long layer;
        int proj, kind, head;
        if (ad_parse_key(t->name, &layer, &proj, &kind, &head))
            return hy_err_set(HY_EFORMAT, "unexpected tensor '%s' (not a LoRA/HydraLoRA key this server knows)",
                              t->name);
        if (layer >= s->n_layer)
            return hy_err_set(HY_EINVAL, "tensor '%s' is for layer %ld but the base model has %d layers", t->name,
                              layer, s->n_layer);
        size_t ti = (size_t)layer * ENG_N_PROJ + (size_t)proj;
        if (!mask[ti])
            return hy_err_set(HY_EINVAL, "tensor '%s' is for a module that target_modules does not name", t->name);
        ad_found *f = &found[ti];
        const st_tensor **slot = NULL;
        switch (kind) {
        case AD_T_A: slot = &f->A; break;
        case AD_T_R: slot = &f->R; break;
        case AD_T_B:
            kind_plain++;
            first_plain = first_plain ? first_plain : t->name;
            slot = &f->B[0];
            break;
        default:
            if (head >= AD_MAX_K)
                return hy_err_set(HY_ELIMIT, "tensor '%s': head index %d exceeds the limit of %d heads", t->name,
                                  head, AD_MAX_K);
            kind_heads++;
            first_head = first_head ? first_head : t->name;
            max_head = HY_MAX(max_head, head);
            slot = &f->B[head];
        }
        if (*slot && (kind == AD_T_B || kind == AD_T_BK) &&
            (kind == AD_T_B) != (strstr((*slot)->name, ".lora_B.weight") != NULL))
            return hy_err_set(HY_EFORMAT, "the file mixes plain LoRA and HydraLoRA B tensors ('%s' and '%s')",
                              (*slot)->name, t->name);
        if (*slot)
            return hy_err_set(HY_EFORMAT, "tensor '%s' duplicates '%s'", t->name, (*slot)->name);
        *slot = t;
    }
    if (kind_plain && kind_heads)
        return hy_err_set(HY_EFORMAT, "the file mixes plain LoRA ('%s') and HydraLoRA ('%s') B tensors", first_plain,
                          first_head);
    int K = kind_heads ? max_head + 1 : 1;
    if (cfg->K && cfg->K != K)
        return hy_err_set(HY_EINVAL, "adapter_config.json says lora_nums = %d but the tensors have %d B head%s (%s)",
                          cfg->K, K, K == 1 ? "" : "s", first_head ? first_head : first_plain ? first_plain : "");
    if (!kind_plain && !kind_heads)
        return hy_err_set(HY_EFORMAT, "adapter_model.safetensors has no lora_B tensors");
    *K_out = K;
    return HY_OK;
}

static void ad_key(char *buf, size_t n, int layer, int proj, const char *suffix)
{
    snprintf(buf, n, AD_PREFIX "%d.%s.%s.%s", layer, ad_parent[proj], ad_proj[proj], suffix);
}

/* Every targeted module must have all its tensors, with the right shapes. */
static int ad_check_found(const ad_shape *s, const uint8_t *mask, int r, int K, bool plain, bool allow_tr,
                          const ad_found *found)
{
    char key[192], what[64];
    for (int l = 0; l < s->n_layer; l++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            size_t ti = (size_t)l * ENG_N_PROJ + (size_t)p;
            const ad_found *f = &found[ti];
            if (!mask[ti])
                continue;
            int64_t in = s->in[p], out = s->out[p];
            bool tr;
            snprintf(what, sizeof what, "%s (r = %d)", ad_proj[p], r);
            if (!f->A) {
                ad_key(key, sizeof key, l, p, "lora_A.weight");
                return hy_err_set(HY_EFORMAT, "missing tensor '%s'", key);
            }
            if (!ad_fits(f->A, r, in, allow_tr, &tr))
                return ad_bad_shape(f->A, what, r, in);
            for (int k = 0; k < K; k++) {
                if (!f->B[k]) {
                    char sfx[32];
                    if (plain)
                        snprintf(sfx, sizeof sfx, "lora_B.weight");
                    else
                        snprintf(sfx, sizeof sfx, "lora_B%d.weight", k);
                    ad_key(key, sizeof key, l, p, sfx);
                    return hy_err_set(HY_EFORMAT, "missing tensor '%s'", key);
                }
                if (!ad_fits(f->B[k], out, r, allow_tr, &tr))
                    return ad_bad_shape(f->B[k], what, out, r);
            }
            if (plain && f->R)
                return hy_err_set(HY_EFORMAT, "unexpected tensor '%s' in a plain LoRA adapter", f->R->name);
            if (K > 1 && !f->R) {
                ad_key(key, sizeof key, l, p, "lora_route.weight");
                return hy_err_set(HY_EFORMAT, "missing tensor '%s' (router of a K = %d HydraLoRA)", key, K);
            }
            if (f->R && !ad_fits(f->R, K, in, allow_tr, &tr)) {
                snprintf(what, sizeof what, "%s's router (K = %d)", ad_proj[p], K);
                return ad_bad_shape(f->R, what, K, in);
            }
        }
    return HY_OK;
}

static int ad_alloc_arena(ad_adapter *a, const uint8_t *mask)
{
    size_t total = 0;
    for (int l = 0; l < a->n_layer; l++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            if (!mask[(size_t)l * ENG_N_PROJ + p])
                continue;
            size_t ain, rin, bo, sz;
            if (hy_mul_size((size_t)a->r, (size_t)a->in[p], &ain) ||
                hy_mul_size(a->K > 1 ? (size_t)a->K : 0, (size_t)a->in[p], &rin) ||
                hy_mul_size((size_t)a->out[p], (size_t)a->r * (size_t)a->K, &bo) || hy_add_size(ain, rin, &sz) ||
                hy_add_size(sz, bo, &sz) || hy_add_size(total, sz, &total))
                return hy_err_set(HY_ELIMIT, "adapter is too large");
        }
    size_t bytes;
    if (hy_mul_size(total, sizeof(float), &bytes))
        return hy_err_set(HY_ELIMIT, "adapter is too large");
    a->arena = malloc(bytes ? bytes : 1);
    if (!a->arena)
        return hy_err_set(HY_ENOMEM, "out of memory for the adapter's %zu-byte host copy", bytes);
    a->arena_n = total;
    float *p0 = a->arena;
    for (int l = 0; l < a->n_layer; l++)
        for (int p = 0; p < ENG_N_PROJ; p++) {
            size_t ti = (size_t)l * ENG_N_PROJ + (size_t)p;
            if (!mask[ti])
                continue;
            ad_target *t = &a->tg[ti];
            t->A = p0;
            p0 += (size_t)a->r * (size_t)a->in[p];
            if (a->K > 1) {
                t->R = p0;
                p0 += (size_t)a->K * (size_t)a->in[p];
            }
            for (int k = 0; k < a->K; k++) {
                t->B[k] = p0;
                p0 += (size_t)a->out[p] * (size_t)a->r;
            }
        }
    return HY_OK;
}

static int ad_fill(ad_adapter *a, const ad_shape *s, const uint8_t *mask, const ad_found *found)
{
    size_t maxn = 0;
    for (size_t i = 0; i < (size_t)s->n_layer * ENG_N_PROJ; i++) {
        if (!mask[i])
            continue;
        const ad_found *f = &found[i];
        maxn = HY_MAX(maxn, f->A->n_elem);
        if (f->R)
            maxn = HY_MAX(maxn, f->R->n_elem);
        for (int k = 0; k < a->K; k++)
            maxn = HY_MAX(maxn, f->B[k]->n_elem);
    }
    float *tmp = malloc(maxn ? maxn * sizeof(float) : 1);
    if (!tmp)
        return hy_err_set(HY_ENOMEM, "out of memory");
    int rc = HY_OK;
    bool allow_tr = a->cfg.fan_in_fan_out;
    for (int l = 0; l < s->n_layer && !rc; l++)
        for (int p = 0; p < ENG_N_PROJ && !rc; p++) {
            size_t ti = (size_t)l * ENG_N_PROJ + (size_t)p;
            if (!mask[ti])
                continue;
            const ad_found *f = &found[ti];
            ad_target *t = &a->tg[ti];
            int64_t in = s->in[p], out = s->out[p];
            int heads = p == ENG_Q ? s->n_head : p == ENG_K ? s->n_head_kv : 0;
            bool tr;
            ad_fits(f->A, a->r, in, allow_tr, &tr);
            if ((rc = ad_copy(f->A, tr, a->r, in, 0, t->A, tmp)))
                break;
            if (a->K > 1) {
                ad_fits(f->R, a->K, in, allow_tr, &tr);
                if ((rc = ad_copy(f->R, tr, a->K, in, 0, t->R, tmp)))
                    break;
            } else if (f->R) {
                /* K == 1 router: softmax of one logit is 1; still refuse NaN/Inf. */
                ad_fits(f->R, 1, in, allow_tr, &tr);
                float *scratch = malloc((size_t)in * sizeof(float));
                if (!scratch) {
                    rc = hy_err_set(HY_ENOMEM, "out of memory");
                    break;
                }
                rc = ad_copy(f->R, tr, 1, in, 0, scratch, tmp);
                free(scratch);
                if (rc)
                    break;
            }
            for (int k = 0; k < a->K && !rc; k++) {
                ad_fits(f->B[k], out, a->r, allow_tr, &tr);
                rc = ad_copy(f->B[k], tr, out, a->r, heads, t->B[k], tmp);
            }
        }
    free(tmp);
    return rc;
}

static int ad_check_shape(const ad_shape *s)
{
    if (s->n_layer < 1 || s->n_layer > 100000)
        return hy_err_set(HY_EINVAL, "base model has %d layers", s->n_layer);
    for (int p = 0; p < ENG_N_PROJ; p++)
        if (s->in[p] < 1 || s->out[p] < 1)
            return hy_err_set(HY_EINVAL, "base model %s has no shape", ad_proj[p]);
    if (s->n_head < 1 || s->n_head_kv < 1 || s->head_dim < 2 || s->head_dim % 2 ||
        s->out[ENG_Q] != (int64_t)s->n_head * s->head_dim || s->out[ENG_K] != (int64_t)s->n_head_kv * s->head_dim)
        return hy_err_set(HY_EINVAL, "base model head layout (%d heads, %d KV heads, head_dim %d) does not fit "
                                     "q_proj/k_proj", s->n_head, s->n_head_kv, s->head_dim);
    return HY_OK;
}

/* Takes ownership of *cfg's contents (cleared on return either way). */
static int ad_pack(ad_adapter *a, be *b);

static int ad_build(ad_config *cfg, const st_file *st, const ad_shape *s, const ad_opts *opts, ad_adapter **out)
{
    int rc;
    uint8_t *mask = NULL;
    ad_found *found = NULL;
    ad_adapter *a = calloc(1, sizeof *a);
    if (a)
        a->load_id = atomic_fetch_add(&next_load_id, 1);
    if (!a) {
        ad_config_clear(cfg);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    a->cfg = *cfg;
    memset(cfg, 0, sizeof *cfg);
    if ((rc = ad_check_shape(s)))
        goto fail;
    if (opts && !isfinite(opts->scale_mult)) {
        rc = hy_err_set(HY_EINVAL, "adapter scale multiplier %g is not a finite number", (double)opts->scale_mult);
        goto fail;
    }
    size_t n = (size_t)s->n_layer * ENG_N_PROJ;
    mask = calloc(n, 1);
    found = calloc(n, sizeof *found);
    a->tg = calloc(n, sizeof *a->tg);
    a->lora = calloc(n, sizeof *a->lora);
    if (!mask || !found || !a->tg || !a->lora) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = ad_config_targets(&a->cfg, s, mask)) || (rc = ad_collect(st, s, mask, &a->cfg, found, &a->K)))
        goto fail;
    bool plain = false;
    for (size_t i = 0; i < n && !plain; i++)
        plain = found[i].B[0] && strstr(found[i].B[0]->name, ".lora_B.weight");
    a->r = a->cfg.r;
    a->n_layer = s->n_layer;
    memcpy(a->in, s->in, sizeof a->in);
    memcpy(a->out, s->out, sizeof a->out);
    if ((rc = ad_check_found(s, mask, a->r, a->K, plain, a->cfg.fan_in_fan_out, found)))
        goto fail;
    double sc = a->cfg.alpha / (a->cfg.use_rslora ? sqrt((double)a->r) : (double)a->r);
    if (opts)
        sc *= opts->scale_mult;
    a->scale = (float)sc;
    if ((rc = ad_alloc_arena(a, mask)) || (rc = ad_fill(a, s, mask, found)))
        goto fail;
    size_t ns;
    if ((rc = hy_mul_size(n, (size_t)a->K + 1, &ns)))
        goto fail;
    a->stats = calloc(ns, sizeof(float));
    if (!a->stats) {
        rc = hy_err_set(HY_ENOMEM, "out of memory");
        goto fail;
    }
    if (opts && opts->pack_for && (rc = ad_pack(a, opts->pack_for)))
        goto fail;
    a->eng.lora = a->lora;
    a->eng.K = a->K;
    a->eng.stats = a->stats;
    atomic_init(&a->n_tok, 0);
    free(mask);
    free(found);
    *out = a;
    return HY_OK;
fail:
    free(mask);
    free(found);
    ad_free(a);
    return rc;
}

int ad_read_mem(const char *cfg_json, size_t cfg_len, const void *st_buf, size_t st_len, const ad_shape *s,
                const ad_opts *opts, ad_adapter **out)
{
    *out = NULL;
    ad_config cfg;
    int rc = ad_config_parse(cfg_json, cfg_len, &cfg);
    if (rc)
        return rc;
    st_file *st = NULL;
    if ((rc = st_open_mem(st_buf, st_len, &st))) {
        ad_config_clear(&cfg);
        return hy_err_wrap(rc, "adapter_model.safetensors");
    }
    rc = ad_build(&cfg, st, s, opts, out);
    st_close(st);
    return rc;
}

static int ad_slurp(const char *path, char **buf, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return hy_err_set(errno == ENOENT ? HY_ENOTFOUND : HY_EIO, "cannot open %s: %s", path, strerror(errno));
    char *b = NULL;
    size_t n = 0, cap = 0;
    int rc = HY_OK;
    for (;;) {
        if (n + 4096 > cap) {
            if (cap > (16u << 20)) {
                rc = hy_err_set(HY_EFORMAT, "%s is larger than 16 MiB", path);
                break;
            }
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(b, cap);
            if (!nb) {
                rc = hy_err_set(HY_ENOMEM, "out of memory");
                break;
            }
            b = nb;
        }
        size_t got = fread(b + n, 1, cap - n, fp);
        n += got;
        if (got == 0) {
            if (ferror(fp))
                rc = hy_err_set(HY_EIO, "cannot read %s", path);
            break;
        }
    }
    fclose(fp);
    if (rc) {
        free(b);
        return rc;
    }
    *buf = b;
    *len = n;
    return HY_OK;
}

int ad_read(const char *dir, const ad_shape *s, const ad_opts *opts, ad_adapter **out)
{
    *out = NULL;
    char path[4096];
    char *text = NULL;
    size_t len = 0;
    ad_config cfg;
    st_file *st = NULL;
    int rc;
    if (snprintf(path, sizeof path, "%s/adapter_config.json", dir) >= (int)sizeof path)
        return hy_err_set(HY_EINVAL, "adapter path is too long");
    if ((rc = ad_slurp(path, &text, &len)))
        return hy_err_wrap(rc, "adapter %s", dir);
    rc = ad_config_parse(text, len, &cfg);
    free(text);
    if (rc)
        return hy_err_wrap(rc, "%s", path);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    if ((rc = st_open(path, &st))) {
        ad_config_clear(&cfg);
        return hy_err_wrap(rc, "adapter %s", dir);
    }
    rc = ad_build(&cfg, st, s, opts, out);
    st_close(st);
    if (rc)
        return hy_err_wrap(rc, "adapter %s", dir);
    return HY_OK;
}

/* ------------------------------------------------------------------ backend */

static void ad_pack_free(ad_adapter *a)
{
    for (size_t i = 0; a->pack && i < (size_t)a->n_layer * ENG_N_PROJ; i++)
        if (a->pack[i])
            a->pack_be->ops->lora_pack_free(a->pack_be, a->pack[i]);
    free(a->pack);
    a->pack = NULL;
    a->pack_be = NULL;
}

/* The reading thread's share of the upload: b's lora_pack for every target (nothing where b has
 * no such op). */
static int ad_pack(ad_adapter *a, be *b)
{
    if (!b->ops->lora_pack)
        return HY_OK;
    size_t n = (size_t)a->n_layer * ENG_N_PROJ;
    if (!(a->pack = calloc(n, sizeof *a->pack)))
        return hy_err_set(HY_ENOMEM, "out of memory");
    a->pack_be = b;
    for (size_t i = 0; i < n; i++) {
        const ad_target *t = &a->tg[i];
        int p = (int)(i % ENG_N_PROJ);
        int rc = t->A ? b->ops->lora_pack(b, a->r, a->K, a->in[p], a->out[p], t->A, t->R,
                                          (const float *const *)t->B, a->scale, &a->pack[i])
                      : HY_OK;
        if (rc) {
            ad_pack_free(a);
            return hy_err_wrap(rc, "preparing adapter for upload");
        }
    }
    return HY_OK;
}

/* One target's backend matrices: from its pack when there is one for b (taken), else made now. */
static int ad_upload_one(ad_adapter *a, be *b, size_t i)
{
    if (a->pack && a->pack_be == b && a->pack[i]) {
        be_lora_pack *p = a->pack[i];
        a->pack[i] = NULL;
        return b->ops->lora_adopt(b, p, &a->lora[i]);
    }
    const ad_target *t = &a->tg[i];
    int p = (int)(i % ENG_N_PROJ);
    return b->ops->lora_create(b, a->r, a->K, a->in[p], a->out[p], t->A, t->R, (const float *const *)t->B,
                               a->scale, &a->lora[i]);
}

int ad_upload(ad_adapter *a, be *b)
{
    if (a->be == b)
        return HY_OK;
    if (a->be)
        ad_unupload(a);
    size_t n = (size_t)a->n_layer * ENG_N_PROJ;
    for (size_t i = 0; i < n; i++) {
        if (!a->tg[i].A)
            continue;
        int rc = ad_upload_one(a, b, i);
        if (rc) {
            for (size_t j = 0; j < i; j++)
                if (a->lora[j]) {
                    b->ops->lora_free(b, a->lora[j]);
                    a->lora[j] = NULL;
                }
            return hy_err_wrap(rc, "uploading adapter");
        }
    }
    a->be = b;
    if (a->pack_be == b)
        ad_pack_free(a); /* used up (or, after a failure above, left for the next try) */
    return HY_OK;
}

bool ad_uploaded(const ad_adapter *a) { return a->be != NULL; }

void ad_unupload(ad_adapter *a)
{
    if (!a || !a->be)
        return;
    for (size_t i = 0; i < (size_t)a->n_layer * ENG_N_PROJ; i++)
        if (a->lora[i]) {
            a->be->ops->lora_free(a->be, a->lora[i]);
            a->lora[i] = NULL;
        }
    a->be = NULL;
}

void ad_free(ad_adapter *a)
{
    if (!a)
        return;
    if (a->lora)
        ad_unupload(a);
    ad_pack_free(a);
    free(a->lora);
    free(a->tg);
    free(a->arena);
    free(a->stats);
    free(a->stack);
    ad_config_clear(&a->cfg);
    free(a);
}

/* ------------------------------------------------------------------ stacks */

int ad_stack_new(ad_adapter *const *members, const float *weights, int n, ad_adapter **out)
{
    *out = NULL;
    if (n < 1 || n > AD_STACK_MAX)
        return hy_err_set(HY_EINVAL, "an adapter stack has 1 to %d members, not %d", AD_STACK_MAX, n);
    for (int i = 0; i < n; i++) {
        if (!members[i] || members[i]->stack)
            return hy_err_set(HY_EINVAL, "adapter stack member %d is not an adapter read from files", i);
        if (!isfinite(weights[i]) || weights[i] == 0.0f)
            return hy_err_set(HY_EINVAL, "adapter stack member %d has weight %g (finite and non-zero)", i,
                              (double)weights[i]);
    }
    ad_adapter *a = calloc(1, sizeof *a);
    struct ad_stack *st = calloc(1, sizeof *st);
    if (!a || !st) {
        free(a);
        free(st);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    /* FNV-1a over (member load id, weight bits); the top bit set keeps it apart from the load ids
     * of adapters read from files (1, 2, ...) */
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < n; i++) {
        uint32_t wb;
        memcpy(&wb, &weights[i], sizeof wb);
        uint64_t v[2] = {members[i]->load_id, wb};
        const unsigned char *p = (const unsigned char *)v;
        for (size_t k = 0; k < sizeof v; k++)
            h = (h ^ p[k]) * 1099511628211ull;
        st->member[i] = members[i];
        st->weight[i] = weights[i];
    }
    st->n = n;
    a->stack = st;
    a->load_id = h | (1ull << 63);
    a->n_layer = members[0]->n_layer;
    *out = a;
    return HY_OK;
}

int ad_stack_n(const ad_adapter *a) { return a->stack ? a->stack->n : 0; }

ad_adapter *ad_stack_member(const ad_adapter *a, int i, float *weight)
{
    if (weight)
        *weight = a->stack->weight[i];
    return a->stack->member[i];
}

void ad_stack_bind(ad_adapter *a)
{
    struct ad_stack *st = a->stack;
    for (int i = 0; i < st->n; i++) {
        st->chain[i] = st->member[i]->eng;
        st->chain[i].scale = st->weight[i];
        st->chain[i].next = i + 1 < st->n ? &st->chain[i + 1] : NULL;
    }
    a->eng = st->chain[0];
}

/* ------------------------------------------------------------------ accessors */

void ad_shape_from_model(const eng_model *m, ad_shape *s)
{
    const eng_hparams *hp = eng_model_hparams(m);
    memset(s, 0, sizeof *s);
    s->n_layer = hp->n_layer;
    s->n_head = hp->n_head;
    s->n_head_kv = hp->n_head_kv;
    s->head_dim = hp->head_dim;
    for (int p = 0; p < ENG_N_PROJ; p++)
        eng_proj_dims(m, p, &s->in[p], &s->out[p]);
}

const eng_adapter *ad_eng(const ad_adapter *a) { return &a->eng; }
int ad_r(const ad_adapter *a) { return a->r; }
int ad_K(const ad_adapter *a) { return a->K; }
uint64_t ad_load_id(const ad_adapter *a) { return a->load_id; }
float ad_scale(const ad_adapter *a) { return a->scale; }
int ad_n_layer(const ad_adapter *a) { return a->n_layer; }
const ad_config *ad_cfg(const ad_adapter *a) { return &a->cfg; }
size_t ad_host_bytes(const ad_adapter *a) { return a->arena_n * sizeof(float); }

bool ad_targets(const ad_adapter *a, int layer, int proj)
{
    if (layer < 0 || layer >= a->n_layer || proj < 0 || proj >= ENG_N_PROJ)
        return false;
    return a->tg[(size_t)layer * ENG_N_PROJ + (size_t)proj].A != NULL;
}

void ad_host(const ad_adapter *a, int layer, int proj, const float **A, const float **R, const float *const **B)
{
    *A = NULL;
    *R = NULL;
    *B = NULL;
    if (!ad_targets(a, layer, proj))
        return;
    const ad_target *t = &a->tg[(size_t)layer * ENG_N_PROJ + (size_t)proj];
    *A = t->A;
    *R = t->R;
    *B = (const float *const *)t->B;
}

void ad_count_tokens(ad_adapter *a, uint64_t n) { atomic_fetch_add(&a->n_tok, n); }
uint64_t ad_tokens(const ad_adapter *a) { return atomic_load(&((ad_adapter *)a)->n_tok); }

double ad_stats_mean_gate(const ad_adapter *a, float *out)
{
    int K = a->K;
    double sum[AD_MAX_K] = {0}, cnt = 0;
    for (size_t i = 0; i < (size_t)a->n_layer * ENG_N_PROJ; i++) {
        if (!a->tg[i].A)
            continue;
        const float *st = a->stats + i * (size_t)(K + 1);
        for (int k = 0; k < K; k++) {
            sum[k] += st[k];
            cnt += st[k];
        }
    }
    for (int k = 0; k < K; k++)
        out[k] = cnt > 0 ? (float)(sum[k] / cnt) : 0.0f;
    return cnt;
}

void ad_stats_mean_entropy(const ad_adapter *a, float *out)
{
    int K = a->K;
    for (int l = 0; l < a->n_layer; l++) {
        double acc = 0;
        int used = 0;
        for (int p = 0; p < ENG_N_PROJ; p++) {
            size_t i = (size_t)l * ENG_N_PROJ + (size_t)p;
            if (!a->tg[i].A)
                continue;
            const float *st = a->stats + i * (size_t)(K + 1);
            double tok = 0;
            for (int k = 0; k < K; k++)
                tok += st[k];
            if (tok <= 0)
                continue;
            acc += st[K] / tok;
            used++;
        }
        out[l] = used ? (float)(acc / used) : 0.0f;
    }
}

void ad_stats_reset(ad_adapter *a)
{
    memset(a->stats, 0, (size_t)a->n_layer * ENG_N_PROJ * (size_t)(a->K + 1) * sizeof(float));
    atomic_store(&a->n_tok, 0);
}
