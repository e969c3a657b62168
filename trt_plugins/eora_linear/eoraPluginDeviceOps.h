/*
 * eoraPluginDeviceOps.h: every device-side effect of the TensorRT glue, behind one table of functions.
 *
 * The plugin allocates its persistent buffers, zeroes the split-K counters, compacts 2:4 weights and
 * launches the op only through these calls. By default they are the CUDA runtime and the kernel entry points
 * of eoraLinearKernel.h; the CPU harness (trt_plugins/tests/eoraPluginHarness.cpp) installs recording fakes
 * so it can check, without a GPU, *on which stream* and *when* each of them happens: that the counters are
 * zeroed on the enqueue stream, that the workspace TensorRT gave is what the launch is told, that the
 * serialized planning inputs reach the launch, and when 2:4 weights are rebuilt.
 */
#ifndef EORA_PLUGIN_DEVICE_OPS_H
#define EORA_PLUGIN_DEVICE_OPS_H

#include "eoraLinearKernel.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Every function returns 0 on success. */
typedef struct EoraDeviceOps
{
    int32_t (*allocate)(void** ptr, size_t bytes);
    int32_t (*release)(void* ptr);
    int32_t (*memsetAsync)(void* ptr, int32_t value, size_t bytes, cudaStream_t stream);
    /* 1 while stream is being captured into a CUDA graph (nothing may be allocated then), else 0. */
    int32_t (*isCapturing)(cudaStream_t stream);
    int32_t (*sparse24Compact)(const void* w, int32_t K, int32_t N, void* out, cudaStream_t stream);
    int32_t (*pack)(const EoraLinearParams* p, void* out, cudaStream_t stream);
    int32_t (*forward)(const EoraLinearParams* p, cudaStream_t stream);
} EoraDeviceOps;

/* Replace the table (a copy is kept); NULL restores the CUDA one. For tests: not thread-safe with enqueue. */
EORA_API void eoraPluginSetDeviceOps(const EoraDeviceOps* ops);

/* Declare that weights changed in place (e.g. after IRefitter::refitCudaEngine): every EoraLinear instance
   rebuilds its 2:4 compacted weight and its packed copies at its next enqueue. */
EORA_API void eoraPluginWeightsChanged(void);

#ifdef __cplusplus
}
#endif

#endif /* EORA_PLUGIN_DEVICE_OPS_H */
