#include "sim/base/provenance.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sim/base/sha256.h"
#include "sim/base/version.h"

struct Provenance {
    cJSON *root;
    cJSON *inputs;  /* array of {role, path, bytes, sha256} */
    double started; /* now_seconds() at the start */
};

/* The UTC wall clock as ISO 8601, to the second: "2026-12-02T19:20:00Z". */
static void utc_now(char out[32])
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

Provenance *provenance_begin(int argc, char **argv)
{
    Provenance *p = kv_calloc(1, sizeof *p);
    p->started = now_seconds();
    p->root = cJSON_CreateObject();
    cJSON_AddStringToObject(p->root, "kvsim_version", kvsim_version());
    cJSON *cmd = cJSON_AddArrayToObject(p->root, "command");
    cJSON_AddItemToArray(cmd, cJSON_CreateString("kvsim"));
    for (int i = 0; i < argc; i++)
        cJSON_AddItemToArray(cmd, cJSON_CreateString(argv[i]));
    char cwd[PATH_MAX];
    cJSON_AddStringToObject(p->root, "working_directory", getcwd(cwd, sizeof cwd) ? cwd : "");
    char now[32];
    utc_now(now);
    cJSON_AddStringToObject(p->root, "started", now);
    return p;
}

int provenance_config(Provenance *p, const char *path, KvErr *err)
{
    size_t len;
    char *text = kv_read_input(path, 0, &len, err);
    if (!text)
        return -1;
    cJSON *c = cJSON_AddObjectToObject(p->root, "config");
    cJSON_AddStringToObject(c, "path", path);
    cJSON_AddStringToObject(c, "text", text); /* a config holds no NUL byte (config_load) */
    free(text);
    return 0;
}

int provenance_input(Provenance *p, const char *role, const char *path, KvErr *err)
{
    char hex[65];
    long long size;
    if (sha256_file(path, hex, &size, err) != 0)
        return -1;
    if (!p->inputs)
        p->inputs = cJSON_AddArrayToObject(p->root, "inputs");
    cJSON *in = cJSON_CreateObject();
    cJSON_AddStringToObject(in, "role", role);
    cJSON_AddStringToObject(in, "path", path);
    cJSON_AddNumberToObject(in, "bytes", (double)size);
    cJSON_AddStringToObject(in, "sha256", hex);
    cJSON_AddItemToArray(p->inputs, in);
    return 0;
}

void provenance_number(Provenance *p, const char *key, double value)
{
    cJSON_AddNumberToObject(p->root, key, value);
}

void provenance_string(Provenance *p, const char *key, const char *value)
{
    cJSON_AddStringToObject(p->root, key, value);
}

int provenance_write(Provenance *p, const char *dir, KvErr *err)
{
    char now[32], path[4200];
    utc_now(now);
    cJSON_AddStringToObject(p->root, "finished", now);
    /* to the millisecond: more digits would be noise */
    cJSON_AddNumberToObject(p->root, "wall_seconds",
                            floor((now_seconds() - p->started) * 1000 + 0.5) / 1000);
    snprintf(path, sizeof path, "%s/run.json", dir);
    char *text = cJSON_Print(p->root);
    AtomicFile af;
    if (atomic_open(&af, path, err) != 0) {
        free(text);
        return -1;
    }
    fputs(text, af.fp);
    fputc('\n', af.fp);
    free(text);
    return atomic_commit(&af, err);
}

void provenance_free(Provenance *p)
{
    if (!p)
        return;
    cJSON_Delete(p->root);
    free(p);
}
