/* trace_cmd.h — `kvsim trace`: run a Hugging Face checkpoint on a prompt, greedy-decode, and
 * write the run's post-RoPE Q/K/V and the model's own attention rows as a kvsim trace
 * (docs/generator.md). */
#ifndef KVSIM_TRACE_CMD_H
#define KVSIM_TRACE_CMD_H

#include "traces/model/checkpoint.h"

int cmd_trace(int argc, char **argv);

#endif
