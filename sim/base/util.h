/* util.h — the few things every kvsim module shares: error reporting, checked allocation,
 * input files opened and read whole, atomic file output, and a monotonic clock.
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
int atomic_commit(AtomicFile *af, KvErr *err); /* atomic_close + atomic_publish */
void atomic_abort(AtomicFile *af);             /* fclose (if open) + unlink the temporary */
/* The two halves of atomic_commit, for a set of files that must appear together: close and
 * check every temporary first (a failure unlinks it), then rename each into place. */
int atomic_close(AtomicFile *af, KvErr *err);
int atomic_publish(AtomicFile *af, KvErr *err);
/* The temporary name used for `path` by atomic output and by the trace writer. */
void atomic_tmp_name(const char *path, char *out, size_t outlen);

/* Temporary files are removed when the process is interrupted: every temporary output is
 * registered while it exists (atomic_open and the trace writer do it), and the handlers that
 * kv_install_signal_cleanup() installs for SIGINT, SIGTERM and SIGHUP unlink the registered names
 * before the signal takes its default effect. At most KV_MAX_TEMPS at once. */
enum { KV_MAX_TEMPS = 16 };
void kv_install_signal_cleanup(void);
void kv_temp_register(const char *tmp_path);
void kv_temp_unregister(const char *tmp_path);

/* Opens an input file for reading; refuses anything but a regular file (a FIFO would block
 * forever, a directory reads as garbage): "PATH: not a regular file" / "PATH: cannot read: ...". */
FILE *kv_open_input(const char *path, KvErr *err);
/* The whole of a regular input file, NUL-terminated (an embedded NUL stays in; *len counts
 * every byte). Refuses files larger than max_bytes (0: no limit): "PATH: larger than N bytes".
 * Every input kvsim reads whole goes through here (JSON files through json_load_file,
 * sim/base/json.h). free() the result. */
char *kv_read_input(const char *path, size_t max_bytes, size_t *len, KvErr *err);

/* Copies at most n bytes of s into out (size outlen) so that it is safe inside a one-line
 * message: control bytes and backslashes become \n, \t, \\ or \xNN; cut with "..." when it
 * does not fit. Returns out. */
char *kv_escape(const char *s, size_t n, char *out, size_t outlen);

/* Creates a directory and its parents (like mkdir -p). */
int make_dirs(const char *path, KvErr *err);
/* Whether files can be created in an existing directory: "DIR: cannot write: ..." if not. */
int dir_writable(const char *dir, KvErr *err);

double now_seconds(void); /* monotonic */

#endif
