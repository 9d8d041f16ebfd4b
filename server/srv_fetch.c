/* srv_fetch.c - adapters from https:// URLs: the host allow-list check (--adapter-url-allow, no
 * private addresses), and the download of both files into the adapter cache, size-capped and
 * sha256-checked, renamed into place only when whole. Loader threads; knows no connection. */
#include "server/srv_conn.h"

#include "engine/hy.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- https:// adapters: download both files into the cache, size-capped, sha256 checked ---- */

typedef struct {
    FILE *f;
    size_t n, cap;
    bool over;        /* the transfer was cut at the cap */
    EVP_MD_CTX *md;   /* SHA-256 of what was written (NULL: not checked) */
    bool md_fail;
} dl_sink;

static size_t dl_write(char *p, size_t sz, size_t nm, void *ud)
{
    dl_sink *d = ud;
    size_t n = sz * nm;
    if (n > d->cap - d->n) {
        d->over = true;
        return 0; /* over the cap: abort the transfer */
    }
    d->n += n;
    if (d->md && !EVP_DigestUpdate(d->md, p, n))
        d->md_fail = true;
    return fwrite(p, 1, n, d->f);
}

/* A fresh temp file beside dst: "<dst>.XXXXXX.part" made by mkstemps (never shared with a
 * concurrent download of the same dst). tmp receives its name. */
static int dl_tmp_open(const char *dst, char *tmp, size_t cap, FILE **f)
{
    *f = NULL;
    if ((size_t)snprintf(tmp, cap, "%s.XXXXXX.part", dst) >= cap)
        return hy_err_set(HY_EINVAL, "path too long: %s", dst);
    int fd = mkstemps(tmp, 5);
    if (fd < 0)
        return hy_err_set(HY_EIO, "cannot create a temp file beside %s: %s", dst, strerror(errno));
    *f = fdopen(fd, "wb");
    if (!*f) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return hy_err_set(HY_EIO, "cannot write %s: %s", tmp, strerror(e));
    }
    return HY_OK;
}

/* Lower-case hex of the digest in d->md into hex[65]; false when it cannot be finished. */
/* Lower-case hex of a 32-byte digest into hex[65]. */
static void hex32(const unsigned char *md, char hex[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

/* Finish a SHA-256 context into hex[65]; false when it cannot be finished. */
static bool md_hex(EVP_MD_CTX *md, char hex[65])
{
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (!EVP_DigestFinal_ex(md, out, &n) || n != 32)
        return false;
    hex32(out, hex);
    return true;
}

static bool dl_hex(dl_sink *d, char hex[65]) { return !d->md_fail && md_hex(d->md, hex); }

int srv_download(const char *url, const char *dst, size_t cap, const char *want_sha, const char *protocols,
                 const char *ca_file)
{
    char tmp[PATH_MAX + 80], got[65];
    dl_sink d = {NULL, 0, cap, false, NULL, false};
    CURL *h = NULL;
    int rc = dl_tmp_open(dst, tmp, sizeof tmp, &d.f);
    if (rc)
        return rc;
    if (want_sha && (!(d.md = EVP_MD_CTX_new()) || !EVP_DigestInit_ex(d.md, EVP_sha256(), NULL))) {
        rc = hy_err_set(HY_ENOMEM, "cannot start SHA-256");
        goto fail;
    }
    if (!(h = curl_easy_init())) {
        rc = hy_err_set(HY_ENOMEM, "libcurl init failed");
        goto fail;
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    if (ca_file)
        curl_easy_setopt(h, CURLOPT_CAINFO, ca_file);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, protocols);
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, protocols);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 20L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 600L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, dl_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &d);
    CURLcode cc = curl_easy_perform(h);
    int closed = fclose(d.f);
    d.f = NULL;
    if (cc != CURLE_OK) {
        rc = d.over ? hy_err_set(HY_ELIMIT, "%s: larger than the %zu-byte cap", url, cap)
                    : hy_err_set(HY_EIO, "%s: %s", url, curl_easy_strerror(cc));
        goto fail;
    }
    if (closed != 0) {
        rc = hy_err_set(HY_EIO, "cannot write %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (want_sha && !dl_hex(&d, got)) {
        rc = hy_err_set(HY_EIO, "cannot hash %s", url);
        goto fail;
    }
    if (want_sha && strcasecmp(got, want_sha) != 0) {
        rc = hy_err_set(HY_EFORMAT, "sha256 mismatch for %s: got %s, expected %s", url, got, want_sha);
        goto fail;
    }
    if (rename(tmp, dst) != 0) {
        rc = hy_err_set(HY_EIO, "cannot rename %s: %s", tmp, strerror(errno));
        goto fail;
    }
    curl_easy_cleanup(h);
    EVP_MD_CTX_free(d.md);
    return HY_OK;
fail:
    if (d.f)
        fclose(d.f);
    unlink(tmp);
    if (h)
        curl_easy_cleanup(h);
    EVP_MD_CTX_free(d.md);
    return rc;
}

/* Lower-case hex SHA-256 of a whole file into hex[65]; false when it cannot be read. */
static bool file_sha256(const char *path, char hex[65])
{
    FILE *f = fopen(path, "rb");
    EVP_MD_CTX *md = f ? EVP_MD_CTX_new() : NULL;
    bool ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    unsigned char buf[1 << 16];
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof buf, f)) > 0)
        ok = EVP_DigestUpdate(md, buf, n);
    ok = ok && !ferror(f) && md_hex(md, hex);
    EVP_MD_CTX_free(md);
    if (f)
        fclose(f);
    return ok;
}

