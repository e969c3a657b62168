/*
 * eoraLinearKernel.cu: the kernels of EoraLinear and the C entry points that launch them.
 *
 * One idea runs through every path (DESIGN.md section 5): the low-rank residual is folded into the main
 * product by extending K,
 *
 *     y = [x | t] . [W ; B] + bias,    t = fp16(x . A)  ([M, r], a thin GEMM run first),
 *
 * so W and B stream through the same loop as one matrix of K + r rows ("segment 0" and "segment 1", each
 * with its own storage format), and the residual costs r more rows instead of two more GEMM launches.
 *
 *   GEMV (small M)     CUDA cores. A block owns 128 output columns; each thread decodes 8 columns of one
 *                      row per load (4 bytes of INT4), 16 row-lanes stride down K, and a split-K grid
 *                      dimension spreads K over enough blocks to fill the GPU. Activations are staged in
 *                      shared memory as fp32. Partials meet in fp32 and the last block of a tile sums them
 *                      in a fixed order (deterministic), adds bias and rounds once.
 *   Tensor core        WMMA 16x16x16 fp16 -> fp32. Each K tile of W (or B) is dequantized on the fly from
 *   (larger M)         registers into shared memory; the next tile's global loads are in flight while the
 *                      current one is multiplied. Same extended-K loop and split-K fix-up.
 *   2:4 + INT4         GEMV over the compacted weight (values + 2-bit indices, see eoraLinearCommon.h):
 *                      0.75x the bytes and half the multiply-adds. Large M uses the dense tensor-core path.
 *   Simple             One thread per output element; any shape or alignment, and the on-GPU cross-check.
 *
 * Dequantization is exact: q is made an fp16 integer with the magic-number trick and multiplied by the fp16
 * scale in fp16, which rounds fp32(q) * fp32(s) once, as the spec (and quant.dequantize) do.
 *
 * On sm_90 the main kernel is launched with programmatic dependent launch: it starts while the t kernel is
 * still running, streams W, and only the blocks that reach B's rows wait (griddepcontrol.wait) for t.
 */
