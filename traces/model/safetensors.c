#include "traces/model/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "sim/base/half.h"
#include "sim/base/json.h"

/* The reference implementation caps the header at 100,000,000 bytes (MAX_HEADER_SIZE in
 * huggingface/safetensors, safetensors/src/tensor.rs); anything larger is a corrupt length. */
#define HEADER_MAX_BYTES UINT64_C(100000000)

/* Header text (tensor names, dtype strings) echoed in a message: one line, bounded. */
#define ESC(s, buf) kv_escape((s), strlen(s), (buf), sizeof(buf))

const char *safetensors_dtype_name(SafetensorsDtype dtype)
{
    switch (dtype) {
    case ST_F32: return "F32";
    case ST_F16: return "F16";
    case ST_BF16: return "BF16";
    case ST_U32: return "U32";
    }
    return "?";
}

size_t safetensors_dtype_size(SafetensorsDtype dtype)
{
    return dtype == ST_F32 || dtype == ST_U32 ? 4 : 2;
}

void safetensors_to_f32(const SafetensorsTensor *t, float *out)
{
    size_t n = (size_t)t->n_elements;
    if (t->dtype == ST_F32) {
        memcpy(out, t->data, n * sizeof(float));
        return;
    }
    /* The data area is not necessarily 2-byte aligned, hence the byte-wise loads (little endian). */
    const unsigned char *p = t->data;
    for (size_t i = 0; i < n; i++) {
        uint16_t half = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
        out[i] = t->dtype == ST_F16 ? float_from_half(half) : float_from_bf16(half);
    }
}

static int parse_dtype(const char *s, SafetensorsDtype *out)
{
    if (!strcmp(s, "F32")) *out = ST_F32;
    else if (!strcmp(s, "F16")) *out = ST_F16;
    else if (!strcmp(s, "BF16")) *out = ST_BF16;
    else if (!strcmp(s, "U32")) *out = ST_U32;
    else return -1;
    return 0;
}

/* A JSON number that is an exact non-negative integer below 2^53. */
static int json_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item))
        return -1;
    double d = item->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != floor(d))
        return -1;
    *out = (uint64_t)d;
    return 0;
}

/* Validates one header entry against the data area [0, data_size) and fills t (t->data points
 * at its first byte, so that begin = t->data - data). */
static int parse_tensor(const char *path, const cJSON *entry, const unsigned char *data,
                        uint64_t data_size, SafetensorsTensor *t, KvErr *err)
{
    char name[256], text[64];
    ESC(entry->string, name);
    if (!cJSON_IsObject(entry))
        return kv_fail(err, "%s: tensor '%s': header entry is not an object", path, name);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsString(dtype) || !cJSON_IsArray(shape) || !cJSON_IsArray(offsets))
        return kv_fail(err, "%s: tensor '%s': header entry needs string 'dtype', arrays 'shape' "
                       "and 'data_offsets'", path, name);
    if (parse_dtype(dtype->valuestring, &t->dtype) != 0)
        return kv_fail(err, "%s: tensor '%s': unsupported dtype '%s' (supported: F32, F16, BF16; "
                       "U32 for MLX-quantized weights)",
                       path, name, ESC(dtype->valuestring, text));
    int n_dims = cJSON_GetArraySize(shape);
    if (n_dims > SAFETENSORS_MAX_DIMS)
        return kv_fail(err, "%s: tensor '%s': %d dimensions, at most %d supported", path, name,
                       n_dims, SAFETENSORS_MAX_DIMS);
    t->n_dims = n_dims;
    /* product(shape) below 2^53, so that times the dtype size it cannot overflow (the
     * reference's checked_mul, ValidationOverflow). */
    uint64_t n_elements = 1;
    for (int d = 0; d < n_dims; d++) {
        uint64_t extent;
        if (json_uint(cJSON_GetArrayItem(shape, d), &extent) != 0)
            return kv_fail(err, "%s: tensor '%s': shape[%d] is not a non-negative integer", path,
                           name, d);
        if (extent != 0 && n_elements > (UINT64_C(1) << 53) / extent)
            return kv_fail(err, "%s: tensor '%s': shape too large (more than 2^53 elements)",
                           path, name);
        n_elements *= extent;
        t->shape[d] = (int64_t)extent;
    }
    uint64_t begin, end;
    if (cJSON_GetArraySize(offsets) != 2 || json_uint(cJSON_GetArrayItem(offsets, 0), &begin) != 0 ||
        json_uint(cJSON_GetArrayItem(offsets, 1), &end) != 0 || begin > end)
        return kv_fail(err, "%s: tensor '%s': data_offsets must be two ordered non-negative "
                       "integers", path, name);
    if (end > data_size)
        return kv_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the "
                       "data area (%llu bytes; file truncated?)", path, name,
                       (unsigned long long)begin, (unsigned long long)end,
                       (unsigned long long)data_size);
    uint64_t expected = n_elements * safetensors_dtype_size(t->dtype);
    if (end - begin != expected)
        return kv_fail(err, "%s: tensor '%s': data_offsets span %llu bytes, shape and dtype %s "
                       "need %llu", path, name, (unsigned long long)(end - begin),
                       safetensors_dtype_name(t->dtype), (unsigned long long)expected);
    t->n_elements = (int64_t)n_elements;
    t->data = data + begin;
    t->n_bytes = (size_t)expected;
    t->name = kv_strdup(entry->string);
    return 0;
}

