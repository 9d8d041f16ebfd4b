/* api.h - the OpenAI-compatible wire format: JSON bodies <-> request/response structs (jansson),
 * validation with OpenAI-shaped errors, SSE chunk encoding. Pure: no I/O, no engine, no threads;
 * every function is safe to call from any thread. */
#ifndef HY_API_H
#define HY_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define API_MAX_N 16          /* most choices per request */
#define API_MAX_PROMPTS 1024  /* most prompts in one completions request (the server's --max-prompts is lower) */
#define API_MAX_STOP 16       /* most stop strings */
#define API_MAX_TOP_LOGPROBS 20

typedef enum { API_COMPLETION = 0, API_CHAT = 1 } api_kind;

/* An OpenAI-shaped error and its HTTP status. param/code are "" when not applicable. */
typedef struct {
    int status;
    char type[40];
    char param[64];
    char code[48];
    char message[512];
} api_error;

/* Fill e and return HY_EINVAL (so `return api_error_set(...)` works in parsers). */
int api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                  const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* {"error":{"message","type","param","code"}}; param/code null when "". malloc'ed, caller frees. */
char *api_error_json(const api_error *e);

typedef struct {
    char *role;     /* system | user | assistant | tool | developer (developer is treated as system) */
    char *content;  /* text parts joined ("" when null) */
    char *tool_calls;   /* assistant: its tool_calls as compact JSON [{"name","arguments"}], or NULL */
    char *tool_call_id; /* tool: the call it answers, or NULL */
} api_msg;

/* Structured outputs and tools (api/api_struct.c). Only the shapes are checked here; the server
 * compiles schemas and grammars (engine/gram*.h) and reports their errors. */
typedef enum { API_RF_TEXT = 0, API_RF_JSON_OBJECT, API_RF_JSON_SCHEMA, API_RF_GRAMMAR } api_rf;
typedef enum { API_TC_NONE = 0, API_TC_AUTO, API_TC_REQUIRED, API_TC_NAMED } api_tc;
#define API_MAX_TOOLS 128
#define API_MAX_BIAS 1024
typedef struct {
    char *name;         /* [A-Za-z0-9_-]{1,64} */
    char *description;  /* NULL when absent */
    char *parameters;   /* compact JSON text of the parameters schema ("{}" when absent) */
} api_tool;
typedef struct {
    api_rf rf;
    char *schema;       /* API_RF_JSON_SCHEMA: compact JSON text of json_schema.schema */
    char *grammar;      /* API_RF_GRAMMAR: GBNF text (extension field `grammar`) */
    const char *param;  /* the field the constraint came from, for errors */
    int n_bias;         /* logit_bias: token id -> bias in [-100, 100] */
    int32_t *bias_id;
    float *bias;
    int n_tools;        /* tools, or 0 */
    api_tool *tools;
    api_tc tool_choice; /* API_TC_NONE when there are no tools */
    int tool_named;     /* API_TC_NAMED: index into tools */
    bool parallel_tool_calls; /* true (OpenAI's default) */
} api_struct;

/* One prompt of a completions request: text, or token ids. */
typedef struct {
    char *text;     /* NULL when ids are given */
    int32_t *ids;
    int n_ids;
} api_prompt;

/* The `hydra` extension object (both endpoints): HydraLoRA router view and control.
 *   {"return_router": bool, "temperature": > 0, "top_k": >= 0, "force_head": k, "mask_heads": [k, ...]}
 * Checked against the adapter's head count by api_hydra_check once the adapter is known. */
#define API_HYDRA_MAX_K 16
typedef struct {
    bool given;            /* the request carried a `hydra` object */
    bool return_router;    /* the response carries the router view */
    double temperature;    /* router softmax temperature, 1 */
    int top_k;             /* 0: every head; else the top_k heads, renormalised */
    int force_head;        /* -1: none; else only this head (gate 1) */
    uint32_t mask;         /* bit k: head k masked (gate 0) */
} api_hydra;

/* The `lora` extension (both endpoints): several adapters' deltas, each times its scale, in one
 * forward: [{"name": "a", "scale": 0.5}, ...] (llama.cpp's shape; "id" is read as the name). */
#define API_LORA_MAX 8
#define API_LORA_MAX_SCALE 100.0
typedef struct {
    char *name;
    double scale; /* finite; 1 when absent */
} api_lora;
typedef struct {
    bool given;   /* the request carried `lora` (an empty list means the base model) */
    int n;
    api_lora e[API_LORA_MAX];
} api_lora_stack;

/* A parsed, validated generation request. Every pointer is owned by the struct
 * (api_request_free). Defaults follow OpenAI; unknown fields are ignored. */
