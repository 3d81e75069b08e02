#include "tests/fuzz/support.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { MAX_FILES = 8 };
static char dir[256];
static char paths[MAX_FILES][512];

static void remove_dir(void)
{
    for (int i = 0; i < MAX_FILES; i++)
        if (paths[i][0])
            unlink(paths[i]);
    rmdir(dir);
}

const char *fuzz_dir(void)
{
    if (!dir[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/kvsim-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(dir)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(remove_dir);
    }
    return dir;
}

const char *fuzz_write(const char *name, const uint8_t *data, size_t size)
{
    const char *d = fuzz_dir();
    int slot = -1;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", d, name);
    for (int i = 0; i < MAX_FILES && slot < 0; i++)
        if (!paths[i][0] || strcmp(paths[i], path) == 0)
            slot = i;
    if (slot < 0)
        abort();
    snprintf(paths[slot], sizeof paths[slot], "%s", path);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) {
        perror("fuzz: write");
        abort();
    }
    return paths[slot];
}
