/* reqlog.h — request logs of LLM serving (docs/workload-format.md): one JSON object per line,
 * read line by line (plain or gzip, through zlib), never loaded whole.
 *
 * Two formats:
 * - qwen: the Qwen/Bailian usage traces: chat_id, parent_chat_id (-1 for a conversation's first
 *   request), timestamp (seconds), input_length, output_length, type, turn, hash_ids (one id per
 *   16-token block of the input); optionally model (an integer: kvsim synth-workload's
 *   extension, the model that served the request).
 * - mooncake: Mooncake's traces: timestamp (milliseconds), input_length, output_length,
 *   hash_ids (one id per 512-token block). No conversations.
 *
 * Errors are one line naming the file and line and what was expected: "PATH:LINE: not valid
 * JSON", "PATH:LINE: missing field 'hash_ids'", "PATH:LINE: input_length: expected an integer
 * >= 0, found -3", "PATH:LINE: timestamp 1.5 is before the previous request's 2", ... */
#ifndef KVSIM_REQLOG_H
#define KVSIM_REQLOG_H

#include <stdbool.h>
#include <stdint.h>

#include "sim/base/util.h"

typedef enum { REQLOG_AUTO, REQLOG_QWEN, REQLOG_MOONCAKE } ReqlogFormat;

/* Tokens per hash_ids block of each format, as published. */
enum { REQLOG_QWEN_BLOCK = 16, REQLOG_MOONCAKE_BLOCK = 512 };

typedef struct {
    int64_t chat_id, parent_chat_id; /* -1 when absent (mooncake; a first turn) */
    double timestamp;                /* seconds since the log's start */
    int64_t input_length, output_length;
    int64_t turn;                    /* 0 when absent (mooncake) */
    char type[32];                   /* "" when absent */
    int64_t model;                   /* qwen's optional "model" (0 when absent): the model that
                                      * served the request, 0 .. 2^31-1 */
    const int64_t *hash_ids;         /* owned by the reader, valid until the next call */
    long n_hash;
    long line;                       /* 1-based line of the record */
} ReqRecord;

typedef struct ReqReader ReqReader;

/* Opens a log; REQLOG_AUTO decides by the first record (chat_id present: qwen). */
ReqReader *reqlog_open(const char *path, ReqlogFormat format, KvErr *err);
/* The next record: 1, 0 at the end, -1 after an error (a line that is not a request of the
 * format, or a timestamp before the previous record's). Blank lines are skipped. */
int reqlog_next(ReqReader *r, ReqRecord *rec, KvErr *err);
/* The format of a log: `format` itself, or under REQLOG_AUTO the first record's (qwen for an
 * empty log). Errors as reqlog_next's on the first record. */
int reqlog_detect(const char *path, ReqlogFormat format, ReqlogFormat *out, KvErr *err);
/* Every line through cJSON, none through the fast path (for measuring the fast path). */
void reqlog_general_only(ReqReader *r);
/* The format in use (after the first record under REQLOG_AUTO). */
ReqlogFormat reqlog_format(const ReqReader *r);
/* The file's bytes read so far, in MiB (for gzip, of the compressed file), and its size: a
 * progress line's position. */
long reqlog_read_mib(const ReqReader *r);
long reqlog_size_mib(const ReqReader *r);
void reqlog_close(ReqReader *r);

/* A log in memory in the form the simulator replays: hash ids remapped to dense block ids
 * 0..n_blocks-1 in order of first appearance, each request's parent as a request index. */
typedef struct {
    long n;                  /* requests */
    int64_t *off;            /* [n + 1]: request i's blocks are ids[off[i] .. off[i+1]) */
    uint32_t *ids;
    uint32_t n_blocks;       /* distinct hash ids */
    int64_t *input, *output; /* [n] tokens */
    int32_t *turn;           /* [n] */
    int32_t *parent;         /* [n] index of the request whose chat_id is this one's
                              * parent_chat_id (the latest before it), -1 when none */
    double *timestamp;       /* [n] seconds */
    int32_t *model;          /* [n] the record's model (0 when absent) */
    int32_t *conv;           /* [n] its conversation: 0, 1, ... in order of first requests
                              * (a request without a parent starts one) */
    int32_t n_conv;
    ReqlogFormat format;
    int block_tokens;        /* tokens per block */
} ReqLog;

/* Reads a whole log (streamed) into `log`: at most 2147483645 requests and 1073741820
 * distinct hash ids ("PATH:LINE: more than ..." otherwise). block_tokens 0: the format's own. progress: a
 * progress line on stderr. */
int reqlog_load(const char *path, ReqlogFormat format, int block_tokens, bool progress,
                ReqLog *log, KvErr *err);
void reqlog_free(ReqLog *log);

/* An open-addressing map from int64 keys to uint32 values, for ids of the logs. */
typedef struct {
    int64_t *keys;
    uint32_t *vals;
    uint8_t *used;
    size_t cap, n;
} IdMap;

void idmap_init(IdMap *m);
void idmap_free(IdMap *m);
/* The value of key, or UINT32_MAX when absent. */
uint32_t idmap_get(const IdMap *m, int64_t key);
void idmap_put(IdMap *m, int64_t key, uint32_t val);

#endif
