/* test_gram_schema.c - engine/gram_schema.c: each supported JSON Schema keyword compiled with
 * engine/gram.c and checked on hand-written JSON texts that must match and must not (compact and
 * flexible whitespace), prefixes, $ref recursion, pydantic- and OpenAI-style schemas, and the
 * refusals (keyword and JSON pointer named). Expected answers come from the JSON Schema meaning
 * and llguidance's choices (documented at the top of gram_schema.c), never from the translator.
 * Texts and schemas are written with ' for " (see q()) to stay readable. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine/gram.h"
#include "engine/gram_schema.h"
#include "engine/hy.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXT 24

/* s with every ' turned into " and every \x01 into ' (a static buffer per call slot). */
static const char *q(const char *s)
{
    static char bufs[4][8192];
    static int slot;
    char *b = bufs[slot++ % 4];
    size_t n = strlen(s);
    assert_true(n < sizeof bufs[0]);
    for (size_t i = 0; i <= n; i++)
        b[i] = s[i] == '\'' ? '"' : s[i] == '\x01' ? '\'' : s[i];
    return b;
}

static json_t *load(const char *schema)
{
    json_error_t je;
    json_t *j = json_loads(q(schema), JSON_DECODE_ANY, &je);
    if (!j)
        fail_msg("bad test schema %s: %s", schema, je.text);
    return j;
}

/* The GBNF for schema (asserting success), compiled. */
static gram *compile_ws(const char *schema, bool ws)
{
    json_t *j = load(schema);
    gram_json_opts o = {.ws_flexible = ws};
    gram_schema_err e;
    char *text = NULL, err[256];
    int rc = gram_schema_gbnf(j, &o, &text, &e);
    json_decref(j);
    if (rc)
        fail_msg("schema %s refused: %s (pointer '%s', keyword '%s')", schema, e.message, e.pointer, e.keyword);
    gram *g = NULL;
    rc = gram_compile(text, strlen(text), &g, err, sizeof err);
    if (rc)
        fail_msg("GBNF for %s does not compile: %s\n%s", schema, err, text);
    free(text);
    return g;
}

static gram *compile(const char *schema) { return compile_ws(schema, false); }

typedef struct {
    const char *schema;
    const char *yes[MAXT]; /* texts (with ' for ") that must match */
    const char *no[MAXT];  /* and must not */
} tcase;

static void check_texts(gram *g, const char *schema, const tcase *t)
{
    for (int i = 0; i < MAXT && t->yes[i]; i++)
        if (!gram_match(g, q(t->yes[i]), strlen(t->yes[i])))
            fail_msg("schema %s: %s should match", schema, q(t->yes[i]));
    for (int i = 0; i < MAXT && t->no[i]; i++)
        if (gram_match(g, q(t->no[i]), strlen(t->no[i])))
            fail_msg("schema %s: %s should not match", schema, q(t->no[i]));
}

static void run_cases_ws(const tcase *cases, size_t n, bool ws)
{
    for (size_t i = 0; i < n; i++) {
        gram *g = compile_ws(cases[i].schema, ws);
        check_texts(g, cases[i].schema, &cases[i]);
        gram_release(g);
    }
}

static void run_cases(const tcase *cases, size_t n) { run_cases_ws(cases, n, false); }

/* The refusal of schema: code, keyword, pointer (NULL: any), and the message reaching
 * hy_err_msg(). */
static void expect_refusal(const char *schema, int code, const char *keyword, const char *pointer,
                           const char *msg_part)
{
    json_t *j = load(schema);
    gram_json_opts o = {0};
    gram_schema_err e;
    char *text = (char *)"untouched";
    hy_err_clear();
    int rc = gram_schema_gbnf(j, &o, &text, &e);
    json_decref(j);
    if (rc != code)
        fail_msg("schema %s: rc %d, want %d (%s)", schema, rc, code, rc ? e.message : text);
    assert_null(text);
    if (strcmp(e.keyword, keyword))
        fail_msg("schema %s: keyword '%s', want '%s' (%s)", schema, e.keyword, keyword, e.message);
    if (pointer && strcmp(e.pointer, q(pointer)))
        fail_msg("schema %s: pointer '%s', want '%s' (%s)", schema, e.pointer, q(pointer), e.message);
    if (msg_part && !strstr(e.message, msg_part))
        fail_msg("schema %s: message '%s' lacks '%s'", schema, e.message, msg_part);
    assert_non_null(strstr(hy_err_msg(), e.message));
}

/* ------------------------------------------------------------------------------------------ */

