/* serve.c - `hydrad serve`: flags, model + tokenizer + KV cache + adapter registry set-up, the
 * engine glue the scheduler calls (forward, sampling, detokenising, adapter residency with LRU
 * eviction), then the HTTP server until SIGINT/SIGTERM. Only main-side wiring lives here. */
#include "adapters/registry.h"
#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/hy.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/smp_constrain.h"
#include "engine/scheduler.h"
#include "engine/spec.h"
#include "engine/tokenizer.h"
#include "server/cli.h"
#include "server/http.h"
#include "server/srv_resolve.h"

#include <curl/curl.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <stdatomic.h>
#include <sys/random.h>

#define MAX_ADAPTER_ARGS 64
#define MAX_RESIDENT 64

/* ---------- engine glue (engine thread only, except where noted) ---------- */

typedef struct {
    ad_adapter *a;
    int users;
    double last;
    bool pinned;         /* the glue's own pin keeps an uploaded adapter alive */
    double since;        /* when it was uploaded (fifo eviction) */
    char name[AD_NAME_MAX];
} resident;

typedef struct {
    srv *s;
    eng_model *m;
    eng_kv *kv;
    be *b;
    tok_vocab *v;
    gram_vocab *gv;      /* the vocabulary's bytes for grammar masks */
    ad_registry *reg;
    int max_loras;
    int n_vocab;
    resident res[MAX_RESIDENT];
    bool fifo;           /* --adapter-eviction fifo: the device slot uploaded first goes first */
    int n_res;
    double last_stats;
    char name_buf[AD_NAME_MAX];
} glue;

typedef struct {
    tok_detok dt;
    smp_seq *smp;
    smp_cseq *cs;        /* grammar / logit_bias of the request, or NULL */
    int n_accepted;      /* tokens of the sequence already given to the sampler's penalties */
    float *logits;       /* [n_vocab] scratch: smp_sample modifies its input */
} seq_state;

static int g_forward(void *ctx, const eng_batch *b, float *logits)
{
    glue *g = ctx;
    return eng_forward(g->m, g->kv, b, logits);
}

