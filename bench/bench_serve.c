/* bench_serve.c - `hydrad-bench serve`: a load generator for OpenAI-compatible servers (hydrad,
 * llama-server, vLLM). One thread drives every stream through libcurl multi; arrivals are
 * Poisson/gamma (vLLM benchmark_serving's --burstiness) or closed-loop by --max-concurrency.
 * It talks HTTP only: it never links against the engine's state. */
#include "bench/bench.h"
#include "bench/bench_stats.h"
#include "engine/hy.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* Common English words that BPE vocabularies (GPT-2, Llama, SmolLM2) keep as one token with
 * their leading space, so a prompt of N words is close to N tokens without a tokenizer. The
 * server's usage.prompt_tokens reports the real count. */
static const char *const k_words[] = {
    "the",   "of",    "and",   "to",    "in",    "is",    "that",  "for",   "it",    "as",    "was",
    "with",  "be",    "by",    "on",    "not",   "he",    "this",  "are",   "or",    "his",   "from",
    "at",    "which", "but",   "have",  "an",    "had",   "they",  "you",   "were",  "their", "one",
    "all",   "we",    "can",   "her",   "has",   "there", "been",  "if",    "more",  "when",  "will",
    "would", "who",   "so",    "no",    "she",   "other", "its",   "may",   "these", "what",  "them",
    "than",  "some",  "him",   "time",  "into",  "only",  "do",    "could", "new",   "about", "two",
    "first", "then",  "also",  "after", "any",   "like",  "should", "our",  "now",   "such",  "over",
    "man",   "very",  "my",    "most",  "made",  "where", "many",  "before", "must", "through", "years",
    "back",  "much",  "good",  "well",  "down",  "world", "day",   "way",   "long",  "great", "little",
    "still", "own",   "work",  "life",  "being", "under", "never", "same",  "last",  "might", "great",
    "water", "city",  "house", "place", "state", "small", "large", "power", "light", "night", "story",
    "music", "river", "school", "family", "group", "money", "point", "party", "order", "market", "field",
};

typedef struct {
    const char *url, *endpoint, *model, *api_key, *admin_key, *dataset, *make_dir, *base_gguf, *hydrad;
    const char *targets, *prefix, *goodput, *result_json, *label, *response_format;
    json_t *rf; /* owned: the response_format sent with every request, or NULL */
    int num_prompts, max_conc, input_len, output_len, num_adapters, ad_r, ad_K, quiet, no_ignore_eos, round_robin, echo;
    int prefix_len, num_prefixes, prefix_rr, turns; /* --shared-prefix-len, --num-prefixes, --prefix-round-robin, --multi-turn */
    int first_use; /* --first-use: made adapters stay on disk; the server loads each on its first request */
    double rate, burstiness, duration, range_ratio, zipf, timeout, temperature;
    uint64_t seed;
} sv_opts;

typedef struct {
    char *prompt;   /* owned */
    int max_tokens; /* 0: the dataset did not say; use --output-len */
} sv_prompt;

typedef struct {
    int id, max_tokens;
    int conv, turn;    /* conversation and turn (0-based); turn 0 without --multi-turn */
    const char *model; /* borrowed from the adapter name table or opts */
    char *body;        /* owned request JSON */
    json_t *hist;      /* owned, --multi-turn: what this turn sent (messages array or prompt string) */
    char *question;    /* owned, --multi-turn turns after the first: the new user text */
    CURL *h;
    struct curl_slist *hdrs;
    double t_start, t_first, t_last, t_end;
    double *itl; /* owned, seconds */
    size_t n_itl, cap_itl;
    int n_chunks;
    long prompt_tokens, completion_tokens, cached_tokens; /* usage; cached: prompt_tokens_details */
    char *buf; /* pending SSE bytes, or the error body */
    size_t len, cap;
    char *text; /* owned: the answer, kept only with --response-format (to check it parses) or for the
                 * next turn of --multi-turn; freed last */
    size_t text_len, text_cap;
    bool keep_text, check_json, saw_done, failed, bad_json, sent, cached_known;
    char err_kind[64], err_msg[256];
} sv_req;

typedef struct {
    char kind[64];
    int count;
    char example[256];
} sv_errkind;

typedef struct {
    sv_errkind e[32];
    int n;
} sv_errors;

static void err_add(sv_errors *es, const char *kind, const char *msg)
{
    for (int i = 0; i < es->n; i++)
        if (!strcmp(es->e[i].kind, kind)) {
            es->e[i].count++;
            return;
        }
    int i = es->n < (int)HY_ARRAY_LEN(es->e) ? es->n++ : es->n - 1; /* last slot collects overflow */
    snprintf(es->e[i].kind, sizeof es->e[i].kind, "%s", kind);
    snprintf(es->e[i].example, sizeof es->e[i].example, "%s", msg);
    es->e[i].count++;
}

/* ---------- small HTTP helpers (blocking; set-up only, never during the run) ---------- */

typedef struct {
    char *p;
    size_t n;
} sv_buf;

static size_t buf_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    sv_buf *b = ud;
    size_t n = size * nmemb;
    char *q = realloc(b->p, b->n + n + 1);
    if (!q)
        return 0;
    memcpy(q + b->n, ptr, n);
    b->p = q;
    b->n += n;
    b->p[b->n] = 0;
    return n;
}

/* GET or POST (body != NULL) url; *out (malloc'ed, caller frees) gets the body, *status the code. */
static int http_call(const char *url, const char *key, const char *body, long *status, char **out)
{
    sv_buf b = {0};
    struct curl_slist *h = NULL;
    char auth[512];
    *out = NULL;
    CURL *c = curl_easy_init();
    if (!c)
        return hy_err_set(HY_ENOMEM, "curl_easy_init failed");
    h = curl_slist_append(h, "Content-Type: application/json");
    if (key && *key) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", key);
        h = curl_slist_append(h, auth);
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, buf_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (body)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    CURLcode cc = curl_easy_perform(c);
    int rc = 0;
    if (cc != CURLE_OK) {
        rc = hy_err_set(HY_EIO, "%s: %s", url, curl_easy_strerror(cc));
        free(b.p);
        b.p = NULL;
    } else {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, status);
        *out = b.p ? b.p : strdup("");
    }
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return rc;
}

/* The first model id of GET /v1/models (the base model on hydrad and llama-server). */
static int fetch_model(const sv_opts *o, char **out)
{
    char url[2048], *body = NULL;
    long st = 0;
    snprintf(url, sizeof url, "%s/v1/models", o->url);
    int rc = http_call(url, o->api_key, NULL, &st, &body);
    if (rc)
        return rc;
    json_t *j = json_loads(body, 0, NULL);
    json_t *id = json_object_get(json_array_get(json_object_get(j, "data"), 0), "id");
    if (st != 200 || !json_is_string(id))
        rc = hy_err_set(HY_EFORMAT, "GET %s: status %ld, no data[0].id in the answer", url, st);
    else
        *out = strdup(json_string_value(id));
    json_decref(j);
    free(body);
    return rc;
}

/* The first n adapter names that GET /v1/adapters lists. names[] strings malloc'ed. */
static int fetch_adapters(const sv_opts *o, int n, char **names)
{
    char url[2048], *body = NULL;
    long st = 0;
    snprintf(url, sizeof url, "%s/v1/adapters", o->url);
    int rc = http_call(url, o->api_key, NULL, &st, &body);
    if (rc)
        return rc;
    json_t *j = json_loads(body, 0, NULL);
    json_t *d = json_object_get(j, "data");
    int have = json_is_array(d) ? (int)json_array_size(d) : 0;
    if (st != 200 || have < n) {
        rc = hy_err_set(HY_ENOTFOUND,
                        "--num-adapters %d: the server lists %d adapters at %s (use --make-adapters DIR, or "
                        "start it with --adapter NAME=DIR)",
                        n, have, url);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        json_t *e = json_array_get(d, (size_t)i);
        json_t *nm = json_object_get(e, "name");
        if (!json_is_string(nm))
            nm = json_object_get(e, "id");
        if (!json_is_string(nm)) {
            rc = hy_err_set(HY_EFORMAT, "%s: entry %d has no name", url, i);
            goto done;
        }
        names[i] = strdup(json_string_value(nm));
    }
done:
    json_decref(j);
    free(body);
    return rc;
}

/* ---------- --make-adapters: generate with `hydrad mkadapter`, load via the admin API ---------- */

static int spawn_mkadapter(const sv_opts *o, const char *dir, int seed, pid_t *pid)
{
    char s_seed[32], s_r[32], s_K[32];
    snprintf(s_seed, sizeof s_seed, "%d", seed);
    snprintf(s_r, sizeof s_r, "%d", o->ad_r);
    snprintf(s_K, sizeof s_K, "%d", o->ad_K);
    /* --shape-from: the shapes are what costs at serving time; B calibration reads every base
     * weight and would make 1000 adapters slow to write */
    char *argv[] = {(char *)o->hydrad, "mkadapter",       "--out",  (char *)dir,          "--shape-from",
                    (char *)o->base_gguf, "--seed",       s_seed,   "--r",                s_r,
                    "--K",              s_K,              "--targets", (char *)o->targets, "--dtype",
                    "f16",              NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0); /* its "wrote DIR" line; failures show in the status */
    int e = posix_spawn(pid, o->hydrad, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e)
        return hy_err_set(HY_EIO, "cannot run %s mkadapter: %s", o->hydrad, strerror(e));
    return 0;
}

