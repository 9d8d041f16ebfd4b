/* bench_main.c - entry point of bin/hydrad-bench: dispatches to the serving load generator and
 * the kernel micro-benchmarks. Timings never live in tests; they live here (STYLE.md 10). */
#include "bench/bench.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: hydrad-bench <command> [options]\n\n"
               "commands:\n"
               "  serve     load generator for an OpenAI-compatible server: Poisson arrivals,\n"
               "            streaming TTFT/TPOT/ITL/E2E, many adapters (--help)\n"
               "  kernels   HydraLoRA op sweep (r, K, batch, adapters) against memcpy bandwidth (--help)\n"
               "  gram      per-token cost of constrained decoding: mask + advance along random valid\n"
               "            paths of a JSON Schema, cold and cached (--help)\n"
               "  membw     read bandwidth of this host (threads summing a buffer >> LLC) and the\n"
               "            weight bytes a decode step of a GGUF reads: the CPU floor (--help)\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "serve"))
        return bench_serve_main(argc - 1, argv + 1);
    if (!strcmp(argv[1], "kernels"))
        return bench_kernels_main(argc - 1, argv + 1);
    if (!strcmp(argv[1], "gram"))
        return bench_gram_main(argc - 1, argv + 1);
    if (!strcmp(argv[1], "membw"))
        return bench_membw_main(argc - 1, argv + 1);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "hydrad-bench: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
