/* gram_schema.h - JSON Schema -> GBNF text (engine/gram.h compiles it), covering what OpenAI's
 * strict mode and pydantic emit. Pure: no I/O, no threads, no request parsing. A keyword it does
 * not implement is an error naming it, never silently unconstrained. */
#ifndef HY_GRAM_SCHEMA_H
#define HY_GRAM_SCHEMA_H

#include <jansson.h>
#include <stdbool.h>

typedef struct {
    /* false (default): compact JSON, no whitespace anywhere outside strings, as xgrammar and
     * llguidance emit by default; true: optional whitespace ([ \t\n\r]*) around every
     * structural character. */
    bool ws_flexible;
} gram_json_opts;

typedef struct {
    char message[256];  /* for the user: what is wrong or unsupported, naming the keyword */
    char pointer[256];  /* JSON pointer (RFC 6901) of the offending schema node, "" = root */
    char keyword[64];   /* the unsupported keyword, "" when the error is not about one */
} gram_schema_err;

/* Translate schema into GBNF whose `root` rule matches exactly the JSON texts (in the chosen
 * whitespace style) that validate against it. *gbnf is malloc'ed, owned by the caller (free()).
 * HY_EINVAL with e filled for a schema that is malformed or uses something unsupported;
 * HY_ELIMIT for one too large or deep; HY_ENOMEM. */
int gram_schema_gbnf(const json_t *schema, const gram_json_opts *o, char **gbnf, gram_schema_err *e);

/* GBNF for any JSON object (response_format json_object), in the chosen whitespace style. */
int gram_json_object_gbnf(const gram_json_opts *o, char **gbnf);

#endif
