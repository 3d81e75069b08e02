/* safetensors.h — read-only, memory-mapped access to Hugging Face safetensors checkpoints.
 *
 * A checkpoint directory holds either one `model.safetensors` or several shards listed by
 * `model.safetensors.index.json` (its "weight_map" names the shard of every tensor). Each file
 * is an 8-byte little-endian header length, a JSON header mapping tensor names to
 * {dtype, shape, data_offsets}, then the data area.
 *
 * Everything the header claims is checked against the file before any byte of data is touched,
 * with the rules of the reference implementation (huggingface/safetensors,
 * safetensors/src/tensor.rs: SafeTensors::read_metadata and Metadata::validate): header length
 * at most 100,000,000 and within the file, UTF-8 JSON object, "__metadata__" a map of strings,
 * supported dtype, byte size = product(shape) x dtype size, and the tensors, sorted by
 * data_offsets, tile the data area exactly (each begins where the previous one ends, the first
 * at 0, the last ends at the end of the file: no overlap or aliasing, no gap, no trailing bytes,
 * so a wrong header length cannot shift the tensors). A tensor name appears once. Only regular
 * files are opened (a FIFO or a directory is refused at once). A lie is a one-line error naming
 * the file and the tensor (escaped: names may hold any character), never an out-of-bounds
 * read. */
#ifndef KVSIM_SAFETENSORS_H
#define KVSIM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "sim/base/util.h"

#define SAFETENSORS_MAX_DIMS 8

/* ST_U32: packed quantized weights (MLX); safetensors_to_f32 does not take it. */
typedef enum { ST_F32 = 0, ST_F16 = 1, ST_BF16 = 2, ST_U32 = 3 } SafetensorsDtype;

typedef struct {
    char *name;
    SafetensorsDtype dtype;
    int n_dims;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    int64_t n_elements;
    const unsigned char *data; /* inside the mapping of its file */
    size_t n_bytes;
    const char *file; /* path of the file that holds it */
} SafetensorsTensor;

typedef struct {
    int n_files;
    char **file_paths;
    void **maps;
    size_t *map_sizes;
    int n_tensors;
    SafetensorsTensor *tensors; /* sorted by name */
} SafetensorsCheckpoint;

/* Opens the weights of a checkpoint directory: model.safetensors.index.json when present,
 * else model.safetensors. */
SafetensorsCheckpoint *safetensors_open_dir(const char *dir, KvErr *err);
/* Opens explicit files (the shards of one checkpoint); a tensor name may appear only once. */
SafetensorsCheckpoint *safetensors_open_files(int n_files, const char *const *paths, KvErr *err);
void safetensors_close(SafetensorsCheckpoint *ck);

/* NULL when absent. */
const SafetensorsTensor *safetensors_find(const SafetensorsCheckpoint *ck, const char *name);

const char *safetensors_dtype_name(SafetensorsDtype dtype);
size_t safetensors_dtype_size(SafetensorsDtype dtype);

/* Converts the tensor's elements to float32 (out holds n_elements), exactly (sim/base/half.h). */
void safetensors_to_f32(const SafetensorsTensor *t, float *out);

#endif
