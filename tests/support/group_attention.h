/* group_attention.h — the attention a KV group gives a cache, computed in double precision
 * independently of the policies and of the fixture's driver, for tests of attention-ranked
 * policies. */
#ifndef KVSIM_TEST_GROUP_ATTENTION_H
#define KVSIM_TEST_GROUP_ATTENTION_H

#include "tests/support/fixture.h"

/* out[s] = sum over the query heads h of KV group g of softmax_s(q_{h,t} . k_s * attn_scale),
 * the softmax taken over the slots of c (their alternative K where set). out has c->n entries. */
void group_attention_over_cache(const Fixture *fx, const KVCache *c, int g, int t, double *out);

#endif
