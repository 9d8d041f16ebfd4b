/* api_lora.c - parses the `lora` extension: [{"name": "a", "scale": 0.5}, ...] (llama.cpp's field;
 * entries name adapters rather than numbering them, and "id" is accepted as a synonym for "name"
 * when it is a string). scale is a finite number in [-API_LORA_MAX_SCALE, API_LORA_MAX_SCALE],
 * 1 when absent. Who may be named, and whether they exist, the server decides. */
#include "api/api_lora.h"
#include "api/api_struct.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int lora_bad(api_error *err, int i, const char *field, const char *msg)
{
    char param[32];
    snprintf(param, sizeof param, "lora[%d]%s%s", i, field[0] ? "." : "", field);
    return api_error_set(err, 400, "invalid_request_error", param, "invalid_value", "'%s' %s", param, msg);
}

int api_parse_lora(json_t *root, api_lora_stack *st, api_error *err)
{
    memset(st, 0, sizeof *st);
    json_t *arr = api_field(root, "lora");
    if (!arr)
        return 0;
    if (!json_is_array(arr))
        return api_error_set(err, 400, "invalid_request_error", "lora", "invalid_type",
                             "'lora' must be an array of {\"name\": adapter, \"scale\": number}");
    size_t n = json_array_size(arr);
    if (n > API_LORA_MAX)
        return api_error_set(err, 400, "invalid_request_error", "lora", "invalid_value",
                             "'lora' lists %zu adapters; at most %d per request", n, API_LORA_MAX);
    st->given = true;
    for (size_t k = 0; k < n; k++) {
        int i = (int)k;
        json_t *e = json_array_get(arr, k);
        if (!json_is_object(e))
            return lora_bad(err, i, "", "must be an object {\"name\": adapter, \"scale\": number}");
        json_t *nm = api_field(e, "name");
        if (!nm)
            nm = api_field(e, "id");
        if (nm && json_is_integer(nm))
            return lora_bad(err, i, "id", "must be an adapter's name: this server names adapters, it does not "
                                          "number them (GET /v1/models lists the names)");
        if (!nm || !json_is_string(nm) || json_string_length(nm) == 0)
            return lora_bad(err, i, "name", "must be a non-empty string naming a loaded adapter");
        double sc = 1.0;
        json_t *s = api_field(e, "scale");
        if (s && !json_is_number(s))
            return lora_bad(err, i, "scale", "must be a number");
        if (s)
            sc = json_number_value(s);
        if (!isfinite(sc) || fabs(sc) > API_LORA_MAX_SCALE) {
            char msg[96];
            snprintf(msg, sizeof msg, "must be a finite number in [-%g, %g]", API_LORA_MAX_SCALE, API_LORA_MAX_SCALE);
            return lora_bad(err, i, "scale", msg);
        }
        api_lora *l = &st->e[st->n];
        if (!(l->name = strndup(json_string_value(nm), json_string_length(nm))))
            return api_error_set(err, 500, "server_error", "", "", "out of memory");
        l->scale = sc;
        st->n++;
    }
    return 0;
}

void api_lora_free(api_lora_stack *st)
{
    for (int i = 0; i < st->n; i++)
        free(st->e[i].name);
    memset(st, 0, sizeof *st);
}