#include "cutlass/eoraLinearCutlass.h"
#include "eoraLinearCommon.h"
#include "eoraLinearKernel.h"
#include "eoraLinearPacked.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace eora
{
namespace
{

// ---------------------------------------------------------------------------------------------
// Launch arguments
// ---------------------------------------------------------------------------------------------

//! One block of rows of the extended K: its matrix, scales, and the activations it multiplies.
struct Segment
{
    uint8_t const* w;     //!< [rows, cols] in fmt
    __half const* scale;  //!< [rows / group, cols], or null for fp16
    __half const* act;    //!< [M, rows] activations (x, or t for the residual)
    int64_t rows;
    int64_t actStride;
    int32_t group;
    int32_t fmt;
};

struct GemmArgs
{
    Segment seg[2];
    int32_t nSeg;
    int64_t M;
    int32_t N;            //!< columns of the output (out_features, or rank for t)
    __half const* bias;
    __half* out;
    int64_t ldo;
    float* partial;       //!< [splits, M, N] fp32 split-K partials
    int32_t* counters;    //!< one per output tile, zero on entry and on exit
    KernelPlan plan;
    uint8_t const* spVals;
    uint8_t const* spMeta;
    int32_t const* spFlag;
    int32_t waitBeforeSeg1;   //!< PDL: wait for the t kernel before touching segment 1
    int32_t triggerDependents; //!< PDL: this is the t kernel; let the main kernel launch early
};

// ---------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------

// Bit casts between a 32-bit word and a half2 (low half = element 0). Through memcpy so they compile to nothing;
// building __half2_raw from shifts and masks costs a shift and a PRMT per call in the inner loops.
__device__ __forceinline__ __half2 bitsToHalf2(uint32_t u)
{
    __half2 h;
    memcpy(&h, &u, sizeof(h));
    return h;
}

__device__ __forceinline__ uint32_t half2ToBits(__half2 h)
{
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
}

__device__ __forceinline__ uint32_t u4Component(uint4 const& v, int i)
{
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ void gridDependencyWait()
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void gridTriggerDependents()
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

//! 8 consecutive columns of one row, raw, plus their 8 scales: the unit every fast path loads.
struct Octet
{
    uint4 raw;
    uint4 sc;
};

//! Raw codes of columns n..n+7 of row k (cols = the matrix's column count; n % 8 == 0, cols % 8 == 0).
template <int F>
__device__ __forceinline__ uint4 loadRaw(Segment const& sg, int64_t k, int32_t n, int32_t cols)
{
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if constexpr (F == kFmtInt4)
    {
        raw.x = __ldg(reinterpret_cast<unsigned int const*>(sg.w + k * (cols / 2) + n / 2));
    }
    else if constexpr (F == kFmtInt8)
    {
        uint2 const v = __ldg(reinterpret_cast<uint2 const*>(sg.w + k * cols + n));
        raw.x = v.x;
        raw.y = v.y;
    }
    else
    {
        raw = __ldg(reinterpret_cast<uint4 const*>(sg.w + (k * cols + n) * 2));
    }
    return raw;
}

//! The 8 fp16 scales of columns n..n+7 in scale row g.
__device__ __forceinline__ uint4 loadScales(Segment const& sg, int64_t g, int32_t n, int32_t cols)
{
    return __ldg(reinterpret_cast<uint4 const*>(sg.scale + g * cols + n));
}

//! Codes and scales of columns n..n+7 of row k.
template <int F>
__device__ __forceinline__ Octet loadOctet(Segment const& sg, int64_t k, int32_t n, int32_t cols)
{
    Octet o;
    o.raw = loadRaw<F>(sg, k, n, cols);
    o.sc = make_uint4(0u, 0u, 0u, 0u);
    if constexpr (F != kFmtFp16)
    {
        o.sc = loadScales(sg, scaleRow(k, sg.group), n, cols);
    }
    return o;
}

//! Dequantize an octet to 4 half2 (columns 2p, 2p+1 in h[p]): fp16(q * s), rounded once.
template <int F>
__device__ __forceinline__ void dequantOctet(Octet const& o, __half2 (&h)[4])
{
    if constexpr (F == kFmtFp16)
    {
#pragma unroll
        for (int p = 0; p < 4; ++p)
        {
            h[p] = bitsToHalf2(u4Component(o.raw, p));
        }
    }
    else if constexpr (F == kFmtInt4)
    {
        __half2 const magic = __float2half2_rn(kInt4Magic);
#pragma unroll
        for (int p = 0; p < 4; ++p)
        {
            __half2 const q = __hsub2(bitsToHalf2(int4PairMagic(o.raw.x, p)), magic);
            h[p] = __hmul2(q, bitsToHalf2(u4Component(o.sc, p)));
        }
    }
    else
    {
        __half2 const magic = __float2half2_rn(kInt8Magic);
#pragma unroll
        for (int p = 0; p < 4; ++p)
        {
            uint32_t const word = p < 2 ? o.raw.x : o.raw.y;
            __half2 const q = __hsub2(bitsToHalf2(int8PairMagic(word, p & 1)), magic);
            h[p] = __hmul2(q, bitsToHalf2(u4Component(o.sc, p)));
        }
    }
}

template <int F>
__device__ __forceinline__ void dequantOctetFloat(Octet const& o, float (&w)[8])
{
    __half2 h[4];
    dequantOctet<F>(o, h);
#pragma unroll
    for (int p = 0; p < 4; ++p)
    {
        float2 const f = __half22float2(h[p]);
        w[2 * p] = f.x;
        w[2 * p + 1] = f.y;
    }
}

//! Split-K meeting point. Every block of a tile has written its fp32 partial; the last one to arrive sums
//! all partials in split order (so the result does not depend on arrival order), adds bias, rounds to fp16,
//! and re-arms the counter for the next launch. Pattern: threadfence before the counter increment publishes
//! the partials; the last block fences again before reading them through L2 (__ldcg).
template <typename Args>
__device__ void splitKFixup(Args const& a, int32_t tileId, int64_t mBeg, int64_t mEnd, int32_t nBeg, int32_t nEnd)
{
    __shared__ int32_t sIsLast;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int32_t const prev = atomicAdd(&a.counters[tileId], 1);
        sIsLast = splitKIsLast(prev, a.plan.splits) ? 1 : 0;
    }
    __syncthreads();
    if (!sIsLast)
    {
        return;
    }
    __threadfence();
    int32_t const width = nEnd - nBeg;
    int64_t const total = (mEnd - mBeg) * width;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x)
    {
        int64_t const m = mBeg + i / width;
        int32_t const n = nBeg + static_cast<int32_t>(i % width);
        float s = 0.0f;
        for (int32_t sp = 0; sp < a.plan.splits; ++sp)
        {
            s += __ldcg(a.partial + (static_cast<int64_t>(sp) * a.M + m) * a.N + n);
        }
        if (a.bias != nullptr)
        {
            s += __half2float(a.bias[n]);
        }
        a.out[m * a.ldo + n] = __float2half_rn(s);
    }
    if (threadIdx.x == 0)
    {
        a.counters[tileId] = kSplitKArmed;
    }
}

// ---------------------------------------------------------------------------------------------
// GEMV path
// ---------------------------------------------------------------------------------------------

constexpr int kGemvThreads = 256;  // 16 column lanes x 16 row lanes
constexpr int kGemvRowLanes = 16;
constexpr int kGemvChunk = 256;    // rows of activations staged in shared memory per pass
constexpr int kGemvUnroll = 4;     // rows whose loads are in flight together per thread

//! Stage activations [m0, m0+MT) x [c0, c0+len) of a segment into shared memory as fp32 (zeros outside).
//! __ldcg: t is written by the kernel that may still be finishing under PDL, so never read it through L1.
template <int MT>
__device__ __forceinline__ void gemvStage(
    Segment const& sg, int64_t c0, int len, int64_t M, int64_t m0, float (*xs)[kGemvChunk])
{
    __syncthreads(); // the previous chunk's readers are done
    for (int i = threadIdx.x; i < MT * kGemvChunk; i += kGemvThreads)
    {
        int const m = i / kGemvChunk;
        int const kk = i - m * kGemvChunk;
        float v = 0.0f;
        if (kk < len && m0 + m < M)
        {
            v = __half2float(__ldcg(sg.act + (m0 + m) * sg.actStride + c0 + kk));
        }
        xs[m][kk] = v;
    }
    __syncthreads();
}

//! Rows [kBeg, kEnd) of a dense segment into this thread's 8 columns.
template <int MT, int F>
__device__ __forceinline__ void gemvSegment(Segment const& sg, int64_t kBeg, int64_t kEnd, int64_t M, int64_t m0,
    int32_t cols, int32_t n0, bool colOk, float (&acc)[MT][8], float (*xs)[kGemvChunk])
{
    int const kl = threadIdx.x >> 4;
    for (int64_t c0 = kBeg; c0 < kEnd; c0 += kGemvChunk)
    {
        int const len = static_cast<int>((kEnd - c0) < kGemvChunk ? (kEnd - c0) : kGemvChunk);
        gemvStage<MT>(sg, c0, len, M, m0, xs);
        if (!colOk)
        {
            continue;
        }
        for (int kk0 = kl; kk0 < len; kk0 += kGemvRowLanes * kGemvUnroll)
        {
            // Issue every load of the batch before any math so kGemvUnroll rows are in flight per thread.
            // The batch's rows span 16 * (kGemvUnroll - 1) = 48 rows, so with groups larger than that they
            // touch at most two scale rows: one division per batch instead of one per row, and a scale
            // load only where the group changes.
            Octet o[kGemvUnroll];
            int64_t const kFirst = c0 + kk0;
            int64_t const gFirst = F != kFmtFp16 ? kFirst / sg.group : 0;
            int32_t const rem = static_cast<int32_t>(kFirst - gFirst * sg.group);
            bool const wideGroups = sg.group > kGemvRowLanes * (kGemvUnroll - 1);
            int64_t gPrev = -1;
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u)
            {
                int const kk = kk0 + kGemvRowLanes * u;
                if (kk < len)
                {
                    o[u].raw = loadRaw<F>(sg, c0 + kk, n0, cols);
                    if constexpr (F != kFmtFp16)
                    {
                        int64_t const g = wideGroups ? gFirst + (rem + kGemvRowLanes * u >= sg.group ? 1 : 0)
                                                     : (c0 + kk) / sg.group;
                        o[u].sc = (u > 0 && g == gPrev) ? o[u > 0 ? u - 1 : 0].sc : loadScales(sg, g, n0, cols);
                        gPrev = g;
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u)
            {
                int const kk = kk0 + kGemvRowLanes * u;
                if (kk < len)
                {
                    float w[8];
                    dequantOctetFloat<F>(o[u], w);
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                    {
                        float const xv = xs[m][kk];
#pragma unroll
                        for (int c = 0; c < 8; ++c)
                        {
                            acc[m][c] = fmaf(xv, w[c], acc[m][c]);
                        }
                    }
                }
            }
        }
    }
}

//! Rows [kBeg, kEnd) of the compacted 2:4 weight (kBeg, kEnd multiples of 4): per group of 4 rows, one meta
//! word and two value words, and x is gathered at the two kept positions.
template <int MT>
__device__ __forceinline__ void gemvSparseSegment(GemmArgs const& a, int64_t kBeg, int64_t kEnd, int64_t m0,
    int32_t n0, bool colOk, float (&acc)[MT][8], float (*xs)[kGemvChunk])
{
    constexpr int kGroupsInFlight = 2;
    Segment const& sg = a.seg[0];
    int64_t const rowB = a.N / 2;
    int const kl = threadIdx.x >> 4;
    for (int64_t c0 = kBeg; c0 < kEnd; c0 += kGemvChunk)
    {
        int const len = static_cast<int>((kEnd - c0) < kGemvChunk ? (kEnd - c0) : kGemvChunk);
        gemvStage<MT>(sg, c0, len, a.M, m0, xs);
        if (!colOk)
        {
            continue;
        }
        int const groups = len / 4;
        for (int gg0 = kl; gg0 < groups; gg0 += kGemvRowLanes * kGroupsInFlight)
        {
            uint32_t meta[kGroupsInFlight];
            Octet v0[kGroupsInFlight];
            Octet v1[kGroupsInFlight];
#pragma unroll
            for (int u = 0; u < kGroupsInFlight; ++u)
            {
                int const gg = gg0 + kGemvRowLanes * u;
                if (gg < groups)
                {
                    int64_t const g = c0 / 4 + gg;
                    meta[u] = __ldg(reinterpret_cast<unsigned int const*>(a.spMeta + g * rowB + n0 / 2));
                    v0[u].raw.x = __ldg(reinterpret_cast<unsigned int const*>(a.spVals + (2 * g) * rowB + n0 / 2));
                    v1[u].raw.x = __ldg(reinterpret_cast<unsigned int const*>(a.spVals + (2 * g + 1) * rowB + n0 / 2));
                    v0[u].sc = __ldg(reinterpret_cast<uint4 const*>(sg.scale + scaleIndex(4 * g, n0, sg.group, a.N)));
                    v1[u].sc = v0[u].sc;
                }
            }
#pragma unroll
            for (int u = 0; u < kGroupsInFlight; ++u)
            {
                int const gg = gg0 + kGemvRowLanes * u;
                if (gg < groups)
                {
                    float w0[8];
                    float w1[8];
                    dequantOctetFloat<kFmtInt4>(v0[u], w0);
                    dequantOctetFloat<kFmtInt4>(v1[u], w1);
                    int const kk = 4 * gg;
#pragma unroll
                    for (int c = 0; c < 8; ++c)
                    {
                        int32_t i0;
                        int32_t i1;
                        sparse24MetaDecode(meta[u] >> (4 * c), i0, i1);
#pragma unroll
                        for (int m = 0; m < MT; ++m)
                        {
                            acc[m][c] = fmaf(xs[m][kk + i0], w0[c], acc[m][c]);
                            acc[m][c] = fmaf(xs[m][kk + i1], w1[c], acc[m][c]);
                        }
                    }
                }
            }
        }
    }
}

template <int MT, int F0, int F1>
__global__ void __launch_bounds__(kGemvThreads) gemvKernel(GemmArgs args)
{
    __shared__ float xs[MT][kGemvChunk];
    __shared__ float red[kGemvThreads / 32][kGemvTileN];

    if (args.triggerDependents)
    {
        gridTriggerDependents();
    }
    int const tid = threadIdx.x;
    int const nl = tid & 15;
    int32_t const nBase = static_cast<int32_t>(blockIdx.x) * kGemvTileN;
    int32_t const n0 = nBase + nl * 8;
    int32_t const split = static_cast<int32_t>(blockIdx.y);
    int64_t const m0 = static_cast<int64_t>(blockIdx.z) * MT;
    bool const colOk = n0 < args.N;

    float acc[MT][8];
#pragma unroll
    for (int m = 0; m < MT; ++m)
    {
#pragma unroll
        for (int c = 0; c < 8; ++c)
        {
            acc[m][c] = 0.0f;
        }
    }

    int64_t rb;
    int64_t re;
    splitRange(args.plan, split, rb, re);
    int64_t const rows0 = args.seg[0].rows;
    if (rb < rows0)
    {
        int64_t const e0 = re < rows0 ? re : rows0;
        if constexpr (F0 == kFmtInt4Sparse)
        {
            // A weight that broke the 2:4 promise was flagged at compaction; the dense form is always exact.
            if (__ldg(args.spFlag) == 0)
            {
                gemvSparseSegment<MT>(args, rb, e0, m0, n0, colOk, acc, xs);
            }
            else
            {
                gemvSegment<MT, kFmtInt4>(args.seg[0], rb, e0, args.M, m0, args.N, n0, colOk, acc, xs);
            }
        }
        else
        {
            gemvSegment<MT, F0>(args.seg[0], rb, e0, args.M, m0, args.N, n0, colOk, acc, xs);
        }
    }
    if constexpr (F1 != kFmtNone)
    {
        if (re > rows0)
        {
            if (args.waitBeforeSeg1)
            {
                gridDependencyWait();
            }
            int64_t const b1 = (rb > rows0 ? rb : rows0) - rows0;
            gemvSegment<MT, F1>(args.seg[1], b1, re - rows0, args.M, m0, args.N, n0, colOk, acc, xs);
        }
    }

    // Block reduction over the 16 row lanes: the two lanes of a warp by shuffle, the 8 warps through smem.
    int const warp = tid >> 5;
    int const lane = tid & 31;
    float res[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m)
    {
#pragma unroll
        for (int c = 0; c < 8; ++c)
        {
            float const v = acc[m][c] + __shfl_xor_sync(0xFFFFFFFFu, acc[m][c], 16);
            if (lane < 16)
            {
                red[warp][nl * 8 + c] = v;
            }
        }
        __syncthreads();
        float s = 0.0f;
        if (tid < kGemvTileN)
        {
#pragma unroll
            for (int w = 0; w < kGemvThreads / 32; ++w)
            {
                s += red[w][tid];
            }
        }
        res[m] = s;
        __syncthreads();
    }

    int32_t const nOut = nBase + tid;
    bool const writer = tid < kGemvTileN && nOut < args.N;
    if (args.plan.splits == 1)
    {
        if (writer)
        {
            float const b = args.bias != nullptr ? __half2float(args.bias[nOut]) : 0.0f;
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                if (m0 + m < args.M)
                {
                    args.out[(m0 + m) * args.ldo + nOut] = __float2half_rn(res[m] + b);
                }
            }
        }
        return;
    }
    if (writer)
    {
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            if (m0 + m < args.M)
            {
                args.partial[(static_cast<int64_t>(split) * args.M + m0 + m) * args.N + nOut] = res[m];
            }
        }
    }
    int64_t const mEnd = (m0 + MT) < args.M ? (m0 + MT) : args.M;
    int32_t const nEnd = (nBase + kGemvTileN) < args.N ? (nBase + kGemvTileN) : args.N;
    splitKFixup(args, static_cast<int32_t>(blockIdx.z * gridDim.x + blockIdx.x), m0, mEnd, nBase, nEnd);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (WMMA)
// ---------------------------------------------------------------------------------------------

template <int BM, int WARPS_M, int WARPS_N, int F0, int F1>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32) tcKernel(GemmArgs args)
{
    using namespace nvcuda;
    constexpr int BN = kTcTileN;
    constexpr int BK = kTcTileK;
    constexpr int T = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M;
    constexpr int WTN = BN / WARPS_N;
    constexpr int FM = WTM / 16;
    constexpr int FN = WTN / 16;
    // +8 halves of padding per row: keeps 16-byte stores aligned and staggers rows across smem banks.
    constexpr int LDA = BK + 8;
    constexpr int LDB = BN + 8;
    constexpr int A_CHUNKS = BM * BK / 8;
    constexpr int A_PER = A_CHUNKS / T;
    constexpr int B_OCTS = BK * BN / 8;
    constexpr int B_PER = B_OCTS / T;
    static_assert(A_PER * T == A_CHUNKS && B_PER * T == B_OCTS, "tile does not split evenly over threads");
    static_assert(FM * 16 == WTM && FN * 16 == WTN, "warp tile must be a multiple of 16");

    __shared__ __align__(128) __half As[2][BM * LDA];
    __shared__ __align__(128) __half Bs[2][BK * LDB];
    __shared__ __align__(128) float Cs[WARPS_M * WARPS_N][16 * 16];

    if (args.triggerDependents)
    {
        gridTriggerDependents();
    }
    int const tid = threadIdx.x;
    int const warp = tid / 32;
    int const lane = tid % 32;
    int const wm = warp / WARPS_N;
    int const wn = warp % WARPS_N;
    int32_t const nBase = static_cast<int32_t>(blockIdx.x) * BN;
    int64_t const mBase = static_cast<int64_t>(blockIdx.y) * BM;
    int32_t const split = static_cast<int32_t>(blockIdx.z);
    int64_t t0;
    int64_t t1;
    splitRange(args.plan, split, t0, t1);
    int64_t const nT0 = ceilDiv(args.seg[0].rows, BK);
    int64_t const waitTile = (args.waitBeforeSeg1 && t1 > nT0) ? (t0 > nT0 ? t0 : nT0) : -1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
    {
#pragma unroll
        for (int j = 0; j < FN; ++j)
        {
            wmma::fill_fragment(acc[i][j], 0.0f);
        }
    }

    uint4 aReg[A_PER];
    Octet bReg[B_PER];
    bool bOk[B_PER];

    // Global -> registers for K tile t (segment 0 tiles first, then segment 1's).
    auto loadTile = [&](int64_t t) {
        int const seg = t < nT0 ? 0 : 1;
        int64_t const k0 = (seg == 0 ? t : t - nT0) * BK;
        Segment const& sg = args.seg[seg];
        if (t == waitTile)
        {
            gridDependencyWait();
        }
#pragma unroll
        for (int i = 0; i < A_PER; ++i)
        {
            int const id = tid + i * T;
            int const row = id / (BK / 8);
            int const kc = (id % (BK / 8)) * 8;
            int64_t const m = mBase + row;
            int64_t const k = k0 + kc;
            aReg[i] = make_uint4(0u, 0u, 0u, 0u);
            if (m < args.M && k < sg.rows)
            {
                aReg[i] = __ldcg(reinterpret_cast<uint4 const*>(sg.act + m * sg.actStride + k));
            }
        }
#pragma unroll
        for (int i = 0; i < B_PER; ++i)
        {
            int const id = tid + i * T;
            int const row = id / (BN / 8);
            int const oc = id % (BN / 8);
            int64_t const k = k0 + row;
            int32_t const n = nBase + oc * 8;
            bOk[i] = k < sg.rows && n < args.N;
            if (bOk[i])
            {
                if (seg == 0)
                {
                    bReg[i] = loadOctet<F0>(sg, k, n, args.N);
                }
                else if constexpr (F1 != kFmtNone)
                {
                    bReg[i] = loadOctet<F1>(sg, k, n, args.N);
                }
            }
        }
    };

    // Registers -> shared memory, dequantizing W/B to fp16 on the way.
    auto storeTile = [&](int buf, int64_t t) {
        int const seg = t < nT0 ? 0 : 1;
#pragma unroll
        for (int i = 0; i < A_PER; ++i)
        {
            int const id = tid + i * T;
            int const row = id / (BK / 8);
            int const kc = (id % (BK / 8)) * 8;
            *reinterpret_cast<uint4*>(&As[buf][row * LDA + kc]) = aReg[i];
        }
#pragma unroll
        for (int i = 0; i < B_PER; ++i)
        {
            int const id = tid + i * T;
            int const row = id / (BN / 8);
            int const oc = id % (BN / 8);
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (bOk[i])
            {
                __half2 h[4];
                if (seg == 0)
                {
                    dequantOctet<F0>(bReg[i], h);
                }
                else if constexpr (F1 != kFmtNone)
                {
                    dequantOctet<F1>(bReg[i], h);
                }
                v = make_uint4(half2ToBits(h[0]), half2ToBits(h[1]), half2ToBits(h[2]), half2ToBits(h[3]));
            }
            *reinterpret_cast<uint4*>(&Bs[buf][row * LDB + oc * 8]) = v;
        }
    };

    if (t0 < t1)
    {
        loadTile(t0);
        storeTile(0, t0);
        __syncthreads();
        for (int64_t t = t0; t < t1; ++t)
        {
            int const buf = static_cast<int>((t - t0) & 1);
            bool const more = t + 1 < t1;
            if (more)
            {
                loadTile(t + 1); // in flight while this tile is multiplied
            }
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af[FM];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> bf[FN];
#pragma unroll
                for (int i = 0; i < FM; ++i)
                {
                    wmma::load_matrix_sync(af[i], &As[buf][(wm * WTM + i * 16) * LDA + kk * 16], LDA);
                }
#pragma unroll
                for (int j = 0; j < FN; ++j)
                {
                    wmma::load_matrix_sync(bf[j], &Bs[buf][(kk * 16) * LDB + wn * WTN + j * 16], LDB);
                }
#pragma unroll
                for (int i = 0; i < FM; ++i)
                {
#pragma unroll
                    for (int j = 0; j < FN; ++j)
                    {
                        wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
                    }
                }
            }
            if (more)
            {
                storeTile(buf ^ 1, t + 1); // the other buffer: its readers passed the last barrier
            }
            __syncthreads();
        }
    }

    // Epilogue, one 16x16 fragment at a time through a per-warp scratch tile: lane L owns row L/2, 8 columns.
    float* cs = Cs[warp];
    int const r = lane / 2;
    int const c = (lane % 2) * 8;
