/* srv_admin.c - the admin and operator routes: POST /v1/load_lora_adapter (on a loader thread,
 * from a confined path or an allowed https:// URL) and /v1/unload_lora_adapter, GET /v1/adapters,
 * GET /metrics; and the adapter bookkeeping they read (requests served per name, router
 * statistics). HTTP and loader threads; never runs the model. */
#include "server/srv_conn.h"

#include "server/srv_paths.h"
#include "server/srv_resolve.h"
#include "engine/hy.h"

#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

srv_ad_stats *srv_stats_entry(srv *s, const char *name)
{
    for (int i = 0; i < s->n_stats; i++)
        if (strcmp(s->stats[i].name, name) == 0)
            return &s->stats[i];
    if (srv_grow((void **)&s->stats, s->n_stats, &s->cap_stats, sizeof *s->stats))
        return NULL;
    srv_ad_stats *x = &s->stats[s->n_stats++];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    return x;
}

/* Count for adapter `name`: a request routed to it (requests 1, at its start: the entry is made
 * then), or the prompt and generated tokens of a finished one (requests 0: only an entry that is
 * still there counts them). The table holds the names requested since they were loaded
 * (forget_served drops one on unload), so it is bounded by the adapters loaded. */
void srv_count_served(srv *s, const char *name, int requests, uint64_t prompt, uint64_t gen, uint64_t drafted,
                      uint64_t accepted)
{
    pthread_mutex_lock(&s->mu);
    int i = 0;
    while (i < s->n_served && strcmp(s->served[i].name, name) != 0)
        i++;
    if (i == s->n_served && requests &&
        srv_grow((void **)&s->served, s->n_served, &s->cap_served, sizeof *s->served) == 0) {
        s->n_served++;
        memset(&s->served[i], 0, sizeof s->served[i]);
        snprintf(s->served[i].name, sizeof s->served[i].name, "%s", name);
    }
    if (i < s->n_served) {
        s->served[i].requests += (uint64_t)requests;
        s->served[i].prompt_tokens += prompt;
        s->served[i].generation_tokens += gen;
        s->served[i].spec_drafted += drafted;
        s->served[i].spec_accepted += accepted;
    }
    pthread_mutex_unlock(&s->mu);
}

static void forget_served(srv *s, const char *name)
{
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_served; i++)
        if (strcmp(s->served[i].name, name) == 0) {
            s->served[i] = s->served[--s->n_served];
            break;
        }
    pthread_mutex_unlock(&s->mu);
}

const char *srv_adapter_name(srv *s, const void *ad, char *buf, size_t cap)
{
    return s->reg && ad_reg_name_of(s->reg, ad, buf, cap) == HY_OK ? buf : NULL;
}

bool srv_is_base_name(srv *s, const char *m)
{
    return !m || !m[0] || strcmp(m, s->cfg.served_name) == 0;
}

static void *load_worker(void *arg)
{
    conn *c = arg;
    srv *s = c->s;
    char dir[PATH_MAX], msg[1400];
    int status = 200, rc = 0;
    const char *param = "lora_path", *code = "";
    if (strncmp(c->load_path, "https://", 8) == 0) {
        rc = srv_fetch_adapter(s, c->load_path, c->load_sha, dir, sizeof dir);
        if (rc)
            status = 400;
    } else {
        snprintf(dir, sizeof dir, "%s", c->load_path);
    }
    if (!rc) {
        ad_opts ao = {.scale_mult = 1.0f, .pack_for = eng_model_backend(s->model)}; /* fp16 work here, not on the engine */
        rc = ad_reg_load(s->reg, c->load_name, dir, &s->shape, &ao);
        if (!rc && c->load_pinned) {
            if (!(rc = srv_pin_check(s->reg, s->cfg.max_loras)))
                rc = ad_reg_set_pinned(s->reg, c->load_name, true);
            if (rc) { /* others were pinned meanwhile: refused, nothing stays loaded */
                snprintf(msg, sizeof msg, "%s", hy_err_msg());
                ad_reg_unload(s->reg, c->load_name);
                rc = hy_err_set(HY_EINVAL, "%s", msg);
            }
        }
        if (rc) {
            status = rc == HY_ELIMIT ? 507 : 400;
            if (rc == HY_EBUSY) {
                param = "lora_name";
                code = "adapter_exists";
            }
        }
    }
    char *json;
    if (rc) {
        api_error e;
        snprintf(msg, sizeof msg, "%s", hy_err_msg());
        api_error_set(&e, status, "invalid_request_error", param, code, "%s", msg);
        json = api_error_json(&e);
    } else {
        snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' added successfully.", c->load_name);
        json_t *o = json_pack("{s:s,s:s}", "status", "ok", "message", msg);
        json = json_dumps(o, JSON_COMPACT);
        json_decref(o);
    }
    srv_conn_load_done(c, status, json);
    return NULL;
}

