/* safetensors files (traces/model/safetensors.c): the header's JSON, dtypes, shapes and data offsets.
 * Any bytes open or fail with one line; every tensor of a file that opens converts to float32
 * within the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "traces/model/safetensors.h"
#include "tests/fuzz/support.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write("model.safetensors", data, size);
    KvErr err;
    SafetensorsCheckpoint *ck = safetensors_open_files(1, &path, &err);
    if (!ck) {
        if (strchr(err.msg, '\n'))
            __builtin_trap();
        return 0;
    }
    for (int i = 0; i < ck->n_tensors; i++) {
        const SafetensorsTensor *t = &ck->tensors[i];
        if (t->n_elements > (1 << 22))
            continue;
        float *out = kv_malloc((size_t)(t->n_elements ? t->n_elements : 1) * sizeof *out);
        safetensors_to_f32(t, out);
        free(out);
    }
    safetensors_close(ck);
    return 0;
}