static uint64_t splitmix(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void g_seq_free(void *ctx, void *state)
{
    seq_state *st = state;
    (void)ctx;
    if (!st)
        return;
    smp_free(st->smp);
    smp_cseq_free(st->cs);
    free(st->logits);
    free(st);
}

/* A seed for a request that gave none: from the kernel's generator; else the clock in ns and a
 * counter. (time(NULL) and the state's address, as before, gave requests in the same second whose
 * state reused freed memory the same seed, so parallel unseeded samples came out identical.) */
static uint64_t fresh_seed(void)
{
    static atomic_uint_fast64_t n;
    uint64_t x;
    if (getrandom(&x, sizeof x, 0) == (ssize_t)sizeof x)
        return x;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return splitmix((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec + 0x9e3779b97f4a7c15u * atomic_fetch_add(&n, 1));
}

static int g_seq_init(void *ctx, const sched_sampling *p, int choice, void **state)
{
    glue *g = ctx;
    seq_state *st = calloc(1, sizeof *st);
    if (!st || !(st->logits = malloc((size_t)g->n_vocab * sizeof(float)))) {
        free(st);
        return hy_err_set(HY_ENOMEM, "out of memory");
    }
    smp_params sp = smp_default_params();
    sp.temperature = (float)p->temperature;
    sp.top_k = p->top_k;
    sp.top_p = (float)p->top_p;
    sp.min_p = (float)p->min_p;
    /* Each choice draws its own stream; without a seed every request gets a fresh one. */
    uint64_t base = p->has_seed ? p->seed : fresh_seed();
    sp.seed = choice == 0 ? base : splitmix(base + (uint64_t)choice);
    sp.repetition_penalty = (float)p->repetition_penalty;
    sp.frequency_penalty = (float)p->frequency_penalty;
    sp.presence_penalty = (float)p->presence_penalty;
    sp.logprobs = p->logprobs;
    sp.n_logprobs = HY_MIN(p->top_logprobs, SMP_MAX_LOGPROBS);
    int rc = smp_create(&sp, g->n_vocab, &st->smp);
    if (!rc && p->constraint)
        rc = smp_cseq_create(p->constraint, g->gv, &st->cs);
    if (rc) {
        g_seq_free(ctx, st);
        return rc;
    }
    tok_detok_init(&st->dt, g->v);
    *state = st;
    return HY_OK;
}

static int g_sample(void *ctx, void *state, const float *logits, const int32_t *toks, int n_prompt, int n_toks,
                    sched_sample *out)
{
    glue *g = ctx;
    seq_state *st = state;
    int rc = 0;
    if (st->n_accepted == 0 && n_prompt > 0) {
        rc = smp_accept_prompt(st->smp, toks, n_prompt);
        st->n_accepted = n_prompt;
    }
    for (; rc == 0 && st->n_accepted < n_toks; st->n_accepted++)
        rc = smp_accept(st->smp, toks[st->n_accepted]);
    if (rc)
        return rc;
    memcpy(st->logits, logits, (size_t)g->n_vocab * sizeof(float));
    if (st->cs && (rc = smp_cseq_apply(st->cs, toks, n_prompt, n_toks, st->logits, g->n_vocab)))
        return rc;
    smp_result res;
    if ((rc = smp_sample(st->smp, st->logits, &res)))
        return rc;
    out->token = res.id;
    out->logprob = res.logprob;
    out->n_top = HY_MIN(res.n_top, SCHED_MAX_TOP);
    for (int i = 0; i < out->n_top; i++) {
        out->top_id[i] = res.top_id[i];
        out->top_lp[i] = res.top_logprob[i];
    }
    return HY_OK;
}

static size_t g_detok(void *ctx, void *state, int32_t tok, char *buf, size_t cap)
{
    (void)ctx;
    return tok_detok_push(&((seq_state *)state)->dt, tok, buf, cap);
}

static size_t g_detok_flush(void *ctx, void *state, char *buf, size_t cap)
{
    (void)ctx;
    return tok_detok_flush(&((seq_state *)state)->dt, buf, cap);
}

static bool g_is_eog(void *ctx, int32_t tok) { return tok_is_eog(((glue *)ctx)->v, tok); }

static void unload_resident(glue *g, int i)
{
    resident *r = &g->res[i];
    ad_unupload(r->a);
    if (r->pinned) {
        ad_reg_mark_resident(g->reg, r->a, -1);
        ad_reg_unpin(g->reg, r->a);
    }
    g->res[i] = g->res[--g->n_res];
}

static void stats_publish_one(glue *g, int i, bool resident);

/* Make adapter a (read from files) resident for one more user. */
static int acquire_one(glue *g, ad_adapter *a)
{
    int i = 0;
    while (i < g->n_res && g->res[i].a != a)
        i++;
    if (i == g->n_res) {
        if (g->n_res >= g->max_loras || g->n_res == MAX_RESIDENT) {
            int lru = -1;
            for (int k = 0; k < g->n_res; k++)
                if (g->res[k].users == 0 && !ad_reg_pinned(g->reg, g->res[k].a) &&
                    (lru < 0 || (g->fifo ? g->res[k].since < g->res[lru].since : g->res[k].last < g->res[lru].last)))
                    lru = k;
            if (lru < 0)
                return HY_EBUSY;
            stats_publish_one(g, lru, false); /* off the device now, not at the next snapshot */
            unload_resident(g, lru);
            atomic_fetch_add(&g->s->device_evictions, 1);
        }
        int rc = ad_upload(a, g->b);
        if (rc)
            return rc;
        atomic_fetch_add(&g->s->device_loads, 1);
        resident *r = &g->res[g->n_res++];
        memset(r, 0, sizeof *r);
        r->a = a;
        r->since = hy_now();
        const char *nm = srv_adapter_name(g->s, a, r->name, sizeof r->name);
        ad_adapter *again = NULL;
        if (nm && ad_reg_pin(g->reg, r->name, &again) == 0) {
            if (again == a) {
                r->pinned = true;
                ad_reg_mark_resident(g->reg, a, +1);
            } else
                ad_reg_unpin(g->reg, again);
        }
        i = g->n_res - 1;
    }
    g->res[i].users++;
    g->res[i].last = hy_now();
    return HY_OK;
}

static void release_one(glue *g, ad_adapter *a, uint64_t n_tokens);

/* The adapters read from files that adapter a runs: a itself, or the members of a stack. */
static int n_parts(const ad_adapter *a) { return ad_stack_n(a) ? ad_stack_n(a) : 1; }
static ad_adapter *part(ad_adapter *a, int i) { return ad_stack_n(a) ? ad_stack_member(a, i, NULL) : a; }

/* Every part resident at once, or none (HY_EBUSY waits for slots). */
static int g_acquire(void *ctx, void *adapter, const eng_adapter **out)
{
    glue *g = ctx;
    ad_adapter *a = adapter;
    for (int i = 0; i < n_parts(a); i++) {
        int rc = acquire_one(g, part(a, i));
        if (rc) {
            while (i-- > 0)
                release_one(g, part(a, i), 0);
            return rc;
        }
    }
    if (ad_stack_n(a))
        ad_stack_bind(a);
    *out = ad_eng(a);
    return HY_OK;
}

/* Router statistics of resident i into srv's table for GET /v1/adapters (s->mu held). */
static void stats_fill(glue *g, int i, srv_ad_stats *x)
{
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", g->res[i].name);
    x->tokens = ad_tokens(g->res[i].a);
    x->K = HY_MIN(ad_K(g->res[i].a), AD_MAX_K);
    x->resident = true;
    float gate[AD_MAX_K] = {0};
    x->gate_n = ad_stats_mean_gate(g->res[i].a, gate);
    memcpy(x->gate, gate, sizeof x->gate);
}

/* Refresh (or add) the entry of resident i, so a finished request's router statistics show at
 * once rather than at the next engine step (an idle engine runs none). */
static void stats_publish_one(glue *g, int i, bool resident)
{
    srv *s = g->s;
    pthread_mutex_lock(&s->mu);
    srv_ad_stats *x = srv_stats_entry(s, g->res[i].name); /* NULL (no memory): shown at the next snapshot */
    if (x) {
        stats_fill(g, i, x);
        x->resident = resident;
    }
    pthread_mutex_unlock(&s->mu);
}

/* The registry no longer serves this resident (unloaded, or draining until its pins go). */
static bool res_retired(glue *g, const resident *r)
{
    ad_state st; /* by pointer: the name may already belong to a new load */
    return ad_reg_state_of(g->reg, r->a, &st) != 0 || st == AD_DRAINING;
}

static void g_release(void *ctx, void *adapter, uint64_t n_tokens)
{
    glue *g = ctx;
    for (int i = 0; i < n_parts(adapter); i++) /* each member of a stack ran every token */
        release_one(g, part(adapter, i), n_tokens);
}

static void release_one(glue *g, ad_adapter *adapter, uint64_t n_tokens)
{
    for (int i = 0; i < g->n_res; i++)
        if (g->res[i].a == adapter) {
            g->res[i].users--;
            g->res[i].last = hy_now();
            ad_count_tokens(g->res[i].a, n_tokens);
            /* without our pin it must not outlive the requests' pins; a draining adapter goes
             * with its last request, not at some later step (an idle engine takes none) */
            bool drop = g->res[i].users == 0 && (!g->res[i].pinned || res_retired(g, &g->res[i]));
            stats_publish_one(g, i, !drop);
            if (drop) {
                unload_resident(g, i);
                ad_reg_collect(g->reg);
            }
            return;
        }
}

/* A stack is named by its members joined with '+' ("a+b"). */
static const char *g_name(void *ctx, void *adapter)
{
    glue *g = ctx;
    int n = ad_stack_n(adapter);
    if (n == 0)
        return srv_adapter_name(g->s, adapter, g->name_buf, sizeof g->name_buf);
    size_t at = 0;
    g->name_buf[0] = 0;
    for (int i = 0; i < n && at + 1 < sizeof g->name_buf; i++) {
        char one[AD_NAME_MAX];
        const char *nm = srv_adapter_name(g->s, ad_stack_member(adapter, i, NULL), one, sizeof one);
        int w = snprintf(g->name_buf + at, sizeof g->name_buf - at, "%s%s", i ? "+" : "", nm ? nm : "?");
        at = w > 0 ? HY_MIN(at + (size_t)w, sizeof g->name_buf - 1) : at;
    }
    return g->name_buf;
}

/* Drop residents being unloaded; snapshot router statistics for GET /v1/adapters. */
static void g_housekeeping(void *ctx)
{
    glue *g = ctx;
    for (int i = 0; i < g->n_res;) {
        resident *r = &g->res[i];
        if (r->users == 0 && res_retired(g, r)) {
            unload_resident(g, i);
            continue;
        }
        i++;
    }
    ad_reg_collect(g->reg);
    double now = hy_now();
    if (now - g->last_stats < 0.25)
        return;
    g->last_stats = now;
    srv *s = g->s;
    pthread_mutex_lock(&s->mu);
    s->n_stats = 0;
    for (int i = 0; i < g->n_res; i++) {
        srv_ad_stats *x = srv_stats_entry(s, g->res[i].name);
        if (x)
            stats_fill(g, i, x);
    }
    pthread_mutex_unlock(&s->mu);
}

static void g_thread_exit(void *ctx)
{
    (void)ctx;
    smp_thread_cleanup();
}

static uint64_t g_ident(void *ctx, void *adapter)
{
    (void)ctx;
    return ad_load_id(adapter);
}

static const sched_ops glue_ops = {
    .forward = g_forward, .seq_init = g_seq_init, .seq_free = g_seq_free, .sample = g_sample,
    .detok = g_detok, .detok_flush = g_detok_flush, .is_eog = g_is_eog, .adapter_acquire = g_acquire,
    .adapter_release = g_release, .adapter_name = g_name, .adapter_ident = g_ident, .housekeeping = g_housekeeping,
    .thread_exit = g_thread_exit,
};

/* ---------- flags ---------- */

typedef struct {
    const char *model, *host, *served, *api_key, *admin_key, *device, *cache;
    int port, max_seqs, max_batch_tokens, kv_mb, kv_blocks, max_loras, max_cpu_loras, max_queue, threads,
        http_threads, max_conns, ctx, adapter_max_mb, drain_s, request_deadline, max_conns_ip, max_prompts,
        adapter_wait;
    const char *adapters[MAX_ADAPTER_ARGS];
    int n_adapters;
    const char *scales[MAX_ADAPTER_ARGS]; /* NAME=X, X parsed in scale_of */
    int n_scales;
    const char *roots[MAX_ADAPTER_ARGS];
    int n_roots;
    const char *resolvers[MAX_ADAPTER_ARGS];
    int n_resolvers;
    const char *resolver_url, *resolver_manifest, *url_ca;
    bool spec_off;       /* --speculative none */
    int spec_max_draft, spec_max_batch;
    bool evict_fifo;     /* --adapter-eviction fifo */
    const char *url_allow[MAX_ADAPTER_ARGS];
    int n_url_allow;
    bool metrics_auth;
    bool json_ws;        /* --json-whitespace flexible */
    bool no_prefix_cache;
    bool no_ui;          /* --no-ui: no web console at / */
} serve_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: hydrad serve -m MODEL.gguf [options]\n"
            "Serve the model over an OpenAI-compatible HTTP API with HydraLoRA adapters.\n\n"
            "  -m, --model PATH          base model (GGUF), required\n"
            "      --host ADDR           address to listen on: IPv4, IPv6 (::1, :: takes IPv4 too)\n"
            "                            or a host name (default 127.0.0.1)\n"
            "      --port N              TCP port (default 8000)\n"
            "      --served-model-name S name of the base model in requests and /v1/models\n"
            "                            (default: the model file name without .gguf)\n"
            "      --adapter NAME=DIR    load an adapter at start-up (repeatable)\n"
            "      --adapter-scale NAME=X  multiply start-up adapter NAME's scale s by X\n"
            "                            (repeatable; 0 = the base model's output)\n"
            "      --adapter-root DIR    directory under which /v1/load_lora_adapter may load\n"
            "                            adapters (repeatable; none: run-time loading refused)\n"
            "      --adapter-cache DIR   download directory for https:// adapters given to\n"
            "                            /v1/load_lora_adapter (default /tmp/hydrad-adapter-cache)\n"
            "      --adapter-max-mb N    size cap of a downloaded adapter file (default 1024)\n"
            "      --api-key KEY         require 'Authorization: Bearer KEY' on /v1/*\n"
            "      --admin-key KEY       key for /v1/load_lora_adapter and /v1/unload_lora_adapter\n"
            "                            (default: the API key)\n"
            "      --max-seqs N          sequences decoded together at most (default 32)\n"
            "      --max-batch-tokens N  tokens per forward step, prefill chunks included (default 512)\n"
            "      --kv-cache-mb N       KV cache size in MiB (default 256)\n"
            "      --kv-blocks N         KV cache size in blocks of %d tokens (overrides --kv-cache-mb)\n"
            "      --max-model-len N     context per sequence (default min(model's, 4096))\n"
            "      --max-loras N         adapters resident on the device at once (default 8)\n"
            "      --max-cpu-loras N     adapters held in host memory (default 64)\n"
            "      --max-queue N         requests waiting for admission; more get 429 (default 256)\n"
            "      --max-prompts N       prompts in one /v1/completions request (default 64, at most %d)\n"
            "      --adapter-resolver DIR  load on first use: a request naming an adapter that is not\n"
            "                            loaded loads DIR/NAME (repeatable; confined to DIR like a root)\n"
            "      --adapter-resolver-url https://HOST/PATH/{name}/  load on first use from a model store:\n"
            "                            a name the manifest lists is fetched (adapter_config.json and\n"
            "                            adapter_model.safetensors under the URL), sha256-checked, cached\n"
            "                            under --adapter-cache and loaded; HOST must be in --adapter-url-allow\n"
            "      --adapter-resolver-manifest FILE  JSON {\"name\": \"<sha256 of adapter_model.safetensors>\"}:\n"
            "                            the names the URL resolver serves (read again when it changes)\n"
            "      --adapter-url-ca FILE  PEM certificates to trust for https:// adapter hosts (default: the\n"
            "                            system's)\n"
            "      --speculative none|ngram  speculative decoding: prompt-lookup drafts (tokens that followed\n"
            "                            the latest earlier occurrence of the last 1-4 tokens) verified in\n"
            "                            the same forward; outputs are unchanged (default ngram)\n"
            "      --spec-max-draft K    draft tokens per sequence and step at most (default 4, at most %d)\n"
            "      --spec-max-batch N    no drafts in a step that decodes N or more sequences (default 4;\n"
            "                            0: always): a full batch is compute-bound, drafts cost there\n"
            "      --adapter-eviction lru|fifo  which idle, unpinned adapter leaves the device or host\n"
            "                            memory when a slot is needed (default lru)\n"
            "      --adapter-wait-timeout S  a request whose adapter finds no free device slot (all in use\n"
            "                            or pinned) for S seconds fails with 503 (default 600; 0: no limit)\n"
            "      --no-prefix-cache     prefill every prompt in full (default: reuse the K/V of whole\n"
            "                            16-token blocks an earlier prompt with the same adapter load,\n"
            "                            router control and cache_salt computed)\n"
            "      --no-ui               no web console at / (default: served; README \"Console\")\n"
            "      --adapter-url-allow HOST  a host https:// adapter URLs may name (repeatable; none: URL\n"
            "                            loading is off); its addresses must not be loopback, link-local\n"
            "                            or private unless HOST is that address itself\n"
            "      --metrics-auth        /metrics needs the API key too (default: open, for scrapers;\n"
            "                            it names the adapters and their request counts)\n"
            "      --max-connections-per-ip N  connections one client address may hold (default: half of\n"
            "                            --max-connections; 0: no limit)\n"
            "      --request-timeout S   a connection must send a whole request (headers and body) within\n"
            "                            S seconds of opening or of its previous answer, else it is shut\n"
            "                            down: slow clients cannot hold connection slots (default 30; 0 off)\n"
            "      --drain-timeout S     on SIGTERM/SIGINT: stop accepting, answer /health 503 and let\n"
            "                            requests in flight finish for up to S seconds (default 30); what\n"
            "                            is left then gets an error; a second signal cuts at once. Exit\n"
            "                            status 0 when nothing was cut, 3 otherwise\n"
            "      --json-whitespace compact|flexible  JSON from response_format: none outside strings\n"
            "                            (default, as xgrammar and llguidance) or optional whitespace\n"
            "                            around every structural character\n"
            "      --threads N           compute threads of the CPU backend (default: all cores)\n"
            "      --http-threads N      HTTP worker threads (default 4)\n"
            "      --max-connections N   open connections at most (default 512)\n"
            "      --device auto|cpu|cuda  compute device (default auto)\n"
            "  -h, --help                this text\n",
            BE_KV_BLOCK, API_MAX_PROMPTS, SPEC_MAX_DRAFT);
}

