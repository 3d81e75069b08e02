/* trace_cmd.h — `kvsim trace`: run a Hugging Face checkpoint on a prompt, greedy-decode, and
 * write the run's post-RoPE Q/K/V and the model's own attention rows as a kvsim trace
 * (docs/generator.md). */
#ifndef KVSIM_TRACE_CMD_H
#define KVSIM_TRACE_CMD_H

#include "traces/model.h"
#include "traces/prompt.h"
#include "traces/tokenizer.h"

int cmd_trace(int argc, char **argv);

/* The pieces `kvsim trace` and `kvsim eval` share. */

/* model_dir/tokenizer.json, with model_dir/tokenizer_config.json when there is one. */
Tokenizer *checkpoint_tokenizer_load(const char *model_dir, KvErr *err);
/* Reads a prompt file as `kvsim trace --prompt` does: markup parsed and removed, text tokenized
 * piece by piece, BOS first when the tokenizer asks for it (its own BOS, else the model's
 * bos_token_id); every id checked against the model's vocabulary. */
int prompt_file_load(const char *path, const Tokenizer *tok, const Model *model,
                     const char *model_dir, PromptMarkup *markup, PromptTokens *tokens,
                     KvErr *err);
/* Whether greedy decoding stops at `token`: the config's eos_token_id(s) or the tokenizer's EOS
 * (tok may be NULL). */
int is_end_of_sequence(const ModelConfig *cfg, const Tokenizer *tok, int token);

#endif