static int wait_child(pid_t pid, const char *what)
{
    int st = 0;
    if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return hy_err_set(HY_EIO, "hydrad mkadapter for %s failed (status %d)", what, st);
    return 0;
}

static int make_adapters(const sv_opts *o, char **names)
{
    char sub[PATH_MAX], dir[PATH_MAX + 32], probe[PATH_MAX + 64], name[128];
    snprintf(sub, sizeof sub, "%s/r%d-K%d-%s", o->make_dir, o->ad_r, o->ad_K, o->targets);
    if (mkdir(o->make_dir, 0755) && errno != EEXIST)
        return hy_err_set(HY_EIO, "mkdir %s: %s", o->make_dir, strerror(errno));
    if (mkdir(sub, 0755) && errno != EEXIST)
        return hy_err_set(HY_EIO, "mkdir %s: %s", sub, strerror(errno));
    long par = sysconf(_SC_NPROCESSORS_ONLN);
    pid_t pids[64];
    char *dirs[64] = {0};
    int np = 0, rc = 0, made = 0;
    par = par < 1 ? 1 : par > 64 ? 64 : par;
    for (int i = 0; i < o->num_adapters && !rc; i++) {
        snprintf(dir, sizeof dir, "%s/%04d", sub, i);
        snprintf(probe, sizeof probe, "%s/adapter_model.safetensors", dir);
        if (access(probe, R_OK) == 0)
            continue; /* written by an earlier run with the same r, K, targets, seed */
        if (np == par) {
            rc = wait_child(pids[0], dirs[0]);
            free(dirs[0]);
            memmove(pids, pids + 1, sizeof(pid_t) * (size_t)(np - 1));
            memmove(dirs, dirs + 1, sizeof(char *) * (size_t)(np - 1));
            np--;
            if (rc)
                break;
        }
        if ((rc = spawn_mkadapter(o, dir, 1000 + i, &pids[np])))
            break;
        dirs[np++] = strdup(dir);
        made++;
    }
    for (int k = 0; k < np; k++) {
        int r2 = wait_child(pids[k], dirs[k]);
        rc = rc ? rc : r2;
        free(dirs[k]);
    }
    if (rc)
        return rc;
    if (made && !o->quiet)
        fprintf(stderr, "hydrad-bench: wrote %d adapters under %s\n", made, sub);
    if (o->first_use) { /* named by their directories; the server resolves them (--adapter-resolver sub) */
        for (int i = 0; i < o->num_adapters; i++) {
            snprintf(name, sizeof name, "%04d", i);
            if (!(names[i] = strdup(name)))
                return hy_err_set(HY_ENOMEM, "out of memory");
        }
        if (!o->quiet)
            fprintf(stderr, "hydrad-bench: %d adapters left on disk for first use (--adapter-resolver %s)\n",
                    o->num_adapters, sub);
        return 0;
    }

    char url[2048], path[PATH_MAX];
    snprintf(url, sizeof url, "%s/v1/load_lora_adapter", o->url);
    double t0 = hy_now();
    for (int i = 0; i < o->num_adapters; i++) {
        snprintf(dir, sizeof dir, "%s/%04d", sub, i);
        if (!realpath(dir, path))
            return hy_err_set(HY_EIO, "realpath %s: %s", dir, strerror(errno));
        snprintf(name, sizeof name, "%s%04d", o->prefix, i);
        json_t *req = json_pack("{s:s, s:s}", "lora_name", name, "lora_path", path);
        char *body = json_dumps(req, JSON_COMPACT), *ans = NULL;
        json_decref(req);
        long st = 0;
        rc = body ? http_call(url, o->admin_key ? o->admin_key : o->api_key, body, &st, &ans)
                  : hy_err_set(HY_ENOMEM, "out of memory");
        free(body);
        if (!rc && st != 200 && !(ans && strstr(ans, "adapter_exists")))
            rc = hy_err_set(HY_EIO, "loading adapter %s from %s: HTTP %ld: %.300s (start the server with "
                                    "--adapter-root above it and --max-cpu-loras >= %d)",
                            name, path, st, ans ? ans : "", o->num_adapters);
        free(ans);
        if (rc)
            return rc;
        names[i] = strdup(name);
    }
    if (!o->quiet)
        fprintf(stderr, "hydrad-bench: %d adapters loaded through the admin API in %.1f s\n", o->num_adapters,
                hy_now() - t0);
    return 0;
}

/* ---------- --response-format ---------- */

/* A record of a few fields of each kind, bounded (maxLength, maxItems, enum, integer ranges) so
 * a small model's answer is about 60-150 tokens whatever it rambles about. */
static const char k_builtin_rf[] =
    "{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"record\",\"strict\":true,\"schema\":{"
    "\"type\":\"object\",\"properties\":{"
    "\"title\":{\"type\":\"string\",\"maxLength\":48},"
    "\"category\":{\"type\":\"string\",\"enum\":[\"news\",\"sports\",\"science\",\"music\",\"travel\",\"other\"]},"
    "\"year\":{\"type\":\"integer\",\"minimum\":1900,\"maximum\":2030},"
    "\"rating\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":5},"
    "\"published\":{\"type\":\"boolean\"},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":16},\"maxItems\":4},"
    "\"summary\":{\"type\":\"string\",\"maxLength\":160}},"
    "\"required\":[\"title\",\"category\",\"year\",\"rating\",\"published\",\"tags\",\"summary\"],"
    "\"additionalProperties\":false}}}";

/* o->rf from --response-format: "builtin" or a file holding an OpenAI response_format object. */
static int load_response_format(sv_opts *o)
{
    json_error_t je;
    bool builtin = !strcmp(o->response_format, "builtin");
    o->rf = builtin ? json_loads(k_builtin_rf, 0, &je) : json_load_file(o->response_format, 0, &je);
    if (!o->rf)
        return hy_err_set(HY_EFORMAT, "--response-format %s:%d: %s", o->response_format, je.line, je.text);
    if (!json_is_object(o->rf) || !json_is_string(json_object_get(o->rf, "type")))
        return hy_err_set(HY_EFORMAT, "--response-format %s: not an object with a string \"type\"",
                          o->response_format);
    return 0;
}

/* ---------- prompts ---------- */

static char *random_prompt(bench_rng *r, int words)
{
    size_t cap = (size_t)words * 12 + 16, n = 0;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    for (int i = 0; i < words; i++) {
        const char *w = k_words[bench_rng_int(r, 0, (int)HY_ARRAY_LEN(k_words) - 1)];
        n += (size_t)snprintf(s + n, cap - n, i ? " %s" : "%s", w);
    }
    s[n] = 0;
    return s;
}

/* a + sep + b, malloc'ed (caller frees); NULL when out of memory. */
static char *str_join(const char *a, const char *sep, const char *b)
{
    size_t na = strlen(a), ns = strlen(sep), nb = strlen(b);
    char *s = malloc(na + ns + nb + 1);
    if (!s)
        return NULL;
    memcpy(s, a, na);
    memcpy(s + na, sep, ns);
    memcpy(s + na + ns, b, nb + 1);
    return s;
}

static int len_draw(bench_rng *r, int n, double ratio)
{
    if (ratio <= 0)
        return n;
    int lo = (int)floor(n * (1.0 - ratio)), hi = (int)ceil(n * (1.0 + ratio));
    return bench_rng_int(r, lo < 1 ? 1 : lo, hi);
}

/* --dataset: one JSON object per line with "prompt" (or "text"), optional "max_tokens"/"output_len". */
static int load_dataset(const char *path, sv_prompt **out, int *n_out)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return hy_err_set(HY_EIO, "--dataset %s: %s", path, strerror(errno));
    sv_prompt *v = NULL;
    int n = 0, cap = 0, line_no = 0, rc = 0;
    char *line = NULL;
    size_t lcap = 0;
    while (getline(&line, &lcap, f) > 0) {
        line_no++;
        json_error_t je;
        json_t *j = json_loads(line, JSON_DECODE_ANY, &je);
        if (!j)
            continue; /* blank line */
        json_t *p = json_object_get(j, "prompt");
        if (!json_is_string(p))
            p = json_object_get(j, "text");
        if (!json_is_string(p)) {
            json_decref(j);
            rc = hy_err_set(HY_EFORMAT, "%s:%d: no \"prompt\" string", path, line_no);
            goto done;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            sv_prompt *nv = realloc(v, sizeof(*v) * (size_t)cap);
            if (!nv) {
                json_decref(j);
                rc = hy_err_set(HY_ENOMEM, "out of memory reading %s", path);
                goto done;
            }
            v = nv;
        }
        json_t *mt = json_object_get(j, "max_tokens");
        if (!json_is_integer(mt))
            mt = json_object_get(j, "output_len");
        v[n].prompt = strdup(json_string_value(p));
        v[n].max_tokens = json_is_integer(mt) ? (int)json_integer_value(mt) : 0;
        n++;
        json_decref(j);
    }
    if (n == 0)
        rc = hy_err_set(HY_EFORMAT, "%s: no prompts", path);
done:
    free(line);
    fclose(f);
    if (rc) {
        for (int i = 0; i < n; i++)
            free(v[i].prompt);
        free(v);
        return rc;
    }
    *out = v;
    *n_out = n;
    return 0;
}

/* ---------- one streaming request ---------- */

static bool is_chat(const sv_opts *o)
{
    return !strcmp(o->endpoint, "chat");
}

/* The first turn's input: a messages array of one user turn (chat) or the prompt string. New
 * reference, NULL when out of memory. */