#pragma unroll
    for (int i = 0; i < FM; ++i)
    {
#pragma unroll
        for (int j = 0; j < FN; ++j)
        {
            wmma::store_matrix_sync(cs, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            int64_t const m = mBase + wm * WTM + i * 16 + r;
            int32_t const n = nBase + wn * WTN + j * 16 + c;
            if (m < args.M && n < args.N)
            {
                float v[8];
#pragma unroll
                for (int e = 0; e < 8; ++e)
                {
                    v[e] = cs[r * 16 + c + e];
                }
                if (args.plan.splits == 1)
                {
                    if (args.bias != nullptr)
                    {
                        uint4 const bb = __ldg(reinterpret_cast<uint4 const*>(args.bias + n));
#pragma unroll
                        for (int p = 0; p < 4; ++p)
                        {
                            float2 const bf2 = __half22float2(bitsToHalf2(u4Component(bb, p)));
                            v[2 * p] += bf2.x;
                            v[2 * p + 1] += bf2.y;
                        }
                    }
                    uint4 o;
                    o.x = half2ToBits(__floats2half2_rn(v[0], v[1]));
                    o.y = half2ToBits(__floats2half2_rn(v[2], v[3]));
                    o.z = half2ToBits(__floats2half2_rn(v[4], v[5]));
                    o.w = half2ToBits(__floats2half2_rn(v[6], v[7]));
                    *reinterpret_cast<uint4*>(args.out + m * args.ldo + n) = o;
                }
                else
                {
                    float4* dst = reinterpret_cast<float4*>(
                        args.partial + (static_cast<int64_t>(split) * args.M + m) * args.N + n);
                    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
                    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
                }
            }
            __syncwarp();
        }
    }
    if (args.plan.splits > 1)
    {
        int64_t const mEnd = (mBase + BM) < args.M ? (mBase + BM) : args.M;
        int32_t const nEnd = (nBase + BN) < args.N ? (nBase + BN) : args.N;
        splitKFixup(args, static_cast<int32_t>(blockIdx.y * gridDim.x + blockIdx.x), mBase, mEnd, nBase, nEnd);
    }
}

