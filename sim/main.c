/* kvsim — command-line front end: one table of subcommands.
 * Exit status: 0 success, 1 a check failed (e.g. `kvsim check` above tolerance), 2 bad input
 * or usage (with a one-line message on stderr), 3 out of memory. */
#include <stdio.h>
#include <string.h>

#include "sim/cmd/check.h"
#include "sim/cmd/reuse_cmd.h"
#include "sim/cmd/run_cmd.h"
#include "sim/cmd/sweep_cmd.h"
#include "sim/cmd/synth.h"
#include "traces/cmd/eval_cmd.h"
#include "traces/cmd/trace_cmd.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand name */
    const char *summary;
} Command;

static const Command commands[] = {
    {"run", cmd_run, "replay a trace through the policies of a config; write CSVs"},
    {"sweep", cmd_sweep, "every policy of a config at many budgets, each trace in one pass"},
    {"merge", cmd_merge, "join the shards of a sweep into the files of one unsharded sweep"},
    {"synth", cmd_synth, "write a synthetic trace with planted attention structure"},
    {"info", cmd_info, "print a trace's header and datasets"},
    {"check", cmd_check, "compare a trace's stored attention rows with its Q and K"},
    {"policies", cmd_policies, "list the policy types with their parameters and defaults"},
    {"trace", cmd_trace, "run a Hugging Face checkpoint on a prompt and write its trace"},
    {"eval", cmd_eval, "answer accuracy of each policy evicting from a model's live KV cache"},
    {"reuse", cmd_reuse, "replay a request log through persisted KV caches (prefix, conversation)"},
    {"synth-workload", cmd_synth_workload, "write a synthetic multi-turn chat request log"},
    {NULL, NULL, NULL},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: kvsim COMMAND [ARGS]   (kvsim COMMAND --help for its options)\n\n"
                 "commands:\n");
    for (const Command *c = commands; c->name; c++)
        fprintf(out, "  %-15s %s\n", c->name, c->summary);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    kv_install_signal_cleanup(); /* an interrupted command leaves no temporary file behind */
    for (const Command *c = commands; c->name; c++)
        if (!strcmp(c->name, argv[1]))
            return c->run(argc - 1, argv + 1);
    fprintf(stderr, "kvsim: unknown command '%s' (kvsim --help lists them)\n", argv[1]);
    return 2;
}