static int compare_tensor_names(const void *a, const void *b)
{
    return strcmp(((const SafetensorsTensor *)a)->name, ((const SafetensorsTensor *)b)->name);
}

typedef struct {
    uint64_t begin, end;
    const char *name;
} Span;

static int compare_spans(const void *a, const void *b)
{
    const Span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The reference implementation's layout rule (huggingface/safetensors,
 * safetensors/src/tensor.rs: Metadata's TryFrom<HashMetadata> sorts the tensors by
 * data_offsets, Metadata::validate walks them and requires each to begin exactly where the
 * previous one ended, starting at 0 (else InvalidOffset), and read_metadata requires the last
 * end to be the end of the file (8 + header length + last end == file size, else
 * MetadataIncompleteBuffer)). So the tensors tile the data area: no overlap or aliasing, no
 * unused gap, no trailing bytes. A header length that is off by a few bytes but still ends in
 * the JSON's padding shifts every tensor, and is caught by the last rule. */
static int check_layout(const char *path, const SafetensorsTensor *tensors, int n,
                        const unsigned char *data, uint64_t data_size, KvErr *err)
{
    Span *spans = kv_malloc((size_t)(n ? n : 1) * sizeof *spans);
    for (int i = 0; i < n; i++) {
        spans[i].begin = (uint64_t)(tensors[i].data - data);
        spans[i].end = spans[i].begin + tensors[i].n_bytes;
        spans[i].name = tensors[i].name;
    }
    if (n > 0)
        qsort(spans, (size_t)n, sizeof *spans, compare_spans);
    uint64_t at = 0;
    int rc = 0;
    char name[256], other[256];
    for (int i = 0; i < n && rc == 0; i++) {
        const Span *s = &spans[i];
        if (s->begin < at)
            rc = kv_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] overlap those of "
                         "tensor '%s' [%llu, %llu] (every byte of the data area belongs to one "
                         "tensor)", path, ESC(s->name, name), (unsigned long long)s->begin,
                         (unsigned long long)s->end, ESC(spans[i - 1].name, other),
                         (unsigned long long)spans[i - 1].begin,
                         (unsigned long long)spans[i - 1].end);
        else if (s->begin > at)
            rc = kv_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] leave bytes [%llu, "
                         "%llu) of the data area to no tensor (the tensors must be contiguous)",
                         path, ESC(s->name, name), (unsigned long long)s->begin,
                         (unsigned long long)s->end, (unsigned long long)at,
                         (unsigned long long)s->begin);
        at = s->end;
    }
    if (rc == 0 && at != data_size)
        rc = kv_fail(err, "%s: the tensors' data ends at byte %llu of a %llu-byte data area "
                     "(wrong header length, or trailing bytes)", path, (unsigned long long)at,
                     (unsigned long long)data_size);
    free(spans);
    return rc;
}

/* "__metadata__" is a map of strings to strings (HashMetadata in the reference). */
static int check_metadata(const char *path, const cJSON *meta, KvErr *err)
{
    if (!cJSON_IsObject(meta))
        return kv_fail(err, "%s: header entry '__metadata__' must be an object of strings", path);
    const cJSON *item;
    cJSON_ArrayForEach(item, meta)
    {
        if (!cJSON_IsString(item)) {
            char key[256];
            return kv_fail(err, "%s: header entry '__metadata__': '%s' must be a string", path,
                           ESC(item->string, key));
        }
    }
    return 0;
}

