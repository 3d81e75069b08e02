/* The INI run configuration (sim/replay/config.c): any bytes as a config file must load or fail with
 * one line, never crash, read out of bounds or leak. */
#include <stdint.h>
#include <string.h>

#include "sim/replay/config.h"
#include "tests/fuzz/support.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write("run.ini", data, size);
    RunConfig rc;
    KvErr err;
    if (config_load(path, &rc, &err) == 0)
        config_free(&rc);
    else if (strchr(err.msg, '\n'))
        __builtin_trap(); /* errors are one line */
    return 0;
}