static void test_types(void **state)
{
    static const tcase cases[] = {
        {"{}", {"1", "-0.5e3", "'x'", "null", "true", "[1,{'a':[]}]", "{'a':{'b':null}}", "{}"},
               {"", " 1", "1 ", "[1,]", "{'a'}", "'x", "nul", "[1 ,2]"}},
        {"true", {"1", "{}", "[]"}, {"{", "x"}},
        {"{'type':'string'}", {"''", "'a b'", "'\\\\\\''", "'\\n\\t\\r\\b\\f'", "'\\u001f'", "'\\u001F'",
                               "'\\u007f'", "'é😀'"},
                              {"'", "\"a'\"", "x", "1", "'\\x'", "'\\u0041'", "'\\/'", "'a\nb'", "'\x7f'",
                               "'\\ud83d\\ude00'"}},
        {"{'type':'number'}", {"0", "-0", "1.5", "1e2", "1E+2", "1.5e-3", "-0.0", "123"},
                              {"01", "1.", ".5", "+1", "1e", "--1", "0x1", "NaN"}},
        {"{'type':'integer'}", {"0", "-0", "7", "-42", "10000000000000000000000"},
                               {"01", "1.0", "1e2", "-", "+1", "1.5"}},
        {"{'type':'boolean'}", {"true", "false"}, {"null", "True", "1"}},
        {"{'type':'null'}", {"null"}, {"true", "Null", "''"}},
        {"{'type':['integer','null']}", {"1", "null"}, {"1.5", "'1'"}},
        {"{'type':['string','object'],'minLength':2,'required':['a']}", {"'ab'", "{'a':1}"},
         {"'a'", "{}", "1"}},
        /* without `type` the other keywords constrain only their own type (JSON Schema, llguidance) */
        {"{'minLength':2}", {"'ab'", "1", "{}", "null"}, {"'a'"}},
        {"{'properties':{'a':{'type':'integer'}}}", {"{'a':1}", "1", "'x'", "[]"}, {"{'a':'x'}"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_strings(void **state)
{
    static const tcase cases[] = {
        {"{'type':'string','minLength':2,'maxLength':3}", {"'ab'", "'abc'", "'a\\n'", "'éé'", "'😀😀'"},
         {"''", "'a'", "'abcd'", "'\\n'"}},
        {"{'type':'string','maxLength':0}", {"''"}, {"'a'"}},
        {"{'type':'string','minLength':3}", {"'abc'", "'abcdefgh'"}, {"'ab'"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_formats(void **state)
{
    static const tcase cases[] = {
        {"{'type':'string','format':'date'}", {"'2024-01-31'", "'2024-02-29'", "'2023-11-30'"},
         {"'2024-13-01'", "'2024-02-30'", "'2024-04-31'", "'2024-1-01'", "'24-01-01'", "2024-01-01"}},
        {"{'type':'string','format':'time'}", {"'12:34:56Z'", "'23:59:60z'", "'00:00:00.123+05:30'"},
         {"'12:34:56'", "'24:00:00Z'", "'12:34Z'", "'12:60:00Z'"}},
        {"{'type':'string','format':'date-time'}", {"'2024-01-31T12:34:56Z'", "'2024-01-31t12:34:56.5-01:00'"},
         {"'2024-01-31 12:34:56Z'", "'2024-01-31T12:34:56'", "'2024-01-31'"}},
        {"{'type':'string','format':'uuid'}", {"'123e4567-e89b-12d3-a456-426614174000'",
                                               "'123E4567-E89B-12D3-A456-426614174000'"},
         {"'123e4567e89b12d3a456426614174000'", "'123e4567-e89b-12d3-a456-42661417400'"}},
        {"{'type':'string','format':'email'}", {"'a@b.com'", "'a.b+c@d-e.fg'", "'x@y'", "'a@[1.2.3.255]'",
                                                "'o\x01k@x.io'"},
         {"'@b.com'", "'a b@c.com'", "'a@-b.com'", "'a..b@c.com'", "'a@[256.1.1.1]'"}},
        {"{'type':'string','format':'ipv4'}", {"'192.168.0.1'", "'0.0.0.0'"}, {"'256.0.0.1'", "'1.2.3'"}},
        {"{'type':'string','format':'hostname'}", {"'a.example.com'", "'x-1'"}, {"'-a.com'", "'a_b'"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_patterns(void **state)
{
    static const tcase cases[] = {
        {"{'type':'string','pattern':'^abc$'}", {"'abc'"}, {"'xabc'", "'abcx'", "'ab'"}},
        {"{'type':'string','pattern':'abc'}", {"'abc'", "'xxabcyy'"}, {"'ab'", "'axbc'"}}, /* a search */
        {"{'type':'string','pattern':'^a.c$'}", {"'abc'", "'a\\'c'", "'a\\\\c'", "'aéc'", "'a\\tc'"},
         {"'a\\nc'", "'ac'"}},
        {"{'type':'string','pattern':'^[a-c]+\\\\d{2,3}$'}", {"'abc12'", "'a123'"}, {"'a1'", "'a1234'", "'d12'"}},
        {"{'type':'string','pattern':'^(ab|cd)*x?$'}", {"''", "'abcd'", "'abx'"}, {"'ac'", "'abxx'"}},
        {"{'type':'string','pattern':'^(?:ab)+$'}", {"'abab'"}, {"''", "'aba'"}},
        {"{'type':'string','pattern':'^(?P<y>\\\\d{4})-(?<m>\\\\d{2})$'}", {"'2024-01'"}, {"'2024-1'"}},
        {"{'type':'string','pattern':'^\\\\w+@\\\\S$'}", {"'a_1@x'"}, {"'a@ '", "'é@x'"}},
        {"{'type':'string','pattern':'^\\\\s$'}", {"' '", "'\\n'", "'\\u000b'", "'\u00a0'"}, {"'a'"}},
        {"{'type':'string','pattern':'^[^a]$'}", {"'b'", "'\\n'", "'\\\\'"}, {"'a'", "''"}},
        {"{'type':'string','pattern':'a|^b$'}", {"'xax'", "'b'"}, {"'xb'"}},
        {"{'type':'string','pattern':'^[\\\\]a-]$'}", {"']'", "'a'", "'-'"}, {"'b'"}},
        {"{'type':'string','pattern':'^a{2,}b{2}c{1,2}$'}", {"'aabbc'", "'aaaabbcc'"}, {"'abbc'", "'aabbccc'"}},
        {"{'type':'string','pattern':'^\\\\x41\\\\u0042\\\\.$'}", {"'AB.'"}, {"'ABx'"}},
        {"{'type':'string','pattern':'^é+ü?$'}", {"'éé'", "'éü'"}, {"'ü'"}},
        {"{'type':'string','pattern':'^$'}", {"''"}, {"'a'"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_integer_ranges(void **state)
{
    static const tcase cases[] = {
        /* llguidance's digit ranges let "-0" through wherever negative numbers are allowed */
        {"{'type':'integer','minimum':-5,'maximum':120}", {"-5", "-1", "-0", "0", "9", "99", "120"},
         {"-6", "121", "1000", "09", "-", "1.0"}},
        {"{'type':'integer','minimum':10}", {"10", "99", "100", "123456"}, {"9", "0", "-10", "010"}},
        {"{'type':'integer','maximum':-3}", {"-3", "-10", "-123"}, {"-2", "0", "3"}},
        {"{'type':'integer','minimum':1900,'maximum':2100}", {"1900", "1999", "2000", "2100"},
         {"1899", "2101", "190", "21000"}},
        {"{'type':'integer','exclusiveMinimum':0,'exclusiveMaximum':10}", {"1", "9"}, {"0", "10"}},
        {"{'type':'integer','minimum':1.5,'maximum':7.5}", {"2", "7"}, {"1", "8"}},
        {"{'type':'integer','minimum':3,'maximum':3}", {"3"}, {"2", "4", "33"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_objects(void **state)
{
    static const tcase cases[] = {
        /* schema order, optional ones skippable, additional properties after the declared ones */
        {"{'type':'object','properties':{'a':{'type':'integer'},'b':{'type':'string'}},'required':['a']}",
         {"{'a':1}", "{'a':1,'b':'x'}", "{'a':1,'c':2}", "{'a':1,'b':'x','c':true,'d':null}"},
         {"{}", "{'b':'x','a':1}", "{'c':2,'a':1}", "{'a':'1'}", "{'a':1,'a':2}", "{ 'a':1}", "{'a':1,}"}},
        {"{'type':'object','properties':{'a':{'type':'integer'},'b':{'type':'integer'},'c':{'type':'integer'}},"
         "'required':['b'],'additionalProperties':false}",
         {"{'b':1}", "{'a':1,'b':1}", "{'b':1,'c':1}", "{'a':1,'b':1,'c':1}"},
         {"{}", "{'a':1,'c':1}", "{'b':1,'d':1}", "{'c':1,'b':1}"}},
        {"{'type':'object','properties':{'a':{'type':'integer'}},'additionalProperties':false}",
         {"{}", "{'a':1}"}, {"{'b':1}", "{'a':1,'b':1}"}},
        {"{'type':'object','properties':{'a':{'type':'integer'}},'additionalProperties':{'type':'string'}}",
         {"{}", "{'a':1}", "{'b':'s'}", "{'a':1,'b':'x','c':'y'}"}, {"{'b':1}", "{'a':'x'}"}},
        /* an additional key is any key text but a declared one */
        {"{'type':'object','properties':{'ab':{'type':'null'}}}",
         {"{'a':1}", "{'abc':1}", "{'b':1}", "{'':1}", "{'ab':null,'x':[]}", "{'a\\u0062':1}"},
         {"{'ab':1}", "{'ab':null,'ab':null}"}},
        {"{'type':'object','required':['x']}", {"{'x':1}", "{'x':1,'y':2}"}, {"{}", "{'y':1}", "{'y':1,'x':1}"}},
        {"{'type':'object','properties':{'a':false,'b':{'type':'integer'}}}", {"{}", "{'b':1}"}, {"{'a':1}"}},
        {"{'type':'object'}", {"{}", "{'a':{'b':[1,'x',null]}}"}, {"[]", "{'a'}"}},
        {"{'type':'object','properties':{'x':{'type':'object','properties':{'y':{'type':'array',"
         "'items':{'type':'boolean'}}},'required':['y']}},'required':['x']}",
         {"{'x':{'y':[]}}", "{'x':{'y':[true,false]}}"}, {"{'x':{}}", "{'x':{'y':[1]}}"}},
        {"{'type':'object','properties':{'a\\'b':{'type':'null'},'é':{'type':'null'}},'additionalProperties':false}",
         {"{'a\\'b':null}", "{'é':null}", "{'a\\'b':null,'é':null}"}, {"{'ab':null}"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_arrays(void **state)
{
    static const tcase cases[] = {
        {"{'type':'array','items':{'type':'integer'}}", {"[]", "[1]", "[1,2,3]"}, {"[1,]", "['a']", "[ 1]", "["}},
        {"{'type':'array','items':{'type':'integer'},'minItems':1,'maxItems':3}", {"[1]", "[1,2,3]"},
         {"[]", "[1,2,3,4]"}},
        {"{'type':'array','minItems':2,'maxItems':2}", {"[1,'a']", "[{},[]]"}, {"[1]", "[1,2,3]"}},
        {"{'type':'array','maxItems':0}", {"[]"}, {"[1]"}},
        {"{'type':'array','prefixItems':[{'type':'integer'},{'type':'string'}]}",
         {"[]", "[1]", "[1,'a']", "[1,'a',null,{}]"}, {"['a']", "[1,2]"}},
        {"{'type':'array','prefixItems':[{'type':'integer'},{'type':'string'}],'items':false}",
         {"[]", "[1]", "[1,'a']"}, {"[1,'a',2]"}},
        {"{'type':'array','prefixItems':[{'type':'integer'},{'type':'string'}],'minItems':3,"
         "'items':{'type':'boolean'}}", {"[1,'a',true]", "[1,'a',true,false]"}, {"[1,'a']", "[1,'a',1]"}},
        {"{'type':'array','prefixItems':[{'type':'boolean'}],'items':{'type':'integer'},'maxItems':3}",
         {"[]", "[true]", "[true,1,2]"}, {"[true,1,2,3]", "[1]"}},
        {"{'type':'array','items':[{'type':'integer'}]}", {"[1]", "[1,'x']", "[]"}, {"['x']"}}, /* draft 4 */
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_enum_const(void **state)
{
    static const tcase cases[] = {
        {"{'enum':['a\\nb','x\\'y',1,1.5,null,true,{'a':1,'b':[1,2]},[1,'z']]}",
         {"'a\\nb'", "'a\\u000ab'", "'x\\'y'", "1", "1.5", "null", "true", "{'a':1,'b':[1,2]}", "[1,'z']"},
         {"1.0", "1.50", "15e-1", "false", "{'b':[1,2],'a':1}", "{'a':1}", "[1]", "'a\nb'"}},
        {"{'const':'fixed'}", {"'fixed'"}, {"'Fixed'", "'fixe'"}},
        /* numbers as Rust prints an f64: integral without ".0", never an exponent */
        {"{'const':1.0}", {"1"}, {"1.0"}},
        {"{'const':1e-7}", {"0.0000001"}, {"1e-7"}},
        {"{'const':1e20}", {"100000000000000000000"}, {"1e20"}},
        {"{'const':-2.5}", {"-2.5"}, {"-2.50"}},
        /* `type` filters the values */
        {"{'type':'string','enum':['m',1,'cm']}", {"'m'", "'cm'"}, {"1"}},
        {"{'type':['string','null'],'enum':['c','f',null]}", {"'c'", "null"}, {"'x'"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_any_all_of(void **state)
{
    static const tcase cases[] = {
        {"{'anyOf':[{'type':'integer'},{'type':'string'}]}", {"1", "'a'"}, {"null", "1.5"}},
        {"{'oneOf':[{'type':'integer'},{'type':'object','properties':{'a':{'type':'null'}}}]}",
         {"1", "{'a':null}"}, {"'x'"}},
        /* siblings of anyOf apply to every alternative */
        {"{'type':'object','anyOf':[{'required':['a']},{'required':['b']}]}",
         {"{'a':1}", "{'b':1}", "{'a':1,'b':2}"}, {"{}", "{'c':1}", "1"}},
        {"{'anyOf':[{'type':'string'},false]}", {"'x'"}, {"1"}},
        /* allOf: properties merge; a key missing on one side meets that side's additionalProperties */
        {"{'allOf':[{'type':'object','properties':{'a':{'type':'integer'}}},{'properties':{'a':{'minimum':3}}}]}",
         {"{'a':3}", "{}"}, {"{'a':1}"}},
        {"{'allOf':[{'properties':{'a':{'type':'integer'}},'additionalProperties':false},"
         "{'properties':{'b':{'type':'integer'}}}]}", {"{'a':1}", "{}"}, {"{'b':1}", "{'a':1,'b':1}"}},
        {"{'allOf':[{'type':'string'},{'minLength':2},{'maxLength':3}]}", {"'ab'"}, {"'a'", "'abcd'", "1"}},
        {"{'allOf':[{'type':['integer','string']},{'type':['number','null']}]}", {"1"}, {"'a'", "1.5", "null"}},
        {"{'allOf':[{'anyOf':[{'type':'integer'},{'type':'string'}]},{'anyOf':[{'type':'string'},{'type':'null'}]}]}",
         {"'s'"}, {"1", "null"}},
        {"{'allOf':[{'$ref':'#/$defs/A'},{'required':['x']}],'$defs':{'A':{'type':'object',"
         "'properties':{'x':{'type':'integer'},'y':{'type':'integer'}}}}}",
         {"{'x':1}", "{'x':1,'y':2}"}, {"{'y':2}", "{}"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_refs(void **state)
{
    static const tcase cases[] = {
        /* recursion through $defs */
        {"{'$defs':{'node':{'type':'object','properties':{'v':{'type':'integer'},'kids':{'type':'array',"
         "'items':{'$ref':'#/$defs/node'}}},'required':['v','kids'],'additionalProperties':false}},"
         "'$ref':'#/$defs/node'}",
         {"{'v':1,'kids':[]}", "{'v':1,'kids':[{'v':2,'kids':[{'v':3,'kids':[]}]},{'v':4,'kids':[]}]}"},
         {"{'v':1}", "{'v':1,'kids':[{'v':2}]}", "{'v':1,'kids':[1]}"}},
        /* recursion through the root */
        {"{'type':'object','properties':{'v':{'type':'integer'},'next':{'anyOf':[{'$ref':'#'},{'type':'null'}]}},"
         "'required':['v','next']}",
         {"{'v':1,'next':null}", "{'v':1,'next':{'v':2,'next':{'v':3,'next':null}}}"},
         {"{'v':1,'next':{'v':2}}", "{'v':1}"}},
        {"{'$ref':'#/definitions/A','definitions':{'A':{'type':'array','items':{'$ref':'#/definitions/A'}}}}",
         {"[]", "[[],[[]]]"}, {"[1]", "[[1]]"}},
        {"{'$ref':'#/$defs/a~1b','$defs':{'a/b':{'type':'integer'}}}", {"1"}, {"'1'"}},
        {"{'$ref':'#/$defs/A%20B','$defs':{'A B':{'type':'boolean'}}}", {"true"}, {"1"}},
        /* constraints beside $ref apply too */
        {"{'$ref':'#/$defs/A','$defs':{'A':{'type':'integer'}},'minimum':3}", {"3", "40"}, {"1", "-3"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

/* What pydantic v2 emits: $defs, titles everywhere, Optional as anyOf with null, defaults. */
static void test_pydantic(void **state)
{
    static const tcase cases[] = {
        {"{'$defs':{'Pet':{'properties':{'name':{'title':'Name','type':'string'},'kind':{'enum':['cat','dog'],"
         "'title':'Kind','type':'string'}},'required':['name','kind'],'title':'Pet','type':'object'}},"
         "'properties':{'id':{'title':'Id','type':'integer'},'nick':{'anyOf':[{'type':'string'},{'type':'null'}],"
         "'default':null,'title':'Nick'},'pet':{'anyOf':[{'$ref':'#/$defs/Pet'},{'type':'null'}],'default':null},"
         "'tags':{'items':{'type':'string'},'title':'Tags','type':'array'},"
         "'when':{'format':'date-time','title':'When','type':'string'}},"
         "'required':['id','tags','when'],'title':'Model','type':'object',"
         "'$schema':'https://json-schema.org/draft/2020-12/schema','description':'A model.'}",
         {"{'id':1,'tags':[],'when':'2024-01-01T00:00:00Z'}",
          "{'id':1,'nick':null,'pet':{'name':'Rex','kind':'dog'},'tags':['a'],'when':'2024-01-01T00:00:00Z'}",
          "{'id':1,'nick':'n','pet':null,'tags':['a','b'],'when':'2024-01-01T00:00:00+01:00'}"},
         {"{'id':1,'tags':[]}", "{'id':1,'pet':{'name':'Rex','kind':'cow'},'tags':[],'when':'2024-01-01T00:00:00Z'}",
          "{'id':1,'pet':{'kind':'dog'},'tags':[],'when':'2024-01-01T00:00:00Z'}",
          "{'id':1,'tags':[],'when':'yesterday'}"}},
        /* a discriminated union: oneOf with OpenAPI's discriminator hint */
        {"{'oneOf':[{'$ref':'#/$defs/Cat'},{'$ref':'#/$defs/Dog'}],'discriminator':{'propertyName':'t',"
         "'mapping':{'cat':'#/$defs/Cat','dog':'#/$defs/Dog'}},'$defs':{"
         "'Cat':{'properties':{'t':{'const':'cat','title':'T'},'lives':{'type':'integer'}},'required':['t','lives'],"
         "'title':'Cat','type':'object'},"
         "'Dog':{'properties':{'t':{'const':'dog','title':'T'},'good':{'type':'boolean'}},'required':['t','good'],"
         "'title':'Dog','type':'object'}}}",
         {"{'t':'cat','lives':9}", "{'t':'dog','good':true}"}, {"{'t':'cat','good':true}", "{'t':'cow','lives':1}"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

/* OpenAI strict mode: every property required, additionalProperties false, nullable via type lists. */
static void test_openai_strict(void **state)
{
    static const tcase cases[] = {
        {"{'type':'object','properties':{'location':{'type':'string'},'unit':{'type':['string','null'],"
         "'enum':['c','f',null]}},'required':['location','unit'],'additionalProperties':false}",
         {"{'location':'Oslo','unit':'c'}", "{'location':'Oslo','unit':null}"},
         {"{'location':'Oslo'}", "{'unit':'c','location':'Oslo'}", "{'location':'Oslo','unit':'k'}",
          "{'location':'Oslo','unit':'c','x':1}"}},
    };
    run_cases(cases, HY_ARRAY_LEN(cases));
}

static void test_ws_flexible(void **state)
{
    static const tcase cases[] = {
        {"{'type':'object','properties':{'a':{'type':'integer'},'b':{'type':'array','items':{'type':'string'}}},"
         "'required':['a']}",
         {"{'a':1}", "{ 'a' : 1 }", "{\n\t'a':1,\r\n 'b' : [ 'x' , 'y' ] }", "{'a':1 ,'b':[]}", "{'a':1,'b':[ ]}",
          "{'a':1,'c':{ 'd' : [ 1 ] }}"},
         {" {'a':1}", "{'a':1} ", "{'a' :1 ,}", "{'a':1\f}", "{'a':1,'b':[ 'x' ' y']}", "{'a':1 2}"}},
        {"{'enum':[{'k':[1,2]}]}", {"{'k':[1,2]}", "{ 'k' : [ 1 , 2 ] }"}, {"{'k':[1,2] ,}"}},
        {"{'type':'string'}", {"' a '"}, {" 'a'"}},
        {"{}", {"[ ]", "{ }", "[1, {'a' :null}]"}, {" 1", "[1 2]"}},
    };
    run_cases_ws(cases, HY_ARRAY_LEN(cases), true);
}

static void test_prefixes(void **state)
{
    gram *g = compile("{'type':'object','properties':{'name':{'type':'string'},'age':{'type':'integer',"
                      "'minimum':0,'maximum':150}},'required':['name','age'],'additionalProperties':false}");
    static const char *const yes[] = {"", "{", "{'", "{'na", "{'name':", "{'name':'Bo", "{'name':'Bo',",
                                      "{'name':'Bo','age':1", "{'name':'Bo','age':15", "{'name':'Bo','age':150}"};
    static const char *const no[] = {"}", "{'age'", "{'name':1", "{'name':'Bo','age':151", "{'name':'Bo','age':-",
                                     "{'name':'Bo','age':1}x", "{ "};
    for (size_t i = 0; i < HY_ARRAY_LEN(yes); i++)
        if (!gram_match_prefix(g, q(yes[i]), strlen(yes[i])))
            fail_msg("%s should be a prefix", q(yes[i]));
    for (size_t i = 0; i < HY_ARRAY_LEN(no); i++)
        if (gram_match_prefix(g, q(no[i]), strlen(no[i])))
            fail_msg("%s should not be a prefix", q(no[i]));
    assert_false(gram_match(g, q("{'name':'Bo','age':15"), strlen("{'name':'Bo','age':15")));
    gram_release(g);
}

static void test_json_object(void **state)
{
    for (int ws = 0; ws < 2; ws++) {
        gram_json_opts o = {.ws_flexible = ws};
        char *text = NULL, err[256];
        assert_int_equal(gram_json_object_gbnf(&o, &text), 0);
        gram *g = NULL;
        if (gram_compile(text, strlen(text), &g, err, sizeof err))
            fail_msg("json_object GBNF does not compile: %s\n%s", err, text);
        const char *yes[] = {"{}", "{'a':1}", "{'a':{'b':[1,'x',null,true,-1.5e3]},'c':''}"};
        const char *no[] = {"[]", "1", "'x'", "{'a'}", "{'a':1,}", "{1:2}"};
        for (size_t i = 0; i < HY_ARRAY_LEN(yes); i++)
            assert_true(gram_match(g, q(yes[i]), strlen(yes[i])));
        for (size_t i = 0; i < HY_ARRAY_LEN(no); i++)
            assert_false(gram_match(g, q(no[i]), strlen(no[i])));
        assert_int_equal(gram_match(g, q("{ 'a' : 1 }"), 11), ws == 1);
        gram_release(g);
        free(text);
    }
}

static void test_refusals(void **state)
{
    /* a keyword that would constrain but is not implemented: named, with the node's pointer */
    expect_refusal("{'type':'array','uniqueItems':true}", HY_EINVAL, "uniqueItems", "",
                   "JSON Schema keyword 'uniqueItems' is not supported");
    expect_refusal("{'properties':{'tags':{'type':'array','uniqueItems':true}}}", HY_EINVAL, "uniqueItems",
                   "/properties/tags", "'uniqueItems'");
    expect_refusal("{'properties':{'a':{'properties':{'b':{'not':{}}}}}}", HY_EINVAL, "not",
                   "/properties/a/properties/b", NULL);
    expect_refusal("{'items':{'anyOf':[{'type':'string'},{'type':'string','contains':{}}]}}", HY_EINVAL,
                   "contains", "/items/anyOf/1", NULL);
    expect_refusal("{'$defs':{'X':{'minProperties':1}},'$ref':'#/$defs/X'}", HY_EINVAL, "minProperties",
                   "/$defs/X", NULL);
    expect_refusal("{'properties':{'a/b~':{'multipleOf':2}}}", HY_EINVAL, "multipleOf", "/properties/a~1b~0", NULL);
    expect_refusal("{'patternProperties':{'^x':{}}}", HY_EINVAL, "patternProperties", "", NULL);
    expect_refusal("{'type':'object','propertyNames':{'maxLength':3}}", HY_EINVAL, "propertyNames", "", NULL);
    expect_refusal("{'if':{},'then':{}}", HY_EINVAL, "if", "", NULL);
    expect_refusal("{'nullable':true}", HY_EINVAL, "nullable", "", NULL);
    /* supported keywords in forms we cannot express */
    expect_refusal("{'type':'number','minimum':0}", HY_EINVAL, "minimum", "", "type number");
    expect_refusal("{'type':'string','format':'uri'}", HY_EINVAL, "format", "", "'uri'");
    expect_refusal("{'type':'string','pattern':'^\\\\bx$'}", HY_EINVAL, "pattern", "", NULL);
    expect_refusal("{'type':'string','pattern':'(?i)x'}", HY_EINVAL, "pattern", "", NULL);
    expect_refusal("{'type':'string','pattern':'(?=x)'}", HY_EINVAL, "pattern", "", NULL);
    expect_refusal("{'type':'string','pattern':'a^b'}", HY_EINVAL, "pattern", "", "anchor");
    expect_refusal("{'type':'string','pattern':'(a)\\\\1'}", HY_EINVAL, "pattern", "", NULL);
    expect_refusal("{'type':'string','pattern':'^a','minLength':1}", HY_EINVAL, "minLength", "", "'pattern'");
    expect_refusal("{'type':'string','format':'date','maxLength':12}", HY_EINVAL, "maxLength", "", "'format'");
    expect_refusal("{'enum':[1,2],'minimum':2}", HY_EINVAL, "minimum", "", "'enum'");
    expect_refusal("{'$ref':'https://example.com/s.json'}", HY_EINVAL, "$ref", "", "local");
    expect_refusal("{'anyOf':[{}],'oneOf':[{}]}", HY_EINVAL, "oneOf", "", NULL);
    /* oneOf means exactly one: branches that may both match cannot be compiled as anyOf */
    expect_refusal("{'properties':{'v':{'oneOf':[{'type':'integer','minimum':0},{'type':'integer','maximum':10}]}}}",
                   HY_EINVAL, "oneOf", "/properties/v", "may both match");
    expect_refusal("{'oneOf':[{'type':'number'},{'type':'integer'}]}", HY_EINVAL, "oneOf", "", "branches 0 and 1");
    expect_refusal("{'oneOf':[{'type':'object','properties':{'t':{'const':'a'}}},"
                   "{'type':'object','properties':{'t':{'const':'b'}}}]}", HY_EINVAL, "oneOf", "", NULL); /* t optional */
}

static void test_malformed(void **state)
{
    expect_refusal("{'type':5}", HY_EINVAL, "", "", "'type'");
    expect_refusal("{'type':'float'}", HY_EINVAL, "", "", "float");
    expect_refusal("{'properties':[]}", HY_EINVAL, "", "", "'properties'");
    expect_refusal("{'type':'object','required':'a'}", HY_EINVAL, "", "", "'required'");
    expect_refusal("{'properties':{'p':{'$ref':'#/$defs/Missing'}}}", HY_EINVAL, "", "/properties/p", "does not resolve");
    expect_refusal("false", HY_EINVAL, "", "", "no value");
    expect_refusal("[1]", HY_EINVAL, "", "", "object or a boolean");
    expect_refusal("{'type':'string','minLength':-1}", HY_EINVAL, "", "", "non-negative");
    expect_refusal("{'type':'array','minItems':3,'maxItems':2}", HY_EINVAL, "", "", NULL);
    expect_refusal("{'type':'integer','minimum':5,'maximum':4}", HY_EINVAL, "", "", NULL);
    expect_refusal("{'type':'integer','enum':['a']}", HY_EINVAL, "", "", NULL);
    expect_refusal("{'allOf':[{'type':'string'},{'type':'integer'}]}", HY_EINVAL, "", "", "no value");
    expect_refusal("{'type':'object','properties':{'a':{}},'additionalProperties':false,'required':['b']}",
                   HY_EINVAL, "", "", "'b'");
}

static void test_limits(void **state)
{
    /* nesting: 80 levels of arrays */
    char deep[2048] = "";
    for (int i = 0; i < 80; i++)
        strcat(deep, "{'type':'array','items':");
    strcat(deep, "{}");
    for (int i = 0; i < 80; i++)
        strcat(deep, "}");
    expect_refusal(deep, HY_ELIMIT, "", NULL, "deeper");

    /* size: many long enum strings */
    json_t *big = json_pack("{s:[]}", "enum");
    char word[1001];
    memset(word, 'x', 1000);
    word[1000] = 0;
    for (int i = 0; i < 300; i++) {
        word[0] = (char)('a' + i % 26);
        word[1] = (char)('a' + i / 26);
        json_array_append_new(json_object_get(big, "enum"), json_string(word));
    }
    gram_schema_err e;
    char *text = NULL;
    gram_json_opts o = {0};
    assert_int_equal(gram_schema_gbnf(big, &o, &text, &e), HY_ELIMIT);
    assert_null(text);
    assert_non_null(strstr(e.message, "exceed"));
    json_decref(big);

    /* a self-referential allOf never ends */
    expect_refusal("{'$defs':{'A':{'allOf':[{'$ref':'#/$defs/A'}]}},'$ref':'#/$defs/A','minimum':1}",
                   HY_ELIMIT, "allOf", NULL, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_types),         cmocka_unit_test(test_strings),
        cmocka_unit_test(test_formats),       cmocka_unit_test(test_patterns),
        cmocka_unit_test(test_integer_ranges), cmocka_unit_test(test_objects),
        cmocka_unit_test(test_arrays),        cmocka_unit_test(test_enum_const),
        cmocka_unit_test(test_any_all_of),    cmocka_unit_test(test_refs),
        cmocka_unit_test(test_pydantic),      cmocka_unit_test(test_openai_strict),
        cmocka_unit_test(test_ws_flexible),   cmocka_unit_test(test_prefixes),
        cmocka_unit_test(test_json_object),   cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_malformed),     cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