static json_t *first_input(const sv_opts *o, const char *prompt)
{
    if (is_chat(o))
        return json_pack("[{s:s, s:s}]", "role", "user", "content", prompt);
    return json_string(prompt);
}

/* The next turn's input: the previous one, the answer received, then the new question. New
 * reference, NULL when out of memory. A completions prompt grows as text: the model's
 * continuation follows the prompt verbatim, then a blank line and the question. */
static json_t *next_input(const json_t *prev, const char *answer, const char *question)
{
    if (json_is_array(prev)) {
        json_t *m = json_deep_copy(prev);
        if (m && (json_array_append_new(m, json_pack("{s:s, s:s}", "role", "assistant", "content", answer)) ||
                  json_array_append_new(m, json_pack("{s:s, s:s}", "role", "user", "content", question)))) {
            json_decref(m);
            return NULL;
        }
        return m;
    }
    char *a = str_join(json_string_value(prev), "", answer), *p = a ? str_join(a, "\n\n", question) : NULL;
    json_t *j = p ? json_string(p) : NULL;
    free(a);
    free(p);
    return j;
}

/* input: borrowed, a messages array (chat) or a prompt string (completions). */
static char *request_body(const sv_opts *o, const char *model, json_t *input, int max_tokens)
{
    /* cache_prompt: llama-server's prompt reuse, sent explicitly (hydrad ignores fields it does not know) */
    json_t *j = json_pack("{s:s, s:i, s:b, s:{s:b}, s:f, s:b}", "model", model, "max_tokens", max_tokens, "stream", 1,
                          "stream_options", "include_usage", 1, "temperature", o->temperature, "cache_prompt", 1);
    if (!j)
        return NULL;
    if (!o->no_ignore_eos)
        json_object_set_new(j, "ignore_eos", json_true());
    if (o->rf)
        json_object_set(j, "response_format", o->rf);
    if (o->echo) { /* prompt scoring: every prompt token's logprob comes back */
        json_object_set_new(j, "echo", json_true());
        json_object_set_new(j, "logprobs", json_integer(1));
    }
    json_object_set(j, json_is_array(input) ? "messages" : "prompt", input);
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s;
}

static void req_fail(sv_req *q, const char *kind, const char *msg)
{
    if (q->failed)
        return;
    q->failed = true;
    snprintf(q->err_kind, sizeof q->err_kind, "%s", kind);
    snprintf(q->err_msg, sizeof q->err_msg, "%s", msg);
}

static void text_append(sv_req *q, const char *s, size_t n)
{
    if (q->text_len + n + 1 > q->text_cap) {
        size_t nc = (q->text_len + n + 1) * 2;
        char *nt = realloc(q->text, nc);
        if (!nt) {
            req_fail(q, "oom", "out of memory keeping the answer");
            return;
        }
        q->text = nt;
        q->text_cap = nc;
    }
    memcpy(q->text + q->text_len, s, n);
    q->text_len += n;
    q->text[q->text_len] = 0;
}

static void on_event(sv_req *q, const char *data, size_t n, double now)
{
    if (n == 6 && !memcmp(data, "[DONE]", 6)) {
        q->saw_done = true;
        return;
    }
    json_error_t je;
    json_t *j = json_loadb(data, n, 0, &je);
    if (!j) {
        req_fail(q, "bad_sse_json", je.text);
        return;
    }
    json_t *err = json_object_get(j, "error");
    if (err) {
        json_t *m = json_object_get(err, "message");
        req_fail(q, "stream_error", json_is_string(m) ? json_string_value(m) : "error event in the stream");
    }
    json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    if (ch) {
        json_t *t = json_object_get(ch, "text");
        if (!json_is_string(t))
            t = json_object_get(json_object_get(ch, "delta"), "content");
        if (json_is_string(t) && json_string_length(t) > 0) {
            if (q->n_chunks == 0) {
                q->t_first = now;
            } else {
                if (q->n_itl == q->cap_itl) {
                    size_t nc = q->cap_itl ? q->cap_itl * 2 : 64;
                    double *ni = realloc(q->itl, nc * sizeof(double));
                    if (ni) {
                        q->itl = ni;
                        q->cap_itl = nc;
                    }
                }
                if (q->n_itl < q->cap_itl)
                    q->itl[q->n_itl++] = now - q->t_last;
            }
            q->n_chunks++;
            q->t_last = now;
            if (q->keep_text)
                text_append(q, json_string_value(t), json_string_length(t));
        }
    }
    json_t *u = json_object_get(j, "usage");
    if (json_is_object(u)) {
        json_t *ct = json_object_get(u, "completion_tokens"), *pt = json_object_get(u, "prompt_tokens");
        if (json_is_integer(ct))
            q->completion_tokens = (long)json_integer_value(ct);
        if (json_is_integer(pt))
            q->prompt_tokens = (long)json_integer_value(pt);
        json_t *cached = json_object_get(json_object_get(u, "prompt_tokens_details"), "cached_tokens");
        if (json_is_integer(cached)) {
            q->cached_tokens = (long)json_integer_value(cached);
            q->cached_known = true;
        }
    }
    json_decref(j);
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud)
{
    sv_req *q = ud;
    size_t n = size * nmemb;
    double now = hy_now();
    long st = 0;
    curl_easy_getinfo(q->h, CURLINFO_RESPONSE_CODE, &st);
    if (q->len + n + 1 > q->cap) {
        size_t nc = (q->len + n + 1) * 2;
        char *nb = realloc(q->buf, nc);
        if (!nb)
            return 0;
        q->buf = nb;
        q->cap = nc;
    }
    memcpy(q->buf + q->len, ptr, n);
    q->len += n;
    q->buf[q->len] = 0;
    if (st != 200)
        return q->len > 65536 ? 0 : n; /* keep the error body for the report */
    size_t start = 0;
    for (;;) {
        char *nl = memchr(q->buf + start, '\n', q->len - start);
        if (!nl)
            break;
        size_t end = (size_t)(nl - q->buf), e = end;
        if (e > start && q->buf[e - 1] == '\r')
            e--;
        if (e - start >= 5 && !memcmp(q->buf + start, "data:", 5)) {
            size_t d = start + 5;
            while (d < e && q->buf[d] == ' ')
                d++;
            on_event(q, q->buf + d, e - d, now);
        }
        start = end + 1;
    }
    memmove(q->buf, q->buf + start, q->len - start);
    q->len -= start;
    return n;
}