enum MHD_Result srv_admin_load_wait(conn *c, struct MHD_Connection *mc)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->load_done;
    if (!done) {
        c->suspended = true;
        MHD_suspend_connection(mc);
    }
    char *json = c->load_json;
    c->load_json = NULL;
    pthread_mutex_unlock(&c->mu);
    if (!done)
        return MHD_YES;
    if (!json)
        return MHD_NO;
    return srv_send_json(c, mc, c->load_status, json);
}

/* Reading (and maybe downloading) an adapter takes time: it runs on its own thread while the
 * connection is suspended, so no MHD worker (and no stream it serves) waits on it. */
enum MHD_Result srv_admin_load(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    char *name, *path, *sha;
    bool pinned = false;
    api_error e;
    if (api_parse_load_lora(c->body ? c->body : "", c->len, &name, &path, &sha, &pinned, &e))
        return srv_send_err(c, mc, &e);
    enum MHD_Result ret = MHD_YES;
    if (pinned && srv_pin_check(s->reg, s->cfg.max_loras)) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "pinned", "", hy_err_msg());
        free(name);
        free(path);
        free(sha);
        return ret;
    }
    c->load_pinned = pinned;
    char resolved[PATH_MAX], msg[1400], bad[64];
    bool url = strncmp(path, "https://", 8) == 0;
    if (srv_is_base_name(s, name)) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_name", "", "that name is the base model's");
    } else if (strlen(name) >= AD_NAME_MAX) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_name", "", "lora_name is too long");
    } else if (sha && (strlen(sha) != 64 || strspn(sha, "0123456789abcdefABCDEF") != 64)) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "sha256", "", "sha256 must be 64 hex digits");
    } else if (url && strlen(path) > API_MAX_URL) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "", "the URL is too long");
    } else if (strstr(path, "://") && !url) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "", "only https:// URLs are accepted");
    } else if (url && !srv_url_allowed(s, path, msg, sizeof msg)) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else if (!url && s->cfg.n_roots == 0) {
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "",
                  "no --adapter-root is configured; adapters cannot be loaded from paths at run time");
    } else if (!url && !srv_path_under(s->cfg.adapter_roots, s->cfg.n_roots, path, resolved)) {
        snprintf(msg, sizeof msg, "lora_path '%s' does not exist or is outside every --adapter-root", path);
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else if (!url && !srv_files_under(s->cfg.adapter_roots, s->cfg.n_roots, resolved, bad, sizeof bad)) {
        snprintf(msg, sizeof msg, "%s of lora_path '%.900s' is a link that resolves outside every --adapter-root",
                 bad, path);
        ret = srv_err(c, mc, 400, "invalid_request_error", "lora_path", "", msg);
    } else {
        snprintf(c->load_name, sizeof c->load_name, "%s", name);
        c->load_path = strdup(url ? path : resolved);
        c->load_sha = sha;
        sha = NULL;
        pthread_t th;
        atomic_fetch_add(&c->refs, 1); /* held by the worker */
        c->state = R_LOAD_WAIT;
        if (!c->load_path || pthread_create(&th, NULL, load_worker, c) != 0) {
            atomic_fetch_sub(&c->refs, 1);
            ret = srv_err(c, mc, 500, "server_error", "", "", "cannot start the loader thread");
        } else {
            pthread_detach(th);
            ret = srv_admin_load_wait(c, mc);
        }
    }
    free(name);
    free(path);
    free(sha);
    return ret;
}

