/* abit.h — the ABIT segmentation used by the abit policy, exposed so that it can be tested on
 * its own. */
#ifndef KVSIM_ABIT_H
#define KVSIM_ABIT_H

#include <stdbool.h>

typedef struct {
    int window;      /* features averaged into the rolling reference */
    int min_split;   /* wanted smallest segment, in tokens (within tolerance) */
    int max_split;   /* wanted median segment, in tokens (within tolerance) */
    int tolerance;
    int min_cluster; /* shorter segments merge into the previous one */
    bool forward_merge; /* TriCache's rule instead: a short segment absorbs the next one (and
                         * is checked again); only a short last segment joins the previous one */
} AbitSplit;

/* Splits n feature vectors ([n][dim], row-major) into contiguous segments. Writes the first
 * index of each segment to starts (room for n; starts[0] = 0) and returns how many there are
 * (0 when n = 0). Deterministic. */
int abit_segment(const float *features, int n, int dim, const AbitSplit *split, int *starts);

#endif
