#include "sim/base/util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
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

/* ---- Temporary files removed on signals ----
 * The handler reads only this fixed table, and unlink() is async-signal-safe. A slot is
 * claimed by writing its name first and then setting `used`. */
static char temp_name[KV_MAX_TEMPS][4096 + 16];
static volatile sig_atomic_t temp_used[KV_MAX_TEMPS];

void kv_temp_register(const char *tmp_path)
{
    for (int i = 0; i < KV_MAX_TEMPS; i++)
        if (!temp_used[i]) {
            snprintf(temp_name[i], sizeof temp_name[i], "%s", tmp_path);
            temp_used[i] = 1;
            return;
        }
}

void kv_temp_unregister(const char *tmp_path)
{
    for (int i = 0; i < KV_MAX_TEMPS; i++)
        if (temp_used[i] && strcmp(temp_name[i], tmp_path) == 0) {
            temp_used[i] = 0;
            return;
        }
}

static void remove_temps_and_die(int sig)
{
    for (int i = 0; i < KV_MAX_TEMPS; i++)
        if (temp_used[i])
            unlink(temp_name[i]);
    signal(sig, SIG_DFL);
    raise(sig);
}

void kv_install_signal_cleanup(void)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = remove_temps_and_die;
        sigemptyset(&sa.sa_mask);
        sigaction(sigs[i], &sa, NULL);
    }
}

/* ---- Input files ---- */

FILE *kv_open_input(const char *path, KvErr *err)
{
    /* O_NONBLOCK: opening a FIFO for reading must not wait for a writer. */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        kv_fail(err, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        kv_fail(err, "%s: not a regular file", path);
        return NULL;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        kv_fail(err, "%s: cannot read: %s", path, strerror(errno));
    }
    return f;
}

char *kv_read_input(const char *path, size_t max_bytes, size_t *len, KvErr *err)
{
    FILE *f = kv_open_input(path, err);
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = kv_malloc(cap + 1);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = kv_realloc(buf, cap + 1);
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (max_bytes && n > max_bytes) {
            fclose(f);
            free(buf);
            kv_fail(err, "%s: larger than %zu bytes", path, max_bytes);
            return NULL;
        }
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        kv_fail(err, "%s: read error", path);
        return NULL;
    }
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

char *kv_escape(const char *s, size_t n, char *out, size_t outlen)
{
    size_t o = 0;
    if (outlen < 5) {
        if (outlen)
            out[0] = '\0';
        return out;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char piece[8];
        if (c == '\n')
            snprintf(piece, sizeof piece, "\\n");
        else if (c == '\t')
            snprintf(piece, sizeof piece, "\\t");
        else if (c == '\\')
            snprintf(piece, sizeof piece, "\\\\");
        else if (c < 0x20 || c == 0x7f)
            snprintf(piece, sizeof piece, "\\x%02x", c);
        else
            piece[0] = (char)c, piece[1] = '\0';
        size_t pl = strlen(piece);
        if (o + pl + 4 > outlen) { /* keep room for "..." and the NUL */
            memcpy(out + o, "...", 4);
            return out;
        }
        memcpy(out + o, piece, pl);
        o += pl;
    }
    out[o] = '\0';
    return out;
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
    kv_temp_register(af->tmp_path);
    return 0;
}

int atomic_close(AtomicFile *af, KvErr *err)
{
    int bad = ferror(af->fp);
    if (fclose(af->fp) != 0)
        bad = 1;
    af->fp = NULL;
    if (bad) {
        unlink(af->tmp_path);
        kv_temp_unregister(af->tmp_path);
        return kv_fail(err, "%s: write failed", af->path);
    }
    return 0;
}

int atomic_publish(AtomicFile *af, KvErr *err)
{
    if (rename(af->tmp_path, af->path) != 0) {
        int e = errno;
        unlink(af->tmp_path);
        kv_temp_unregister(af->tmp_path);
        return kv_fail(err, "%s: cannot rename temporary file into place: %s", af->path, strerror(e));
    }
    kv_temp_unregister(af->tmp_path);
    return 0;
}

int atomic_commit(AtomicFile *af, KvErr *err)
{
    if (atomic_close(af, err) != 0)
        return -1;
    return atomic_publish(af, err);
}

void atomic_abort(AtomicFile *af)
{
    if (af->fp)
        fclose(af->fp);
    af->fp = NULL;
    unlink(af->tmp_path);
    kv_temp_unregister(af->tmp_path);
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

int dir_writable(const char *dir, KvErr *err)
{
    /* access() would answer for the real user id and ignores read-only mounts: try it. */
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/.kvsim-write-probe.%ld", dir, (long)getpid());
    int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        return kv_fail(err, "%s: cannot write: %s", dir, strerror(errno));
    close(fd);
    unlink(probe);
    return 0;
}

double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