enum MHD_Result srv_admin_unload(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    char *name, msg[600];
    api_error e;
    if (api_parse_unload_lora(c->body ? c->body : "", c->len, &name, &e))
        return srv_send_err(c, mc, &e);
    int rc = ad_reg_unload(s->reg, name);
    enum MHD_Result ret;
    if (rc == 0) {
        forget_served(s, name);
        sched_wake(s->sched);
        snprintf(msg, sizeof msg, "Success: LoRA adapter '%s' removed successfully.", name);
        json_t *o = json_pack("{s:s,s:s}", "status", "ok", "message", msg);
        char *j = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        ret = srv_send_json(c, mc, 200, j);
    } else {
        snprintf(msg, sizeof msg, "%s", hy_err_msg());
        ret = srv_err(c, mc, rc == HY_ENOTFOUND ? 404 : 400, "invalid_request_error", "lora_name",
                  rc == HY_ENOTFOUND ? "model_not_found" : "", msg);
    }
    free(name);
    return ret;
}

/* Every registry entry (malloc'ed into *out, caller frees; NULL with *n = 0 when there are none).
 * Retries when adapters are loaded between counting and copying. */
int srv_reg_snapshot(srv *s, ad_reg_info **out, int *n)
{
    *out = NULL;
    *n = 0;
    int want = s->reg ? ad_reg_count(s->reg) : 0;
    while (want > 0) {
        ad_reg_info *info = calloc((size_t)want, sizeof *info);
        if (!info)
            return HY_ENOMEM;
        int got = ad_reg_list(s->reg, info, want);
        if (got <= want) {
            *out = info;
            *n = got;
            return HY_OK;
        }
        free(info);
        want = got;
    }
    return HY_OK;
}

enum MHD_Result srv_admin_adapters(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    bool admin = srv_is_admin(s, mc);
    ad_reg_info *info;
    int n;
    if (srv_reg_snapshot(s, &info, &n))
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        ad_reg_info *x = &info[i];
        uint64_t served = 0;
        pthread_mutex_lock(&s->mu);
        for (int k = 0; k < s->n_served; k++)
            if (strcmp(s->served[k].name, x->name) == 0)
                served = s->served[k].requests;
        pthread_mutex_unlock(&s->mu);
        json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:i,s:I,s:I}", "name", x->name, "state",
                              ad_state_name(x->state), "K", x->K, "r", x->r, "refcount", x->refcount,
                              "requests", (json_int_t)served, "host_bytes", (json_int_t)x->host_bytes);
        json_object_set_new(o, "pinned", json_boolean(x->pinned));
        if (admin) /* server paths only for admins */
            json_object_set_new(o, "path", json_string(x->path));
        /* targets: the projections the adapter touches in any layer, and tokens run through it
         * (a brief pin to read them; the engine's snapshot below lags and forgets evicted ones) */
        ad_adapter *a = NULL;
        json_t *targets = json_array();
        bool have_tokens = false;
        if (x->state == AD_READY && ad_reg_pin(s->reg, x->name, &a) == 0) {
            json_object_set_new(o, "tokens", json_integer((json_int_t)ad_tokens(a)));
            have_tokens = true;
            for (int p = 0; p < ENG_N_PROJ; p++) {
                bool any = false;
                for (int l = 0; l < ad_n_layer(a) && !any; l++)
                    any = ad_targets(a, l, p);
                if (any)
                    json_array_append_new(targets, json_string(eng_proj_names[p]));
            }
            ad_reg_unpin(s->reg, a);
        }
        json_object_set_new(o, "targets", targets);
        pthread_mutex_lock(&s->mu);
        for (int k = 0; k < s->n_served; k++) /* speculative decoding on its finished requests */
            if (strcmp(s->served[k].name, x->name) == 0 && s->served[k].spec_drafted)
                json_object_set_new(o, "speculative",
                                    json_pack("{s:I,s:I,s:f}", "draft_tokens", (json_int_t)s->served[k].spec_drafted,
                                              "accepted_tokens", (json_int_t)s->served[k].spec_accepted,
                                              "acceptance_rate",
                                              (double)s->served[k].spec_accepted / (double)s->served[k].spec_drafted));
        json_t *router = json_null();
        for (int k = 0; k < s->n_stats; k++)
            if (strcmp(s->stats[k].name, x->name) == 0) {
                if (!have_tokens)
                    json_object_set_new(o, "tokens", json_integer((json_int_t)s->stats[k].tokens));
                json_object_set_new(o, "resident", json_boolean(s->stats[k].resident));
                json_t *g = json_array();
                for (int h = 0; h < s->stats[k].K; h++)
                    json_array_append_new(g, json_real(s->stats[k].gate[h]));
                json_decref(router);
                router = json_pack("{s:o}", "mean_gate", g);
            }
        pthread_mutex_unlock(&s->mu);
        if (!json_object_get(o, "tokens"))
            json_object_set_new(o, "tokens", json_integer(0));
        if (!json_object_get(o, "resident"))
            json_object_set_new(o, "resident", json_false());
        json_object_set_new(o, "router", router);
        json_array_append_new(arr, o);
    }
    free(info);
    json_t *root = json_pack("{s:s,s:o}", "object", "list", "data", arr);
    char *j = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return srv_send_json(c, mc, 200, j);
}

