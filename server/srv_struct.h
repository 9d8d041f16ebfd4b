/* srv_struct.h - structured outputs and tool calling on the server side: a request's
 * response_format / grammar / tools / logit_bias become the engine's smp_constraint (grammars
 * compiled once, kept in an LRU by their text with the masks they learned), tools are rendered into
 * the chat prompt, and a tool-call answer is read back as tool_calls, whole or as stream deltas.
 * HTTP threads only; the engine sees nothing but the constraint. */
#ifndef HY_SRV_STRUCT_H
#define HY_SRV_STRUCT_H

#include "api/api.h"
#include "engine/smp_constrain.h"
#include "engine/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>

/* Compiled grammars by text (any thread; its own lock). */
typedef struct srv_gcache srv_gcache;
int srv_gcache_create(int cap, srv_gcache **out);
void srv_gcache_free(srv_gcache *gc);

/* The request's constraint, or *out NULL when it has none. 400s name the field (a schema error
 * also gives the JSON pointer). ws_flexible: JSON outputs may carry whitespace between tokens
 * (`--json-whitespace flexible`); compact otherwise (tool calls always are). *out freed with
 * smp_constraint_free (or handed to a request). */
int srv_struct_constraint(srv_gcache *gc, const api_request *ar, int n_vocab, bool ws_flexible,
                          smp_constraint **out, api_error *e);

/* The chat messages as the template gets them: tools described in the system message, assistant
 * tool calls and tool results written the way the model is asked to write and read them.
 * *msgs (n_msgs entries) and *owned (the strings built for it) are malloc'ed: free both with
 * srv_tools_msgs_free. */
int srv_tools_msgs(const api_request *ar, tok_msg **msgs, char ***owned, int *n_owned);
void srv_tools_msgs_free(tok_msg *msgs, char **owned, int n_owned);

/* Reads a choice's text as a tool call ("<tool_call>[{"name":..,"arguments":{..}}, ...]</tool_call>"),
 * incrementally. With tool_choice auto, text that does not start that way is ordinary content. */
#define SRV_MAX_CALLS 16
typedef struct {
    int state, lit;           /* scanner state and position in the literal it expects */
    size_t pos;               /* bytes of the text scanned */
    bool is_text;             /* auto: the answer is plain content */
    int n_calls;              /* calls whose name is complete */
    size_t name_at[SRV_MAX_CALLS], name_len[SRV_MAX_CALLS];
    char name[SRV_MAX_CALLS][72];
    size_t args_at[SRV_MAX_CALLS], args_len[SRV_MAX_CALLS];
    int depth;                /* inside the arguments value */
    bool in_str, esc;
    bool complete;            /* the closing tag was read */
    /* streaming: what was sent */
    size_t text_sent;
    int named;                /* calls whose id and name were sent */
    size_t args_sent[SRV_MAX_CALLS];
    char id[SRV_MAX_CALLS][48];
    api_tool_call out[2 * SRV_MAX_CALLS];
} srv_toolscan;

/* id_base: unique per request and choice (call ids are id_base + "_" + index). */
void srv_toolscan_init(srv_toolscan *ts, const char *id_base, int choice);
/* Whole answer: fill c (text, calls, finish) from the choice's full text. */
void srv_toolscan_whole(srv_toolscan *ts, const char *text, size_t len, api_choice *c);
/* Stream: scan text[0..len) and set c's text / calls to what must be sent now (both may be
 * empty: nothing to send); finish "tool_calls" when the answer was a complete tool call. */
void srv_toolscan_stream(srv_toolscan *ts, const char *text, size_t len, bool done, api_choice *c);

#endif