static int parse_int(const char *name, const char *v, int lo, int *out)
{
    char *end;
    long x = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || x < lo || x > 1 << 30) {
        fprintf(stderr, "hydrad serve: --%s needs an integer >= %d (got '%s')\n", name, lo, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* parse_int, and at most hi. */
static int parse_int_max(const char *name, const char *v, int lo, int hi, int *out)
{
    int rc = parse_int(name, v, lo, out);
    if (!rc && *out > hi) {
        fprintf(stderr, "hydrad serve: --%s must be at most %d\n", name, hi);
        rc = -1;
    }
    return rc;
}

/* Length of NAME in "NAME=..." */
static int arg_name_len(const char *arg) { return (int)(strchr(arg, '=') - arg); }

/* Every --adapter-scale names a start-up --adapter (once) and carries a finite number. */
static int check_scales(const serve_opts *o)
{
    for (int i = 0; i < o->n_scales; i++) {
        const char *a = o->scales[i], *val = strchr(a, '=') + 1;
        int n = arg_name_len(a), found = 0;
        char *end;
        double x = strtod(val, &end);
        if (*val == '\0' || *end != '\0' || !isfinite(x)) {
            fprintf(stderr, "hydrad serve: --adapter-scale %s: '%s' is not a number\n", a, val);
            return -1;
        }
        for (int k = 0; k < o->n_adapters; k++)
            found += arg_name_len(o->adapters[k]) == n && strncmp(o->adapters[k], a, (size_t)n) == 0;
        for (int k = 0; k < i; k++)
            if (arg_name_len(o->scales[k]) == n && strncmp(o->scales[k], a, (size_t)n) == 0)
                found = -1;
        if (found != 1) {
            fprintf(stderr, "hydrad serve: --adapter-scale %.*s: %s\n", n, a,
                    found < 0 ? "given twice" : "no --adapter of that name");
            return -1;
        }
    }
    return 0;
}

/* The reading options of start-up adapter `name`: its --adapter-scale, else 1. */
static ad_opts opts_of(const serve_opts *o, const char *name, be *b)
{
    ad_opts r = {.scale_mult = 1.0f, .pack_for = b};
    size_t n = strlen(name);
    for (int i = 0; i < o->n_scales; i++)
        if ((size_t)arg_name_len(o->scales[i]) == n && strncmp(o->scales[i], name, n) == 0)
            r.scale_mult = strtof(o->scales[i] + n + 1, NULL);
    return r;
}

static int parse_flags(int argc, char **argv, serve_opts *o)
{
    enum { O_HOST = 256, O_PORT, O_SERVED, O_ADAPTER, O_ROOT, O_API, O_ADMIN, O_SEQS, O_BT, O_KVMB, O_KVB,
           O_LORAS, O_CPU, O_QUEUE, O_THREADS, O_HTHREADS, O_CONNS, O_DEVICE, O_CTX, O_CACHE, O_AMB, O_SCALE,
           O_DRAIN, O_URLALLOW, O_METRICSAUTH, O_DEADLINE, O_CONNSIP, O_JSONWS, O_PROMPTS, O_NOPC, O_RESOLVER, O_EVICT, O_NOUI,
           O_AWAIT, O_RURL, O_RMANIFEST, O_URLCA, O_SPEC, O_SPECK, O_SPECB };
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"host", required_argument, 0, O_HOST},
        {"port", required_argument, 0, O_PORT}, {"served-model-name", required_argument, 0, O_SERVED},
        {"adapter", required_argument, 0, O_ADAPTER}, {"adapter-root", required_argument, 0, O_ROOT},
        {"adapter-scale", required_argument, 0, O_SCALE}, {"adapter-resolver", required_argument, 0, O_RESOLVER},
        {"adapter-eviction", required_argument, 0, O_EVICT}, {"adapter-wait-timeout", required_argument, 0, O_AWAIT},
        {"adapter-resolver-url", required_argument, 0, O_RURL},
        {"adapter-resolver-manifest", required_argument, 0, O_RMANIFEST},
        {"adapter-url-ca", required_argument, 0, O_URLCA},
        {"speculative", required_argument, 0, O_SPEC}, {"spec-max-draft", required_argument, 0, O_SPECK},
        {"spec-max-batch", required_argument, 0, O_SPECB},
        {"api-key", required_argument, 0, O_API}, {"admin-key", required_argument, 0, O_ADMIN},
        {"max-seqs", required_argument, 0, O_SEQS}, {"max-batch-tokens", required_argument, 0, O_BT},
        {"kv-cache-mb", required_argument, 0, O_KVMB}, {"kv-blocks", required_argument, 0, O_KVB},
        {"max-loras", required_argument, 0, O_LORAS}, {"max-cpu-loras", required_argument, 0, O_CPU},
        {"max-queue", required_argument, 0, O_QUEUE}, {"threads", required_argument, 0, O_THREADS},
        {"http-threads", required_argument, 0, O_HTHREADS}, {"max-connections", required_argument, 0, O_CONNS},
        {"device", required_argument, 0, O_DEVICE}, {"max-model-len", required_argument, 0, O_CTX},
        {"adapter-cache", required_argument, 0, O_CACHE}, {"adapter-max-mb", required_argument, 0, O_AMB},
        {"drain-timeout", required_argument, 0, O_DRAIN}, {"adapter-url-allow", required_argument, 0, O_URLALLOW},
        {"metrics-auth", no_argument, 0, O_METRICSAUTH}, {"request-timeout", required_argument, 0, O_DEADLINE},
        {"max-connections-per-ip", required_argument, 0, O_CONNSIP}, {"json-whitespace", required_argument, 0, O_JSONWS},
        {"max-prompts", required_argument, 0, O_PROMPTS}, {"no-prefix-cache", no_argument, 0, O_NOPC},
        {"no-ui", no_argument, 0, O_NOUI}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c, rc = 0;
    optind = 1;
    while (rc == 0 && (c = getopt_long(argc, argv, "m:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'h': usage(stdout); return 1;
        case O_HOST: o->host = optarg; break;
        case O_PORT: rc = parse_int("port", optarg, 0, &o->port); break;
        case O_SERVED: o->served = optarg; break;
        case O_ADAPTER:
            if (o->n_adapters == MAX_ADAPTER_ARGS || !strchr(optarg, '=')) {
                fprintf(stderr, "hydrad serve: --adapter needs NAME=DIR (at most %d)\n", MAX_ADAPTER_ARGS);
                rc = -1;
            } else {
                o->adapters[o->n_adapters++] = optarg;
            }
            break;
        case O_SCALE:
            if (o->n_scales == MAX_ADAPTER_ARGS || !strchr(optarg, '=')) {
                fprintf(stderr, "hydrad serve: --adapter-scale needs NAME=X (at most %d)\n", MAX_ADAPTER_ARGS);
                rc = -1;
            } else {
                o->scales[o->n_scales++] = optarg;
            }
            break;
        case O_ROOT:
            if (o->n_roots == MAX_ADAPTER_ARGS)
                rc = -1;
            else
                o->roots[o->n_roots++] = optarg;
            break;
        case O_RESOLVER:
            if (o->n_resolvers == MAX_ADAPTER_ARGS)
                rc = -1;
            else
                o->resolvers[o->n_resolvers++] = optarg;
            break;
        case O_EVICT:
            if (strcmp(optarg, "lru") && strcmp(optarg, "fifo")) {
                fprintf(stderr, "hydrad serve: --adapter-eviction is lru or fifo\n");
                rc = -1;
            }
            o->evict_fifo = !strcmp(optarg, "fifo");
            break;
        case O_API: o->api_key = optarg; break;
        case O_ADMIN: o->admin_key = optarg; break;
        case O_SEQS: rc = parse_int("max-seqs", optarg, 1, &o->max_seqs); break;
        case O_BT: rc = parse_int("max-batch-tokens", optarg, 1, &o->max_batch_tokens); break;
        case O_KVMB: rc = parse_int("kv-cache-mb", optarg, 1, &o->kv_mb); break;
        case O_KVB: rc = parse_int("kv-blocks", optarg, 1, &o->kv_blocks); break;
        case O_LORAS: rc = parse_int("max-loras", optarg, 1, &o->max_loras); break;
        case O_CPU: rc = parse_int("max-cpu-loras", optarg, 1, &o->max_cpu_loras); break;
        case O_QUEUE: rc = parse_int("max-queue", optarg, 1, &o->max_queue); break;
        case O_NOPC: o->no_prefix_cache = true; break;
        case O_AWAIT: rc = parse_int("adapter-wait-timeout", optarg, 0, &o->adapter_wait); break;
        case O_RURL: o->resolver_url = optarg; break;
        case O_RMANIFEST: o->resolver_manifest = optarg; break;
        case O_URLCA: o->url_ca = optarg; break;
        case O_SPEC:
            if (strcmp(optarg, "none") && strcmp(optarg, "ngram")) {
                fprintf(stderr, "hydrad serve: --speculative is none or ngram\n");
                rc = -1;
            }
            o->spec_off = !strcmp(optarg, "none");
            break;
        case O_SPECB: rc = parse_int("spec-max-batch", optarg, 0, &o->spec_max_batch); break;
        case O_SPECK: rc = parse_int_max("spec-max-draft", optarg, 1, SPEC_MAX_DRAFT, &o->spec_max_draft); break;
        case O_NOUI: o->no_ui = true; break;
        case O_PROMPTS: rc = parse_int_max("max-prompts", optarg, 1, API_MAX_PROMPTS, &o->max_prompts); break;
        case O_THREADS: rc = parse_int("threads", optarg, 0, &o->threads); break;
        case O_HTHREADS: rc = parse_int("http-threads", optarg, 1, &o->http_threads); break;
        case O_CONNS: rc = parse_int("max-connections", optarg, 1, &o->max_conns); break;
        case O_DEVICE: o->device = optarg; break;
        case O_CACHE: o->cache = optarg; break;
        case O_AMB: rc = parse_int("adapter-max-mb", optarg, 1, &o->adapter_max_mb); break;
        case O_DRAIN: rc = parse_int("drain-timeout", optarg, 0, &o->drain_s); break;
        case O_METRICSAUTH: o->metrics_auth = true; break;
        case O_DEADLINE: rc = parse_int("request-timeout", optarg, 0, &o->request_deadline); break;
        case O_CONNSIP: rc = parse_int("max-connections-per-ip", optarg, 0, &o->max_conns_ip); break;
        case O_JSONWS:
            o->json_ws = !strcmp(optarg, "flexible");
            if (!o->json_ws && strcmp(optarg, "compact")) {
                fprintf(stderr, "hydrad serve: --json-whitespace takes compact or flexible\n");
                rc = -1;
            }
            break;
        case O_URLALLOW:
            if (o->n_url_allow == MAX_ADAPTER_ARGS)
                rc = -1;
            else
                o->url_allow[o->n_url_allow++] = optarg;
            break;
        case O_CTX: rc = parse_int("max-model-len", optarg, 16, &o->ctx); break;
        default: usage(stderr); return -1;
        }
    }
    if (rc)
        return -1;
    if (optind < argc) {
        fprintf(stderr, "hydrad serve: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!o->model) {
        fprintf(stderr, "hydrad serve: -m MODEL is required (see --help)\n");
        return -1;
    }
    return check_scales(o);
}

/* ---------- main ---------- */

/* Load on first use (srv_resolve.c): resolver directories and/or the URL resolver, whose host must
 * already be allowed for https:// adapters (the allow-list is checked again at every fetch). */
static int resolver_create(const serve_opts *o, srv *s)
{
    char msg[300];
    if (o->resolver_url && !srv_url_allowed(s, o->resolver_url, msg, sizeof msg))
        return hy_err_set(HY_EINVAL, "--adapter-resolver-url: %s", msg);
    srv_resolve_cfg rc = {.roots = o->resolvers, .n_roots = o->n_resolvers, .url = o->resolver_url,
                          .manifest = o->resolver_manifest, .fetch = srv_fetch_resolved, .fetch_ctx = s,
                          .room_wait_s = 5.0, .fifo = o->evict_fifo, .pack_for = eng_model_backend(s->model)};
    return srv_resolve_create(&rc, s->reg, &s->shape, &s->resolver);
}

static char *default_served_name(const char *path)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    char *s = strdup(b);
    if (s && strlen(s) > 5 && strcmp(s + strlen(s) - 5, ".gguf") == 0)
        s[strlen(s) - 5] = '\0';
    return s;
}

/* Wait until nothing runs or waits, for at most `seconds` or until one more of `sigs` arrives.
 * Returns the requests (running sequences + waiting requests) still there: what will be cut. */
static int wait_drained(srv *s, double seconds, const sigset_t *sigs)
{
    double until = hy_now() + seconds;
    int idle = 0;
    for (;;) {
        sched_stats st;
        sched_get_stats(s->sched, &st);
        int left = st.running_seqs + st.waiting_reqs;
        /* the stats are published once per engine step: idle only when seen so over 100 ms, so a
         * request admitted in the step under way is not taken for nothing left */
        idle = left == 0 ? idle + 1 : 0;
        if (idle >= 6 || hy_now() >= until)
            return left;
        struct timespec ts = {0, 20 * 1000 * 1000};
        if (sigtimedwait(sigs, NULL, &ts) > 0) {
            fprintf(stderr, "hydrad serve: second signal: stopping now\n");
            return left;
        }
    }
}

int cli_serve(int argc, char **argv)
{
    serve_opts o = {.host = "127.0.0.1", .port = 8000, .device = "auto", .max_seqs = 32, .max_batch_tokens = 512,
                    .kv_mb = 256, .max_loras = 8, .max_cpu_loras = 64, .max_queue = 256, .http_threads = 4,
                    .max_conns = 512, .ctx = 0, .adapter_max_mb = 1024, .drain_s = 30,
                    .request_deadline = 30, .max_conns_ip = -1, .max_prompts = 64, .adapter_wait = 600,
                    .spec_max_draft = 4, .spec_max_batch = 4};
    int prc = parse_flags(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;

    /* Signals go to sigwait in this thread only: block them before any thread starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ret = 1, rc;
    char *served = o.served ? strdup(o.served) : default_served_name(o.model);
    gguf_file *f = NULL;
    be *b = NULL;
    eng_model *m = NULL;
    eng_kv *kv = NULL;
    tok_vocab *v = NULL;
    ad_registry *reg = NULL;
    sched *sc = NULL;
    glue g;
    memset(&g, 0, sizeof g);
    srv s;
    srv_config cfg = {o.host, o.port, served, o.api_key, o.admin_key, o.http_threads, o.max_conns, 1u << 20,
                      o.roots, o.n_roots, o.max_loras, o.cache, (size_t)o.adapter_max_mb << 20, o.url_ca,
                      o.url_allow, o.n_url_allow, o.metrics_auth, o.request_deadline,
                      o.max_conns_ip >= 0 ? o.max_conns_ip : (o.max_conns + 1) / 2, o.json_ws,
                      o.max_prompts, o.no_ui};
    curl_global_init(CURL_GLOBAL_DEFAULT);
    srv_init(&s, &cfg);
    if (!served)
        goto done;
    if ((rc = srv_start(&s))) {
        fprintf(stderr, "hydrad serve: %s\n", hy_err_msg());
        goto done;
    }
    fprintf(stderr, "hydrad serve: listening on http://%s:%d (loading %s)\n", s.bound, o.port, o.model);
    ret = 2;
    if ((rc = gguf_open(o.model, &f)) || (rc = be_open(o.device, o.threads, &b)) ||
        (rc = eng_model_load(f, b, &m)) || (rc = tok_load(f, &v)) || (rc = gram_vocab_create(v, &g.gv))) {
        fprintf(stderr, "hydrad serve: %s: %s\n", o.model, hy_err_msg());
        goto done;
    }
    const eng_hparams *hp = eng_model_hparams(m);
    int n_ctx = o.ctx ? o.ctx : HY_MIN(hp->n_ctx_train > 0 ? hp->n_ctx_train : 4096, 4096);
    size_t block_bytes = (size_t)hp->n_layer * 2 * (size_t)hp->n_head_kv * (size_t)hp->head_dim * 2 * BE_KV_BLOCK;
    int n_blocks = o.kv_blocks ? o.kv_blocks : (int)(((size_t)o.kv_mb << 20) / block_bytes);
    if (n_blocks < 1 || (rc = eng_kv_create(m, n_blocks, &kv))) {
        fprintf(stderr, "hydrad serve: KV cache of %d blocks: %s\n", n_blocks, hy_err_msg());
        goto done;
    }
    if ((rc = ad_reg_create(o.max_cpu_loras, &reg))) {
        fprintf(stderr, "hydrad serve: %s\n", hy_err_msg());
        goto done;
    }
    ad_shape_from_model(m, &s.shape);
    for (int i = 0; i < o.n_adapters; i++) {
        char name[AD_NAME_MAX];
        const char *eq = strchr(o.adapters[i], '=');
        snprintf(name, sizeof name, "%.*s", (int)(eq - o.adapters[i]), o.adapters[i]);
        ad_opts ao = opts_of(&o, name, b);
        char dir[4096];
        size_t dl = strlen(eq + 1);
        bool pin = dl > 7 && !strcmp(eq + 1 + dl - 7, ":pinned"); /* NAME=DIR:pinned */
        snprintf(dir, sizeof dir, "%.*s", (int)(pin ? dl - 7 : dl), eq + 1);
        if ((rc = ad_reg_load(reg, name, dir, &s.shape, &ao)) ||
            (pin && (rc = srv_pin_check(reg, o.max_loras)) == 0 && (rc = ad_reg_set_pinned(reg, name, true)))) {
            fprintf(stderr, "hydrad serve: adapter %s: %s\n", name, hy_err_msg());
            goto done;
        }
    }
    g = (glue){.s = &s, .m = m, .kv = kv, .b = b, .v = v, .gv = g.gv, .reg = reg, .max_loras = o.max_loras,
               .n_vocab = hp->n_vocab, .fifo = o.evict_fifo};
    sched_config sc_cfg = {.max_seqs = o.max_seqs, .max_batch_tokens = o.max_batch_tokens, .n_blocks = n_blocks,
                           .max_queue = o.max_queue, .max_loras = o.max_loras, .n_ctx = n_ctx,
                           .n_vocab = hp->n_vocab, .n_layer = hp->n_layer, .prefix_cache = !o.no_prefix_cache,
                           .adapter_wait_s = o.adapter_wait,
                           .spec_max_draft = o.spec_off ? 0 : o.spec_max_draft, .spec_max_batch = o.spec_max_batch,
                           .ops = &glue_ops, .ops_ctx = &g};
    if ((rc = sched_create(&sc_cfg, &sc)) || (rc = sched_start(sc))) {
        fprintf(stderr, "hydrad serve: %s\n", hy_err_msg());
        goto done;
    }
    s.model = m;
    s.vocab = v;
    s.chat_ok = tok_chat_detect(f, NULL, &s.chat) == 0;
    if (!s.chat_ok)
        fprintf(stderr, "hydrad serve: no chat template (%s); /v1/chat/completions will answer 400\n", hy_err_msg());
    s.n_ctx = n_ctx;
    s.sched = sc;
    s.reg = reg;
    if ((o.n_resolvers || o.resolver_url) && (rc = resolver_create(&o, &s))) {
        fprintf(stderr, "hydrad serve: %s\n", hy_err_msg());
        goto done;
    }
    atomic_store(&s.ready, true);
    fprintf(stderr, "hydrad serve: ready: model '%s', backend %s, context %d, KV %d blocks (%d tokens), %d adapter(s)\n",
            served, b->ops->name, n_ctx, n_blocks, n_blocks * BE_KV_BLOCK, o.n_adapters);
    if (!o.no_ui)
        fprintf(stderr, "hydrad serve: web console on http://%s:%d/\n", s.bound, o.port);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "hydrad serve: signal %d: draining for up to %d s (a second signal stops at once)\n", sig,
            o.drain_s);
    /* new work gets 503 and /health 503 draining (load balancers stop sending) while the listener
     * stays open to say so; it closes once the work in flight is done or cut */
    atomic_store(&s.stopping, true);
    int cut = wait_drained(&s, o.drain_s, &sigs);
    srv_quiesce(&s);
    sched_stop(sc); /* ends what is left ("cancelled": an error to its client) and resumes every connection */
    usleep(200000); /* let the last chunks reach their sockets */
    if (cut)
        fprintf(stderr, "hydrad serve: %d request(s) cut at shutdown\n", cut);
    ret = cut ? 3 : 0;
done:
    srv_stop(&s);
    srv_resolve_free(s.resolver); /* waits for first-use loads in flight */
    s.resolver = NULL;
    sched_free(sc);
    ad_reg_free(reg);
    eng_kv_free(kv);
    eng_model_free(m);
    gram_vocab_free(g.gv);
    tok_free(v);
    if (b)
        b->ops->destroy(b);
    gguf_close(f);
    srv_clear(&s);
    curl_global_cleanup();
    free(served);
    return ret;
}
