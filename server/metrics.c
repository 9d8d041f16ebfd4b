/* metrics.c - Prometheus counters/histograms of the server and their text exposition.
 * Callers pass engine gauges in; this file reads no engine or adapter state itself. */
#include "server/metrics.h"

#include "engine/hy.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double bucket_le[SRV_HIST_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                   1.0,   2.5,  5.0,   10.0, 30.0, 60.0, 120.0};

void srv_metrics_init(srv_metrics *m)
{
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
}

void srv_metrics_clear(srv_metrics *m) { pthread_mutex_destroy(&m->mu); }

static void observe(srv_hist *h, double v)
{
    int i = 0;
    while (i < SRV_HIST_BUCKETS && v > bucket_le[i])
        i++;
    h->count[i]++;
    h->sum += v;
    h->n++;
}

void srv_metrics_status(srv_metrics *m, int status)
{
    if (status < 100 || status >= 600)
        return;
    pthread_mutex_lock(&m->mu);
    m->by_status[status]++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_cancelled(srv_metrics *m)
{
    pthread_mutex_lock(&m->mu);
    m->cancelled++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_request(srv_metrics *m, double ttft, double e2e, int prompt_tokens, int gen_tokens)
{
    pthread_mutex_lock(&m->mu);
    m->requests_ok++;
    m->prompt_tokens += (uint64_t)(prompt_tokens > 0 ? prompt_tokens : 0);
    m->generation_tokens += (uint64_t)(gen_tokens > 0 ? gen_tokens : 0);
    if (ttft >= 0) {
        observe(&m->ttft, ttft);
        if (gen_tokens > 1)
            observe(&m->tpot, (e2e - ttft) / (gen_tokens - 1));
    }
    observe(&m->e2e, e2e);
    pthread_mutex_unlock(&m->mu);
}

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->buf + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap * 2 + (size_t)n + 1;
        char *p = realloc(b->buf, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->buf = p;
        b->cap = cap;
    }
}

/* A histogram of n buckets with upper bounds le[0..n) (count[n]: the rest), their sum and count. */
static void hist_of(sbuf *b, const char *name, const char *help, const double *le, int n, const uint64_t *count,
                    double sum, uint64_t total)
{
    uint64_t cum = 0;
    sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    for (int i = 0; i < n; i++) {
        cum += count[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, le[i], (unsigned long long)cum);
    }
    cum += count[n];
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
              (unsigned long long)cum, name, sum, name, (unsigned long long)total);
}

static void hist(sbuf *b, const char *name, const char *help, const srv_hist *h)
{
    hist_of(b, name, help, bucket_le, SRV_HIST_BUCKETS, h->count, h->sum, h->n);
}

static uint64_t hist_total(const uint64_t *count, int n)
{
    uint64_t t = 0;
    for (int i = 0; i <= n; i++)
        t += count[i];
    return t;
}

/* Label values: escape backslash, quote and newline. */
static void label_escape(char *out, size_t cap, const char *s)
{
    size_t o = 0;
    for (; s && *s && o + 3 < cap; s++) {
        if (*s == '\\' || *s == '"') {
            out[o++] = '\\';
            out[o++] = *s;
        } else if (*s == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *s;
        }
    }
    out[o] = '\0';
}

/* A label value escaped into new memory (every byte escaped at most once, plus the end); NULL when
 * out of memory. */
static char *label_dup(const char *s)
{
    s = s ? s : "";
    size_t cap = 2 * strlen(s) + 4;
    char *esc = malloc(cap);
    if (esc)
        label_escape(esc, cap, s);
    return esc;
}

/* One unlabelled counter. */
static void counter(sbuf *b, const char *name, const char *help, uint64_t v)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name, (unsigned long long)v);
}