static int req_start(const sv_opts *o, CURLM *m, sv_req *q)
{
    char url[2048], auth[512];
    snprintf(url, sizeof url, "%s/v1/%s", o->url, is_chat(o) ? "chat/completions" : "completions");
    q->h = curl_easy_init();
    if (!q->h)
        return hy_err_set(HY_ENOMEM, "curl_easy_init failed");
    q->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    if (o->api_key) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", o->api_key);
        q->hdrs = curl_slist_append(q->hdrs, auth);
    }
    curl_easy_setopt(q->h, CURLOPT_URL, url);
    curl_easy_setopt(q->h, CURLOPT_HTTPHEADER, q->hdrs);
    curl_easy_setopt(q->h, CURLOPT_POSTFIELDS, q->body);
    curl_easy_setopt(q->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(q->h, CURLOPT_WRITEDATA, q);
    curl_easy_setopt(q->h, CURLOPT_PRIVATE, q);
    curl_easy_setopt(q->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(q->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(q->h, CURLOPT_TIMEOUT_MS, (long)(o->timeout * 1000));
    q->t_start = hy_now();
    if (curl_multi_add_handle(m, q->h) != CURLM_OK)
        return hy_err_set(HY_EIO, "curl_multi_add_handle failed");
    return 0;
}

static void req_finish(sv_req *q, CURLcode cc, double now)
{
    long st = 0;
    char msg[256];
    q->t_end = now;
    curl_easy_getinfo(q->h, CURLINFO_RESPONSE_CODE, &st);
    if (cc != CURLE_OK) {
        char kind[64];
        snprintf(kind, sizeof kind, "curl_%d", (int)cc);
        req_fail(q, cc == CURLE_OPERATION_TIMEDOUT ? "timeout" : cc == CURLE_COULDNT_CONNECT ? "connect" : kind,
                 curl_easy_strerror(cc));
    } else if (st != 200) {
        char kind[64];
        snprintf(kind, sizeof kind, "http_%ld", st);
        json_t *j = q->buf ? json_loadb(q->buf, q->len, 0, NULL) : NULL;
        json_t *m = json_object_get(json_object_get(j, "error"), "message");
        snprintf(msg, sizeof msg, "%s", json_is_string(m) ? json_string_value(m) : q->buf ? q->buf : "");
        json_decref(j);
        req_fail(q, kind, msg);
    } else if (q->n_chunks == 0) {
        req_fail(q, "no_tokens", "the stream ended without a token");
    } else if (!q->saw_done) {
        req_fail(q, "no_done", "the stream ended without data: [DONE]");
    }
    if (q->completion_tokens <= 0)
        q->completion_tokens = q->n_chunks; /* server sent no usage */
    if (q->check_json && !q->failed) {
        json_t *j = json_loadb(q->text ? q->text : "", q->text_len, 0, NULL);
        q->bad_json = !json_is_object(j); /* json_object and json_schema both ask for an object */
        json_decref(j);
    }
}

static void req_release(CURLM *m, sv_req *q)
{
    if (q->h) {
        curl_multi_remove_handle(m, q->h);
        curl_easy_cleanup(q->h);
        q->h = NULL;
    }
    curl_slist_free_all(q->hdrs);
    q->hdrs = NULL;
    free(q->buf);
    q->buf = NULL;
    free(q->body);
    q->body = NULL;
}

/* ---------- report ---------- */

#define SV_TURN_GROUPS 3 /* TTFT by turn: 1, 2, 3 and later */

typedef struct {
    bench_summary ttft, tpot, itl, e2el;
    bench_summary ttft_turn[SV_TURN_GROUPS]; /* --multi-turn: turn 1, turn 2, turns 3+ */
    bench_summary ttft_warm, ttft_cold;      /* --first-use: later requests / the first of each adapter */
    int completed, failed, short_out, bad_json;
    char bad_example[128]; /* the start of the first answer that is not a JSON object */
    long in_tok, out_tok;
    /* prompt_tokens_details.cached_tokens, over the completed requests whose usage carried it
     * (cached_reqs of them; in_tok_reported: their prompt tokens) */
    long cached_tok, in_tok_reported;
    int cached_reqs;
    double duration, goodput;
} sv_result;

/* cached share of the prompt tokens of the requests that reported it; NAN when none did */
static double cached_share(const sv_result *r)
{
    return r->cached_reqs > 0 && r->in_tok_reported > 0 ? (double)r->cached_tok / (double)r->in_tok_reported : NAN;
}

static int turn_group(int turn) { return turn < SV_TURN_GROUPS ? turn : SV_TURN_GROUPS - 1; }

/* Mean TTFT, prompt and cached tokens per turn (0-based) of the completed requests, for the
 * JSON (arrays of --multi-turn entries; the caller frees the three arrays). */
static int per_turn(const sv_req *q, int n, int turns, double **ttft, double **ptok, double **ctok)
{
    int *cnt = calloc((size_t)turns, sizeof(int));
    *ttft = calloc((size_t)turns, sizeof(double));
    *ptok = calloc((size_t)turns, sizeof(double));
    *ctok = calloc((size_t)turns, sizeof(double));
    if (!cnt || !*ttft || !*ptok || !*ctok) {
        free(cnt);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        if (!q[i].sent || q[i].failed)
            continue;
        int t = q[i].turn;
        cnt[t]++;
        (*ttft)[t] += (q[i].t_first - q[i].t_start) * 1e3;
        (*ptok)[t] += q[i].prompt_tokens > 0 ? (double)q[i].prompt_tokens : 0;
        (*ctok)[t] += (double)q[i].cached_tokens;
    }
    for (int t = 0; t < turns; t++) {
        double d = cnt[t] ? cnt[t] : NAN;
        (*ttft)[t] /= d;
        (*ptok)[t] /= d;
        (*ctok)[t] /= d;
    }
    free(cnt);
    return 0;
}

/* The start of an answer on one table line: no newline or '|' to break the markdown. */
static void example_of(char *dst, size_t cap, const char *text)
{
    snprintf(dst, cap, "%.100s%s", text ? text : "", text && strlen(text) > 100 ? "..." : "");
    for (char *p = dst; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '|')
            *p = ' ';
}

static int compute(const sv_opts *o, sv_req *q, int n, double duration, const bench_slo *slo, sv_result *res)
{
    int rc = 0;
    size_t n_itl = 0;
    for (int i = 0; i < n; i++)
        if (!q[i].failed)
            n_itl += q[i].n_itl;
    double *ttft = calloc((size_t)n + 1, sizeof(double)), *tpot = calloc((size_t)n + 1, sizeof(double));
    double *e2el = calloc((size_t)n + 1, sizeof(double)), *itl = calloc(n_itl + 1, sizeof(double));
    double *by_turn = calloc((size_t)n + 1, sizeof(double));
    if (!ttft || !tpot || !e2el || !itl || !by_turn) {
        rc = hy_err_set(HY_ENOMEM, "out of memory summarising %d requests", n);
        goto done;
    }
    memset(res, 0, sizeof(*res));
    size_t k = 0, ni = 0;
    for (int i = 0; i < n; i++) {
        if (!q[i].sent)
            continue; /* --duration ran out first */
        if (q[i].failed) {
            res->failed++;
            continue;
        }
        res->completed++;
        if (q[i].cached_known) {
            res->cached_reqs++;
            res->cached_tok += q[i].cached_tokens;
            res->in_tok_reported += q[i].prompt_tokens > 0 ? q[i].prompt_tokens : 0;
        }
        if (q[i].bad_json && !res->bad_json++)
            example_of(res->bad_example, sizeof res->bad_example, q[i].text);
        res->in_tok += q[i].prompt_tokens > 0 ? q[i].prompt_tokens : 0;
        res->out_tok += q[i].completion_tokens;
        if (q[i].completion_tokens < q[i].max_tokens)
            res->short_out++;
        ttft[k] = (q[i].t_first - q[i].t_start) * 1e3;
        e2el[k] = (q[i].t_end - q[i].t_start) * 1e3;
        /* vLLM: TPOT over the tokens after the first; a 1-token answer has none (counted as 0) */
        tpot[k] = q[i].completion_tokens > 1 ? (e2el[k] - ttft[k]) / (double)(q[i].completion_tokens - 1) : 0;
        for (size_t j = 0; j < q[i].n_itl; j++)
            itl[ni++] = q[i].itl[j] * 1e3;
        k++;
    }
    res->duration = duration;
    res->goodput = duration > 0 ? (double)bench_goodput_count(ttft, tpot, e2el, k, slo) / duration : 0;
    if ((rc = bench_summarize(ttft, k, &res->ttft)) || (rc = bench_summarize(tpot, k, &res->tpot)) ||
        (rc = bench_summarize(e2el, k, &res->e2el)) || (rc = bench_summarize(itl, ni, &res->itl)))
        goto done;
    if (o->first_use) { /* cold: the first request sent for its adapter (its load is in its TTFT) */
        size_t mw = 0, mc = 0;
        double *cold = calloc((size_t)n + 1, sizeof(double));
        if (!cold) {
            rc = hy_err_set(HY_ENOMEM, "out of memory summarising %d requests", n);
            goto done;
        }
        for (int i = 0; i < n; i++) {
            if (!q[i].sent || q[i].failed)
                continue;
            bool first = true;
            for (int j = 0; j < n && first; j++)
                if (q[j].sent && q[j].t_start < q[i].t_start && q[j].model == q[i].model)
                    first = false;
            double v = (q[i].t_first - q[i].t_start) * 1e3;
            if (first)
                cold[mc++] = v;
            else
                by_turn[mw++] = v;
        }
        rc = bench_summarize(by_turn, mw, &res->ttft_warm);
        if (!rc)
            rc = bench_summarize(cold, mc, &res->ttft_cold);
        free(cold);
        if (rc)
            goto done;
    }
    for (int g = 0; g < SV_TURN_GROUPS && o->turns > 1; g++) {
        size_t m = 0;
        for (int i = 0; i < n; i++)
            if (q[i].sent && !q[i].failed && turn_group(q[i].turn) == g)
                by_turn[m++] = (q[i].t_first - q[i].t_start) * 1e3;
        if ((rc = bench_summarize(by_turn, m, &res->ttft_turn[g])))
            goto done;
    }
done:
    free(by_turn);
    free(ttft);
    free(tpot);
    free(e2el);
    free(itl);
    return rc;
}

static void print_table(const sv_opts *o, const char *model, int n_adapters, const sv_result *r,
                        const sv_errors *es, const bench_slo *slo)
{
    double d = r->duration > 0 ? r->duration : 1e-9;
    printf("\n## hydrad-bench serve%s%s\n\n", o->label ? ": " : "", o->label ? o->label : "");
    printf("| setting | value |\n|---|---|\n");
    printf("| server | %s (%s) |\n", o->url, is_chat(o) ? "/v1/chat/completions" : "/v1/completions");
    printf("| model | %s |\n", model);
    printf("| adapters | %d%s |\n", n_adapters,
           !n_adapters ? "" : o->round_robin ? " (round robin)" : o->zipf > 0 ? " (Zipf)" : " (uniform)");
    if (isinf(o->rate))
        printf("| request rate | inf |\n");
    else
        printf("| request rate | %.3g req/s (burstiness %.3g) |\n", o->rate, o->burstiness);
    if (o->max_conc > 0)
        printf("| max concurrency | %d |\n", o->max_conc);
    else
        printf("| max concurrency | unbounded |\n");
    if (o->prefix_len > 0)
        printf("| shared prefixes | %d of %d words (%s), then %d-word questions |\n", o->num_prefixes, o->prefix_len,
               o->prefix_rr ? "round robin" : "uniform", o->input_len);
    if (o->turns > 1)
        printf("| conversations | %d of %d turns (each turn resends the history) |\n", o->num_prompts, o->turns);
    printf("| requests | %d ok, %d failed |\n", r->completed, r->failed);
    printf("| duration | %.2f s |\n", r->duration);
    printf("| input / output tokens | %ld / %ld |\n", r->in_tok, r->out_tok);
    if (r->cached_reqs > 0)
        printf("| cached prompt tokens | %ld (%.1f %% of the prompt tokens of %d requests) |\n", r->cached_tok,
               100.0 * cached_share(r), r->cached_reqs);
    else
        printf("| cached prompt tokens | not reported (no usage.prompt_tokens_details.cached_tokens) |\n");
    printf("| request throughput | %.3f req/s |\n", r->completed / d);
    printf("| output throughput | %.2f tok/s |\n", r->out_tok / d);
    printf("| total token throughput | %.2f tok/s |\n", (r->in_tok + r->out_tok) / d);
    if (slo->ttft_ms > 0 || slo->tpot_ms > 0 || slo->e2el_ms > 0)
        printf("| goodput | %.3f req/s (ttft<=%g tpot<=%g e2el<=%g ms; 0 = unchecked) |\n", r->goodput, slo->ttft_ms,
               slo->tpot_ms, slo->e2el_ms);
    if (o->rf)
        printf("| response_format | %s; %d answers not a JSON object%s%s |\n",
               json_string_value(json_object_get(o->rf, "type")), r->bad_json, r->bad_json ? ", e.g. " : "",
               r->bad_example);
    if (r->short_out)
        printf("| short outputs | %d requests stopped before max_tokens |\n", r->short_out);
    printf("\n| latency (ms) | mean | p50 | p90 | p99 |\n|---|---|---|---|---|\n");
    const struct {
        const char *name;
        const bench_summary *s;
    } rows[] = {{"TTFT", &r->ttft}, {"TPOT", &r->tpot}, {"ITL", &r->itl}, {"E2E", &r->e2el}};
    for (size_t i = 0; i < HY_ARRAY_LEN(rows); i++)
        printf("| %s | %.2f | %.2f | %.2f | %.2f |\n", rows[i].name, rows[i].s->mean, rows[i].s->p50, rows[i].s->p90,
               rows[i].s->p99);
    static const char *const turn_names[SV_TURN_GROUPS] = {"TTFT turn 1", "TTFT turn 2", "TTFT turns 3+"};
    if (o->first_use) {
        printf("| TTFT warm (%zu) | %.2f | %.2f | %.2f | %.2f |\n", r->ttft_warm.n, r->ttft_warm.mean, r->ttft_warm.p50,
               r->ttft_warm.p90, r->ttft_warm.p99);
        printf("| TTFT cold: first use (%zu) | %.2f | %.2f | %.2f | %.2f |\n", r->ttft_cold.n, r->ttft_cold.mean,
               r->ttft_cold.p50, r->ttft_cold.p90, r->ttft_cold.p99);
    }
    for (int g = 0; g < SV_TURN_GROUPS && o->turns > 1; g++) {
        const bench_summary *t = &r->ttft_turn[g];
        if (t->n)
            printf("| %s (%zu) | %.2f | %.2f | %.2f | %.2f |\n", turn_names[g], t->n, t->mean, t->p50, t->p90, t->p99);
    }
    if (es->n) {
        printf("\n| error | count | example |\n|---|---|---|\n");
        for (int i = 0; i < es->n; i++)
            printf("| %s | %d | %s |\n", es->e[i].kind, es->e[i].count, es->e[i].example);
    }
    fflush(stdout);
}

static void put_summary(json_t *j, const char *name, const bench_summary *s)
{
    char k[64];
#define PUT(stat, v)                                                                                               \
    snprintf(k, sizeof k, "%s_%s_ms", stat, name);                                                                 \
    json_object_set_new(j, k, json_real(v))
    PUT("mean", s->mean);
    PUT("median", s->p50);
    PUT("std", s->std);
    PUT("p50", s->p50);
    PUT("p90", s->p90);
    PUT("p99", s->p99);
#undef PUT
}

static int write_json(const sv_opts *o, const char *model, int n_adapters, const sv_req *q, int n,
                      const sv_result *r, const sv_errors *es, const bench_slo *slo)
{
    double d = r->duration > 0 ? r->duration : 1e-9;
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y%m%d-%H%M%S", localtime(&now));
    json_t *j = json_object();
    json_object_set_new(j, "date", json_string(date));
    json_object_set_new(j, "backend", json_string("openai"));
    json_object_set_new(j, "label", o->label ? json_string(o->label) : json_null());
    json_object_set_new(j, "base_url", json_string(o->url));
    json_object_set_new(j, "endpoint", json_string(is_chat(o) ? "/v1/chat/completions" : "/v1/completions"));
    json_object_set_new(j, "model_id", json_string(model));
    int n_sent = 0;
    for (int i = 0; i < n; i++)
        n_sent += q[i].sent;
    json_object_set_new(j, "num_prompts", json_integer(n_sent)); /* requests sent (all turns) */
    json_object_set_new(j, "request_rate", isinf(o->rate) ? json_string("inf") : json_real(o->rate));
    json_object_set_new(j, "burstiness", json_real(o->burstiness));
    json_object_set_new(j, "max_concurrency", o->max_conc > 0 ? json_integer(o->max_conc) : json_null());
    json_object_set_new(j, "num_adapters", json_integer(n_adapters));
    json_object_set_new(j, "zipf_alpha", json_real(o->zipf));
    json_object_set(j, "response_format", o->rf ? o->rf : json_null());
    json_object_set_new(j, "invalid_json", json_integer(r->bad_json));
    json_object_set_new(j, "duration", json_real(r->duration));
    json_object_set_new(j, "completed", json_integer(r->completed));
    json_object_set_new(j, "failed", json_integer(r->failed));
    json_object_set_new(j, "total_input_tokens", json_integer(r->in_tok));
    json_object_set_new(j, "total_output_tokens", json_integer(r->out_tok));
    json_object_set_new(j, "request_throughput", json_real(r->completed / d));
    json_object_set_new(j, "request_goodput", json_real(r->goodput));
    json_object_set_new(j, "output_throughput", json_real(r->out_tok / d));
    json_object_set_new(j, "total_token_throughput", json_real((r->in_tok + r->out_tok) / d));
    json_object_set_new(j, "goodput_config", json_pack("{s:f, s:f, s:f}", "ttft", slo->ttft_ms, "tpot", slo->tpot_ms,
                                                       "e2el", slo->e2el_ms));
    put_summary(j, "ttft", &r->ttft);
    put_summary(j, "tpot", &r->tpot);
    put_summary(j, "itl", &r->itl);
    put_summary(j, "e2el", &r->e2el);
    if (o->first_use) {
        put_summary(j, "ttft_warm", &r->ttft_warm);
        put_summary(j, "ttft_cold", &r->ttft_cold);
    }
    json_object_set_new(j, "shared_prefix_len", json_integer(o->prefix_len));
    json_object_set_new(j, "num_prefixes", json_integer(o->prefix_len > 0 ? o->num_prefixes : 0));
    json_object_set_new(j, "multi_turn", json_integer(o->turns));
    json_object_set_new(j, "total_cached_tokens", json_integer(r->cached_tok));
    json_object_set_new(j, "cached_requests", json_integer(r->cached_reqs)); /* usage carried cached_tokens */
    json_object_set_new(j, "cached_token_share", r->cached_reqs ? json_real(cached_share(r)) : json_null());
    if (o->turns > 1) {
        static const char *const keys[SV_TURN_GROUPS] = {"turn1", "turn2", "turn3plus"};
        char k[64];
        for (int g = 0; g < SV_TURN_GROUPS; g++) {
            snprintf(k, sizeof k, "mean_ttft_%s_ms", keys[g]);
            json_object_set_new(j, k, r->ttft_turn[g].n ? json_real(r->ttft_turn[g].mean) : json_null());
            snprintf(k, sizeof k, "p50_ttft_%s_ms", keys[g]);
            json_object_set_new(j, k, r->ttft_turn[g].n ? json_real(r->ttft_turn[g].p50) : json_null());
        }
        double *tt = NULL, *pt = NULL, *ct = NULL;
        int prc = per_turn(q, n, o->turns, &tt, &pt, &ct);
        if (prc) {
            json_decref(j);
            return prc;
        }
        json_t *a = json_array(), *b = json_array(), *c = json_array();
        for (int t = 0; t < o->turns; t++) {
            json_array_append_new(a, isnan(tt[t]) ? json_null() : json_real(tt[t]));
            json_array_append_new(b, isnan(pt[t]) ? json_null() : json_real(pt[t]));
            json_array_append_new(c, isnan(ct[t]) ? json_null() : json_real(ct[t]));
        }
        json_object_set_new(j, "mean_ttft_by_turn_ms", a);
        json_object_set_new(j, "mean_prompt_tokens_by_turn", b);
        json_object_set_new(j, "mean_cached_tokens_by_turn", c);
        free(tt);
        free(pt);
        free(ct);
    }
    json_t *el = json_object();
    for (int i = 0; i < es->n; i++)
        json_object_set_new(el, es->e[i].kind, json_integer(es->e[i].count));
    json_object_set_new(j, "errors_by_kind", el);
    json_t *inl = json_array(), *outl = json_array(), *tt = json_array(), *errs = json_array(), *cl = json_array();
    for (int i = 0; i < n; i++) {
        if (!q[i].sent)
            continue;
        json_array_append_new(inl, json_integer(q[i].prompt_tokens > 0 ? q[i].prompt_tokens : 0));
        json_array_append_new(cl, json_integer(q[i].cached_tokens));
        json_array_append_new(outl, json_integer(q[i].failed ? 0 : q[i].completion_tokens));
        json_array_append_new(tt, json_real(q[i].failed ? 0 : q[i].t_first - q[i].t_start));
        json_array_append_new(errs, json_string(q[i].failed ? q[i].err_msg : ""));
    }
    json_object_set_new(j, "input_lens", inl);
    json_object_set_new(j, "cached_lens", cl);
    json_object_set_new(j, "output_lens", outl);
    json_object_set_new(j, "ttfts", tt);
    json_object_set_new(j, "errors", errs);
    int rc = json_dump_file(j, o->result_json, JSON_INDENT(1)) ? hy_err_set(HY_EIO, "cannot write %s", o->result_json)
                                                               : 0;
    json_decref(j);
    return rc;
}

/* ---------- flags ---------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: hydrad-bench serve [options]\n"
            "Load generator for an OpenAI-compatible server (hydrad, llama-server, vLLM): streams every\n"
            "request and times TTFT, TPOT, every inter-token gap and end-to-end latency.\n\n"
            "  --url URL              server base URL (default http://127.0.0.1:8000)\n"
            "  --endpoint E           completions or chat (default completions)\n"
            "  --model NAME           base model name (default: the first id of GET /v1/models)\n"
            "  --api-key KEY          'Authorization: Bearer KEY' on every request\n"
            "  --admin-key KEY        key for /v1/load_lora_adapter (default: --api-key)\n"
            "  --num-prompts N        requests to send (default 32)\n"
            "  --duration S           stop sending after S seconds (default 0: no limit)\n"
            "  --request-rate R       mean arrivals per second, or inf: all at once (default inf)\n"
            "  --burstiness B         gamma shape of the gaps: 1 Poisson, <1 burstier (default 1)\n"
            "  --max-concurrency N    requests in flight at most (default 0: unbounded)\n"
            "  --input-len N          prompt length in words, about one token each (default 128);\n"
            "                         the length of each question with the two options below\n"
            "  --shared-prefix-len N  every prompt starts with one of --num-prefixes shared prefixes\n"
            "                         of N words, then a unique question of --input-len words\n"
            "  --num-prefixes P       shared prefixes to choose from, uniformly by seed (default 1)\n"
            "  --prefix-round-robin   request (conversation) i takes prefix i mod P instead\n"
            "  --multi-turn T         --num-prompts conversations of T turns: each later turn is sent\n"
            "                         when the previous answer is in and resends the whole history\n"
            "                         (chat: messages with the answers; completions: the prompt, the\n"
            "                         answer text, a blank line, then the new question); TTFT is also\n"
            "                         reported for turn 1, turn 2 and turns 3+. --request-rate paces\n"
            "                         the conversations' first turns; --max-concurrency bounds\n"
            "                         requests in flight; no turn is sent after --duration\n"
            "  --output-len N         max_tokens of every request, with ignore_eos (default 64; 0 only\n"
            "                         with --echo)\n"
            "  --echo                 completions with echo and logprobs 1: score every prompt token\n"
            "  --range-ratio X        draw lengths uniformly in N*(1-X)..N*(1+X) (default 0)\n"
            "  --dataset FILE         JSONL prompts: {\"prompt\": ..., \"max_tokens\": N optional}\n"
            "  --no-ignore-eos        let the model stop at end of sequence\n"
            "  --response-format F    send F's OpenAI response_format object with every request, or\n"
            "                         'builtin': a JSON schema of 7 bounded fields (60-150 tokens);\n"
            "                         answers that are not a JSON object are counted\n"
            "  --temperature T        sampling temperature (default 0)\n"
            "  --num-adapters N       spread requests over N adapters (default 0: base model)\n"
            "                         named by --make-adapters, else the first N of GET /v1/adapters\n"
            "  --zipf ALPHA           adapter popularity ~ 1/rank^ALPHA (default 0: uniform)\n"
            "  --round-robin          request i uses adapter i mod N (N in-flight requests: N adapters)\n"
            "  --adapter-dist D       uniform, zipf:ALPHA or round-robin (the two flags above in one)\n"
            "  --make-adapters DIR    write N adapters under DIR with `hydrad mkadapter` (kept for\n"
            "                         later runs) and load them via POST /v1/load_lora_adapter;\n"
            "                         the server needs --adapter-root DIR and --max-cpu-loras >= N\n"
            "  --first-use            with --make-adapters: leave them on disk, named 0000, 0001, ...; the\n"
            "                         server (--adapter-resolver DIR/rN-KK-TARGETS) loads each on its\n"
            "                         first request; TTFT is reported warm and cold (first use)\n"
            "  --adapter-r R          rank of made adapters (default 8)\n"
            "  --adapter-K K          heads of made adapters (default 3)\n"
            "  --adapter-targets T    target modules of made adapters (default q_proj,v_proj)\n"
            "  --adapter-prefix P     names of made adapters: P0000, P0001, ... (default bench-)\n"
            "  --base GGUF            base model file for mkadapter shapes\n"
            "                         (default models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
            "  --hydrad BIN           hydrad binary for mkadapter (default: hydrad beside this one)\n"
            "  --goodput SLOS         e.g. \"ttft:500 tpot:50 e2el:5000\" (ms): requests/s meeting all\n"
            "  --result-json FILE     write the results (vLLM benchmark_serving field names)\n"
            "  --label TEXT           a title for the table and the JSON\n"
            "  --seed S               arrivals, prompts and adapter choice (default 0)\n"
            "  --timeout S            per-request limit in seconds (default 600)\n"
            "  --quiet                no progress line on stderr\n"
            "  -h, --help             this text\n"
            "Every request asks for stream_options.include_usage and sends \"cache_prompt\": true\n"
            "(llama-server's prompt reuse); usage.prompt_tokens_details.cached_tokens is summed into\n"
            "the share of prompt tokens served from the server's prefix cache.\n"
            "Exit status: 0 when every request succeeded, 1 when any failed, 2 on bad flags.\n");
}

enum {
    O_URL = 256, O_ENDPOINT, O_MODEL, O_KEY, O_ADMIN, O_NUM, O_DUR, O_RATE, O_BURST, O_CONC, O_IN, O_OUT,
    O_RANGE, O_DATA, O_NOEOS, O_TEMP, O_NAD, O_ZIPF, O_MAKE, O_AR, O_AK, O_ATGT, O_APFX, O_BASE, O_HYDRAD,
    O_GOOD, O_JSON, O_LABEL, O_SEED, O_TIMEOUT, O_QUIET, O_RR, O_RF, O_ECHO, O_PLEN, O_NPFX, O_PRR, O_TURNS, O_FIRST, O_ADIST
};

static int num_arg(const char *name, const char *v, double lo, double hi, double *out)
{
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || isnan(x) || x < lo || x > hi) {
        fprintf(stderr, "hydrad-bench serve: --%s %s: expected a number in [%g, %g]\n", name, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_opts(int argc, char **argv, sv_opts *o)
{
    static const struct option lo[] = {
        {"url", 1, 0, O_URL},          {"endpoint", 1, 0, O_ENDPOINT},    {"model", 1, 0, O_MODEL},
        {"api-key", 1, 0, O_KEY},      {"admin-key", 1, 0, O_ADMIN},      {"num-prompts", 1, 0, O_NUM},
        {"duration", 1, 0, O_DUR},     {"request-rate", 1, 0, O_RATE},    {"burstiness", 1, 0, O_BURST},
        {"max-concurrency", 1, 0, O_CONC}, {"input-len", 1, 0, O_IN},     {"output-len", 1, 0, O_OUT},
        {"range-ratio", 1, 0, O_RANGE}, {"dataset", 1, 0, O_DATA},        {"no-ignore-eos", 0, 0, O_NOEOS},
        {"temperature", 1, 0, O_TEMP}, {"num-adapters", 1, 0, O_NAD},     {"zipf", 1, 0, O_ZIPF}, {"adapter-dist", 1, 0, O_ADIST},
        {"make-adapters", 1, 0, O_MAKE}, {"adapter-r", 1, 0, O_AR},       {"adapter-K", 1, 0, O_AK},
        {"adapter-targets", 1, 0, O_ATGT}, {"adapter-prefix", 1, 0, O_APFX}, {"base", 1, 0, O_BASE},
        {"hydrad", 1, 0, O_HYDRAD},    {"goodput", 1, 0, O_GOOD},         {"result-json", 1, 0, O_JSON},
        {"label", 1, 0, O_LABEL},      {"seed", 1, 0, O_SEED},            {"timeout", 1, 0, O_TIMEOUT},
        {"quiet", 0, 0, O_QUIET},      {"round-robin", 0, 0, O_RR},       {"response-format", 1, 0, O_RF},
        {"echo", 0, 0, O_ECHO},        {"first-use", 0, 0, O_FIRST},        {"shared-prefix-len", 1, 0, O_PLEN}, {"num-prefixes", 1, 0, O_NPFX},
        {"prefix-round-robin", 0, 0, O_PRR}, {"multi-turn", 1, 0, O_TURNS}, {"help", 0, 0, 'h'},
        {0, 0, 0, 0},
    };
    double x;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case O_URL: o->url = optarg; break;
        case O_ENDPOINT:
            o->endpoint = optarg;
            bad = strcmp(optarg, "completions") && strcmp(optarg, "chat");
            break;
        case O_MODEL: o->model = optarg; break;
        case O_KEY: o->api_key = optarg; break;
        case O_ADMIN: o->admin_key = optarg; break;
        case O_NUM: bad = num_arg("num-prompts", optarg, 1, 1e7, &x); o->num_prompts = (int)x; break;
        case O_DUR: bad = num_arg("duration", optarg, 0, 1e7, &o->duration); break;
        case O_RATE:
            if (!strcmp(optarg, "inf"))
                o->rate = INFINITY;
            else
                bad = num_arg("request-rate", optarg, 1e-6, 1e7, &o->rate);
            break;
        case O_BURST: bad = num_arg("burstiness", optarg, 1e-3, 1e3, &o->burstiness); break;
        case O_CONC: bad = num_arg("max-concurrency", optarg, 0, 1e5, &x); o->max_conc = (int)x; break;
        case O_IN: bad = num_arg("input-len", optarg, 1, 1e6, &x); o->input_len = (int)x; break;
        case O_OUT: bad = num_arg("output-len", optarg, 0, 1e6, &x); o->output_len = (int)x; break;
        case O_RANGE: bad = num_arg("range-ratio", optarg, 0, 0.999, &o->range_ratio); break;
        case O_DATA: o->dataset = optarg; break;
        case O_NOEOS: o->no_ignore_eos = 1; break;
        case O_TEMP: bad = num_arg("temperature", optarg, 0, 10, &o->temperature); break;
        case O_NAD: bad = num_arg("num-adapters", optarg, 0, 1e6, &x); o->num_adapters = (int)x; break;
        case O_ZIPF: bad = num_arg("zipf", optarg, 0, 10, &o->zipf); break;
        case O_ADIST: /* uniform | zipf:ALPHA | round-robin: the same choices as --zipf / --round-robin */
            if (!strncmp(optarg, "zipf:", 5))
                bad = num_arg("adapter-dist zipf", optarg + 5, 0, 10, &o->zipf);
            else if (!strcmp(optarg, "round-robin"))
                o->round_robin = 1;
            else if (strcmp(optarg, "uniform"))
                bad = fprintf(stderr, "hydrad-bench serve: --adapter-dist is uniform, zipf:ALPHA or round-robin\n") > 0;
            break;
        case O_MAKE: o->make_dir = optarg; break;
        case O_AR: bad = num_arg("adapter-r", optarg, 1, 4096, &x); o->ad_r = (int)x; break;
        case O_AK: bad = num_arg("adapter-K", optarg, 1, 64, &x); o->ad_K = (int)x; break;
        case O_ATGT: o->targets = optarg; break;
        case O_APFX: o->prefix = optarg; break;
        case O_BASE: o->base_gguf = optarg; break;
        case O_HYDRAD: o->hydrad = optarg; break;
        case O_GOOD: o->goodput = optarg; break;
        case O_JSON: o->result_json = optarg; break;
        case O_LABEL: o->label = optarg; break;
        case O_SEED: bad = num_arg("seed", optarg, 0, 9e15, &x); o->seed = (uint64_t)x; break;
        case O_TIMEOUT: bad = num_arg("timeout", optarg, 0.001, 1e6, &o->timeout); break;
        case O_QUIET: o->quiet = 1; break;
        case O_RR: o->round_robin = 1; break;
        case O_RF: o->response_format = optarg; break;
        case O_ECHO: o->echo = 1; break;
        case O_FIRST: o->first_use = 1; break;
        case O_PLEN: bad = num_arg("shared-prefix-len", optarg, 0, 1e6, &x); o->prefix_len = (int)x; break;
        case O_NPFX: bad = num_arg("num-prefixes", optarg, 1, 1e5, &x); o->num_prefixes = (int)x; break;
        case O_PRR: o->prefix_rr = 1; break;
        case O_TURNS: bad = num_arg("multi-turn", optarg, 1, 1000, &x); o->turns = (int)x; break;
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return -1;
        }
        if (bad) {
            if (c == O_ENDPOINT)
                fprintf(stderr, "hydrad-bench serve: --endpoint must be completions or chat\n");
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "hydrad-bench serve: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if ((o->output_len == 0 && !o->echo) || (o->echo && is_chat(o))) {
        fprintf(stderr, "hydrad-bench serve: %s\n", o->echo ? "--echo is for --endpoint completions"
                                                             : "--output-len 0 needs --echo (scoring only)");
        return -1;
    }
    if ((o->turns > 1 && (o->dataset || o->echo || o->rf)) || (o->prefix_len > 0 && o->dataset)) {
        fprintf(stderr, "hydrad-bench serve: %s\n",
                o->dataset && o->prefix_len > 0 ? "--shared-prefix-len does not go with --dataset"
                                                : "--multi-turn does not go with --dataset, --echo or --response-format");
        return -1;
    }
    if (o->turns > 1 && o->num_prompts > INT_MAX / o->turns) {
        fprintf(stderr, "hydrad-bench serve: --num-prompts x --multi-turn is too large\n");
        return -1;
    }
    size_t ul = strlen(o->url);
    while (ul > 0 && o->url[ul - 1] == '/')
        ((char *)o->url)[--ul] = 0; /* argv storage is writable */
    return 0;
}

