/*
 * eoraLinearSkinny.cuh: the M <= 16 path (kPathSkinny) and the repack kernels of its packed layout.
 * Included by eoraLinearKernel.cu (it uses that file's helpers and split-K fix-up).
 *
 * y^T = W^T x^T on mma.sync.m16n8k16 with fp32 accumulation: the weight is the A operand (16 output columns
 * x 16 k per MMA) and x^T the B operand (16 k x 8 rows of x), so M <= 8 wastes no MMA lane and M <= 16 takes
 * a second B operand against the same dequantized A. The packed layout (eoraLinearPacked.h) makes each
 * thread's 16-byte load one k16 step of 4 column tiles: per 8 INT4 weights the inner loop spends 1 shift,
 * 4 LOP3, 2 HADD2, 2 HFMA2, 4 HMUL2 (the scale, kept in registers for the whole group) and 1 HMMA (2 for
 * M > 8); x arrives in two 16-byte loads per row per batch of 4 steps. Two batches of kSkDepth loads are in
 * flight per thread (2 x 64 B of weights).
 *
 * A block (4 warps) owns one 64-column strip and one split of K; its warps take consecutive quarters of the
 * split's k16 steps and meet in shared memory. Splits take an equal share of *each* segment (W's rows, then
 * B's), so the residual rows, which need t = x.A, sit at the tail of every block: under programmatic
 * dependent launch only that tail waits (griddepcontrol.wait), after the block's share of W has streamed.
 */
#ifndef EORA_LINEAR_SKINNY_CUH
#define EORA_LINEAR_SKINNY_CUH

#include "eoraLinearPacked.h"