// ---------------------------------------------------------------------------------------------
// Simple path and 2:4 compaction
// ---------------------------------------------------------------------------------------------

//! w[k, n] of a segment as the fp16 value the graph computes with, widened to float.
__device__ __forceinline__ float elementValue(Segment const& sg, int64_t k, int64_t n, int64_t cols)
{
    if (sg.fmt == kFmtFp16)
    {
        return __half2float(reinterpret_cast<__half const*>(sg.w)[k * cols + n]);
    }
    int32_t q;
    if (sg.fmt == kFmtInt4)
    {
        q = int4At(sg.w + k * (cols / 2), n);
    }
    else
    {
        q = static_cast<int8_t>(sg.w[k * cols + n]);
    }
    float const s = __half2float(sg.scale[scaleIndex(k, n, sg.group, cols)]);
    return __half2float(__float2half_rn(static_cast<float>(q) * s));
}

__global__ void simpleKernel(GemmArgs a)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= a.M * a.N)
    {
        return;
    }
    int64_t const m = idx / a.N;
    int64_t const n = idx % a.N;
    float s = 0.0f;
    for (int sgi = 0; sgi < a.nSeg; ++sgi)
    {
        Segment const& sg = a.seg[sgi];
        for (int64_t k = 0; k < sg.rows; ++k)
        {
            s = fmaf(__half2float(sg.act[m * sg.actStride + k]), elementValue(sg, k, n, a.N), s);
        }
    }
    if (a.bias != nullptr)
    {
        s += __half2float(a.bias[n]);
    }
    a.out[m * a.ldo + n] = __float2half_rn(s);
}

