#include "tests/support/scratch.h"

#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "sim/base/util.h"

char *scratch_create(void)
{
    const char *base = getenv("TMPDIR");
    char templ[4096];
    snprintf(templ, sizeof templ, "%s/kvsim-test-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(templ))
        fail_msg("mkdtemp %s failed", templ);
    return kv_strdup(templ);
}

int scratch_count(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        fail_msg("cannot list %s", dir);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

void scratch_remove(char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        char path[8192];
        for (struct dirent *e; (e = readdir(d));) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

const char *scratch_path(const char *dir, const char *name, int slot)
{
    static char bufs[4][8192];
    snprintf(bufs[slot & 3], sizeof bufs[0], "%s/%s", dir, name);
    return bufs[slot & 3];
}

char *scratch_read(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return kv_strdup("");
    size_t cap = 4096, n = 0;
    char *buf = kv_malloc(cap);
    for (size_t got; (got = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += got;
        if (cap - n - 1 == 0)
            buf = kv_realloc(buf, cap *= 2);
    }
    buf[n] = '\0';
    fclose(f);
    return buf;
}

KvsimRun run_command(const char *command)
{
    char *dir = scratch_create();
    char out_path[8192], err_path[8192];
    snprintf(out_path, sizeof out_path, "%s/stdout", dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", dir);
    size_t len = strlen(command) + strlen(out_path) + strlen(err_path) + 32;
    char *cmd = kv_malloc(len);
    snprintf(cmd, len, "%s >'%s' 2>'%s'", command, out_path, err_path);
    int raw = system(cmd);
    free(cmd);
    KvsimRun r;
    r.status = raw != -1 && WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    r.out = scratch_read(out_path);
    r.err = scratch_read(err_path);
    scratch_remove(dir);
    return r;
}

KvsimRun run_kvsim(const char *args)
{
    const char *bin = getenv("KVSIM_BIN");
    if (!bin || !*bin)
        fail_msg("KVSIM_BIN is not set (run the tests through ctest)");
    size_t len = strlen(bin) + strlen(args) + 8;
    char *cmd = kv_malloc(len);
    snprintf(cmd, len, "'%s' %s", bin, args);
    KvsimRun r = run_command(cmd);
    free(cmd);
    return r;
}

void kvsim_run_free(KvsimRun *r)
{
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

void scratch_write(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        fail_msg("cannot write %s", path);
    fputs(text, f);
    if (fclose(f) != 0)
        fail_msg("cannot write %s", path);
}

void run_kvsim_fails(const char *args, ...)
{
    KvsimRun r = run_kvsim(args);
    if (r.status != 2 || count_lines(r.err) != 1)
        fail_msg("kvsim %s: expected exit 2 and one line, got %d: '%s'", args, r.status, r.err);
    va_list ap;
    va_start(ap, args);
    for (const char *want = va_arg(ap, const char *); want; want = va_arg(ap, const char *))
        if (!strstr(r.err, want))
            fail_msg("kvsim %s: '%s' does not mention '%s'", args, r.err, want);
    va_end(ap);
    kvsim_run_free(&r);
}

KvsimRun run_kvsim_ok(const char *fmt, ...)
{
    char args[16384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    KvsimRun r = run_kvsim(args);
    if (r.status != 0)
        fail_msg("kvsim %s: exit %d: %s", args, r.status, r.err);
    return r;
}
