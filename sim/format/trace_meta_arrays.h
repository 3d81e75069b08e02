/* trace_meta_arrays.h — private to sim/format: the reader's and the builder's common first step. */
#ifndef KVSIM_TRACE_META_ARRAYS_H
#define KVSIM_TRACE_META_ARRAYS_H

#include "sim/format/trace.h"

/* Allocates the arrays sized by the header's counts, zeroed; every layer global with the
 * unscaled RoPE frequencies of rope_theta; the spans of a single prompt of n_prompt tokens. */
void trace_meta_alloc_arrays(TraceMeta *meta);

#endif
