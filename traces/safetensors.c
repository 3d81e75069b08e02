#include "traces/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

/* The safetensors format caps the header at 100 MB; anything larger is a corrupt length. */
#define HEADER_MAX_BYTES ((uint64_t)100 << 20)

const char *safetensors_dtype_name(SafetensorsDtype dtype)
{
    switch (dtype) {
    case ST_F32: return "F32";
    case ST_F16: return "F16";
    case ST_BF16: return "BF16";
    }
    return "?";
}

size_t safetensors_dtype_size(SafetensorsDtype dtype)
{
    return dtype == ST_F32 ? 4 : 2;
}

float f16_to_f32(uint16_t h)
{
    int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float magnitude;
    if (exponent == 0)
        magnitude = ldexpf((float)mantissa, -24); /* zero and subnormals */
    else if (exponent == 31)
        magnitude = mantissa ? NAN : INFINITY;
    else
        magnitude = ldexpf((float)(mantissa | 0x400), exponent - 25);
    return sign ? -magnitude : magnitude;
}

float bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
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
        out[i] = t->dtype == ST_F16 ? f16_to_f32(half) : bf16_to_f32(half);
    }
}

static int parse_dtype(const char *s, SafetensorsDtype *out)
{
    if (!strcmp(s, "F32")) *out = ST_F32;
    else if (!strcmp(s, "F16")) *out = ST_F16;
    else if (!strcmp(s, "BF16")) *out = ST_BF16;
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

/* Validates one header entry against the data area [0, data_size) and fills t. */
static int parse_tensor(const char *path, const cJSON *entry, const unsigned char *data,
                        uint64_t data_size, SafetensorsTensor *t, KvErr *err)
{
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return kv_fail(err, "%s: tensor '%s': header entry is not an object", path, name);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsString(dtype) || !cJSON_IsArray(shape) || !cJSON_IsArray(offsets))
        return kv_fail(err, "%s: tensor '%s': header entry needs string 'dtype', arrays 'shape' "
                       "and 'data_offsets'", path, name);
    if (parse_dtype(dtype->valuestring, &t->dtype) != 0)
        return kv_fail(err, "%s: tensor '%s': unsupported dtype '%s' (supported: F32, F16, BF16)",
                       path, name, dtype->valuestring);
    int n_dims = cJSON_GetArraySize(shape);
    if (n_dims > SAFETENSORS_MAX_DIMS)
        return kv_fail(err, "%s: tensor '%s': %d dimensions, at most %d supported", path, name,
                       n_dims, SAFETENSORS_MAX_DIMS);
    t->n_dims = n_dims;
    uint64_t n_elements = 1;
    for (int d = 0; d < n_dims; d++) {
        uint64_t extent;
        if (json_uint(cJSON_GetArrayItem(shape, d), &extent) != 0)
            return kv_fail(err, "%s: tensor '%s': shape[%d] is not a non-negative integer", path,
                           name, d);
        if (extent != 0 && n_elements > (UINT64_C(1) << 53) / extent)
            return kv_fail(err, "%s: tensor '%s': shape too large", path, name);
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
    t->name = kv_strdup(name);
    return 0;
}

static int compare_tensor_names(const void *a, const void *b)
{
    return strcmp(((const SafetensorsTensor *)a)->name, ((const SafetensorsTensor *)b)->name);
}

/* Maps one file and appends its tensors to ck. */
static int add_file(SafetensorsCheckpoint *ck, const char *path, KvErr *err)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return kv_fail(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return kv_fail(err, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        return kv_fail(err, "%s: truncated safetensors file (%zu bytes, the header length alone "
                       "needs 8)", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return kv_fail(err, "%s: cannot map: %s", path, strerror(errno));
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
    if (header_len < 2 || header_len > HEADER_MAX_BYTES || header_len > size - 8)
        return kv_fail(err, "%s: header length %llu is impossible for a %zu-byte file "
                       "(truncated or not safetensors)", path, (unsigned long long)header_len,
                       size);
    cJSON *header = json_parse_exact((const char *)bytes + 8, (size_t)header_len, NULL);
    if (!header || !cJSON_IsObject(header)) {
        cJSON_Delete(header);
        return kv_fail(err, "%s: header is not a valid JSON object", path);
    }
    const unsigned char *data = bytes + 8 + header_len;
    uint64_t data_size = size - 8 - header_len;
    int rc = 0;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, header)
    {
        if (!strcmp(entry->string, "__metadata__"))
            continue;
        ck->tensors = kv_realloc(ck->tensors, (size_t)(ck->n_tensors + 1) * sizeof *ck->tensors);
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
    return rc;
}

/* Sorts the tensors and rejects a name that appears in two places. */
static int index_tensors(SafetensorsCheckpoint *ck, KvErr *err)
{
    qsort(ck->tensors, (size_t)ck->n_tensors, sizeof *ck->tensors, compare_tensor_names);
    for (int i = 1; i < ck->n_tensors; i++)
        if (!strcmp(ck->tensors[i].name, ck->tensors[i - 1].name))
            return kv_fail(err, "%s: tensor '%s' also appears in %s", ck->tensors[i].file,
                           ck->tensors[i].name, ck->tensors[i - 1].file);
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

char *read_text_file(const char *path, size_t *len, KvErr *err)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        kv_fail(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = kv_malloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, fp)) > 0) {
        n += got;
        if (cap - n - 1 == 0)
            buf = kv_realloc(buf, cap *= 2);
    }
    int bad = ferror(fp);
    fclose(fp);
    if (bad) {
        free(buf);
        kv_fail(err, "%s: read error", path);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

cJSON *json_parse_exact(const char *text, size_t len, size_t *error_at)
{
    const char *end = NULL;
    cJSON *json = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (json) {
        /* cJSON stops after the first value; anything but whitespace after it is an error. */
        while (end < text + len && strchr(" \t\r\n", *end) && *end)
            end++;
        if (end == text + len)
            return json;
        cJSON_Delete(json);
    }
    if (error_at)
        *error_at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    return NULL;
}

cJSON *json_read_file(const char *path, KvErr *err)
{
    size_t len;
    char *text = read_text_file(path, &len, err);
    if (!text)
        return NULL;
    size_t at = 0;
    cJSON *json = json_parse_exact(text, len, &at);
    if (!json) {
        /* Line of the error, so that a hand-edited config can be fixed. */
        int line = 1;
        for (size_t i = 0; i < at && i < len; i++)
            line += text[i] == '\n';
        kv_fail(err, "%s:%d: invalid JSON", path, line);
    }
    free(text);
    return json;
}

/* Sharded checkpoint: the shards named by weight_map, each opened once; every tensor of the
 * map must be in the shard the map names. */
static SafetensorsCheckpoint *open_index(const char *dir, const char *index_path, KvErr *err)
{
    cJSON *index = json_read_file(index_path, err);
    if (!index)
        return NULL;
    const cJSON *weight_map = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
    if (!cJSON_IsObject(weight_map)) {
        cJSON_Delete(index);
        kv_fail(err, "%s: not valid JSON with a 'weight_map' object", index_path);
        return NULL;
    }
    int n_shards = 0;
    char **shards = NULL;
    const cJSON *entry;
    int bad = 0;
    cJSON_ArrayForEach(entry, weight_map)
    {
        if (!cJSON_IsString(entry) || strchr(entry->valuestring, '/') || !entry->valuestring[0]) {
            kv_fail(err, "%s: weight_map['%s'] must be a file name in the same directory",
                    index_path, entry->string);
            bad = 1;
            break;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, entry->valuestring);
        int seen = 0;
        for (int i = 0; i < n_shards && !seen; i++)
            seen = !strcmp(shards[i], path);
        if (!seen) {
            shards = kv_realloc(shards, (size_t)(n_shards + 1) * sizeof *shards);
            shards[n_shards++] = kv_strdup(path);
        }
    }
    SafetensorsCheckpoint *ck = NULL;
    if (!bad)
        ck = safetensors_open_files(n_shards, (const char *const *)shards, err);
    if (ck) {
        cJSON_ArrayForEach(entry, weight_map)
        {
            const SafetensorsTensor *t = safetensors_find(ck, entry->string);
            const char *file_name = t ? strrchr(t->file, '/') + 1 : NULL;
            if (!t || strcmp(file_name, entry->valuestring) != 0) {
                kv_fail(err, "%s: tensor '%s' is mapped to %s but %s", index_path, entry->string,
                        entry->valuestring, t ? "found in another shard" : "not found there");
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
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
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
    SafetensorsTensor key = {.name = (char *)name};
    return bsearch(&key, ck->tensors, (size_t)ck->n_tensors, sizeof *ck->tensors,
                   compare_tensor_names);
}
