/* config.h — the INI run configuration of `kvsim run` (see configs/ and docs/config.md).
 *
 *   [trace]  path = FILE.h5   (or a glob(3) pattern: a dataset of traces, sim/replay/dataset.h)
 *   [run]    threads = 0  out = DIR  topk = 32  eval_every = 1  kv_bits = 16  seed = 0
 *            prefill_chunk = 0  history = persist  sliding_layers = skip  prefill_tflops = 0
 *            budget = N | ratio = r   (one budget for every policy; docs/config.md)
 *            reference = full   (the policy a dataset's paired differences are taken to)
 *   [policy.LABEL]  type = NAME  <the type's parameters>   (one section per policy)
 *
 * Every error (unknown section or key, malformed value, unknown policy type, duplicate label,
 * missing type, a byte that is not text) is one line "FILE:LINE: what is wrong (what was
 * expected)"; a file that cannot be read or is not a regular file is "FILE: ...". */
#ifndef KVSIM_CONFIG_H
#define KVSIM_CONFIG_H

#include "sim/replay/engine.h"

typedef struct ConfigSource ConfigSource; /* where each policy and key was written */

typedef struct {
    char config_path[4096];
    char trace_path[4096]; /* relative paths are relative to the working directory */
    char out_dir[4096];    /* default: results/<config file name without .ini> */
    EngineConfig engine;
    ConfigSource *source;
    int prefill_chunk_line; /* the line of [run] prefill_chunk; 0 when not set */
    /* [run] budget (tokens per KV head) or [run] ratio (share of the trace's n_prompt kept),
     * at most one of them: the budget of every policy whose section does not set its own
     * (config_policy_budgeted). config_load applies a budget; a ratio is applied once the
     * context is known (config_apply_budget with config_ratio_budget). 0: not set. */
    int budget;
    double ratio;
    int budget_line; /* the line of the one given */
    int trace_line;  /* the line of [trace] path; 0 when not set */
    char reference[64]; /* [run] reference: a policy's label; "" = not set */
    int reference_line;
} RunConfig;

/* The file must be a regular file of UTF-8 text (an initial byte-order mark is skipped) of at
 * most 1 MiB, without NUL bytes or control characters other than tab, lines of at most 197
 * bytes. A section or a key given twice is an error, so is text after a [section] header
 * other than a comment. */
int config_load(const char *path, RunConfig *rc, KvErr *err);

/* What can only be checked against the model that the run simulates (the trace of `kvsim run`,
 * the checkpoint of `kvsim eval`; `model` names it), before any work, at the config's file and
 * line: a policy's `calibration` trace (trig), unless `online`, must come from a model of the
 * same shape: at least n_layers layers, the same query heads, head_dim and RoPE layout. */
int config_check_model(const RunConfig *rc, const char *model, int n_layers, int n_q_heads,
                       int head_dim, RopeLayout rope_layout, KvErr *err);

/* Policy i's calibration trace (trig's `calibration`), or NULL when it has none or calibrates
 * online. */
const char *config_calibration(const RunConfig *rc, int i);

/* What closed loop (`kvsim eval`) cannot do, at the config's file and line: prefill_chunk > 0
 * (its prompt pass attends over the full cache; traces/eval/eval.h). */
int config_check_closed_loop(const RunConfig *rc, KvErr *err);

/* Whether the run's budget or ratio sets policy i's parameters: the config has one, policy i's
 * type has a budget (every type but full) and its section does not set it (`budget`, or
 * `window` for window). */
bool config_policy_budgeted(const RunConfig *rc, int i);

/* The budget a ratio gives for a context of n_prompt tokens: floor(ratio x n_prompt), as kvpress
 * keeps int(k_len x (1 - compression_ratio)) tokens. */
int config_ratio_budget(const RunConfig *rc, int n_prompt);

/* Sets the parameters of specs[i] (policy i of rc, or a copy of it) for every budgeted policy i
 * to `budget` tokens per KV head, the way docs/config.md gives per type (window = budget -
 * sinks, decay's local = budget / 4, ...), leaving a parameter the section sets alone, and
 * validates the result; an error is "FILE:LINE: [policy.X] ..." at the line of [run] budget or
 * ratio. `context` (NULL for a budget) says where a ratio's budget came from, for the message. */
int config_apply_budget(const RunConfig *rc, PolicySpec *specs, int budget, const char *context,
                        KvErr *err);

/* Whether policy i's type has a budget (every type but full). */
bool config_policy_has_budget(const RunConfig *rc, int i);
/* Whether a policy of this type has a budget at all (every type but full). */
bool config_type_has_budget(const PolicyType *type);

/* Policy i at one budget of a sweep (`kvsim sweep`, `kvsim eval --budget`): sets spec (a copy
 * of policy i's spec) to `budget` tokens per KV head the way [run] budget would if policy i's
 * section did not set its own budget. A section that sets its own (`budget`, or `window` for
 * window) is taken as the design at that budget: every budget-like parameter (docs/sweeps.md's
 * table) is set from the new budget, the section's own values included (configs/ta512.ini at
 * each budget gives the parameters that table lists); the others stay. Policies without a budget
 * (full) are left as they are. An error is "FILE:LINE: [policy.X] ... (from `given`)" at the
 * section's line. */
int config_sweep_budget(const RunConfig *rc, int i, PolicySpec *spec, int budget,
                        const char *given, KvErr *err);

/* The policy a dataset's paired differences are taken to: [run] reference's (config_load
 * checks that it names a policy); when not set, the policy labelled `full`, else the first of
 * type full; -1 when there is none. */
int config_reference(const RunConfig *rc);

void config_free(RunConfig *rc);

#endif
