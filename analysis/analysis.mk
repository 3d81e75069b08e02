# Budget sweeps and plots, included by the top-level Makefile. Plots are PNG unless
# FORMAT=pdf or FORMAT=svg (the same names with that extension).
FORMAT ?= png
#
#   make sweep        `kvsim sweep SWEEP_CONFIG` at the budgets SWEEP_BUDGETS on DEFAULT_TRACE
#                     (every budget in one pass) -> results/sweep/bB/*.csv and
#                     results/sweep/summary.csv; where EVAL_PROMPTS holds prompts with answers,
#                     also `kvsim eval --budget B` at each budget -> results/sweep/eval.csv
#                     then the same budgets of each config of SWEEP_LIBRARY (the policy library
#                     and the references' variants) -> results/sweep-NAME/summary.csv, bB/*.csv
#   make plots        the sweep's plots (with answer accuracy when the sweep ran kvsim eval) and
#                     those of one run (PLOT_RUN) -> results/plots/*.$(FORMAT); the *_vs_budget
#                     plots of each SWEEP_LIBRARY config -> results/plots/NAME/*.$(FORMAT)
#   make run-plot     results/<config name>/plot.$(FORMAT) from the summary of `make run`
#   make conversation the conversation trace (CONV_PROMPT: a document delivered in four turns,
#                     a question the model answers after each), replayed with CONV_CONFIG once per history mode ->
#                     results/conversation/MODE/*.csv, results/conversation/turns.csv (every
#                     mode's turns.csv with a history column), results/conversation/turns.$(FORMAT)
#                     and survival_distance.$(FORMAT);
#                     then `kvsim eval` of CONV_CONFIG's policies on the held-out conversations
#                     (CONV_EVAL_PROMPTS) once per mode -> results/conversation/MODE/eval*.csv,
#                     results/conversation/eval_turns.csv and results/conversation/eval_distance.$(FORMAT)
#   make dataset      DEFAULT_CONFIG over a dataset of traces: each of the first DATASET_SIZE
#                     prompts of DATASET_PROMPTS traced (results/dataset/traces/NAME.h5), then one
#                     `kvsim run` over all of them -> results/dataset/traces.csv, dataset.csv,
#                     paired.csv and dataset.$(FORMAT) (means with 95% bootstrap intervals)
#   make reuse        a synthetic request log (kvsim synth-workload, REUSE_CONVERSATIONS
#                     conversations) replayed by kvsim reuse at REUSE_CAPACITIES ->
#                     results/reuse/reuse.csv, reuse_turns.csv, reuse_ttft.csv, reuse.$(FORMAT)
#                     (hit rate vs capacity) and reuse_ttft.$(FORMAT) (the TTFT CDF); `make plots`
#                     draws these two as well
#
# Every output is written to a temporary name and renamed. See docs/sweeps.md, docs/plots.md.

SWEEP_BUDGETS ?= 64 128 256 512 1024
SWEEP_CONFIG  ?= $(DEFAULT_CONFIG)
SWEEP_DIR     ?= results/sweep
SWEEP_THREADS ?= 0
# The run whose steps.csv and layers.csv `make plots` draws: the sweep's 512-token budget (its
# largest when 512 is not among SWEEP_BUDGETS).
PLOT_RUN      ?= $(SWEEP_DIR)/b$(if $(filter 512,$(SWEEP_SORTED)),512,$(lastword $(SWEEP_SORTED)))
PLOTS_DIR     ?= results/plots
# `make run` writes where DEFAULT_CONFIG's [run] out says; kvsim's default is results/<name>.
RUN_DIR       ?= $(or $(shell sed -n 's/^[[:space:]]*out[[:space:]]*=[[:space:]]*\([^[:space:];]*\).*/\1/p' \
                   $(DEFAULT_CONFIG) 2>/dev/null | head -n 1),results/$(basename $(notdir $(DEFAULT_CONFIG))))

