# Thin wrapper over CMake for the targets users expect. See README.md.
BUILD      ?= build
SAN_BUILD  ?= build-san
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
KVSIM      := $(BUILD)/kvsim

# Debian packages kvsim builds and tests with.
DEB_PACKAGES := build-essential cmake pkg-config libhdf5-dev hdf5-tools libopenblas-dev \
                libgsl-dev libcmocka-dev libinih-dev libcjson-dev libpcre2-dev gnuplot-nox

.PHONY: all deps build install test test-release test-sanitize test-fuzz fuzz fuzz-deps run bench layers clean \
        test-slurm slurm-deps

all: build

# Installs missing Debian packages when run as root; otherwise prints the one command needed.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "kvsim needs these Debian packages: sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# Puts kvsim on the PATH: PREFIX/bin/kvsim (PREFIX=$$HOME/.local for a user install).
PREFIX ?= /usr/local
install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

$(SAN_BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKVSIM_SANITIZE=ON

# The test suite, twice (the release build, then the ASan+UBSan build), then every fuzz harness
# for a short time (FUZZ_TEST_SECONDS each), then a sharded sweep through a real Slurm.
test: test-release test-sanitize test-fuzz test-slurm

test-release: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-sanitize: deps $(SAN_BUILD)/CMakeCache.txt
	cmake --build $(SAN_BUILD) -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --test-dir $(SAN_BUILD) --output-on-failure -j $(JOBS)

# libFuzzer harnesses (tests/fuzz, docs/fuzzing.md): clang and its runtime from Debian.
FUZZ_BUILD        ?= build-fuzz
FUZZ_SECONDS      ?= 600
FUZZ_TEST_SECONDS ?= 45
FUZZ_JOBS         ?= $(JOBS)
FUZZ_PACKAGES     := clang libclang-rt-14-dev

fuzz-deps: deps
	@missing=$$(for p in $(FUZZ_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "fuzzing needs these Debian packages: sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

$(FUZZ_BUILD)/CMakeCache.txt: | fuzz-deps
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKVSIM_FUZZ=ON

# Every harness for FUZZ_SECONDS (a campaign; resumes from the corpus of the last one).
fuzz: fuzz-deps $(FUZZ_BUILD)/CMakeCache.txt
	cmake --build $(FUZZ_BUILD) -j $(JOBS)
	tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

test-fuzz: fuzz-deps $(FUZZ_BUILD)/CMakeCache.txt
	cmake --build $(FUZZ_BUILD) -j $(JOBS)
	tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_TEST_SECONDS) $(FUZZ_JOBS)

# A single-node Slurm started on this machine runs a sharded `kvsim sweep` as a job array with
# analysis/sweep.sbatch; `kvsim merge` must give the local sweep's files (docs/cluster.md). Needs
# root; skipped with a message otherwise (a failure when KVSIM_REQUIRE_SLURM=1, as in CI).
SLURM_PACKAGES := slurm-wlm munge

slurm-deps:
	@missing=$$(for p in $(SLURM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "test-slurm needs these Debian packages: sudo apt-get install -y $$missing"; \
	  fi; \
	fi

test-slurm: build slurm-deps
	tests/slurm/test_slurm.sh $(KVSIM)

# The main job on the embedded default: the committed tiny retrieval model (models/tiny-retrieval)
# traced on the committed held-out prompt, replayed through the configured policies.
DEFAULT_MODEL  ?= models/tiny-retrieval
DEFAULT_PROMPT ?= traces/prompts/default.txt
DEFAULT_TRACE  ?= traces/default.h5
DEFAULT_CONFIG ?= configs/ta512.ini

$(DEFAULT_TRACE): $(DEFAULT_PROMPT) $(DEFAULT_MODEL)/model.safetensors | build
	$(KVSIM) trace --model $(DEFAULT_MODEL) --prompt $(DEFAULT_PROMPT) --out $@ --max-new 32

run: build $(DEFAULT_TRACE)
	$(KVSIM) run $(DEFAULT_CONFIG) --trace $(DEFAULT_TRACE)
	$(MAKE) --no-print-directory run-plot

# Benchmarks: the traces and checkpoints they use are written once into the build directory.
# The generator's PyTorch reference needs python3-torch (installed here when run as root).
# Then bench/sweep.sh: make sweep's one-pass `kvsim sweep` against a `kvsim run` per budget;
# bench/sweep_nested.sh: window and oracle_topk at 20 budgets against one budget.
bench: build $(DEFAULT_TRACE)
	@dpkg -s python3-torch >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-torch
	cd $(BUILD) && ./bench_replay bench-1b.h5 $(CURDIR)/bench/replay.ini $(CURDIR)/configs/ta512.ini; \
	  replay=$$?; cd $(CURDIR) && bench/generator.sh $(BUILD) 2; generator=$$?; \
	  $(BUILD)/bench_weights16 $(BUILD)/bench-1b-bf16 --threads 2; weights16=$$?; \
	  bench/sweep.sh $(KVSIM) $(SWEEP_CONFIG) $(DEFAULT_TRACE) "$(SWEEP_SORTED)" 2; \
	  sweep=$$?; bench/sweep_nested.sh $(KVSIM) 2; \
	  exit $$(( replay || generator || weights16 || sweep || $$? ))

# The request-level simulator's benchmark (bench/bench_reuse.c): its synthetic log of
# BENCH_REUSE_CONVERSATIONS conversations (about 4 requests each) is written once into the
# build directory; exits non-zero when a target is missed.
BENCH_REUSE_CONVERSATIONS ?= 250000
.PHONY: bench-reuse
bench: bench-reuse
bench-reuse: build
	cd $(BUILD) && ./bench_reuse $(BENCH_REUSE_CONVERSATIONS)

# The include graph, file by file with the layer of each side (docs/layout.md); fails on an
# include that runs upward.
layers:
	@tests/check_layers.sh -v .

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(FUZZ_BUILD)

# Budget sweeps and plots (make sweep, make plots).
-include analysis/analysis.mk
