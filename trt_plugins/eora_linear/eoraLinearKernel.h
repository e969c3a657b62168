/*
 * eoraLinearKernel.h: the CUDA side of EoraLinear, as a plain C ABI.
 *
 * y[M, N] = x[M, K] . W + fp16(x . A) . B + bias, fp16 in and out, fp32 accumulation, with W, A, B stored
 * as graphs/eora_linear.spec.json says. The TensorRT plugin calls eoraLinearForward from enqueue(); Python
 * calls the same symbol through ctypes on torch CUDA tensors (eora_export/trt/plugin.py), so the tests and
 * benchmarks run exactly the code an engine runs.
 */
#ifndef EORA_LINEAR_KERNEL_H
#define EORA_LINEAR_KERNEL_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define EORA_API __declspec(dllexport)
#else
#define EORA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever EoraLinearParams changes; ctypes mirrors check it with eoraLinearParamsSize(). */
#define EORA_PARAMS_VERSION 3

/* Error codes of the C entry points (0 is success). */
#define EORA_OK 0
#define EORA_ERR_INVALID 1 /* bad attributes, shapes, pointers or too small a workspace */
#define EORA_ERR_CUDA 2    /* a CUDA call or kernel launch failed */

typedef struct EoraLinearParams
{
    int32_t version;    /* EORA_PARAMS_VERSION */
    int32_t structSize; /* sizeof(EoraLinearParams) */
    int64_t M;          /* rows of x: the product of all but its last dimension */
    /* The spec's attributes. */
    int32_t inFeatures;
    int32_t outFeatures;
    int32_t rank;
    int32_t weightBits;
    int32_t groupSize;
    int32_t lowrankBits;
    int32_t lowrankGroupSize;
    int32_t sparse24;
    int32_t hasBias;
    /* 0 auto, 1 GEMV, 2 tensor core, 3 simple, 4 skinny (M <= 16 mma.sync on the packed copies; see eora::Path);
       shapes the fast paths cannot take always run the simple kernel, and skinny without packed copies (or
       for shapes it cannot take) runs the GEMV. 5: CUTLASS (opt-in, sm_90a builds with CUTLASS; otherwise the
       tensor-core path). */
    int32_t algo;
    /* Auto uses the GEMV for M <= gemvMaxM (0: the built-in default). A planning input: the plugin serializes
       it with the engine; the library reads no environment variable for it. */
    int32_t gemvMaxM;
    /* 1: no split-K (no semaphores needed). The plugin sets it while a CUDA graph is being captured before
       its semaphores exist. */
    int32_t noSplitK;
    /* Device pointers, in the spec's input order; absent inputs are NULL. */
    const void* x;       /* fp16 [M, K] */
    const void* w;       /* int8 [K, N/2] packed INT4, or fp16 [K, N] */
    const void* wScale;  /* fp16 [K/group, N] */
    const void* a;       /* [K, r/2] INT4 | int8 [K, r] | fp16 [K, r] */
    const void* aScale;  /* fp16 [K/lgroup, r] */
    const void* b;       /* [r, N/2] INT4 | int8 [r, N] | fp16 [r, N] */
    const void* bScale;  /* fp16 [r/lgroup, N] */
    const void* bias;    /* fp16 [N] */
    const void* sparse;  /* compacted 2:4 weight from eoraSparse24Compact, or NULL (dense w is used) */
    const void* packed;  /* packed copies of w, a, b and their scales from eoraLinearPack, or NULL (no skinny path) */
    const void* cutlass; /* K-major copy of [w ; b] + scales from eoraLinearCutlassPack, or NULL (algo 5 only) */
    void* y;             /* fp16 [M, N] */
    void* workspace;     /* eoraLinearWorkspaceSize bytes, any content */
    size_t workspaceBytes;
    /* eoraLinearSemaphoreCount() int32 split-K counters: zero before the first call; every call leaves them
       zero. Needed unless noSplitK; must not be shared by calls that may run concurrently. */
    int32_t* semaphores;
} EoraLinearParams;

/* Fill *p with defaults (version, structSize, attributes of an INT4 rank-0 op, NULL pointers). */
EORA_API void eoraLinearParamsInit(EoraLinearParams* p);

/* sizeof(EoraLinearParams), for ctypes mirrors to check their layout. */
EORA_API int32_t eoraLinearParamsSize(void);

/* Number of int32 semaphores a call may use. */
EORA_API int32_t eoraLinearSemaphoreCount(void);

/* Workspace bytes for p->M rows (pointers in p are ignored). */
EORA_API size_t eoraLinearWorkspaceSize(const EoraLinearParams* p);

/* Largest workspace over every M in [1, maxM]: what a TensorRT profile with that max needs. */
EORA_API size_t eoraLinearWorkspaceSizeMax(const EoraLinearParams* p, int64_t maxM);

/* The path a call with these parameters takes (eora::Path), or -1 if they are invalid. */
EORA_API int32_t eoraLinearSelectPath(const EoraLinearParams* p);

/* Launch the op on stream. Returns EORA_OK or an error code; eoraLastError() says why. */
EORA_API int32_t eoraLinearForward(const EoraLinearParams* p, cudaStream_t stream);

/* Bytes of the compacted 2:4 form of a packed INT4 [K, N] weight (K % 4 == 0, N % 8 == 0). */
EORA_API size_t eoraSparse24Bytes(int32_t K, int32_t N);

/* Compact w (int8 [K, N/2] packed INT4) into out (eoraSparse24Bytes). If some group of 4 rows holds more than
   2 non-zeros, the buffer is flagged and forward falls back to the dense weight, so the result stays exact. */
EORA_API int32_t eoraSparse24Compact(const void* w, int32_t K, int32_t N, void* out, cudaStream_t stream);

/* Bytes of the packed copies (eoraLinearPacked.h) the skinny path reads, or 0 when the attributes in *p do not
   allow that path (INT4 weight, N % 64 == 0, K and group % 16 == 0; INT4 factors, rank % 64 == 0). */
EORA_API size_t eoraLinearPackedBytes(const EoraLinearParams* p);

/* Build the packed copies of p->w, p->a, p->b and their scales into out (eoraLinearPackedBytes) on stream. */
EORA_API int32_t eoraLinearPack(const EoraLinearParams* p, void* out, cudaStream_t stream);

/* Bytes of the CUTLASS path's copy ([w ; b] K-major + scales at one group size), or 0 when this library was built
   without CUTLASS or the attributes do not allow the path (those of the skinny path). */
EORA_API size_t eoraLinearCutlassBytes(const EoraLinearParams* p);

/* Build that copy from p->w, p->b and their scales into out (eoraLinearCutlassBytes) on stream. */
EORA_API int32_t eoraLinearCutlassPack(const EoraLinearParams* p, void* out, cudaStream_t stream);

/* The last error message of this thread ("" if none). */
EORA_API const char* eoraLastError(void);

#ifdef __cplusplus
}
#endif

#endif /* EORA_LINEAR_KERNEL_H */
