/* sweep_cmd.h — `kvsim sweep CONFIG --budgets B,... | --ratios R,...` (every policy of CONFIG
 * at every budget on every trace, each trace in one pass; --resume, --shard I/N) and
 * `kvsim merge --out OUT DIR...` (joins the shards' directories into the files one unsharded
 * sweep writes). The cells and files are sim/replay/sweep.h's; docs/sweeps.md, docs/cluster.md. */
#ifndef KVSIM_SWEEP_CMD_H
#define KVSIM_SWEEP_CMD_H

int cmd_sweep(int argc, char **argv);
int cmd_merge(int argc, char **argv);

#endif