enum MHD_Result srv_admin_metrics(conn *c, struct MHD_Connection *mc)
{
    srv *s = c->s;
    sched_stats st;
    memset(&st, 0, sizeof st);
    if (atomic_load(&s->ready))
        sched_get_stats(s->sched, &st);
    srv_gauges g = {st.waiting_reqs, st.running_seqs, st.kv_used, st.kv_total,
                    s->reg ? ad_reg_count(s->reg) : 0, s->cfg.max_loras, st.preemptions, st.steps,
                    st.running_adapters, st.waiting_adapters, s->cfg.served_name, NULL, 0,
                    (uint64_t)atomic_load(&s->guard.timed_out), st.kv_cached, st.prefix_queries,
                    st.prefix_hits, NULL, 0, NULL, atomic_load(&s->device_loads),
                    atomic_load(&s->device_evictions), st.spec_drafts, st.spec_draft_tokens, st.spec_accepted,
                    st.step_hist, st.step_s_sum};
    /* per-adapter counts: copied under mu so the render runs without it */
    pthread_mutex_lock(&s->mu);
    int n = s->n_served;
    srv_ad_served *copy = n ? malloc((size_t)n * sizeof *copy) : NULL;
    if (copy)
        memcpy(copy, s->served, (size_t)n * sizeof *copy);
    pthread_mutex_unlock(&s->mu);
    srv_adapter_requests *ad = copy ? calloc((size_t)n, sizeof *ad) : NULL;
    if (n && !ad) {
        free(copy);
        return srv_err(c, mc, 500, "server_error", "", "", "out of memory");
    }
    pthread_mutex_lock(&s->mu); /* head usage from the engine's router snapshot (resident adapters) */
    for (int i = 0; i < n; i++) {
        ad[i] = (srv_adapter_requests){.name = copy[i].name, .requests = copy[i].requests,
                                       .prompt_tokens = copy[i].prompt_tokens,
                                       .generation_tokens = copy[i].generation_tokens};
        for (int k = 0; k < s->n_stats; k++)
            if (strcmp(s->stats[k].name, copy[i].name) == 0 && s->stats[k].gate_n > 0 && s->stats[k].K > 1) {
                ad[i].K = HY_MIN(s->stats[k].K, SRV_MAX_HEADS);
                for (int h = 0; h < ad[i].K; h++)
                    ad[i].gate_sum[h] = (double)s->stats[k].gate[h] * s->stats[k].gate_n;
            }
    }
    pthread_mutex_unlock(&s->mu);
    g.adapters = ad;
    g.n_adapters = n;
    /* loaded adapters and where they are */
    ad_reg_info *info = NULL;
    int n_info = 0;
    srv_adapter_level *lv = NULL;
    if (s->reg && srv_reg_snapshot(s, &info, &n_info) == 0 && n_info && (lv = calloc((size_t)n_info, sizeof *lv))) {
        pthread_mutex_lock(&s->mu);
        for (int i = 0; i < n_info; i++) {
            if (info[i].state != AD_READY)
                continue;
            srv_adapter_level *l = &lv[g.n_levels++];
            l->name = info[i].name;
            l->pinned = info[i].pinned;
            for (int k = 0; k < s->n_stats; k++)
                if (strcmp(s->stats[k].name, info[i].name) == 0)
                    l->device = s->stats[k].resident;
        }
        pthread_mutex_unlock(&s->mu);
    }
    g.levels = lv;
    srv_resolve_stats rs;
    if (s->resolver) {
        srv_resolve_get_stats(s->resolver, &rs);
        g.resolve = &rs;
    }
    char *t = srv_metrics_render(&s->metrics, &g);
    free(lv);
    free(info);
    free(ad);
    free(copy);
    if (!t)
        return MHD_NO;
    return srv_send_buf(c, mc, 200, "text/plain; version=0.0.4", t, strlen(t), NULL, NULL);
}
