/* blas.h — OpenBLAS's CBLAS, includable in a file that also uses GSL.
 *
 * gsl_randist.h pulls in gsl_cblas.h (through gsl_matrix.h), whose declarations clash with
 * OpenBLAS's cblas.h although both describe the same CBLAS interface (same enums and values).
 * kvsim links OpenBLAS for every CBLAS symbol, so after OpenBLAS's header GSL's is marked as
 * already included. Include this instead of <cblas.h>, before any GSL header. */
#ifndef KVSIM_BLAS_H
#define KVSIM_BLAS_H

#include <cblas.h>

#ifndef __GSL_CBLAS_H__
#define __GSL_CBLAS_H__
#endif

#endif