__global__ void compact24Kernel(uint8_t const* w, int64_t K, int64_t N, uint8_t* out)
{
    Sparse24Layout const L = sparse24Layout(K, N);
    int64_t const octs = N / 8;
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= (K / 4) * octs)
    {
        return;
    }
    int64_t const g = idx / octs;
    int64_t const o = idx % octs;
    int64_t const rowB = N / 2;
    uint32_t rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        rows[i] = __ldg(reinterpret_cast<unsigned int const*>(w + (4 * g + i) * rowB + o * 4));
    }
    uint32_t v0;
    uint32_t v1;
    uint32_t meta;
    bool const ok = sparse24CompactOctet(rows, v0, v1, meta);
    *reinterpret_cast<uint32_t*>(out + L.valuesOffset + (2 * g) * rowB + o * 4) = v0;
    *reinterpret_cast<uint32_t*>(out + L.valuesOffset + (2 * g + 1) * rowB + o * 4) = v1;
    *reinterpret_cast<uint32_t*>(out + L.metaOffset + g * rowB + o * 4) = meta;
    if (!ok)
    {
        atomicOr(reinterpret_cast<int32_t*>(out + L.flagOffset), 1);
    }
}

} // namespace
} // namespace eora

#include "eoraLinearSkinny.cuh"

namespace eora
{
namespace
{

// ---------------------------------------------------------------------------------------------
// The CUTLASS path's helpers (eoraLinearPacked.h, "CUTLASS path's copy")
// ---------------------------------------------------------------------------------------------

//! C of the CUTLASS epilogue: the bias repeated on every row, so y = acc + bias is rounded once.
__global__ void biasRowsKernel(__half const* bias, int64_t M, int64_t N, __half* out)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx < M * N)
    {
        out[idx] = bias[idx % N];
    }
}

__global__ void cutlassCodesKernel(uint8_t const* w, uint8_t const* b, int64_t K, int64_t kExt, int64_t N, uint8_t* out)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx < N * (kExt / 2))
    {
        out[idx] = cutlassCodeByte(w, b, K, N, idx / (kExt / 2), idx % (kExt / 2));
    }
}

__global__ void cutlassScalesKernel(EoraAttrs a, __half const* ws, __half const* bs, int64_t groups, __half* out)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx < groups * a.outFeatures)
    {
        bool fromB;
        int64_t const src = cutlassScaleSource(a, idx / a.outFeatures, idx % a.outFeatures, fromB);
        out[idx] = fromB ? bs[src] : ws[src];
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel selection (every instantiation the dispatcher can reach, and no more)
// ---------------------------------------------------------------------------------------------

using KernelFn = void (*)(GemmArgs);

template <int MT, int F0>
KernelFn pickGemvF1(int32_t f1)
{
    switch (f1)
    {
    case kFmtNone: return gemvKernel<MT, F0, kFmtNone>;
    case kFmtInt4: return gemvKernel<MT, F0, kFmtInt4>;
    case kFmtInt8: return gemvKernel<MT, F0, kFmtInt8>;
    case kFmtFp16: return gemvKernel<MT, F0, kFmtFp16>;
    default: return nullptr;
    }
}

template <int MT>
KernelFn pickGemvF0(int32_t f0, int32_t f1)
{
    switch (f0)
    {
    case kFmtInt4: return pickGemvF1<MT, kFmtInt4>(f1);
    case kFmtFp16: return pickGemvF1<MT, kFmtFp16>(f1);
    case kFmtInt4Sparse: return pickGemvF1<MT, kFmtInt4Sparse>(f1);
    case kFmtInt8: return f1 == kFmtNone ? gemvKernel<MT, kFmtInt8, kFmtNone> : nullptr; // only A of t = x.A
    default: return nullptr;
    }
}

KernelFn pickGemv(int32_t mt, int32_t f0, int32_t f1)
{
    switch (mt)
    {
    case 1: return pickGemvF0<1>(f0, f1);
    case 2: return pickGemvF0<2>(f0, f1);
    case 4: return pickGemvF0<4>(f0, f1);
    case 8: return pickGemvF0<8>(f0, f1);
    default: return nullptr;
    }
}

template <int BM, int WM, int WN, int F0>
KernelFn pickTcF1(int32_t f1)
{
    switch (f1)
    {
    case kFmtNone: return tcKernel<BM, WM, WN, F0, kFmtNone>;
    case kFmtInt4: return tcKernel<BM, WM, WN, F0, kFmtInt4>;
    case kFmtInt8: return tcKernel<BM, WM, WN, F0, kFmtInt8>;
    case kFmtFp16: return tcKernel<BM, WM, WN, F0, kFmtFp16>;
    default: return nullptr;
    }
}

template <int BM, int WM, int WN>
KernelFn pickTcF0(int32_t f0, int32_t f1)
{
    switch (f0)
    {
    case kFmtInt4: return pickTcF1<BM, WM, WN, kFmtInt4>(f1);
    case kFmtFp16: return pickTcF1<BM, WM, WN, kFmtFp16>(f1);
    case kFmtInt8: return f1 == kFmtNone ? tcKernel<BM, WM, WN, kFmtInt8, kFmtNone> : nullptr;
    default: return nullptr;
    }
}

//! BM 32: 4 warps side by side (32x32 each); BM 128: 4x2 warps (32x64 each).
KernelFn pickTc(int32_t bm, int32_t f0, int32_t f1, int32_t& threads)
{
    if (bm == 32)
    {
        threads = 128;
        return pickTcF0<32, 1, 4>(f0, f1);
    }
    threads = 256;
    return pickTcF0<128, 4, 2>(f0, f1);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

thread_local std::string tLastError;

int32_t fail(int32_t code, char const* fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    tLastError = buf;
    return code;
}

int32_t envInt(char const* name, int32_t fallback)
{
    char const* v = std::getenv(name);
    if (v == nullptr || *v == '\0')
    {
        return fallback;
    }
    return static_cast<int32_t>(std::strtol(v, nullptr, 10));
}

//! PDL needs sm_90; cached per device because the attribute query is not free on every enqueue.
bool pdlEnabled()
{
    static std::mutex mu;
    static int32_t cache[64];
    static bool init = false;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
    {
        return false;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!init)
    {
        for (int32_t& c : cache)
        {
            c = -1;
        }
        init = true;
    }
    if (cache[dev] < 0)
    {
        int major = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cache[dev] = (major >= 9 && envInt("EORA_DISABLE_PDL", 0) == 0) ? 1 : 0;
    }
    return cache[dev] == 1;
}

EoraAttrs attrsOf(EoraLinearParams const& p)
{
    EoraAttrs a;
    a.inFeatures = p.inFeatures;
    a.outFeatures = p.outFeatures;
    a.rank = p.rank;
    a.weightBits = p.weightBits;
    a.groupSize = p.groupSize;
    a.lowrankBits = p.lowrankBits;
    a.lowrankGroupSize = p.lowrankGroupSize;
    a.sparse24 = p.sparse24;
    a.hasBias = p.hasBias;
    return a;
}

int32_t checkHeader(EoraLinearParams const* p, EoraAttrs& attrs)
{
    if (p == nullptr)
    {
        return fail(EORA_ERR_INVALID, "EoraLinearParams pointer is NULL");
    }
    if (p->version != EORA_PARAMS_VERSION || p->structSize != static_cast<int32_t>(sizeof(EoraLinearParams)))
    {
        return fail(EORA_ERR_INVALID,
            "EoraLinearParams mismatch: caller has version %d size %d, library expects version %d size %d "
            "(rebuild the library or update the caller's struct)",
            p->version, p->structSize, EORA_PARAMS_VERSION, static_cast<int32_t>(sizeof(EoraLinearParams)));
    }
    attrs = attrsOf(*p);
    char msg[256];
    if (!validateAttrs(attrs, msg, sizeof(msg)))
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: %s", msg);
    }
    if (p->M < 0)
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: M must be >= 0 (got %lld)", static_cast<long long>(p->M));
    }
    if (p->algo < kPathAuto || p->algo > kPathCutlass)
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: algo must be 0..5 (got %d)", p->algo);
    }
    return EORA_OK;
}

