/* srv_paths.h - confinement of adapter paths to configured roots (--adapter-root, and the
 * --adapter-resolver directories): realpath-based, so links that leave a root are refused before
 * any byte of the file is read. Any thread. */
#ifndef HY_SRV_PATHS_H
#define HY_SRV_PATHS_H

#include <stdbool.h>
#include <stddef.h>

/* path resolves (realpath into resolved, PATH_MAX bytes) to a root or below it. */
bool srv_path_under(const char *const *roots, int n_roots, const char *path, char *resolved);
/* Every file an adapter directory (already under a root) holds resolves under a root too: false
 * with the offending file's name in bad. A missing file is not this check's business. */
bool srv_files_under(const char *const *roots, int n_roots, const char *dir, char *bad, size_t cap);

#endif