/* vLLM's vllm:lora_adapter_loaded: 1 per loaded adapter and level (host; device when resident). */
static void adapter_levels(sbuf *b, const srv_gauges *g)
{
    sb_printf(b, "# HELP vllm:lora_adapter_loaded Loaded adapters by level (host memory, device).\n"
                 "# TYPE vllm:lora_adapter_loaded gauge\n");
    for (int i = 0; i < g->n_levels; i++) {
        char *esc = label_dup(g->levels[i].name);
        if (!esc) {
            b->oom = 1;
            return;
        }
        const char *pin = g->levels[i].pinned ? "true" : "false";
        sb_printf(b, "vllm:lora_adapter_loaded{adapter_name=\"%s\",level=\"host\",pinned=\"%s\"} 1\n", esc, pin);
        if (g->levels[i].device)
            sb_printf(b, "vllm:lora_adapter_loaded{adapter_name=\"%s\",level=\"device\",pinned=\"%s\"} 1\n", esc,
                      pin);
        free(esc);
    }
}

/* Per-adapter series, one sample per adapter that has been requested since it was loaded (the
 * series of an unloaded adapter are gone with it: bounded by the adapters loaded). */
static void adapter_requests(sbuf *b, const srv_gauges *g)
{
    static const struct {
        const char *name, *help;
    } fam[] = {
        {"hydrad_adapter_requests_total", "Requests routed to each loaded adapter."},
        {"hydrad_adapter_prompt_tokens_total", "Prompt tokens of finished requests, by adapter."},
        {"hydrad_adapter_generation_tokens_total", "Generated tokens of finished requests, by adapter."},
        {"hydrad_adapter_head_gate_sum", "HydraLoRA head usage: the sum of the head's router gate over every "
                                         "token and targeted projection, by adapter and head."},
    };
    char **esc = calloc((size_t)g->n_adapters + 1, sizeof *esc);
    if (!esc) {
        b->oom = 1;
        return;
    }
    for (int i = 0; i < g->n_adapters && !b->oom; i++)
        if (!(esc[i] = label_dup(g->adapters[i].name)))
            b->oom = 1;
    for (size_t f = 0; f < HY_ARRAY_LEN(fam) && !b->oom; f++) {
        sb_printf(b, "# HELP %s %s\n# TYPE %s counter\n", fam[f].name, fam[f].help, fam[f].name);
        for (int i = 0; i < g->n_adapters; i++) {
            const srv_adapter_requests *a = &g->adapters[i];
            if (f == 3) {
                for (int k = 0; k < a->K && k < SRV_MAX_HEADS; k++)
                    sb_printf(b, "%s{adapter=\"%s\",head=\"%d\"} %.6f\n", fam[f].name, esc[i], k, a->gate_sum[k]);
                continue;
            }
            uint64_t v = f == 0 ? a->requests : f == 1 ? a->prompt_tokens : a->generation_tokens;
            sb_printf(b, "%s{adapter=\"%s\"} %llu\n", fam[f].name, esc[i], (unsigned long long)v);
        }
    }
    for (int i = 0; i < g->n_adapters; i++)
        free(esc[i]);
    free(esc);
}