/* <cache>/<sha256(url)> into dir, created (with the cache) when missing. */
static int cache_dir(srv *s, const char *url, char *dir, size_t dir_cap)
{
    unsigned char md[32];
    char key[65];
    const char *cache = s->cfg.adapter_cache ? s->cfg.adapter_cache : "/tmp/hydrad-adapter-cache";
    SHA256((const unsigned char *)url, strlen(url), md);
    hex32(md, key);
    if (mkdir(cache, 0700) != 0 && errno != EEXIST)
        return hy_err_set(HY_EIO, "cannot create the adapter cache %s: %s", cache, strerror(errno));
    snprintf(dir, dir_cap, "%s/%s", cache, key);
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return hy_err_set(HY_EIO, "cannot create %s: %s", dir, strerror(errno));
    return HY_OK;
}

/* Fetch <url>/adapter_config.json and <url>/adapter_model.safetensors into
 * <cache>/<sha256(url)>/ and write that directory to dir. With want_sha, a cached copy whose
 * weights have that sha256 is used as it is (*downloaded false). */
static int fetch(srv *s, const char *url, const char *want_sha, char *dir, size_t dir_cap, bool *downloaded)
{
    char path[PATH_MAX + 64], u[API_MAX_URL + 64], got[65];
    *downloaded = false;
    int rc = cache_dir(s, url, dir, dir_cap);
    if (rc)
        return rc;
    size_t ul = strlen(url);
    const char *sep = ul && url[ul - 1] == '/' ? "" : "/";
    const char *files[2] = {"adapter_config.json", "adapter_model.safetensors"};
    snprintf(path, sizeof path, "%s/%s", dir, files[0]);
    bool have_cfg = access(path, R_OK) == 0;
    snprintf(path, sizeof path, "%s/%s", dir, files[1]);
    if (want_sha && have_cfg && file_sha256(path, got) && strcasecmp(got, want_sha) == 0)
        return HY_OK;
    size_t cap = s->cfg.adapter_max_bytes ? s->cfg.adapter_max_bytes : (size_t)1 << 30;
    for (int i = 0; i < 2; i++) {
        snprintf(u, sizeof u, "%s%s%s", url, sep, files[i]);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        /* the weights are checked before they take the final name: a mismatch leaves none */
        if ((rc = srv_download(u, path, i == 0 ? (size_t)1 << 20 : cap, i == 1 ? want_sha : NULL, "https",
                               s->cfg.url_ca)))
            return rc;
    }
    *downloaded = true;
    return HY_OK;
}

int srv_fetch_adapter(srv *s, const char *url, const char *want_sha, char *dir, size_t dir_cap)
{
    bool downloaded;
    return fetch(s, url, want_sha, dir, dir_cap, &downloaded);
}

int srv_fetch_resolved(void *ctx, const char *url, const char *sha256, char *dir, size_t cap, bool *downloaded)
{
    char msg[300];
    *downloaded = false;
    if (!srv_url_allowed(ctx, url, msg, sizeof msg))
        return hy_err_set(HY_EINVAL, "%s", msg);
    return fetch(ctx, url, sha256, dir, cap, downloaded);
}

/* The host of an https:// URL ("https://HOST[:PORT]/..." or "https://[V6]:PORT/..."): it must be
 * listed in --adapter-url-allow (none listed: URL loading is off), and unless it is an address
 * itself, none of the addresses it resolves to may be loopback, link-local or private. Decided
 * before any connection; false with the reason in msg. */
bool srv_url_allowed(srv *s, const char *url, char *msg, size_t cap)
{
    char host[256];
    const char *h = url + 8, *end;
    if (*h == '[') {
        end = strchr(++h, ']');
    } else {
        end = h + strcspn(h, ":/?#");
    }
    if (!end || end == h || (size_t)(end - h) >= sizeof host || memchr(h, '@', (size_t)(end - h))) {
        snprintf(msg, cap, "lora_path has no usable host");
        return false;
    }
    memcpy(host, h, (size_t)(end - h));
    host[end - h] = '\0';
    if (s->cfg.n_url_allow == 0) {
        snprintf(msg, cap, "loading adapters from URLs is off (host '%s'); allow hosts with --adapter-url-allow", host);
        return false;
    }
    bool listed = false;
    for (int i = 0; i < s->cfg.n_url_allow && !listed; i++)
        listed = strcasecmp(host, s->cfg.url_allow[i]) == 0;
    if (!listed) {
        snprintf(msg, cap, "host '%s' is not in --adapter-url-allow", host);
        return false;
    }
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1)
        return true; /* an address listed as itself */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0) {
        snprintf(msg, cap, "host '%s' does not resolve", host);
        return false;
    }
    bool ok = true;
    for (struct addrinfo *ai = res; ai && ok; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            uint32_t ip = ntohl(((struct sockaddr_in *)ai->ai_addr)->sin_addr.s_addr);
            ok = !((ip >> 24) == 127 || (ip >> 24) == 10 || (ip >> 24) == 0 || (ip >> 16) == 0xa9fe ||
                   (ip >> 20) == 0xac1 || (ip >> 16) == 0xc0a8 || (ip >> 22) == (100u << 2 | 1u));
        } else if (ai->ai_family == AF_INET6) {
            const struct in6_addr *x = &((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
            ok = !(IN6_IS_ADDR_LOOPBACK(x) || IN6_IS_ADDR_LINKLOCAL(x) || IN6_IS_ADDR_V4MAPPED(x) ||
                   IN6_IS_ADDR_UNSPECIFIED(x) || (x->s6_addr[0] & 0xfe) == 0xfc);
        }
    }
    freeaddrinfo(res);
    if (!ok)
        snprintf(msg, cap, "host '%s' resolves to a loopback, link-local or private address", host);
    return ok;
}