//! The GEMV / tensor-core crossover is a planning input like the attributes: the caller passes it (the plugin
//! serializes it with the engine), never the environment at run time, so a launch plans exactly what the
//! engine build planned and sized the workspace for.
int32_t gemvMaxMOf(EoraLinearParams const& p)
{
    return p.gemvMaxM > 0 ? p.gemvMaxM : kDefaultGemvMaxM;
}

bool aligned16(void const* ptr)
{
    return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

bool pointersAligned(EoraLinearParams const& p)
{
    void const* ptrs[] = {p.x, p.w, p.wScale, p.a, p.aScale, p.b, p.bScale, p.bias, p.sparse, p.packed, p.cutlass,
        p.y, p.workspace};
    for (void const* q : ptrs)
    {
        if (q != nullptr && !aligned16(q))
        {
            return false;
        }
    }
    return true;
}

ForwardPlan planOf(EoraLinearParams const& p, EoraAttrs const& attrs)
{
    ForwardPlan f = planForward(attrs, p.M, p.algo, gemvMaxMOf(p), pointersAligned(p), p.packed != nullptr,
        p.cutlass != nullptr && cutlassBuilt());
    if (p.noSplitK)
    {
        for (KernelPlan* kp : {&f.tPlan, &f.mainPlan})
        {
            kp->splits = 1;
            kp->unitsPerSplit = kp->totalUnits > 0 ? kp->totalUnits : 1;
        }
        // No partials: t alone (at offset 0) is the scratch.
        f.workspaceBytes = attrs.rank > 0 ? alignUp(p.M * attrs.rank * 2, 256) : 0;
    }
    return f;
}

cudaError_t launch(KernelFn fn, dim3 grid, dim3 block, bool pdl, cudaStream_t stream, GemmArgs const& args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, fn, args);
}

//! Launch the skinny kernel (M <= 16) over packed segments.
int32_t launchSkinny(SkinnyArgs const& args, bool pdl, cudaStream_t stream)
{
    if (args.M == 0)
    {
        return EORA_OK;
    }
    dim3 const grid(static_cast<unsigned>(args.plan.nTiles), static_cast<unsigned>(args.plan.splits));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kSkThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t const err = args.M <= 8 ? cudaLaunchKernelEx(&cfg, skinnyKernel<1>, args)
                                        : cudaLaunchKernelEx(&cfg, skinnyKernel<2>, args);
    if (err != cudaSuccess)
    {
        return fail(EORA_ERR_CUDA, "EoraLinear: skinny kernel launch failed: %s", cudaGetErrorString(err));
    }
    return EORA_OK;
}

//! The packed segment of one matrix (codes at cOff, scales at sOff of the packed buffer).
PackedSeg packedSeg(void const* packed, int64_t cOff, int64_t sOff, __half const* act, int64_t rows, int64_t stride,
    int32_t group)
{
    uint8_t const* base = static_cast<uint8_t const*>(packed);
    return PackedSeg{reinterpret_cast<uint4 const*>(base + cOff), reinterpret_cast<uint4 const*>(base + sOff), act,
        rows / kPackK, stride, group / kPackK};
}

//! Launch one GEMM over the segments in args on the planned path.
int32_t launchGemm(int32_t path, GemmArgs const& args, bool pdl, cudaStream_t stream)
{
    if (args.M == 0)
    {
        return EORA_OK;
    }
    cudaError_t err;
    if (path == kPathSimple)
    {
        int64_t const total = args.M * args.N;
        dim3 const grid(static_cast<unsigned>(ceilDiv(total, 256)));
        err = launch(simpleKernel, grid, dim3(256), false, stream, args);
    }
    else
    {
        int32_t const f0 = args.spVals != nullptr ? static_cast<int32_t>(kFmtInt4Sparse) : args.seg[0].fmt;
        int32_t const f1 = args.nSeg > 1 ? args.seg[1].fmt : static_cast<int32_t>(kFmtNone);
        KernelPlan const& kp = args.plan;
        KernelFn fn;
        int32_t threads = kGemvThreads;
        dim3 grid;
        if (path == kPathGemv)
        {
            fn = pickGemv(kp.mTile, f0, f1);
            grid = dim3(kp.nTiles, kp.splits, kp.mTiles);
        }
        else
        {
            fn = pickTc(kp.mTile, f0, f1, threads);
            grid = dim3(kp.nTiles, kp.mTiles, kp.splits);
        }
        if (fn == nullptr)
        {
            return fail(EORA_ERR_INVALID, "EoraLinear: no kernel for path %d formats %d/%d", path, f0, f1);
        }
        if ((path == kPathGemv && kp.mTiles > 65535) || (path != kPathGemv && kp.mTiles > 65535))
        {
            return fail(EORA_ERR_INVALID, "EoraLinear: M=%lld is too large for one launch",
                static_cast<long long>(args.M));
        }
        err = launch(fn, grid, dim3(threads), pdl, stream, args);
    }
    if (err != cudaSuccess)
    {
        return fail(EORA_ERR_CUDA, "EoraLinear: kernel launch failed: %s", cudaGetErrorString(err));
    }
    return EORA_OK;
}

} // namespace
} // namespace eora

using namespace eora;

extern "C" EORA_API void eoraLinearParamsInit(EoraLinearParams* p)
{
    if (p == nullptr)
    {
        return;
    }
    std::memset(p, 0, sizeof(*p));
    p->version = EORA_PARAMS_VERSION;
    p->structSize = static_cast<int32_t>(sizeof(EoraLinearParams));
    p->weightBits = 4;
    p->groupSize = 128;
    p->lowrankBits = 16;
}

extern "C" EORA_API int32_t eoraLinearParamsSize(void)
{
    return static_cast<int32_t>(sizeof(EoraLinearParams));
}

extern "C" EORA_API int32_t eoraLinearSemaphoreCount(void)
{
    return kSemaphoreCount;
}

extern "C" EORA_API size_t eoraLinearWorkspaceSize(EoraLinearParams const* p)
{
    EoraAttrs attrs;
    if (checkHeader(p, attrs) != EORA_OK)
    {
        return 0;
    }
    return static_cast<size_t>(planOf(*p, attrs).workspaceBytes);
}

extern "C" EORA_API size_t eoraLinearWorkspaceSizeMax(EoraLinearParams const* p, int64_t maxM)
{
    EoraAttrs attrs;
    if (checkHeader(p, attrs) != EORA_OK || maxM < 1)
    {
        return 0;
    }
    return static_cast<size_t>(workspaceBytesMax(attrs, maxM, p->algo, gemvMaxMOf(*p)));
}

extern "C" EORA_API int32_t eoraLinearSelectPath(EoraLinearParams const* p)
{
    EoraAttrs attrs;
    if (checkHeader(p, attrs) != EORA_OK)
    {
        return -1;
    }
    return planOf(*p, attrs).path;
}