/* ---------- the run ---------- */

static char g_hydrad[PATH_MAX];

static const char *default_hydrad(void)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return "bin/hydrad";
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = 0;
    snprintf(g_hydrad, sizeof g_hydrad, "%.*s/hydrad", (int)(sizeof g_hydrad - 8), self);
    return g_hydrad;
}

static void progress(const sv_opts *o, int done, int n, int running, int errors, double t, long out_tok, bool last)
{
    if (o->quiet)
        return;
    bool tty = isatty(2);
    fprintf(stderr, "%s[hydrad-bench] %d/%d done, %d running, %d errors, %.1f s, %.1f out tok/s%s", tty ? "\r" : "",
            done, n, running, errors, t, t > 0 ? out_tok / t : 0.0, tty && !last ? "   " : "\n");
}

/* ---------- the workload: every prompt drawn before the run ---------- */

typedef struct {
    const sv_opts *o;
    const char *model;   /* base model name */
    char **names;        /* adapter names, or NULL */
    const bench_zipf *zipf;
    const sv_prompt *data;
    int n_data;
    char **prefixes;     /* o->num_prefixes shared prefixes (owned), or NULL */
} sv_draw;

/* The shared prefixes, from their own stream so that the questions and lengths of a seed stay
 * what they are without them. *out: o->num_prefixes strings, each freed with free, then *out. */
