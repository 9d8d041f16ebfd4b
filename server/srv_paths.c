/* srv_paths.c - adapter paths confined to roots (see srv_paths.h). */
#include "server/srv_paths.h"

#include "engine/hy.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

bool srv_path_under(const char *const *roots, int n_roots, const char *path, char *resolved)
{
    if (!realpath(path, resolved))
        return false;
    for (int i = 0; i < n_roots; i++) {
        char root[PATH_MAX];
        if (!realpath(roots[i], root))
            continue;
        size_t n = strlen(root);
        if (strncmp(resolved, root, n) == 0 && (resolved[n] == '/' || resolved[n] == '\0'))
            return true;
    }
    return false;
}

bool srv_files_under(const char *const *roots, int n_roots, const char *dir, char *bad, size_t cap)
{
    static const char *const files[] = {"adapter_config.json", "adapter_model.safetensors"};
    for (size_t i = 0; i < HY_ARRAY_LEN(files); i++) {
        char p[PATH_MAX + 32], r[PATH_MAX];
        struct stat st;
        if (snprintf(p, sizeof p, "%s/%s", dir, files[i]) >= (int)sizeof p || lstat(p, &st) != 0)
            continue; /* missing: the loader says so */
        if (!srv_path_under(roots, n_roots, p, r)) {
            snprintf(bad, cap, "%s", files[i]);
            return false;
        }
    }
    return true;
}