extern "C" EORA_API int32_t eoraLinearForward(EoraLinearParams const* p, cudaStream_t stream)
{
    EoraAttrs attrs;
    int32_t rc = checkHeader(p, attrs);
    if (rc != EORA_OK)
    {
        return rc;
    }
    tLastError.clear();
    if (p->M == 0)
    {
        return EORA_OK;
    }
    bool const quantW = attrs.weightBits < 16;
    bool const quantL = attrs.lowrankBits < 16;
    if (p->x == nullptr || p->w == nullptr || p->y == nullptr || (quantW && p->wScale == nullptr))
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: x, w, y%s must be non-NULL", quantW ? " and w_scale" : "");
    }
    if (attrs.rank > 0
        && (p->a == nullptr || p->b == nullptr || (quantL && (p->aScale == nullptr || p->bScale == nullptr))))
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: rank %d needs a, b%s", attrs.rank,
            quantL ? " and their scales" : "");
    }
    if (attrs.hasBias && p->bias == nullptr)
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: has_bias=1 but bias is NULL");
    }
    ForwardPlan const plan = planOf(*p, attrs);
    if (static_cast<int64_t>(p->workspaceBytes) < plan.workspaceBytes
        || (plan.workspaceBytes > 0 && p->workspace == nullptr))
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: workspace of %zu bytes is too small, need %lld",
            p->workspaceBytes, static_cast<long long>(plan.workspaceBytes));
    }
    bool const needSem = plan.path != kPathSimple
        && (plan.mainPlan.splits > 1 || (attrs.rank > 0 && plan.tPlan.splits > 1));
    if (needSem && p->semaphores == nullptr)
    {
        return fail(EORA_ERR_INVALID, "EoraLinear: split-K needs semaphores (or set noSplitK)");
    }

    uint8_t* ws = static_cast<uint8_t*>(p->workspace);
    __half* tBuf = attrs.rank > 0 ? reinterpret_cast<__half*>(ws + plan.tOffset) : nullptr;
    int32_t const fmtW = quantW ? static_cast<int32_t>(kFmtInt4) : static_cast<int32_t>(kFmtFp16);
    int32_t const fmtL = formatOfBits(attrs.lowrankBits);
    int64_t const K = attrs.inFeatures;
    int64_t const r = attrs.rank;

    Segment segW{static_cast<uint8_t const*>(p->w), static_cast<__half const*>(p->wScale),
        static_cast<__half const*>(p->x), K, K, attrs.groupSize, fmtW};
    Segment segA{static_cast<uint8_t const*>(p->a), static_cast<__half const*>(p->aScale),
        static_cast<__half const*>(p->x), K, K, attrs.lowrankGroupSize, fmtL};
    Segment segB{static_cast<uint8_t const*>(p->b), static_cast<__half const*>(p->bScale), tBuf, r, r,
        attrs.lowrankGroupSize, fmtL};

    bool const pdl = attrs.rank > 0 && plan.path != kPathSimple && pdlEnabled();

    if (plan.path == kPathCutlass)
    {
        int64_t const kExt = K + r;
        __half* aExt = reinterpret_cast<__half*>(ws + plan.aExtOffset);
        cudaError_t err = cudaMemcpy2DAsync(aExt, kExt * 2, p->x, K * 2, K * 2, p->M, cudaMemcpyDeviceToDevice, stream);
        if (err != cudaSuccess)
        {
            return fail(EORA_ERR_CUDA, "EoraLinear: copying x for CUTLASS failed: %s", cudaGetErrorString(err));
        }
        if (attrs.rank > 0)
        {
            GemmArgs t{};
            t.seg[0] = segA;
            t.nSeg = 1;
            t.M = p->M;
            t.N = attrs.rank;
            t.out = aExt + K; // t = x.A straight into its columns of [x | t]
            t.ldo = kExt;
            t.partial = reinterpret_cast<float*>(ws + plan.tPartialOffset);
            t.counters = p->semaphores;
            t.plan = plan.tPlan;
            rc = launchGemm(kPathTensorCore, t, false, stream);
            if (rc != EORA_OK)
            {
                return rc;
            }
        }
        __half* cRows = nullptr;
        if (attrs.hasBias)
        {
            cRows = reinterpret_cast<__half*>(ws + plan.cOffset);
            int64_t const total = p->M * attrs.outFeatures;
            biasRowsKernel<<<static_cast<unsigned>(ceilDiv(total, 256)), 256, 0, stream>>>(
                static_cast<__half const*>(p->bias), p->M, attrs.outFeatures, cRows);
        }
        CutlassLayout const L = cutlassLayout(attrs);
        uint8_t const* cp = static_cast<uint8_t const*>(p->cutlass);
        int32_t const e = cutlassGemm(aExt, cp + L.codes, cp + L.scales, cRows, p->y, p->M, attrs.outFeatures, kExt,
            cutlassGroup(attrs), ws + plan.scratchOffset, static_cast<size_t>(kCutlassScratch), stream);
        if (e != 0)
        {
            return fail(EORA_ERR_CUDA, "EoraLinear: CUTLASS GEMM failed: %s",
                cudaGetErrorString(static_cast<cudaError_t>(e)));
        }
        return EORA_OK;
    }

    if (plan.path == kPathSkinny)
    {
        PackedLayout const L = packedLayout(attrs);
        __half const* x = static_cast<__half const*>(p->x);
        if (attrs.rank > 0)
        {
            SkinnyArgs t{};
            t.seg[0] = packedSeg(p->packed, L.aCodes, L.aScales, x, K, K, attrs.lowrankGroupSize);
            t.nSeg = 1;
            t.M = p->M;
            t.N = attrs.rank;
            t.out = tBuf;
            t.ldo = attrs.rank;
            t.partial = reinterpret_cast<float*>(ws + plan.tPartialOffset);
            t.counters = p->semaphores;
            t.plan = plan.tPlan;
            t.triggerDependents = pdl ? 1 : 0;
            rc = launchSkinny(t, false, stream);
            if (rc != EORA_OK)
            {
                return rc;
            }
        }
        SkinnyArgs g{};
        g.seg[0] = packedSeg(p->packed, L.wCodes, L.wScales, x, K, K, attrs.groupSize);
        g.seg[1] = packedSeg(p->packed, L.bCodes, L.bScales, tBuf, r, r, attrs.lowrankGroupSize);
        g.nSeg = attrs.rank > 0 ? 2 : 1;
        g.M = p->M;
        g.N = attrs.outFeatures;
        g.bias = attrs.hasBias ? static_cast<__half const*>(p->bias) : nullptr;
        g.out = static_cast<__half*>(p->y);
        g.ldo = attrs.outFeatures;
        g.partial = reinterpret_cast<float*>(ws + plan.mainPartialOffset);
        g.counters = p->semaphores != nullptr ? p->semaphores + kSemaphoreRegion : nullptr;
        g.plan = plan.mainPlan;
        g.waitBeforeSeg1 = pdl ? 1 : 0;
        return launchSkinny(g, pdl, stream);
    }

    if (attrs.rank > 0)
    {
        GemmArgs t{};
        t.seg[0] = segA;
        t.nSeg = 1;
        t.M = p->M;
        t.N = attrs.rank;
        t.out = tBuf;
        t.ldo = attrs.rank;
        t.partial = reinterpret_cast<float*>(ws + plan.tPartialOffset);
        t.counters = p->semaphores;
        t.plan = plan.tPlan;
        t.triggerDependents = pdl ? 1 : 0;
        rc = launchGemm(plan.path, t, false, stream);
        if (rc != EORA_OK)
        {
            return rc;
        }
    }

    GemmArgs g{};
    g.seg[0] = segW;
    g.seg[1] = segB;
    g.nSeg = attrs.rank > 0 ? 2 : 1;
    g.M = p->M;
    g.N = attrs.outFeatures;
    g.bias = attrs.hasBias ? static_cast<__half const*>(p->bias) : nullptr;
    g.out = static_cast<__half*>(p->y);
    g.ldo = attrs.outFeatures;
    g.partial = reinterpret_cast<float*>(ws + plan.mainPartialOffset);
    g.counters = p->semaphores != nullptr ? p->semaphores + kSemaphoreRegion : nullptr;
    g.plan = plan.mainPlan;
    g.waitBeforeSeg1 = pdl ? 1 : 0;
    bool const sparse = attrs.sparse24 && quantW && plan.path == kPathGemv && p->sparse != nullptr
        && K % 4 == 0 && attrs.groupSize % 4 == 0;
    if (sparse)
    {
        Sparse24Layout const L = sparse24Layout(K, attrs.outFeatures);
        uint8_t const* sp = static_cast<uint8_t const*>(p->sparse);
        g.spVals = sp + L.valuesOffset;
        g.spMeta = sp + L.metaOffset;
        g.spFlag = reinterpret_cast<int32_t const*>(sp + L.flagOffset);
    }
    return launchGemm(plan.path, g, pdl, stream);
}