static int make_prefixes(const sv_opts *o, bench_rng *r, char ***out)
{
    char **p = calloc((size_t)o->num_prefixes, sizeof(char *));
    if (!p)
        return hy_err_set(HY_ENOMEM, "out of memory");
    *out = p;
    for (int i = 0; i < o->num_prefixes; i++)
        if (!(p[i] = random_prompt(r, o->prefix_len)))
            return hy_err_set(HY_ENOMEM, "out of memory for the prefixes");
    return 0;
}

/* Requests q[c * turns + t] for conversation c, turn t: adapter per conversation, first-turn
 * prompt (prefix + question, or a dataset prompt) with its body, later turns' questions (their
 * bodies are built when the previous answer is in). Random streams are separate, so the same seed
 * gives the same arrivals and prompts whatever the adapter count, prefixes or turns. */
static int draw_requests(const sv_draw *d, sv_req *q, double *arrive, int n_conv)
{
    const sv_opts *o = d->o;
    int T = o->turns;
    bench_rng rng, arr_rng, ad_rng, pfx_rng;
    bench_rng_seed(&rng, o->seed);
    bench_rng_seed(&arr_rng, o->seed ^ 0xA5A5A5A5u);
    bench_rng_seed(&ad_rng, o->seed ^ 0x5A5A5A5A00u);
    bench_rng_seed(&pfx_rng, o->seed ^ 0x3C3C3C3C0000ull);
    double t_acc = 0;
    for (int c = 0; c < n_conv; c++) {
        t_acc += c ? bench_arrival_gap(&arr_rng, o->rate, o->burstiness) : 0.0;
        arrive[c] = t_acc;
        const char *model = d->model;
        if (o->num_adapters > 0)
            model = d->names[o->round_robin ? c % o->num_adapters : bench_zipf_draw(d->zipf, &ad_rng)];
        for (int t = 0; t < T; t++) {
            sv_req *r = &q[c * T + t];
            r->id = c * T + t;
            r->conv = c;
            r->turn = t;
            r->model = model;
            r->prompt_tokens = -1;
            r->check_json = o->rf != NULL;
            r->keep_text = o->rf != NULL || t + 1 < T; /* the next turn resends the answer */
            char *text;
            if (d->data) {
                const sv_prompt *p = &d->data[c % d->n_data];
                text = strdup(p->prompt);
                r->max_tokens = p->max_tokens > 0 ? p->max_tokens : len_draw(&rng, o->output_len, o->range_ratio);
            } else {
                text = random_prompt(&rng, len_draw(&rng, o->input_len, o->range_ratio));
                r->max_tokens = len_draw(&rng, o->output_len, o->range_ratio);
            }
            if (!text)
                return hy_err_set(HY_ENOMEM, "out of memory building request %d", r->id);
            if (t > 0) {
                r->question = text;
                continue;
            }
            if (d->prefixes) {
                int k = o->prefix_rr ? c % o->num_prefixes : bench_rng_int(&pfx_rng, 0, o->num_prefixes - 1);
                char *full = str_join(d->prefixes[k], " ", text);
                free(text);
                if (!(text = full))
                    return hy_err_set(HY_ENOMEM, "out of memory building request %d", r->id);
            }
            json_t *in = first_input(o, text);
            free(text);
            r->body = in ? request_body(o, r->model, in, r->max_tokens) : NULL;
            if (T > 1)
                r->hist = in;
            else
                json_decref(in);
            if (!r->body)
                return hy_err_set(HY_ENOMEM, "out of memory building request %d", r->id);
        }
    }
    return 0;
}

