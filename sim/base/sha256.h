/* sha256.h — SHA-256 (FIPS 180-4), for the digests of the input files in run.json
 * (docs/metrics.md, "Provenance"). None of kvsim's dependencies exposes a SHA-256, so this is a
 * direct transcription of the standard: 64-byte blocks, big-endian words, the message padded
 * with 0x80, zeros and its length in bits. */
#ifndef KVSIM_SHA256_H
#define KVSIM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "sim/base/util.h"

typedef struct {
    uint32_t h[8];      /* the hash value H(i) */
    uint64_t n_bytes;   /* message bytes so far */
    uint8_t block[64];  /* the current block, filled to n_bytes % 64 */
} Sha256;

void sha256_init(Sha256 *s);
void sha256_update(Sha256 *s, const void *data, size_t n);
/* The digest as 64 lowercase hexadecimal digits and a NUL. */
void sha256_final_hex(Sha256 *s, char hex[65]);

/* The digest and size of a regular file, read in blocks: "PATH: ..." on an error. */
int sha256_file(const char *path, char hex[65], long long *size, KvErr *err);

#endif
