/* checkpoint.h — what `kvsim trace` and `kvsim eval` both read from a Hugging Face checkpoint
 * directory besides the weights: its tokenizer, a prompt file tokenized for its model, and its
 * end-of-sequence tokens. */
#ifndef KVSIM_CHECKPOINT_H
#define KVSIM_CHECKPOINT_H

#include "traces/model/model.h"
#include "traces/model/prompt.h"
#include "traces/model/tokenizer.h"

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