char *srv_metrics_render(srv_metrics *m, const srv_gauges *g)
{
    sbuf b = {malloc(8192), 0, 8192, 0};
    if (!b.buf)
        return NULL;
    b.buf[0] = '\0';
    char model[512], run[2100], wait[2100];
    label_escape(model, sizeof model, g->model_name);
    label_escape(run, sizeof run, g->running_adapters);
    label_escape(wait, sizeof wait, g->waiting_adapters);
    double kv = g->kv_total > 0 ? (double)g->kv_used / g->kv_total : 0.0;

    pthread_mutex_lock(&m->mu);
    sb_printf(&b, "# HELP hydrad_requests_total HTTP responses by status code.\n"
                  "# TYPE hydrad_requests_total counter\n");
    for (int s = 100; s < 600; s++)
        if (m->by_status[s])
            sb_printf(&b, "hydrad_requests_total{status=\"%d\"} %llu\n", s, (unsigned long long)m->by_status[s]);
    sb_printf(&b, "# HELP hydrad_prompt_tokens_total Prompt tokens of finished requests.\n"
                  "# TYPE hydrad_prompt_tokens_total counter\nhydrad_prompt_tokens_total %llu\n",
              (unsigned long long)m->prompt_tokens);
    sb_printf(&b, "# HELP hydrad_generation_tokens_total Generated tokens of finished requests.\n"
                  "# TYPE hydrad_generation_tokens_total counter\nhydrad_generation_tokens_total %llu\n",
              (unsigned long long)m->generation_tokens);
    sb_printf(&b, "# HELP hydrad_requests_cancelled_total Requests cancelled because the client disconnected "
                  "before the answer was complete.\n# TYPE hydrad_requests_cancelled_total counter\n"
                  "hydrad_requests_cancelled_total %llu\n", (unsigned long long)m->cancelled);
    sb_printf(&b, "# HELP hydrad_connections_timed_out_total Connections shut down because they did not send "
                  "a whole request within the request deadline.\n# TYPE hydrad_connections_timed_out_total counter\n"
                  "hydrad_connections_timed_out_total %llu\n", (unsigned long long)g->conns_timed_out);
    hist(&b, "hydrad_time_to_first_token_seconds", "Time from arrival to the first generated token.", &m->ttft);
    hist(&b, "hydrad_time_per_output_token_seconds", "Mean time between output tokens of a request.", &m->tpot);
    hist(&b, "hydrad_e2e_request_latency_seconds", "Time from arrival to the last token.", &m->e2e);
    pthread_mutex_unlock(&m->mu);

    sb_printf(&b, "# HELP hydrad_queue_depth Requests waiting for admission.\n# TYPE hydrad_queue_depth gauge\n"
                  "hydrad_queue_depth %d\n", g->waiting);
    sb_printf(&b, "# HELP hydrad_running_sequences Sequences in the running batch.\n"
                  "# TYPE hydrad_running_sequences gauge\nhydrad_running_sequences %d\n", g->running);
    sb_printf(&b, "# HELP hydrad_kv_blocks_used KV cache blocks in use.\n# TYPE hydrad_kv_blocks_used gauge\n"
                  "hydrad_kv_blocks_used %d\n", g->kv_used);
    sb_printf(&b, "# HELP hydrad_kv_blocks_total KV cache blocks.\n# TYPE hydrad_kv_blocks_total gauge\n"
                  "hydrad_kv_blocks_total %d\n", g->kv_total);
    sb_printf(&b, "# HELP hydrad_kv_blocks_cached KV cache blocks holding a cached prefix that no sequence "
                  "holds (reusable; free = total - used - cached).\n# TYPE hydrad_kv_blocks_cached gauge\n"
                  "hydrad_kv_blocks_cached %d\n", g->kv_cached);
    sb_printf(&b, "# HELP vllm:prefix_cache_queries Prompt tokens looked up in the prefix cache.\n"
                  "# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)g->prefix_queries);
    sb_printf(&b, "# HELP vllm:prefix_cache_hits Prompt tokens found in the prefix cache.\n"
                  "# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)g->prefix_hits);
    sb_printf(&b, "# HELP hydrad_kv_cache_usage_ratio Fraction of KV blocks in use.\n"
                  "# TYPE hydrad_kv_cache_usage_ratio gauge\nhydrad_kv_cache_usage_ratio %.6f\n", kv);
    sb_printf(&b, "# HELP hydrad_adapters_loaded Adapters held by the registry.\n"
                  "# TYPE hydrad_adapters_loaded gauge\nhydrad_adapters_loaded %d\n", g->adapters_loaded);
    adapter_requests(&b, g);
    adapter_levels(&b, g);
    counter(&b, "hydrad_adapter_device_loads_total", "Adapters copied from host memory into a device slot.",
            g->device_loads);
    counter(&b, "hydrad_adapter_device_evictions_total",
            "Idle unpinned adapters moved off the device to free a slot (they stay in host memory).",
            g->device_evictions);
    if (g->resolve) {
        const srv_resolve_stats *r = g->resolve;
        counter(&b, "hydrad_adapter_first_use_loads_total", "Adapters loaded on first use (--adapter-resolver, --adapter-resolver-url).",
                r->loads);
        counter(&b, "hydrad_adapter_load_failures_total", "First-use loads that failed.", r->failures);
        counter(&b, "hydrad_adapter_downloads_total",
                "First-use loads fetched from --adapter-resolver-url (the rest came from a directory or the cache).",
                r->downloads);
        counter(&b, "hydrad_adapter_evictions_total", "Idle adapters unloaded to make room for a first-use load.",
                r->evictions);
        hist_of(&b, "hydrad_adapter_load_seconds", "Duration of first-use loads (fetch, read, parse, validate).",
                srv_resolve_buckets, 7, r->load_hist, r->load_s_sum, hist_total(r->load_hist, 7));
    }
    sb_printf(&b, "# HELP hydrad_preemptions_total Sequences preempted for recompute.\n"
                  "# TYPE hydrad_preemptions_total counter\nhydrad_preemptions_total %llu\n",
              (unsigned long long)g->preemptions);
    sb_printf(&b, "# HELP hydrad_engine_steps_total Forward steps run.\n# TYPE hydrad_engine_steps_total counter\n"
                  "hydrad_engine_steps_total %llu\n", (unsigned long long)g->steps);
    if (g->step_hist)
        hist_of(&b, "hydrad_engine_step_seconds", "Wall time of a forward step (admission and adapter uploads included).",
                sched_step_buckets, SCHED_STEP_BUCKETS, g->step_hist, g->step_s_sum,
                hist_total(g->step_hist, SCHED_STEP_BUCKETS));
    /* The names vLLM exports and the inference-extension endpoint picker reads. */
    /* vLLM's speculative-decoding counters: verifications (a sequence's draft checked in a step),
     * draft tokens proposed, draft tokens accepted */
    const char *spec[3][2] = {{"num_drafts", "Drafts verified (one per sequence and step with a draft)."},
                              {"num_draft_tokens", "Draft tokens proposed."},
                              {"num_accepted_tokens", "Draft tokens accepted."}};
    const uint64_t spec_v[3] = {g->spec_drafts, g->spec_draft_tokens, g->spec_accepted};
    for (int i = 0; i < 3; i++)
        sb_printf(&b, "# HELP vllm:spec_decode_%s %s\n# TYPE vllm:spec_decode_%s counter\n"
                      "vllm:spec_decode_%s_total{model_name=\"%s\"} %llu\n", spec[i][0], spec[i][1], spec[i][0],
                  spec[i][0], model, (unsigned long long)spec_v[i]);
    sb_printf(&b, "# HELP vllm:num_requests_waiting Requests waiting to be processed.\n"
                  "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"%s\"} %d\n",
              model, g->waiting);
    sb_printf(&b, "# HELP vllm:num_requests_running Requests in the running batch.\n"
                  "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"%s\"} %d\n",
              model, g->running);
    sb_printf(&b, "# HELP vllm:kv_cache_usage_perc KV cache usage (1 means 100 percent).\n"
                  "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"%s\"} %.6f\n",
              model, kv);
    sb_printf(&b, "# HELP vllm:lora_requests_info Running and waiting adapters.\n"
                  "# TYPE vllm:lora_requests_info gauge\n"
                  "vllm:lora_requests_info{running_lora_adapters=\"%s\",waiting_lora_adapters=\"%s\","
                  "max_lora=\"%d\"} 1\n",
              run, wait, g->max_loras);
    if (b.oom) {
        free(b.buf);
        return NULL;
    }
    return b.buf;
}