/* prev's answer is in: build the next turn's history and body (the previous history is dropped). */
static int next_turn(const sv_opts *o, sv_req *prev, sv_req *nx)
{
    nx->hist = next_input(prev->hist, prev->text ? prev->text : "", nx->question);
    nx->body = nx->hist ? request_body(o, nx->model, nx->hist, nx->max_tokens) : NULL;
    json_decref(prev->hist);
    prev->hist = NULL;
    if (!nx->body)
        return hy_err_set(HY_ENOMEM, "out of memory building turn %d of conversation %d", nx->turn + 1, nx->conv);
    return 0;
}

/* ---------- the run ---------- */

typedef struct {
    int done, running, n_err, issued;
    long out_tok;
} sv_count;

/* A finished request: count it, and queue its conversation's next turn (or, when it failed,
 * count the turns that will never be sent as failed). */
static int on_finished(const sv_opts *o, sv_req *r, bool stopped, sv_errors *es, sv_count *k, int *readyq, int *qt)
{
    if (r->failed) {
        err_add(es, r->err_kind, r->err_msg);
        k->n_err++;
    } else {
        k->out_tok += r->completion_tokens;
    }
    if (r->turn + 1 >= o->turns)
        return 0;
    if (!r->failed) {
        if (stopped)
            return 0; /* --duration ran out: the rest of the conversation is not sent */
        int rc = next_turn(o, r, r + 1);
        if (!rc)
            readyq[(*qt)++] = r->id + 1;
        return rc;
    }
    for (sv_req *x = r + 1; x->conv == r->conv && x->turn > r->turn; x++) {
        x->sent = x->failed = true;
        snprintf(x->err_kind, sizeof x->err_kind, "earlier_turn_failed");
        snprintf(x->err_msg, sizeof x->err_msg, "turn %d of the conversation failed", r->turn + 1);
        err_add(es, x->err_kind, x->err_msg);
        k->n_err++;
        k->issued++;
        k->done++;
        if (x->turn + 1 >= o->turns)
            break;
    }
    return 0;
}

