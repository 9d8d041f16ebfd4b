/* api_struct.h - the request fields of structured outputs and tool calling (response_format,
 * grammar, logit_bias, tools, tool_choice, parallel_tool_calls, tool messages) and the tool_calls
 * of responses; parameters that would change the output but are not implemented are refused.
 * Shapes only: schemas and grammars are compiled by the server (engine/gram*.h). */
#ifndef HY_API_STRUCT_H
#define HY_API_STRUCT_H

#include "api/api.h"

#include <jansson.h>

/* Member k of object o, NULL when absent or null (api/api.c; every request parser uses it). */
json_t *api_field(json_t *o, const char *k);

int api_parse_struct(json_t *root, api_kind kind, api_struct *st, api_error *err);
void api_struct_free(api_struct *st);
/* A chat message's tool fields (role tool: tool_call_id; assistant: tool_calls). */
int api_parse_msg_tools(json_t *msg, api_msg *m, api_error *err);
/* message.tool_calls (stream false) or delta.tool_calls (stream true) of a choice. */
json_t *api_tool_calls_json(const api_choice *c, bool stream);

#endif
