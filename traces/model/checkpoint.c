/* Checkpoint-level helpers: see checkpoint.h for what they promise. */
#include "traces/model/checkpoint.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int tokenizer_encode_piece(void *ctx, const char *text, size_t len, int32_t **ids, int *n,
                                  KvErr *err)
{
    return tokenizer_encode(ctx, text, len, ids, n, err);
}

Tokenizer *checkpoint_tokenizer_load(const char *model_dir, KvErr *err)
{
    char json_path[4096], config_path[4096];
    snprintf(json_path, sizeof json_path, "%s/tokenizer.json", model_dir);
    snprintf(config_path, sizeof config_path, "%s/tokenizer_config.json", model_dir);
    return tokenizer_load(json_path, access(config_path, F_OK) == 0 ? config_path : NULL, err);
}

int prompt_file_load(const char *path, const Tokenizer *tok, const Model *model,
                     const char *model_dir, PromptMarkup *markup, PromptTokens *tokens,
                     KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, 0, &len, err);
    if (!text)
        return -1;
    int rc = prompt_parse(path, text, len, markup, err);
    free(text);
    if (rc != 0)
        return -1;
    int bos = -1;
    if (tokenizer_add_bos(tok)) {
        bos = tokenizer_bos(tok);
        if (bos < 0)
            bos = model->config.bos_token_id;
        if (bos < 0)
            return kv_fail(err, "%s/tokenizer_config.json: add_bos_token is set but no BOS "
                           "token is defined", model_dir);
    }
    if (prompt_tokenize(path, markup, tokenizer_encode_piece, (void *)tok, bos, tokens, err) != 0)
        return -1;
    for (int t = 0; t < tokens->n_tokens; t++)
        if (tokens->tokens[t] >= model->config.vocab_size)
            return kv_fail(err, "%s: token %d is id %d, beyond the model's vocab_size %d", path,
                           t, tokens->tokens[t], model->config.vocab_size);
    return 0;
}

int is_end_of_sequence(const ModelConfig *cfg, const Tokenizer *tok, int token)
{
    for (int i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_token_ids[i] == token)
            return 1;
    return tok && tokenizer_eos(tok) == token;
}