namespace eora
{
namespace
{

constexpr int kSkWarps = 4;
constexpr int kSkThreads = kSkWarps * 32;
constexpr int kSkDepth = 4; //!< k16 steps per batch: 4 x 16 B of weights per thread per batch

//! One segment of the extended K in packed form.
struct PackedSeg
{
    uint4 const* codes;  //!< packed words, strip-major (eoraLinearPacked.h)
    uint4 const* scales; //!< packed scales: one uint4 per (group, strip, g)
    __half const* act;   //!< [M, rows] fp16 activations (x, or t for the residual)
    int64_t steps;       //!< rows / 16
    int64_t actStride;
    int32_t groupSteps;  //!< group size / 16
};

struct SkinnyArgs
{
    PackedSeg seg[2];
    int32_t nSeg;
    int64_t M;
    int32_t N;
    __half const* bias;
    __half* out;
    int64_t ldo;
    float* partial;
    int32_t* counters;
    KernelPlan plan;
    int32_t waitBeforeSeg1;
    int32_t triggerDependents;
};

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

//! One packed word -> the A fragment of one MMA: fp16(q * s) exactly (see eoraLinearPacked.h). sc holds the
//! scales of columns g (low half) and g + 8 (high half); broadcasting them here lets the compiler use HMUL2's
//! .H0_H0 / .H1_H1 operand selects instead of separate PRMTs.
__device__ __forceinline__ void dequantPacked(uint32_t w, uint32_t sc, uint32_t (&a)[4])
{
    uint32_t p[4];
    packedMagicPairs(w, p);
    __half2 const pair = bitsToHalf2(sc);
    __half2 const sLo = __low2half2(pair);
    __half2 const sHi = __high2half2(pair);
    __half2 const loBias = __float2half2_rn(kPackLoBias);
    __half2 const hiScale = __float2half2_rn(kPackHiScale);
    __half2 const hiBias = __float2half2_rn(kPackHiBias);
    a[0] = half2ToBits(__hmul2(__hsub2(bitsToHalf2(p[0]), loBias), sLo));
    a[1] = half2ToBits(__hmul2(__hfma2(bitsToHalf2(p[1]), hiScale, hiBias), sHi));
    a[2] = half2ToBits(__hmul2(__hsub2(bitsToHalf2(p[2]), loBias), sLo));
    a[3] = half2ToBits(__hmul2(__hfma2(bitsToHalf2(p[3]), hiScale, hiBias), sHi));
}

//! k16 steps [b, e) of one segment for this warp's strip; b and e are multiples of kSkDepth (whole 64-row
//! blocks of the packed layout, which also never straddle a scale group). Batches are software-pipelined: the
//! next batch's loads are issued before the current batch's math, so two batches (2 x 64 B of weights per
//! thread) are in flight. Indices are 32-bit and pointers advance by constant strides, keeping address
//! arithmetic out of the inner loop.
template <int MH>
__device__ __forceinline__ void skinnySegment(PackedSeg const& sg, int32_t strip, int32_t b, int32_t e, int32_t strips,
    int64_t M, float (&acc)[MH][4][4])
{
    if (b >= e)
    {
        return;
    }
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    uint4 const* wp = sg.codes + (static_cast<int64_t>(strip) * sg.steps + b) * 32 + lane;
    // Lane t reads rows 16t..16t+15 of each 64-row block of x (the k permutation of eoraLinearPacked.h). Rows
    // of x past M read row 0 instead: B column m of the MMA only reaches output column m, and outputs of rows
    // >= M are never stored, so the loop needs no select or predicate.
    uint4 const* ap[MH];
#pragma unroll
    for (int h = 0; h < MH; ++h)
    {
        int64_t const row = g + 8 * h;
        ap[h] = reinterpret_cast<uint4 const*>(
            sg.act + (row < M ? row : 0) * sg.actStride + static_cast<int64_t>(b) * kPackK + 16 * t);
    }
    int32_t groupEnd = (b / sg.groupSteps + 1) * sg.groupSteps;
    uint4 const* sp = sg.scales + (static_cast<int64_t>(b / sg.groupSteps) * strips + strip) * 8 + g;
    int64_t const spStride = static_cast<int64_t>(strips) * 8;
    uint4 sc = __ldg(sp);

    struct Batch
    {
        uint4 w[kSkDepth];
        uint4 x[MH][2]; //!< 16 halves of x per row: words 2i, 2i+1 are step i's B operand
    };
    auto load = [&](Batch& bt) {
#pragma unroll
        for (int i = 0; i < kSkDepth; ++i)
        {
            bt.w[i] = __ldg(wp + i * 32);
        }
#pragma unroll
        for (int h = 0; h < MH; ++h)
        {
            bt.x[h][0] = __ldcg(ap[h]);
            bt.x[h][1] = __ldcg(ap[h] + 1);
            ap[h] += kSkDepth * kPackK / 8;
        }
        wp += kSkDepth * 32;
    };
    auto compute = [&](int32_t s0, Batch const& bt) {
        if (s0 >= groupEnd) // group sizes are multiples of 64 rows: a batch never straddles two groups
        {
            groupEnd += sg.groupSteps;
            sp += spStride;
            sc = __ldg(sp);
        }
#pragma unroll
        for (int i = 0; i < kSkDepth; ++i)
        {
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                uint32_t a[4];
                dequantPacked(u4Component(bt.w[i], j), u4Component(sc, j), a);
#pragma unroll
                for (int h = 0; h < MH; ++h)
                {
                    mma16816(acc[h][j], a, u4Component(bt.x[h][i >> 1], 2 * (i & 1)),
                        u4Component(bt.x[h][i >> 1], 2 * (i & 1) + 1));
                }
            }
        }
    };