typedef struct {
    api_kind kind;
    char *model;              /* NULL when absent */
    int n_prompts;            /* completions: >= 1 */
    api_prompt *prompts;
    int n_msgs;               /* chat: >= 1 */
    api_msg *msgs;
    int max_tokens;           /* -1 = not given (server picks: 16 completions, context rest for chat);
                               * 0 only with echo (score the prompt, generate nothing) */
    bool echo;                /* completions: the text starts with the prompt, logprobs cover it */
    char *cache_salt;         /* vLLM's prefix-cache tenant, NULL when absent */
    double temperature;       /* 1.0 */
    double top_p;             /* 1.0 */
    int top_k;                /* 0 = off (-1 accepted as off) */
    double min_p;             /* 0 */
    bool has_seed;
    int64_t seed;
    int n_stop;
    char **stop;
    int n;                    /* choices, 1..API_MAX_N */
    bool stream;
    bool include_usage;       /* stream_options.include_usage */
    bool logprobs;            /* completions: logprobs != null; chat: logprobs == true */
    int top_logprobs;         /* 0..API_MAX_TOP_LOGPROBS (completions: the integer `logprobs`) */
    double presence_penalty, frequency_penalty; /* 0 */
    double repetition_penalty; /* 1.0 */
    bool ignore_eos;
    bool speculative;         /* extension, default true: false decodes this request without
                               * speculation (the server's --speculative still has to be on) */
    api_hydra hydra;
    api_lora_stack lora;
    api_struct st;
} api_request;

/* Parse a POST /v1/completions (kind API_COMPLETION) or /v1/chat/completions body.
 * Returns 0 and fills *out (free with api_request_free), or HY_EINVAL with err filled
 * (status 400, param naming the offending field). */
int api_parse_request(api_kind kind, const char *body, size_t len, api_request *out, api_error *err);
void api_request_free(api_request *r);

/* Admin bodies. Strings are malloc'ed, caller frees; sha256 NULL when absent. */
/* pinned (may be NULL): the optional "pinned" boolean (false when absent). */
int api_parse_load_lora(const char *body, size_t len, char **name, char **path, char **sha256, bool *pinned,
                        api_error *err);
int api_parse_unload_lora(const char *body, size_t len, char **name, api_error *err);

/* Log probability of one sampled token and its alternatives. */
typedef struct {
    const char *token;        /* token text (may be partial UTF-8; encoded lossily) */
    float logprob;
    int n_top;
    const char *const *top_token;
    const float *top_logprob;
    bool none;                /* no logprob (echo: the first prompt token): null in JSON */
} api_tokenlp;

/* The router view of one choice (or of one streamed chunk's new tokens). */
typedef struct {
    int K;
    int n_tok;
    const int8_t *head;        /* [n_tok]: dominant head of each token */
    int n_groups;              /* 0: no means (a chunk before the last) */
    const char *const *group;  /* [n_groups] names (projections) */
    const float *mean;         /* [n_groups][K] mean gate of each head */
    const float *overall;      /* [K] mean gate over every group, or NULL */
} api_router;

/* One tool call of a chat choice, or (streaming) a fragment of one: id and name only in the
 * call's first chunk (NULL after), arguments as they arrive. */
typedef struct {
    int index;
    const char *id;
    const char *name;
    const char *args;
    size_t args_len;
} api_tool_call;

typedef struct {
    int index;
    const char *text;
    size_t text_len;
    const char *finish_reason;  /* "stop", "length", "tool_calls", or NULL (streaming, not finished) */
    int n_lp;                   /* number of tokens with logprobs; 0 with lp == NULL: no logprobs */
    const api_tokenlp *lp;
    const api_router *router;   /* NULL: no `hydra` member */
    int n_calls;                /* > 0: message.tool_calls (content null unless text_len > 0) */
    const api_tool_call *calls;
    size_t lp_offset;           /* completions: text_offset of lp[0] (streaming: text sent before) */
} api_choice;

typedef struct {
    int prompt_tokens, completion_tokens;
    int cached_tokens;          /* prompt tokens served from the prefix cache */
} api_usage;

/* Whole (non-streamed) response body. malloc'ed JSON, caller frees. NULL on ENOMEM. */
char *api_format_response(api_kind kind, const char *id, int64_t created, const char *model,
                          const api_choice *choices, int n_choices, const api_usage *usage,
                          bool want_logprobs);
/* One SSE event "data: {...}\n\n" for a streamed chunk of one choice. role_first: the chat
 * chunk carries delta.role = "assistant". usage != NULL adds "usage" (null otherwise when
 * include_usage is on: pass usage_null = true). malloc'ed, caller frees. */
char *api_format_chunk(api_kind kind, const char *id, int64_t created, const char *model,
                       const api_choice *c, bool role_first, bool want_logprobs, bool usage_null);
/* The final usage-only chunk (choices: []). */
char *api_format_usage_chunk(api_kind kind, const char *id, int64_t created, const char *model,
                             const api_usage *usage);
/* "data: [DONE]\n\n" (static string). */
const char *api_sse_done(void);

/* The hydra object against the adapter the request names (K heads; K = 0: the base model):
 * HY_EINVAL with a 400 naming the field when a head is out of range, every head is masked, or
 * router options are given for the base model. */
int api_hydra_check(const api_hydra *h, int K, api_error *err); /* api/api_hydra.c */

/* GET /v1/models entry. parent NULL for the base model. */
typedef struct {
    const char *id;
    const char *parent;
    const char *root;     /* path or name the model came from; may be NULL */
    int64_t created;
} api_model_entry;
char *api_format_models(const api_model_entry *m, int n);

#endif
