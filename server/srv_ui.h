/* srv_ui.h - the web console: the static files of server/ui/ (embedded into the binary at build
 * time by scripts/embed_ui.sh) served at GET / and /ui/..., under a strict Content-Security-Policy.
 * It serves bytes only: the page reaches the model through the same /v1 routes as any client. */
#ifndef HY_SRV_UI_H
#define HY_SRV_UI_H

#include "server/http.h"

#include <microhttpd.h>
#include <stdbool.h>
#include <stddef.h>

/* One embedded file (the generated table's element). */
typedef struct {
    const char *name;            /* file name under server/ui/, no directories */
    const unsigned char *data;
    size_t len;
} srv_ui_file;

/* The embedded file called name (e.g. "app.js"), or NULL. */
const srv_ui_file *srv_ui_find(const char *name);

/* When url is the console's ("/", "/ui", "/ui/...") and the method GET or HEAD and the console is
 * on (!s->cfg.no_ui), queue the answer (the file, or a 404 for an unknown /ui/ name) into *ret and
 * return true; else return false and leave the request to the API routes. Needs no key: the page
 * holds no data and asks for the key itself. */
bool srv_ui_route(srv *s, struct MHD_Connection *mc, const char *url, const char *method, enum MHD_Result *ret);

#endif