    int32_t const batches = (e - b) / kSkDepth;
    int32_t s = b;
    Batch bA;
    Batch bB;
    load(bA);
    for (int32_t i = 0; i < batches; i += 2)
    {
        if (i + 1 < batches)
        {
            load(bB); // in flight while batch A is multiplied
        }
        compute(s, bA);
        s += kSkDepth;
        if (i + 1 >= batches)
        {
            break;
        }
        if (i + 2 < batches)
        {
            load(bA);
        }
        compute(s, bB);
        s += kSkDepth;
    }
}

//! MH = 1 for M <= 8, 2 for M <= 16. grid = (strips, splits).
template <int MH>
__global__ void __launch_bounds__(kSkThreads) skinnyKernel(SkinnyArgs args)
{
    __shared__ float red[kSkWarps][kPackStripCols][8 * MH];
    if (args.triggerDependents)
    {
        gridTriggerDependents();
    }
    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int const g = lane >> 2;
    int const t = lane & 3;
    int64_t const strip = blockIdx.x;
    int64_t const strips = args.N / kPackStripCols;
    int32_t const split = static_cast<int32_t>(blockIdx.y);

    float acc[MH][4][4];
#pragma unroll
    for (int h = 0; h < MH; ++h)
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
#pragma unroll
            for (int c = 0; c < 4; ++c)
            {
                acc[h][j][c] = 0.0f;
            }
        }
    }

    int64_t b0;
    int64_t e0;
    int64_t b1;
    int64_t e1;
    skinnySplitRange(args.plan, split, args.seg[0].steps, args.nSeg > 1 ? args.seg[1].steps : 0, b0, e0, b1, e1);
    // The warps take consecutive quarters of the split's steps in each segment, in whole batches.
    int32_t const strip32 = static_cast<int32_t>(strip);
    int32_t const strips32 = static_cast<int32_t>(strips);
    auto run = [&](PackedSeg const& sg, int64_t bb, int64_t ee) {
        int64_t const per = alignUp(ceilDiv(ee - bb, kSkWarps), kSkDepth);
        int32_t const wb = static_cast<int32_t>(bb + warp * per < ee ? bb + warp * per : ee);
        int32_t const we = static_cast<int32_t>(wb + per < ee ? wb + per : ee);
        skinnySegment<MH>(sg, strip32, wb, we, strips32, args.M, acc);
    };
    run(args.seg[0], b0, e0);
    if (args.nSeg > 1 && b1 < e1)
    {
        // Wait for t = x.A only if this warp has residual rows (griddepcontrol.wait is per thread).
        int64_t const per = alignUp(ceilDiv(e1 - b1, kSkWarps), kSkDepth);
        if (args.waitBeforeSeg1 && b1 + warp * per < e1)
        {
            gridDependencyWait();
        }
        run(args.seg[1], b1, e1);
    }

    // C fragment: d0, d1 = (column g, rows 2t, 2t+1), d2, d3 = (column g + 8, same rows); h adds 8 rows.
#pragma unroll
    for (int h = 0; h < MH; ++h)
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            red[warp][16 * j + g][8 * h + 2 * t] = acc[h][j][0];
            red[warp][16 * j + g][8 * h + 2 * t + 1] = acc[h][j][1];
            red[warp][16 * j + g + 8][8 * h + 2 * t] = acc[h][j][2];
            red[warp][16 * j + g + 8][8 * h + 2 * t + 1] = acc[h][j][3];
        }
    }
    __syncthreads();
    int32_t const nBase = static_cast<int32_t>(strip * kPackStripCols);
    for (int idx = threadIdx.x; idx < kPackStripCols * 8 * MH; idx += kSkThreads)
    {
        int const n = idx % kPackStripCols;
        int const m = idx / kPackStripCols;
        if (m >= args.M)
        {
            continue;
        }
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kSkWarps; ++w)
        {
            s += red[w][n][m];
        }
        if (args.plan.splits == 1)
        {
            float const bb = args.bias != nullptr ? __half2float(args.bias[nBase + n]) : 0.0f;
            args.out[m * args.ldo + nBase + n] = __float2half_rn(s + bb);
        }
        else
        {
            args.partial[(static_cast<int64_t>(split) * args.M + m) * args.N + nBase + n] = s;
        }
    }
    if (args.plan.splits > 1)
    {
        splitKFixup(args, static_cast<int32_t>(strip), 0, args.M, nBase, nBase + kPackStripCols);
    }
}

//! Packed words of a [K, N] INT4 matrix in the spec layout: one thread per (strip, step, lane), 16 bytes out.
__global__ void packCodesKernel(uint8_t const* w, int64_t K, int64_t N, uint4* out)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    int64_t const steps = K / kPackK;
    if (idx >= (N / kPackStripCols) * steps * 32)
    {
        return;
    }
    int32_t const lane = static_cast<int32_t>(idx % 32);
    int64_t const step = (idx / 32) % steps;
    int64_t const strip = idx / 32 / steps;
    uint4 v;
    v.x = packedWordFromSpec(w, N / 2, strip, step, lane, 0);
    v.y = packedWordFromSpec(w, N / 2, strip, step, lane, 1);
    v.z = packedWordFromSpec(w, N / 2, strip, step, lane, 2);
    v.w = packedWordFromSpec(w, N / 2, strip, step, lane, 3);
    out[idx] = v;
}

//! Packed scales: one thread per (group, column).
__global__ void packScalesKernel(__half const* s, int64_t groups, int64_t N, __half* out)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= groups * N)
    {
        return;
    }
    out[packedScaleIndex(idx / N, idx % N, N)] = s[idx];
}

} // namespace
} // namespace eora

#endif // EORA_LINEAR_SKINNY_CUH