extern "C" EORA_API size_t eoraSparse24Bytes(int32_t K, int32_t N)
{
    if (K <= 0 || N <= 0 || K % 4 != 0 || N % 8 != 0)
    {
        return 0;
    }
    return static_cast<size_t>(sparse24Layout(K, N).totalBytes);
}

extern "C" EORA_API int32_t eoraSparse24Compact(void const* w, int32_t K, int32_t N, void* out, cudaStream_t stream)
{
    if (w == nullptr || out == nullptr || K <= 0 || N <= 0 || K % 4 != 0 || N % 8 != 0)
    {
        return fail(EORA_ERR_INVALID, "eoraSparse24Compact: need non-NULL pointers, K %% 4 == 0 and N %% 8 == 0 "
                                      "(got K=%d N=%d)", K, N);
    }
    if (!aligned16(w) || !aligned16(out))
    {
        return fail(EORA_ERR_INVALID, "eoraSparse24Compact: pointers must be 16-byte aligned");
    }
    Sparse24Layout const L = sparse24Layout(K, N);
    uint8_t* o = static_cast<uint8_t*>(out);
    cudaError_t err = cudaMemsetAsync(o + L.flagOffset, 0, sizeof(int32_t), stream);
    if (err == cudaSuccess)
    {
        int64_t const threads = static_cast<int64_t>(K / 4) * (N / 8);
        compact24Kernel<<<static_cast<unsigned>(ceilDiv(threads, 256)), 256, 0, stream>>>(
            static_cast<uint8_t const*>(w), K, N, o);
        err = cudaGetLastError();
    }
    if (err != cudaSuccess)
    {
        return fail(EORA_ERR_CUDA, "eoraSparse24Compact: %s", cudaGetErrorString(err));
    }
    return EORA_OK;
}

extern "C" EORA_API size_t eoraLinearPackedBytes(EoraLinearParams const* p)
{
    EoraAttrs attrs;
    if (checkHeader(p, attrs) != EORA_OK || !skinnyShapesOk(attrs))
    {
        return 0;
    }
    return static_cast<size_t>(packedLayout(attrs).totalBytes);
}

extern "C" EORA_API int32_t eoraLinearPack(EoraLinearParams const* p, void* out, cudaStream_t stream)
{
    EoraAttrs attrs;
    int32_t const rc = checkHeader(p, attrs);
    if (rc != EORA_OK)
    {
        return rc;
    }
    if (!skinnyShapesOk(attrs))
    {
        return fail(EORA_ERR_INVALID, "eoraLinearPack: these attributes have no packed layout (INT4 weight, N %% 64, "
                                      "K and group %% 16; INT4 factors with rank %% 64)");
    }
    if (out == nullptr || !aligned16(out) || p->w == nullptr || p->wScale == nullptr
        || (attrs.rank > 0 && (p->a == nullptr || p->aScale == nullptr || p->b == nullptr || p->bScale == nullptr)))
    {
        return fail(EORA_ERR_INVALID, "eoraLinearPack: needs a 16-byte aligned out and every matrix and scale");
    }
    PackedLayout const L = packedLayout(attrs);
    uint8_t* o = static_cast<uint8_t*>(out);
    auto codes = [&](void const* src, int64_t rows, int64_t cols, int64_t off) {
        int64_t const threads = (cols / kPackStripCols) * (rows / kPackK) * 32;
        packCodesKernel<<<static_cast<unsigned>(ceilDiv(threads, 256)), 256, 0, stream>>>(
            static_cast<uint8_t const*>(src), rows, cols, reinterpret_cast<uint4*>(o + off));
    };
    auto scales = [&](void const* src, int64_t groups, int64_t cols, int64_t off) {
        packScalesKernel<<<static_cast<unsigned>(ceilDiv(groups * cols, 256)), 256, 0, stream>>>(
            static_cast<__half const*>(src), groups, cols, reinterpret_cast<__half*>(o + off));
    };
    int64_t const K = attrs.inFeatures;
    int64_t const N = attrs.outFeatures;
    int64_t const r = attrs.rank;
    codes(p->w, K, N, L.wCodes);
    scales(p->wScale, K / attrs.groupSize, N, L.wScales);
    if (r > 0)
    {
        codes(p->a, K, r, L.aCodes);
        scales(p->aScale, K / attrs.lowrankGroupSize, r, L.aScales);
        codes(p->b, r, N, L.bCodes);
        scales(p->bScale, r / attrs.lowrankGroupSize, N, L.bScales);
    }
    cudaError_t const err = cudaGetLastError();
    if (err != cudaSuccess)
    {
        return fail(EORA_ERR_CUDA, "eoraLinearPack: %s", cudaGetErrorString(err));
    }
    return EORA_OK;
}

extern "C" EORA_API size_t eoraLinearCutlassBytes(EoraLinearParams const* p)
{
    EoraAttrs attrs;
    if (checkHeader(p, attrs) != EORA_OK || !cutlassBuilt() || !skinnyShapesOk(attrs))
    {
        return 0;
    }
    return static_cast<size_t>(cutlassLayout(attrs).totalBytes);
}

extern "C" EORA_API int32_t eoraLinearCutlassPack(EoraLinearParams const* p, void* out, cudaStream_t stream)
{
    EoraAttrs attrs;
    int32_t const rc = checkHeader(p, attrs);
    if (rc != EORA_OK)
    {
        return rc;
    }
    if (eoraLinearCutlassBytes(p) == 0)
    {
        return fail(EORA_ERR_INVALID, "eoraLinearCutlassPack: %s", cutlassBuilt() ? "these attributes have no CUTLASS "
            "layout (those of the skinny path)" : "this library was built without CUTLASS (sm_90a + nvidia-cutlass)");
    }
    if (out == nullptr || !aligned16(out) || p->w == nullptr || p->wScale == nullptr
        || (attrs.rank > 0 && (p->b == nullptr || p->bScale == nullptr)))
    {
        return fail(EORA_ERR_INVALID, "eoraLinearCutlassPack: needs a 16-byte aligned out, w, b and their scales");
    }
    CutlassLayout const L = cutlassLayout(attrs);
    uint8_t* o = static_cast<uint8_t*>(out);
    int64_t const K = attrs.inFeatures;
    int64_t const kExt = K + attrs.rank;
    int64_t const N = attrs.outFeatures;
    cutlassCodesKernel<<<static_cast<unsigned>(ceilDiv(N * kExt / 2, 256)), 256, 0, stream>>>(
        static_cast<uint8_t const*>(p->w), static_cast<uint8_t const*>(p->b), K, kExt, N, o + L.codes);
    int64_t const groups = kExt / cutlassGroup(attrs);
    cutlassScalesKernel<<<static_cast<unsigned>(ceilDiv(groups * N, 256)), 256, 0, stream>>>(attrs,
        static_cast<__half const*>(p->wScale), static_cast<__half const*>(p->bScale), groups,
        reinterpret_cast<__half*>(o + L.scales));
    cudaError_t const err = cudaGetLastError();
    if (err != cudaSuccess)
    {
        return fail(EORA_ERR_CUDA, "eoraLinearCutlassPack: %s", cudaGetErrorString(err));
    }
    return EORA_OK;
}

extern "C" EORA_API char const* eoraLastError(void)
{
    return tLastError.c_str();
}