/* Maps one file and appends its tensors to ck. */
static int add_file(SafetensorsCheckpoint *ck, const char *path, KvErr *err)
{
    /* kv_open_input refuses FIFOs and directories without blocking. */
    FILE *fp = kv_open_input(path, err);
    if (!fp)
        return -1;
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        fclose(fp);
        return kv_fail(err, "%s: cannot read: %s", path, strerror(errno));
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        fclose(fp);
        return kv_fail(err, "%s: truncated safetensors file (%zu bytes, the header length alone "
                       "needs 8)", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fileno(fp), 0);
    int map_errno = errno;
    fclose(fp);
    if (map == MAP_FAILED)
        return kv_fail(err, "%s: cannot map: %s", path, strerror(map_errno));
    int slot = ck->n_files++;
    ck->file_paths = kv_realloc(ck->file_paths, (size_t)ck->n_files * sizeof *ck->file_paths);
    ck->maps = kv_realloc(ck->maps, (size_t)ck->n_files * sizeof *ck->maps);
    ck->map_sizes = kv_realloc(ck->map_sizes, (size_t)ck->n_files * sizeof *ck->map_sizes);
    ck->file_paths[slot] = kv_strdup(path);
    ck->maps[slot] = map;
    ck->map_sizes[slot] = size;

    const unsigned char *bytes = map;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = (header_len << 8) | bytes[i];
    if (header_len > HEADER_MAX_BYTES)
        return kv_fail(err, "%s: header length %llu exceeds the format's limit of %llu bytes "
                       "(corrupt, or not safetensors)", path, (unsigned long long)header_len,
                       (unsigned long long)HEADER_MAX_BYTES);
    if (header_len < 2 || header_len > size - 8)
        return kv_fail(err, "%s: header length %llu is impossible for a %zu-byte file "
                       "(truncated or not safetensors)", path, (unsigned long long)header_len,
                       size);
    const char *problem;
    size_t bad_at = json_text_check((const char *)bytes + 8, (size_t)header_len, &problem);
    if (problem)
        return kv_fail(err, "%s: header byte %zu: %s (the header must be UTF-8 JSON)", path,
                       bad_at, problem);
    cJSON *header = json_parse_exact((const char *)bytes + 8, (size_t)header_len, NULL, NULL);
    if (!header || !cJSON_IsObject(header)) {
        cJSON_Delete(header);
        return kv_fail(err, "%s: header is not a valid JSON object", path);
    }
    const unsigned char *data = bytes + 8 + header_len;
    uint64_t data_size = size - 8 - header_len;
    int first = ck->n_tensors, n_entries = cJSON_GetArraySize(header);
    ck->tensors = kv_realloc(ck->tensors, (size_t)(first + n_entries + 1) * sizeof *ck->tensors);
    int rc = 0;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, header)
    {
        if (!strcmp(entry->string, "__metadata__")) {
            if ((rc = check_metadata(path, entry, err)) != 0)
                break;
            continue;
        }
        SafetensorsTensor *t = &ck->tensors[ck->n_tensors];
        memset(t, 0, sizeof *t);
        if (parse_tensor(path, entry, data, data_size, t, err) != 0) {
            rc = -1;
            break;
        }
        t->file = ck->file_paths[slot];
        ck->n_tensors++;
    }
    cJSON_Delete(header);
    if (rc == 0)
        rc = check_layout(path, ck->tensors + first, ck->n_tensors - first, data, data_size, err);
    return rc;
}

/* Sorts the tensors and rejects a name that appears in two places. */
static int index_tensors(SafetensorsCheckpoint *ck, KvErr *err)
{
    if (ck->n_tensors == 0)
        return 0; /* qsort and bsearch want a non-NULL array */
    qsort(ck->tensors, (size_t)ck->n_tensors, sizeof *ck->tensors, compare_tensor_names);
    char name[256];
    for (int i = 1; i < ck->n_tensors; i++) {
        const SafetensorsTensor *a = &ck->tensors[i - 1], *b = &ck->tensors[i];
        if (strcmp(a->name, b->name) != 0)
            continue;
        if (a->file == b->file)
            return kv_fail(err, "%s: tensor '%s' appears twice in the header", b->file,
                           ESC(b->name, name));
        return kv_fail(err, "%s: tensor '%s' also appears in %s", b->file, ESC(b->name, name),
                       a->file);
    }
    return 0;
}

SafetensorsCheckpoint *safetensors_open_files(int n_files, const char *const *paths, KvErr *err)
{
    SafetensorsCheckpoint *ck = kv_calloc(1, sizeof *ck);
    for (int i = 0; i < n_files; i++)
        if (add_file(ck, paths[i], err) != 0) {
            safetensors_close(ck);
            return NULL;
        }
    if (index_tensors(ck, err) != 0) {
        safetensors_close(ck);
        return NULL;
    }
    return ck;
}

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A shard name from the index: a plain file name in the checkpoint directory. */
static int valid_shard_name(const char *s)
{
    if (!s[0] || !strcmp(s, ".") || !strcmp(s, "..") || strchr(s, '/'))
        return 0;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        if (*c < 0x20 || *c == 0x7f)
            return 0;
    return 1;
}

