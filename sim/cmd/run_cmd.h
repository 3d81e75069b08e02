/* run_cmd.h — `kvsim run CONFIG` (replay a trace through the configured policies) and
 * `kvsim policies` (list the policy types and their parameters). */
#ifndef KVSIM_RUN_CMD_H
#define KVSIM_RUN_CMD_H

int cmd_run(int argc, char **argv);
int cmd_policies(int argc, char **argv);

#endif