# Configs swept at the same budgets beside SWEEP_CONFIG, each into results/sweep-NAME (NAME: the
# config's file name): the policies kvsim adds from kvpress and KVCache-Factory, and the reference
# implementations' own variants of the policies of SWEEP_CONFIG (docs/policies.md).
SWEEP_LIBRARY ?= configs/library.ini configs/variants.ini

SWEEP_SORTED  := $(shell printf '%s\n' $(SWEEP_BUDGETS) | sort -n -u)
SWEEP_RUNS    := $(foreach b,$(SWEEP_SORTED),$(SWEEP_DIR)/b$(b)/summary.csv)
# End-to-end accuracy (kvsim eval) joins the sweep when the model's held-out prompts are there.
EVAL_MODEL    ?= models/tiny-retrieval
EVAL_PROMPTS  ?= $(EVAL_MODEL)/heldout
SWEEP_EVALS   := $(if $(wildcard $(EVAL_PROMPTS)/*.answer),$(foreach b,$(SWEEP_SORTED),$(SWEEP_DIR)/b$(b)/eval.csv))
GNUPLOT       ?= gnuplot

VS_BUDGET_PLOTS := mass recall error needle cache
PLOTS := $(foreach p,$(VS_BUDGET_PLOTS),$(PLOTS_DIR)/$(p)_vs_budget.$(FORMAT)) \
         $(PLOTS_DIR)/memory_vs_step.$(FORMAT) $(PLOTS_DIR)/mass_heatmap.$(FORMAT)
# Answer accuracy joins the plots when the sweep runs `kvsim eval`.
PLOTS += $(if $(SWEEP_EVALS),$(PLOTS_DIR)/accuracy_vs_budget.$(FORMAT))

.PHONY: sweep plots run-plot conversation FORCE
# Per-budget results are kept even when only reached through a pattern.
.PRECIOUS: $(SWEEP_DIR)/b%/summary.csv $(SWEEP_DIR)/b%/eval.csv

sweep: $(SWEEP_DIR)/summary.csv $(if $(SWEEP_EVALS),$(SWEEP_DIR)/eval.csv) \
       $(foreach c,$(SWEEP_LIBRARY),$(SWEEP_DIR)-$(basename $(notdir $(c)))/summary.csv)

sweep_comma := ,
sweep_empty :=
sweep_space := $(sweep_empty) $(sweep_empty)
SWEEP_ARGS    := $(SWEEP_CONFIG) --trace $(DEFAULT_TRACE) \
                 --budgets $(subst $(sweep_space),$(sweep_comma),$(SWEEP_SORTED))

# The sweep's arguments; this file changes only when they do, so that another config, trace
# path or budget list reruns the sweep and unchanged ones do not.
$(SWEEP_DIR)/sweep.args: FORCE
	@mkdir -p $(@D)
	@echo '$(SWEEP_ARGS)' | cmp -s - $@ || echo '$(SWEEP_ARGS)' > $@

# One pass over the trace for every budget; its report goes to sweep.log. The per-budget
# directories (bB/*.csv, the files of a `kvsim run` at B) come with the summary.
$(SWEEP_DIR)/summary.csv: $(SWEEP_DIR)/sweep.args $(SWEEP_CONFIG) $(DEFAULT_TRACE) $(wildcard $(KVSIM)) | build
	$(KVSIM) sweep $(SWEEP_ARGS) --out $(@D) --threads $(SWEEP_THREADS) > $(@D)/sweep.log

$(SWEEP_RUNS): $(SWEEP_DIR)/summary.csv ;

$(SWEEP_DIR)/b%/summary.csv:
	@echo "sweep: $@: budget $* is not among SWEEP_BUDGETS ($(SWEEP_SORTED))" >&2; exit 1

$(SWEEP_DIR)/b%/eval.csv: $(SWEEP_CONFIG) $(wildcard $(EVAL_PROMPTS)/*) $(wildcard $(KVSIM)) | build
	$(KVSIM) eval $(SWEEP_CONFIG) --budget $* --model $(EVAL_MODEL) --prompts $(EVAL_PROMPTS) \
	  --out $(@D) --threads $(SWEEP_THREADS) --quiet

$(SWEEP_DIR)/eval.csv: $(SWEEP_EVALS) analysis/concat_summaries.awk
	awk -f analysis/concat_summaries.awk $(foreach b,$(SWEEP_SORTED),budget=$(b) $(SWEEP_DIR)/b$(b)/eval.csv) \
	  > $@.tmp || { rm -f $@.tmp; exit 1; }
	mv $@.tmp $@

# sweep_library(NAME, CONFIG): the sweep of CONFIG at the budgets of SWEEP_CONFIG's, into
# $(SWEEP_DIR)-NAME, and its *_vs_budget plots into $(PLOTS_DIR)/NAME.
define sweep_library
$(SWEEP_DIR)-$(1)/sweep.args: FORCE
	@mkdir -p $$(@D)
	@echo '$(2) $(wordlist 2,$(words $(SWEEP_ARGS)),$(SWEEP_ARGS))' | cmp -s - $$@ || \
	  echo '$(2) $(wordlist 2,$(words $(SWEEP_ARGS)),$(SWEEP_ARGS))' > $$@

$(SWEEP_DIR)-$(1)/summary.csv: $(SWEEP_DIR)-$(1)/sweep.args $(2) $(DEFAULT_TRACE) $(wildcard $(KVSIM)) | build
	$(KVSIM) sweep $(2) $(wordlist 2,$(words $(SWEEP_ARGS)),$(SWEEP_ARGS)) --out $$(@D) \
	  --threads $(SWEEP_THREADS) > $$(@D)/sweep.log

$(PLOTS_DIR)/$(1)/%_vs_budget.$(FORMAT): analysis/%_vs_budget.gp analysis/vs_budget.gp analysis/common.gp $(SWEEP_DIR)-$(1)/summary.csv
	$$(call gnuplot_png,$$<,$(SWEEP_DIR)-$(1)/summary.csv,$$(SWEEP_SUBTITLE)$$(comma) config $(2))

PLOTS += $(foreach p,$(VS_BUDGET_PLOTS),$(PLOTS_DIR)/$(1)/$(p)_vs_budget.$(FORMAT))
endef
$(foreach c,$(SWEEP_LIBRARY),$(eval $(call sweep_library,$(basename $(notdir $(c))),$(c))))

plots: $(PLOTS)

# gnuplot_png(script, input[, subtitle]): renders the script on the input into $@ (in FORMAT)
# through a temporary; the subtitle is the second line of its title (common.gp).
gnuplot_png = @mkdir -p $(@D); $(GNUPLOT) -e "in='$(2)'; out='$@.tmp'; format='$(FORMAT)'; subtitle='$(strip $(3))'" $(1) \
	  || { rm -f $@.tmp; exit 1; }; mv $@.tmp $@; echo "wrote $@"

# The subtitles: what a plot was made from. A trace's model is the one `kvsim info` names; a
# run's trace and budget are those its run.json records (expanded when the recipe runs, after
# the run); a sweep directory's run.json is that of its `kvsim eval` (same directory), which
# names no trace: the sweep's, DEFAULT_TRACE, then.
trace_model = $(shell $(KVSIM) info '$(1)' 2>/dev/null | sed -n 's/^model[[:space:]]*//p')
run_json_trace = $(shell sed -n '/"role":[[:space:]]*"trace"/{n;s/.*"path":[[:space:]]*"\(.*\)",*$$/\1/p;q;}' '$(1)/run.json' 2>/dev/null)
run_json_budget = $(shell sed -n 's/^[[:space:]]*"budget":[[:space:]]*\([0-9]*\).*/\1/p' '$(1)/run.json' 2>/dev/null | head -n 1)
comma := ,
budget_note = $(if $(call run_json_budget,$(1)),$(comma) budget $(call run_json_budget,$(1)) tokens per KV head)
run_trace = $(or $(call run_json_trace,$(1)),$(DEFAULT_TRACE))
run_subtitle = model $(call trace_model,$(call run_trace,$(1))), trace $(call run_trace,$(1))$(call budget_note,$(1))
SWEEP_SUBTITLE = model $(call trace_model,$(DEFAULT_TRACE)), trace $(DEFAULT_TRACE)
EVAL_SUBTITLE = model $(notdir $(EVAL_MODEL)), $(words $(wildcard $(EVAL_PROMPTS)/*.answer)) prompts of $(EVAL_PROMPTS); error bars: Wilson 95% intervals

$(PLOTS_DIR)/%_vs_budget.$(FORMAT): analysis/%_vs_budget.gp analysis/vs_budget.gp analysis/common.gp $(SWEEP_DIR)/summary.csv
	$(call gnuplot_png,$<,$(SWEEP_DIR)/summary.csv,$(SWEEP_SUBTITLE))

$(PLOTS_DIR)/accuracy_vs_budget.$(FORMAT): analysis/accuracy_vs_budget.gp analysis/vs_budget.gp analysis/common.gp $(SWEEP_DIR)/eval.csv
	$(call gnuplot_png,$<,$(SWEEP_DIR)/eval.csv,$(EVAL_SUBTITLE))

$(PLOTS_DIR)/memory_vs_step.$(FORMAT): analysis/memory_vs_step.gp analysis/common.gp $(PLOT_RUN)/summary.csv
	$(call gnuplot_png,$<,$(PLOT_RUN)/steps.csv,$(call run_subtitle,$(PLOT_RUN)))

$(PLOTS_DIR)/mass_heatmap.$(FORMAT): analysis/mass_heatmap.gp analysis/common.gp $(PLOT_RUN)/summary.csv
	$(call gnuplot_png,$<,$(PLOT_RUN)/layers.csv,$(call run_subtitle,$(PLOT_RUN)))

# After `make run` (or any run: make run-plot RUN_DIR=results/mine).
run-plot: $(RUN_DIR)/plot.$(FORMAT)

$(RUN_DIR)/plot.$(FORMAT): analysis/run_plot.gp analysis/common.gp $(RUN_DIR)/summary.csv
	$(call gnuplot_png,$<,$(RUN_DIR)/summary.csv,$(call run_subtitle,$(RUN_DIR)))

$(RUN_DIR)/summary.csv:
	@echo "run-plot: $@ does not exist: run \`make run\` first (or set RUN_DIR)" >&2; exit 1

# ---- make conversation ----

CONV_MODEL  ?= models/tiny-retrieval
CONV_PROMPT ?= $(CONV_MODEL)/conversations/conv_00.txt
CONV_TRACE  ?= traces/conversation.h5
CONV_CONFIG ?= configs/conversation.ini
CONV_DIR    ?= results/conversation
# Every value of [run] history (docs/config.md): the first is the mode the plot's mass panel draws.
CONV_MODES  := persist reencode prefix

.PRECIOUS: $(CONV_DIR)/%/config.ini $(CONV_DIR)/%/turns.csv

# Conversations with answers: a document delivered over four turns, a question after each.
CONV_EVAL_PROMPTS ?= $(CONV_MODEL)/conversations

CONV_SUBTITLE = model $(call trace_model,$(CONV_TRACE)), trace $(CONV_TRACE), $(CONV_CONFIG)
CONV_EVAL_SUBTITLE = model $(notdir $(CONV_MODEL)), $(words $(wildcard $(CONV_EVAL_PROMPTS)/*.answer)) conversations of $(CONV_EVAL_PROMPTS), $(CONV_CONFIG)

.PRECIOUS: $(CONV_DIR)/%/eval_turns.csv

conversation: $(CONV_DIR)/turns.$(FORMAT) $(CONV_DIR)/survival_distance.$(FORMAT) $(CONV_DIR)/eval_distance.$(FORMAT)

# One generated token per answer: a code is one token of the model's vocabulary.
$(CONV_TRACE): $(CONV_PROMPT) $(CONV_MODEL)/model.safetensors | build
	$(KVSIM) trace --model $(CONV_MODEL) --prompt $(CONV_PROMPT) --out $@ --max-new 1

# kvsim run has no option for the history mode: each mode gets CONV_CONFIG with its own line.
$(CONV_DIR)/%/config.ini: $(CONV_CONFIG)
	@case ' $(CONV_MODES) ' in *' $* '*) ;; *) echo "conversation: '$*' is not a history mode ($(CONV_MODES))" >&2; exit 1;; esac; \
	grep -q '^[[:space:]]*history[[:space:]]*=' $< || { echo "conversation: $<: no [run] history line to set" >&2; exit 1; }; \
	mkdir -p $(@D); sed -e 's|^[[:space:]]*history[[:space:]]*=.*|history = $*|' $< > $@.tmp && mv $@.tmp $@

$(CONV_DIR)/%/turns.csv: $(CONV_DIR)/%/config.ini $(CONV_TRACE) $(wildcard $(KVSIM)) | build
	$(KVSIM) run $< --trace $(CONV_TRACE) --out $(@D) > $(@D)/run.log

# The modes' tables, one after the other, each row led by its mode; the headers must agree.
$(CONV_DIR)/turns.csv: $(foreach m,$(CONV_MODES),$(CONV_DIR)/$(m)/turns.csv)
	awk 'FNR == 1 { mode = FILENAME; sub(/\/turns\.csv$$/, "", mode); sub(/.*\//, "", mode); \
	  if (NR == 1) { header = $$0; print "history," $$0 } \
	  else if ($$0 != header) { print FILENAME ": header differs from the first mode'"'"'s" > "/dev/stderr"; exit 1 } \
	  next } { print mode "," $$0 }' $^ > $@.tmp || { rm -f $@.tmp; exit 1; }
	mv $@.tmp $@

$(CONV_DIR)/turns.$(FORMAT): analysis/turns.gp analysis/common.gp $(CONV_DIR)/turns.csv
	$(call gnuplot_png,$<,$(CONV_DIR)/turns.csv,$(CONV_SUBTITLE))

$(CONV_DIR)/survival_distance.$(FORMAT): analysis/survival_distance.gp analysis/common.gp $(CONV_DIR)/turns.csv
	$(call gnuplot_png,$<,$(CONV_DIR)/turns.csv,$(CONV_SUBTITLE))

$(CONV_DIR)/%/eval_turns.csv: $(CONV_DIR)/%/config.ini $(wildcard $(CONV_EVAL_PROMPTS)/*) \
                              $(CONV_MODEL)/model.safetensors $(wildcard $(KVSIM)) | build
	$(KVSIM) eval $< --model $(CONV_MODEL) --prompts $(CONV_EVAL_PROMPTS) --out $(@D) > $(@D)/eval.log

# The modes' eval_turns.csv (each row names its mode), one after the other; the headers agree.
$(CONV_DIR)/eval_turns.csv: $(foreach m,$(CONV_MODES),$(CONV_DIR)/$(m)/eval_turns.csv)
	awk 'FNR == 1 { if (NR == 1) { header = $$0; print } \
	  else if ($$0 != header) { print FILENAME ": header differs from the first mode'"'"'s" > "/dev/stderr"; exit 1 } \
	  next } { print }' $^ > $@.tmp || { rm -f $@.tmp; exit 1; }
	mv $@.tmp $@

$(CONV_DIR)/eval_distance.$(FORMAT): analysis/eval_distance.gp analysis/common.gp $(CONV_DIR)/eval_turns.csv
	$(call gnuplot_png,$<,$(CONV_DIR)/eval_turns.csv,$(CONV_EVAL_SUBTITLE))

# ---- make reuse ----

REUSE_DIR           ?= results/reuse
REUSE_CONVERSATIONS ?= 5000
REUSE_CAPACITIES    ?= 256MiB,1GiB,4GiB,16GiB
REUSE_SUBTITLE = $(REUSE_CONVERSATIONS) synthetic conversations (kvsim synth-workload), configs/reuse.ini

.PHONY: reuse
reuse: $(REUSE_DIR)/reuse.$(FORMAT) $(REUSE_DIR)/reuse_ttft.$(FORMAT)
plots: $(REUSE_DIR)/reuse.$(FORMAT) $(REUSE_DIR)/reuse_ttft.$(FORMAT)

$(REUSE_DIR)/chats.jsonl: | build
	@mkdir -p $(@D)
	$(KVSIM) synth-workload --out $@ --conversations $(REUSE_CONVERSATIONS)

$(REUSE_DIR)/reuse.csv: $(REUSE_DIR)/chats.jsonl configs/reuse.ini $(wildcard $(KVSIM)) | build
	$(KVSIM) reuse configs/reuse.ini --workload $< --capacity $(REUSE_CAPACITIES) --out $(@D) > $(@D)/reuse.log

# reuse_ttft.csv is written with reuse.csv (all of a run's files are renamed together).
$(REUSE_DIR)/reuse_ttft.csv: $(REUSE_DIR)/reuse.csv

$(REUSE_DIR)/reuse_ttft.$(FORMAT): analysis/reuse_ttft.gp analysis/common.gp $(REUSE_DIR)/reuse_ttft.csv
	$(call gnuplot_png,$<,$(REUSE_DIR)/reuse_ttft.csv,$(REUSE_SUBTITLE))

$(REUSE_DIR)/reuse.$(FORMAT): analysis/reuse.gp analysis/common.gp $(REUSE_DIR)/reuse.csv
	$(call gnuplot_png,$<,$(REUSE_DIR)/reuse.csv,$(REUSE_SUBTITLE))

# ---- make dataset ----

DATASET_DIR     ?= results/dataset
DATASET_PROMPTS ?= $(EVAL_PROMPTS)
DATASET_SIZE    ?= 10
DATASET_NAMES   := $(wordlist 1,$(DATASET_SIZE),$(basename $(notdir $(wildcard $(DATASET_PROMPTS)/*.txt))))
DATASET_TRACES  := $(foreach n,$(DATASET_NAMES),$(DATASET_DIR)/traces/$(n).h5)

DATASET_SUBTITLE = model $(notdir $(EVAL_MODEL)), $(words $(DATASET_TRACES)) traces of $(DATASET_PROMPTS)$(call budget_note,$(DATASET_DIR))

.PHONY: dataset
.PRECIOUS: $(DATASET_DIR)/traces/%.h5
dataset: $(DATASET_DIR)/dataset.$(FORMAT)

$(DATASET_DIR)/traces/%.h5: $(DATASET_PROMPTS)/%.txt $(EVAL_MODEL)/model.safetensors | build
	@mkdir -p $(@D)
	$(KVSIM) trace --model $(EVAL_MODEL) --prompt $< --out $@ --max-new 8 > /dev/null

# One run over every trace (a glob kvsim expands); the table it prints goes to run.log.
$(DATASET_DIR)/dataset.csv: $(DATASET_TRACES) $(DEFAULT_CONFIG) $(wildcard $(KVSIM)) | build
	$(KVSIM) run $(DEFAULT_CONFIG) $(foreach t,$(DATASET_TRACES),--trace $(t)) --out $(@D) > $(@D)/run.log

$(DATASET_DIR)/dataset.$(FORMAT): analysis/dataset.gp analysis/common.gp $(DATASET_DIR)/dataset.csv
	$(call gnuplot_png,$<,$(DATASET_DIR)/dataset.csv,$(DATASET_SUBTITLE))

FORCE:
