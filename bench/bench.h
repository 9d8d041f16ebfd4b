/* bench.h - subcommands of bin/hydrad-bench (bench/bench_main.c dispatches argv[1]).
 * Each returns the process exit code: 0 ok, 2 bad flags, 1 failure (or errors seen). */
#ifndef HY_BENCH_H
#define HY_BENCH_H

int bench_serve_main(int argc, char **argv);   /* bench/bench_serve.c: HTTP load generator */
int bench_kernels_main(int argc, char **argv); /* bench/bench_kernels.c: HydraLoRA op sweep */
int bench_gram_main(int argc, char **argv);    /* bench/bench_gram.c: grammar mask cost per token */
int bench_membw_main(int argc, char **argv);   /* bench/bench_membw.c: read bandwidth, decode bytes */

#endif
