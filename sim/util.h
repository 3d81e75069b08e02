/* util.h — the few things every kvsim module shares: error reporting, checked allocation,
 * atomic file output, and a monotonic clock.
 *
 * Errors: a function that can fail on bad input takes a KvErr* and returns -1 (or NULL) after
 * filling it with one line that names the file, dataset or line and says what was expected.
 * The command-line front end prints that line and exits with status 2. */
#ifndef KVSIM_UTIL_H
#define KVSIM_UTIL_H

#include <stddef.h>
#include <stdio.h>

typedef struct {
    char msg[1024];
} KvErr;

/* Formats a message into err (if not NULL) and returns -1, so callers can `return kv_fail(...)`. */
int kv_fail(KvErr *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Allocation that cannot fail: on exhaustion prints what was being allocated and exits(3).
 * Out of memory is not bad input; there is nothing useful a caller could do with it. */
void *kv_malloc(size_t n);
void *kv_calloc(size_t count, size_t size);
void *kv_realloc(void *p, size_t n);
char *kv_strdup(const char *s);

/* Atomic output: write to a temporary name in the target's directory, then rename over the
 * target, so that an interrupted run never leaves a half-written file behind. */
typedef struct {
    FILE *fp;
    char path[4096];
    char tmp_path[4096 + 16];
} AtomicFile;

int atomic_open(AtomicFile *af, const char *path, KvErr *err);
int atomic_commit(AtomicFile *af, KvErr *err); /* fclose + rename */
void atomic_abort(AtomicFile *af);             /* fclose + unlink the temporary */
/* The temporary name used for `path` by atomic output and by the trace writer. */
void atomic_tmp_name(const char *path, char *out, size_t outlen);

/* Creates a directory and its parents (like mkdir -p). */
int make_dirs(const char *path, KvErr *err);

double now_seconds(void); /* monotonic */

#endif
