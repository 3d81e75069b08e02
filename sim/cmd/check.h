/* check.h — `kvsim info TRACE` (header and datasets of a trace) and `kvsim check TRACE
 * [--tol X]` (stored attention rows against softmax(attn_scale · q·k) recomputed from the
 * stored Q and K; exit 0 within tolerance, 1 above, 2 bad input or no rows). */
#ifndef KVSIM_CHECK_H
#define KVSIM_CHECK_H

/* Default tolerances on a probability (docs/trace-format.md, "Checking a trace"). */
#define CHECK_TOL_F32 1e-4
#define CHECK_TOL_F16 2e-3

int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);

#endif