/* Sends q[] (n_conv conversations of o->turns requests) as the arrivals and the concurrency
 * limit allow; *duration: seconds from the first send to the last answer. */
static int run_requests(const sv_opts *o, CURLM *m, sv_req *q, const double *arrive, int n_conv, sv_errors *es,
                        double *duration)
{
    int T = o->turns, n_req = n_conv * T, qh = 0, qt = 0, next = 0, rc = 0;
    int *readyq = malloc(sizeof(int) * (size_t)n_req); /* request ids ready to send, oldest first */
    if (!readyq)
        return hy_err_set(HY_ENOMEM, "out of memory");
    sv_count k = {0};
    bool stopped = false;
    double t0 = hy_now(), last_prog = 0, t_end_send = o->duration > 0 ? o->duration : INFINITY;
    for (;;) {
        double now = hy_now() - t0;
        if (now >= t_end_send && !stopped) {
            stopped = true; /* --duration reached: send nothing more */
            qh = qt;
        }
        while (!stopped && next < n_conv && arrive[next] <= now)
            readyq[qt++] = next++ * T;
        while (qh < qt && (o->max_conc <= 0 || k.running < o->max_conc)) {
            sv_req *r = &q[readyq[qh++]];
            if ((rc = req_start(o, m, r)))
                goto out;
            r->sent = true;
            k.issued++;
            k.running++;
        }
        if (k.done == k.issued && qh == qt && (stopped || next >= n_conv))
            break;
        int still = 0;
        curl_multi_perform(m, &still);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(m, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            sv_req *r = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            req_finish(r, msg->data.result, hy_now());
            rc = on_finished(o, r, stopped, es, &k, readyq, &qt);
            req_release(m, r);
            k.done++;
            k.running--;
            if (rc)
                goto out;
        }
        now = hy_now() - t0;
        if (now - last_prog >= 1.0) {
            progress(o, k.done, n_req, k.running, k.n_err, now, k.out_tok, false);
            last_prog = now;
        }
        int wait_ms = 100;
        if (qh < qt && (o->max_conc <= 0 || k.running < o->max_conc))
            wait_ms = 0;
        else if (!stopped && next < n_conv && (o->max_conc <= 0 || k.running < o->max_conc)) {
            double dt = arrive[next] - now;
            wait_ms = dt <= 0 ? 0 : dt * 1e3 < 100 ? (int)(dt * 1e3) + 1 : 100;
        }
        if (wait_ms > 0 && k.running > 0)
            curl_multi_poll(m, NULL, 0, wait_ms, NULL);
        else if (wait_ms > 0)
            usleep((useconds_t)wait_ms * 1000);
    }
    *duration = hy_now() - t0;
    progress(o, k.done, n_req, 0, k.n_err, *duration, k.out_tok, true);
out:
    free(readyq);
    return rc;
}

int bench_serve_main(int argc, char **argv)
{
    sv_opts o = {.url = "http://127.0.0.1:8000", .endpoint = "completions", .num_prompts = 32, .rate = INFINITY,
                 .burstiness = 1.0, .input_len = 128, .output_len = 64, .ad_r = 8, .ad_K = 3,
                 .num_prefixes = 1, .turns = 1,
                 .targets = "q_proj,v_proj", .prefix = "bench-", .base_gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 .timeout = 600};
    int prc = parse_opts(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    if (!o.hydrad)
        o.hydrad = default_hydrad();
    bench_slo slo = {0};
    if (o.goodput && bench_slo_parse(o.goodput, &slo)) {
        fprintf(stderr, "hydrad-bench serve: %s\n", hy_err_msg());
        return 2;
    }
    if ((o.zipf > 0 || o.round_robin) && o.num_adapters < 1) {
        fprintf(stderr, "hydrad-bench serve: --zipf and --round-robin need --num-adapters\n");
        return 2;
    }
    if ((o.num_prefixes > 1 || o.prefix_rr) && o.prefix_len < 1) {
        fprintf(stderr, "hydrad-bench serve: --num-prefixes and --prefix-round-robin need --shared-prefix-len\n");
        return 2;
    }

    int exit_code = 1, n_conv = o.num_prompts, n_req = n_conv * o.turns, n_data = 0;
    char *model = NULL, **names = NULL, **prefixes = NULL;
    sv_prompt *data = NULL;
    sv_req *q = NULL;
    double *arrive = NULL;
    bench_zipf zipf = {0};
    sv_errors es = {0};
    CURLM *m = NULL;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "hydrad-bench serve: curl_global_init failed\n");
        return 1;
    }
    if (o.model)
        model = strdup(o.model);
    else if (fetch_model(&o, &model))
        goto fail;
    if (o.dataset && load_dataset(o.dataset, &data, &n_data))
        goto fail;
    if (o.response_format && load_response_format(&o))
        goto fail;
    if (o.num_adapters > 0) {
        names = calloc((size_t)o.num_adapters, sizeof(char *));
        if (!names) {
            hy_err_set(HY_ENOMEM, "out of memory");
            goto fail;
        }
        if (o.make_dir ? make_adapters(&o, names) : fetch_adapters(&o, o.num_adapters, names))
            goto fail;
        if (bench_zipf_init(&zipf, o.num_adapters, o.zipf))
            goto fail;
    }

    /* Everything random is drawn before the run, from one seed: arrivals, lengths, adapters. */
    q = calloc((size_t)n_req, sizeof(sv_req));
    arrive = calloc((size_t)n_conv, sizeof(double));
    if (!q || !arrive) {
        hy_err_set(HY_ENOMEM, "out of memory for %d requests", n_req);
        goto fail;
    }
    if (o.prefix_len > 0) {
        bench_rng prng;
        bench_rng_seed(&prng, o.seed ^ 0xC3C3C3C3C3ull);
        if (make_prefixes(&o, &prng, &prefixes))
            goto fail;
    }
    sv_draw d = {.o = &o, .model = model, .names = names, .zipf = &zipf, .data = data, .n_data = n_data,
                 .prefixes = prefixes};
    if (draw_requests(&d, q, arrive, n_conv))
        goto fail;

    m = curl_multi_init();
    if (!m) {
        hy_err_set(HY_ENOMEM, "curl_multi_init failed");
        goto fail;
    }
    curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    double duration = 0;
    if (run_requests(&o, m, q, arrive, n_conv, &es, &duration))
        goto fail;

    sv_result res;
    if (compute(&o, q, n_req, duration, &slo, &res))
        goto fail;
    print_table(&o, model, o.num_adapters, &res, &es, &slo);
    if (o.result_json && write_json(&o, model, o.num_adapters, q, n_req, &res, &es, &slo))
        goto fail;
    exit_code = res.failed || res.completed == 0 ? 1 : 0;
    goto out;
fail:
    fprintf(stderr, "hydrad-bench serve: %s\n", hy_err_msg());
    exit_code = 1;
out:
    if (q) {
        for (int i = 0; i < n_req; i++) {
            req_release(m, &q[i]);
            free(q[i].itl);
            free(q[i].text);
            free(q[i].question);
            json_decref(q[i].hist);
        }
    }
    free(q);
    free(arrive);
    if (m)
        curl_multi_cleanup(m);
    if (names)
        for (int i = 0; i < o.num_adapters; i++)
            free(names[i]);
    free(names);
    if (prefixes)
        for (int i = 0; i < o.num_prefixes; i++)
            free(prefixes[i]);
    free(prefixes);
    for (int i = 0; i < n_data; i++)
        free(data[i].prompt);
    free(data);
    bench_zipf_free(&zipf);
    json_decref(o.rf);
    free(model);
    curl_global_cleanup();
    return exit_code;
}
