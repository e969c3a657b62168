/*
 * eoraLinearCutlass.h: the M > 16 GEMM of the opt-in CUTLASS path (kPathCutlass), behind a plain C++ call so
 * the kernel file never includes CUTLASS. eoraLinearCutlassSm90.cu implements it when the build found the
 * CUTLASS headers (pip nvidia-cutlass) and targets sm_90a; eoraLinearCutlassStub.cpp otherwise.
 */
#ifndef EORA_LINEAR_CUTLASS_H
#define EORA_LINEAR_CUTLASS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace eora
{

//! Whether this library holds the CUTLASS kernel (built with CUTLASS, for sm_90a).
bool cutlassBuilt();

//! Scratch CUTLASS itself asks for (beyond the op's own workspace regions); 0 when not built.
size_t cutlassWorkspaceBytes(int64_t m, int64_t n, int64_t k, int32_t group);

//! y[m, n] = a[m, k] . dequant(wt, scales) + (c ? c[m, n] : 0), fp16 in and out, fp32 accumulation, where
//! wt is the INT4 weight K-major ([n, k], two codes per byte along k, low nibble first) and scales are fp16
//! [k / group, n] (row-major). group must be a multiple of 64 dividing k. Returns 0 or a cudaError_t.
int32_t cutlassGemm(void const* a, void const* wt, void const* scales, void const* c, void* y, int64_t m, int64_t n,
    int64_t k, int32_t group, void* scratch, size_t scratchBytes, cudaStream_t stream);

} // namespace eora

#endif // EORA_LINEAR_CUTLASS_H