/* Sharded checkpoint: the shards named by weight_map, each opened once; every tensor of the
 * map must be in the shard the map names. */
static SafetensorsCheckpoint *open_index(const char *dir, const char *index_path, KvErr *err)
{
    cJSON *index = json_load_file(index_path, JSON_OBJECT | JSON_UNIQUE_KEYS, err);
    if (!index)
        return NULL;
    const cJSON *weight_map = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
    if (!cJSON_IsObject(weight_map)) {
        cJSON_Delete(index);
        kv_fail(err, "%s: not valid JSON with a 'weight_map' object", index_path);
        return NULL;
    }
    int n_shards = 0;
    char **shards = kv_malloc((size_t)(cJSON_GetArraySize(weight_map) + 1) * sizeof *shards);
    const cJSON *entry;
    int bad = 0;
    char name[256], value[256];
    cJSON_ArrayForEach(entry, weight_map)
    {
        if (!cJSON_IsString(entry) || !valid_shard_name(entry->valuestring)) {
            kv_fail(err, "%s: weight_map['%s'] must be a file name in the same directory",
                    index_path, ESC(entry->string, name));
            bad = 1;
            break;
        }
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, entry->valuestring) >= (int)sizeof path) {
            kv_fail(err, "%s: weight_map['%s']: path too long", index_path,
                    ESC(entry->string, name));
            bad = 1;
            break;
        }
        shards[n_shards++] = kv_strdup(path);
    }
    /* Each shard once (sorted, so that a large map costs n log n). */
    if (n_shards > 0)
        qsort(shards, (size_t)n_shards, sizeof *shards, compare_strings);
    int n_unique = 0;
    for (int i = 0; i < n_shards; i++) {
        if (n_unique > 0 && !strcmp(shards[n_unique - 1], shards[i])) {
            free(shards[i]);
            continue;
        }
        shards[n_unique++] = shards[i];
    }
    n_shards = n_unique;
    SafetensorsCheckpoint *ck = NULL;
    if (!bad)
        ck = safetensors_open_files(n_shards, (const char *const *)shards, err);
    if (ck) {
        cJSON_ArrayForEach(entry, weight_map)
        {
            const SafetensorsTensor *t = safetensors_find(ck, entry->string);
            const char *file_name = t ? strrchr(t->file, '/') + 1 : NULL;
            if (!t || strcmp(file_name, entry->valuestring) != 0) {
                kv_fail(err, "%s: tensor '%s' is mapped to %s but %s", index_path,
                        ESC(entry->string, name), ESC(entry->valuestring, value),
                        t ? "found in another shard" : "not found there");
                safetensors_close(ck);
                ck = NULL;
                break;
            }
        }
    }
    for (int i = 0; i < n_shards; i++)
        free(shards[i]);
    free(shards);
    cJSON_Delete(index);
    return ck;
}

SafetensorsCheckpoint *safetensors_open_dir(const char *dir, KvErr *err)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir) >= (int)sizeof path) {
        kv_fail(err, "%s: path too long", dir);
        return NULL;
    }
    if (access(path, F_OK) == 0)
        return open_index(dir, path, err);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (access(path, F_OK) != 0) {
        kv_fail(err, "%s: no model.safetensors or model.safetensors.index.json", dir);
        return NULL;
    }
    const char *paths[1] = {path};
    return safetensors_open_files(1, paths, err);
}

void safetensors_close(SafetensorsCheckpoint *ck)
{
    if (!ck)
        return;
    for (int i = 0; i < ck->n_tensors; i++)
        free(ck->tensors[i].name);
    free(ck->tensors);
    for (int i = 0; i < ck->n_files; i++) {
        munmap(ck->maps[i], ck->map_sizes[i]);
        free(ck->file_paths[i]);
    }
    free(ck->file_paths);
    free(ck->maps);
    free(ck->map_sizes);
    free(ck);
}

const SafetensorsTensor *safetensors_find(const SafetensorsCheckpoint *ck, const char *name)
{
    if (ck->n_tensors == 0)
        return NULL; /* bsearch wants a non-NULL array */
    SafetensorsTensor key = {.name = (char *)name};
    return bsearch(&key, ck->tensors, (size_t)ck->n_tensors, sizeof *ck->tensors,
                   compare_tensor_names);
}
