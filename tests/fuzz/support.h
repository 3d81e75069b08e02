/* support.h — what the fuzz harnesses share: kvsim's loaders read files, so each input is
 * written to a file of a private temporary directory (removed at exit) before it is loaded. */
#ifndef KVSIM_FUZZ_SUPPORT_H
#define KVSIM_FUZZ_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

/* Writes data to NAME in the harness's directory and returns the path (static storage, valid
 * until the next call with the same name slot: names are few and fixed per harness). */
const char *fuzz_write(const char *name, const uint8_t *data, size_t size);
/* The harness's directory. */
const char *fuzz_dir(void);

#endif
