#include "sim/util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int kv_fail(KvErr *err, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static void out_of_memory(size_t n)
{
    fprintf(stderr, "kvsim: out of memory allocating %zu bytes\n", n);
    exit(3);
}

void *kv_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        out_of_memory(n);
    return p;
}

void *kv_calloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        out_of_memory(count * size);
    return p;
}

void *kv_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        out_of_memory(n);
    return q;
}

char *kv_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = kv_malloc(n);
    memcpy(d, s, n);
    return d;
}

void atomic_tmp_name(const char *path, char *out, size_t outlen)
{
    /* Same directory as the target so that rename() never crosses file systems. */
    snprintf(out, outlen, "%s.%ld.tmp", path, (long)getpid());
}

int atomic_open(AtomicFile *af, const char *path, KvErr *err)
{
    memset(af, 0, sizeof *af);
    if (strlen(path) >= sizeof af->path)
        return kv_fail(err, "%s: path too long", path);
    strcpy(af->path, path);
    atomic_tmp_name(path, af->tmp_path, sizeof af->tmp_path);
    af->fp = fopen(af->tmp_path, "w");
    if (!af->fp)
        return kv_fail(err, "%s: cannot write: %s", path, strerror(errno));
    return 0;
}

int atomic_commit(AtomicFile *af, KvErr *err)
{
    int bad = ferror(af->fp);
    if (fclose(af->fp) != 0)
        bad = 1;
    af->fp = NULL;
    if (bad) {
        unlink(af->tmp_path);
        return kv_fail(err, "%s: write failed", af->path);
    }
    if (rename(af->tmp_path, af->path) != 0) {
        int e = errno;
        unlink(af->tmp_path);
        return kv_fail(err, "%s: cannot rename temporary file into place: %s", af->path, strerror(e));
    }
    return 0;
}

void atomic_abort(AtomicFile *af)
{
    if (af->fp)
        fclose(af->fp);
    af->fp = NULL;
    unlink(af->tmp_path);
}

int make_dirs(const char *path, KvErr *err)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return kv_fail(err, "invalid directory name '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return kv_fail(err, "%s: cannot create directory: %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return kv_fail(err, "%s: not a directory", path);
    return 0;
}

double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
