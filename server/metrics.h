/* metrics.h - the server's Prometheus counters and histograms (requests by status, TTFT, TPOT,
 * end-to-end latency, tokens) and the text exposition of them plus the engine gauges and the
 * vLLM metric names the Gateway API Inference Extension reads. Thread-safe; no HTTP here. */
#ifndef HY_METRICS_H
#define HY_METRICS_H

#include "engine/scheduler.h"
#include "server/srv_resolve.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define SRV_HIST_BUCKETS 14

typedef struct {
    uint64_t count[SRV_HIST_BUCKETS + 1]; /* last = +Inf */
    double sum;
    uint64_t n;
} srv_hist;

typedef struct {
    pthread_mutex_t mu;
    uint64_t by_status[600];
    uint64_t prompt_tokens, generation_tokens;
    uint64_t requests_ok;
    uint64_t cancelled;        /* the client went away before its answer was complete */
    srv_hist ttft, tpot, e2e;
} srv_metrics;

/* What one loaded adapter served since it was loaded (a snapshot the caller owns for the render
 * call): requests, their prompt and generated tokens, and for HydraLoRA adapters the sum of each
 * head's router gate over every token and targeted projection run so far (head usage). */
#define SRV_MAX_HEADS 16
typedef struct {
    const char *name;
    uint64_t requests;
    uint64_t prompt_tokens, generation_tokens;
    int K;                           /* heads with a gate sum; 0: none (no data, or plain LoRA) */
    double gate_sum[SRV_MAX_HEADS];
} srv_adapter_requests;

/* Where a loaded adapter is: host memory (every READY adapter), the device too when resident. */
typedef struct {
    const char *name;
    bool device, pinned;
} srv_adapter_level;

/* Gauges sampled at scrape time (filled by the caller). */
typedef struct {
    int waiting, running;
    int kv_used, kv_total;
    int adapters_loaded, max_loras;
    uint64_t preemptions, steps;
    const char *running_adapters, *waiting_adapters; /* comma-separated */
    const char *model_name;
    const srv_adapter_requests *adapters; /* [n_adapters], may be NULL when n_adapters is 0 */
    int n_adapters;
    uint64_t conns_timed_out; /* connections shut down for not sending a whole request in time */
    int kv_cached;            /* prefix-cache blocks no sequence holds */
    uint64_t prefix_queries, prefix_hits; /* prompt tokens looked up / found in the prefix cache */
    const srv_adapter_level *levels;      /* [n_levels] loaded adapters (vllm:lora_adapter_loaded) */
    int n_levels;
    const srv_resolve_stats *resolve;     /* first-use loads (--adapter-resolver), NULL when off */
    uint64_t device_loads, device_evictions; /* host -> device copies of adapters; idle ones moved out */
    uint64_t spec_drafts, spec_draft_tokens, spec_accepted; /* speculative decoding (sched_stats) */
    const uint64_t *step_hist;            /* [SCHED_STEP_BUCKETS + 1] forward steps by wall time; NULL: none */
    double step_s_sum;
} srv_gauges;

void srv_metrics_init(srv_metrics *m);
void srv_metrics_clear(srv_metrics *m);
void srv_metrics_status(srv_metrics *m, int status);
/* A finished generation: latencies in seconds (ttft < 0: no token produced). */
/* A request cancelled because its client disconnected (stream or whole answer). */
void srv_metrics_cancelled(srv_metrics *m);
void srv_metrics_request(srv_metrics *m, double ttft, double e2e, int prompt_tokens, int gen_tokens);
/* Prometheus text format 0.0.4, malloc'ed (caller frees); NULL on ENOMEM. */
char *srv_metrics_render(srv_metrics *m, const srv_gauges *g);

#endif
