/* eval_cmd.h — `kvsim eval`: end-to-end answer accuracy of each policy of a config, the model
 * generating with the policy evicting from its live KV cache (traces/eval/eval.h, docs/eval.md).
 * Writes eval.csv (per policy) and eval_prompts.csv (per policy and prompt). */
#ifndef KVSIM_EVAL_CMD_H
#define KVSIM_EVAL_CMD_H

int cmd_eval(int argc, char **argv);

#endif
