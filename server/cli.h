/* cli.h - subcommands of bin/hydrad; server/main.c dispatches argv[1] to these.
 * Each returns the process exit code (0 ok, 2 bad input/model, 1 other failure). */
#ifndef HY_CLI_H
#define HY_CLI_H

int cli_generate(int argc, char **argv);  /* server/cli_generate.c */
int cli_perplexity(int argc, char **argv); /* server/cli_perplexity.c */
int cli_serve(int argc, char **argv);     /* server/serve.c */
int cli_mkmodel(int argc, char **argv);   /* server/cli_mkmodel.c */
int cli_mkadapter(int argc, char **argv); /* server/cli_mkadapter.c */

#endif
