/* provenance.h — run.json, the record of how an output directory was made (docs/metrics.md,
 * "Provenance"): the kvsim version, the command line, the config's path and text, every input
 * file's path, size and SHA-256, the settings that shape the results (seed, threads) and the
 * wall-clock start and end. The CSVs beside it hold no time and no path, so that they stay
 * byte-identical from run to run and at any thread count; what differs between two runs of the
 * same inputs is here. Written with cJSON under a temporary name and renamed. */
#ifndef KVSIM_PROVENANCE_H
#define KVSIM_PROVENANCE_H

#include "sim/base/util.h"

typedef struct Provenance Provenance;

/* Starts the record at the command's start (UTC wall clock): the version (sim/base/version.h),
 * the working directory and the command line, "kvsim" followed by the subcommand's argv. */
Provenance *provenance_begin(int argc, char **argv);
/* The config file: its path and its text, read again. */
int provenance_config(Provenance *p, const char *path, KvErr *err);
/* An input file, in order: role ("trace", "calibration", "model", "prompt", ...), path, size in
 * bytes and SHA-256. */
int provenance_input(Provenance *p, const char *role, const char *path, KvErr *err);
/* A setting, as a number or a string, in the order given. */
void provenance_number(Provenance *p, const char *key, double value);
void provenance_string(Provenance *p, const char *key, const char *value);
/* Records the end (UTC wall clock, and the seconds since the start) and writes DIR/run.json. */
int provenance_write(Provenance *p, const char *dir, KvErr *err);
void provenance_free(Provenance *p);

#endif
