/* main.c - bin/hydrad: dispatches argv[1] to a subcommand (server/cli.h). The only place that
 * turns a subcommand's result into the process exit code; it does no work of its own. */
#include "server/cli.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: hydrad <command> [options]\n"
            "\n"
            "commands:\n"
            "  generate    run one prompt through a GGUF model and stream the text\n"
            "              (hydrad generate -m MODEL -p PROMPT [--chat] ...; --help for all)\n"
            "  perplexity  perplexity of a model (and adapter) over a text file, llama-perplexity's\n"
            "              method (hydrad perplexity -m MODEL -f TEXT [--ctx N] ...; --help for all)\n"
            "  serve       OpenAI-compatible HTTP server with hot-swapped adapters (--help)\n"
            "  mkmodel     write a llama GGUF with seeded random weights (--help)\n"
            "  mkadapter   write a seeded test LoRA/HydraLoRA adapter directory (--help)\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") ||
        !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "generate"))
        return cli_generate(argc - 1, argv + 1);
    if (!strcmp(argv[1], "perplexity"))
        return cli_perplexity(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve"))
        return cli_serve(argc - 1, argv + 1);
    if (!strcmp(argv[1], "mkmodel"))
        return cli_mkmodel(argc - 1, argv + 1);
    if (!strcmp(argv[1], "mkadapter"))
        return cli_mkadapter(argc - 1, argv + 1);
    fprintf(stderr, "hydrad: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
