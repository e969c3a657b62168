/*
 * eoraLinearPacked.h: the "packed" INT4 layout of the M <= 16 tensor-core path (kPathSkinny), shared by the
 * repack kernel, the skinny kernel and the CPU test (host compiled, checked against eora_export/quant.py).
 *
 * Why a second layout. At batch 1..16 the op is a stream of weights: time = bytes / bandwidth, if every byte
 * costs few instructions and enough bytes are in flight. The spec layout ([K, N/2], 8 codes per 32-bit word
 * along N) makes each thread decode one word per load and FMA it in fp32 (~8 instructions per weight). Here
 * the weight is the *A* operand of mma.m16n8k16 (y^T = W^T x^T: 16 output columns x 16 k per MMA, and x^T
 * as the 16 x 8 B operand, so M <= 8 wastes nothing), and one 32-bit word holds exactly one thread's share
 * of one MMA's A fragment, nibbles ordered so that two AND-OR ops (one LOP3 each) per pair yield fp16
 * "magic" values:
 *
 *   lane l = 4g + t (g = l / 4, t = l % 4), A fragment of a 16 (n) x 16 (k) tile:
 *     a0 = (k 2t, 2t+1;  n g)     a1 = (k 2t, 2t+1;  n g+8)
 *     a2 = (k 2t+8, 2t+9; n g)    a3 = (k 2t+8, 2t+9; n g+8)
 *   word nibbles 0..7 = (2t,g) (2t,g+8) (2t+8,g) (2t+8,g+8) (2t+1,g) (2t+1,g+8) (2t+9,g) (2t+9,g+8)   [k,n]
 *   a0 = (w & 0x000F000F) | 0x64006400          fp16 pair 1024 + u      (u = q + 8, stored pre-biased)
 *   a1 = (w & 0x00F000F0) | 0x64006400          fp16 pair 1024 + 16 u
 *   a2, a3: the same on w >> 8.
 *   q = (1024 + u) - 1032 (one HSUB2), q = (1024 + 16u) / 16 - 72 (one HFMA2), both exact; then one HMUL2
 *   by the pair's scale gives fp16(q * s), the spec's value, rounded once.
 *
 * A thread loads 16 bytes = 4 words = the same k16 step of 4 adjacent 16-column tiles (a "strip" of 64
 * columns), so one warp reads 512 contiguous bytes per k16 step. Codes are stored strip by strip, k16 step by
 * k16 step: word index ((strip * K16 + step) * 32 + lane) * 4 + tile. Scales are permuted the same way, so a
 * thread's 8 scales of one group (tiles 0..3 x columns g, g+8) are one 16-byte load:
 * half index ((group * strips + strip) * 8 + g) * 8 + 2 * tile + (column is g+8).
 *
 * k is permuted inside each block of 64 rows (4 k16 steps), the same way for the weight and, implicitly, for
 * x: an MMA sums over k, so any order works if both operands agree. Step i of a block, MMA row kk of lane t's
 * B fragment (kk = 2t, 2t+1, 2t+8, 2t+9) is row 16t + 4i + {0, 1, 2, 3} of the block. Lane t then needs
 * x[16t .. 16t+15] of the block for all 4 steps: two 16-byte loads per row of x per batch, not eight 4-byte
 * ones. Hence K, the rank and the group sizes must be multiples of 64.
 */
#ifndef EORA_LINEAR_PACKED_H
#define EORA_LINEAR_PACKED_H

#include "eoraLinearCommon.h"

namespace eora
{

constexpr int32_t kPackTileCols = 16; //!< columns per MMA tile (kPackStripCols, kPackK: eoraLinearCommon.h)
constexpr uint32_t kPackLoMask = 0x000F000Fu;
constexpr uint32_t kPackHiMask = 0x00F000F0u;
constexpr uint32_t kPackMagic = 0x64006400u; //!< fp16 1024.0 in both halves
constexpr float kPackLoBias = 1032.0f;       //!< (1024 + u) - 1032 = q
constexpr float kPackHiScale = 0.0625f;      //!< (1024 + 16u) / 16 = 64 + u
constexpr float kPackHiBias = -72.0f;        //!< 64 + u - 72 = q

//! k (0..15) and n (0..15) inside a 16 x 16 tile of nibble `nib` (0..7) of lane `lane`'s word.
EORA_HD void packedCoord(int32_t lane, int32_t nib, int32_t& k, int32_t& n)
{
    int32_t const g = lane >> 2;
    int32_t const t = lane & 3;
    int32_t const hiCol = nib & 1;        // nibbles 1, 3, 5, 7: column g + 8
    int32_t const hiK = (nib >> 1) & 1;   // nibbles 2, 3, 6, 7: k + 8
    int32_t const second = (nib >> 2) & 1; // nibbles 4..7: k + 1
    k = 2 * t + second + 8 * hiK;
    n = g + 8 * hiCol;
}

//! Inverse of packedCoord: which lane and nibble hold (k, n) of a 16 x 16 tile.
EORA_HD void packedSlot(int32_t k, int32_t n, int32_t& lane, int32_t& nib)
{
    int32_t const hiK = k >= 8 ? 1 : 0;
    int32_t const kk = k - 8 * hiK;
    int32_t const t = kk >> 1;
    int32_t const second = kk & 1;
    int32_t const hiCol = n >= 8 ? 1 : 0;
    int32_t const g = n - 8 * hiCol;
    lane = 4 * g + t;
    nib = hiCol + 2 * hiK + 4 * second;
}

constexpr int32_t kPackBlockK = 64; //!< rows per k-permutation block: 4 k16 steps

//! Row (0..63) of a 64-row block that step i (0..3) of the block, MMA row kk (0..15) stands for.
EORA_HD int32_t packedBlockRow(int32_t i, int32_t kk)
{
    int32_t const t = (kk & 7) >> 1;
    int32_t const idx = (kk & 1) + 2 * (kk >> 3);
    return 16 * t + 4 * i + idx;
}

//! Inverse of packedBlockRow: the step and MMA row of row r (0..63) of a block.
EORA_HD void packedBlockSlot(int32_t r, int32_t& i, int32_t& kk)
{
    int32_t const t = r >> 4;
    int32_t const idx = r & 3;
    i = (r >> 2) & 3;
    kk = 2 * t + (idx & 1) + 8 * (idx >> 1);
}

//! Index of the 32-bit word holding (k, n) of a [K, N] weight in the packed layout, and its nibble.
EORA_HD int64_t packedWordIndex(int64_t k, int64_t n, int64_t K, int32_t& nib)
{
    int64_t const strip = n / kPackStripCols;
    int32_t const tile = static_cast<int32_t>((n % kPackStripCols) / kPackTileCols);
    int32_t i;
    int32_t kk;
    packedBlockSlot(static_cast<int32_t>(k % kPackBlockK), i, kk);
    int64_t const step = (k / kPackBlockK) * 4 + i;
    int32_t lane;
    packedSlot(kk, static_cast<int32_t>(n % kPackTileCols), lane, nib);
    return ((strip * (K / kPackK) + step) * 32 + lane) * 4 + tile;
}

//! Index (in halves) of scale[group, n] in the packed scale layout of an N-column matrix.
EORA_HD int64_t packedScaleIndex(int64_t group, int64_t n, int64_t N)
{
    int64_t const strips = N / kPackStripCols;
    int64_t const strip = n / kPackStripCols;
    int32_t const tile = static_cast<int32_t>((n % kPackStripCols) / kPackTileCols);
    int32_t const c = static_cast<int32_t>(n % kPackTileCols);
    int32_t const g = c & 7;
    int32_t const hi = c >> 3;
    return ((group * strips + strip) * 8 + g) * 8 + 2 * tile + hi;
}

//! The packed word of lane `lane`, tile `tile`, k16 step `step`, strip `strip` of a [K, N] INT4 weight in the
//! spec layout (rowBytes = N/2 bytes per row): codes pre-biased by +8 (the nibble xor 8).
EORA_HD uint32_t packedWordFromSpec(
    uint8_t const* w, int64_t rowBytes, int64_t strip, int64_t step, int32_t lane, int32_t tile)
{
    uint32_t word = 0;
    for (int32_t nib = 0; nib < 8; ++nib)
    {
        int32_t k;
        int32_t n;
        packedCoord(lane, nib, k, n);
        int64_t const kk = (step / 4) * kPackBlockK + packedBlockRow(static_cast<int32_t>(step % 4), k);
        int64_t const nn = strip * kPackStripCols + tile * kPackTileCols + n;
        uint32_t const byte = w[kk * rowBytes + (nn >> 1)];
        uint32_t const code = ((nn & 1) ? (byte >> 4) : byte) & 0xFu;
        word |= (code ^ 0x8u) << (4 * nib);
    }
    return word;
}

//! The four fp16 "magic" pairs of a packed word (see the file comment): a0, a1 (x16), a2, a3 (x16). The AND-OR
//! is one LOP3 each on the GPU; on the host the same bits, so the CPU test checks the kernel's decoding.
EORA_HD uint32_t andOr(uint32_t a, uint32_t mask, uint32_t bits)
{
#if defined(__CUDA_ARCH__)
    // One LOP3 (lut 0xEA = (a & b) | c). Written out, the compiler emits an AND and an OR, since LOP3 takes one
    // immediate: here the magic lives in a register, loaded once.
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
    return r;
#else
    return (a & mask) | bits;
#endif
}

EORA_HD void packedMagicPairs(uint32_t w, uint32_t (&p)[4])
{
    uint32_t const w8 = w >> 8;
    p[0] = andOr(w, kPackLoMask, kPackMagic);
    p[1] = andOr(w, kPackHiMask, kPackMagic);
    p[2] = andOr(w8, kPackLoMask, kPackMagic);
    p[3] = andOr(w8, kPackHiMask, kPackMagic);
}

//! Byte offsets of the packed copies of w (+ scales), a and b (+ scales) in one buffer.
struct PackedLayout
{
    int64_t wCodes;
    int64_t wScales;
    int64_t aCodes;
    int64_t aScales;
    int64_t bCodes;
    int64_t bScales;
    int64_t totalBytes;
};

EORA_HD PackedLayout packedLayout(EoraAttrs const& a)
{
    PackedLayout l{};
    int64_t const K = a.inFeatures;
    int64_t const N = a.outFeatures;
    int64_t const r = a.rank;
    int64_t off = 0;
    l.wCodes = off;
    off += alignUp(K * N / 2, 256);
    l.wScales = off;
    off += alignUp(scaleRows(K, a.groupSize) * N * 2, 256);
    l.aCodes = off;
    off += alignUp(K * r / 2, 256);
    l.aScales = off;
    off += alignUp(scaleRows(K, a.lowrankGroupSize) * r * 2, 256);
    l.bCodes = off;
    off += alignUp(r * N / 2, 256);
    l.bScales = off;
    off += alignUp(scaleRows(r, a.lowrankGroupSize) * N * 2, 256);
    l.totalBytes = off;
    return l;
}

// ---------------------------------------------------------------------------------------------
// The CUTLASS path's copy: W and B as one K-major INT4 matrix over the extended K
// ---------------------------------------------------------------------------------------------
//
// CUTLASS's Hopper mixed-input GEMM wants the INT4 operand K-major: wt[n, kExt] for kExt in [0, K + r), two codes
// per byte along kExt, low nibble first (cutlass::int4b_t), rows of (K + r) / 2 bytes; kExt < K is W's row kExt,
// kExt >= K is B's row kExt - K. Its scales are one fp16 [(K + r) / g, N] matrix at one group size g: the gcd of
// group_size and lowrank_group_size (both multiples of 64 on this path), W's and B's scales repeated as needed.

EORA_HD int32_t gcd32(int32_t a, int32_t b)
{
    while (b != 0)
    {
        int32_t const t = a % b;
        a = b;
        b = t;
    }
    return a;
}

EORA_HD int32_t cutlassGroup(EoraAttrs const& a)
{
    return a.rank > 0 ? gcd32(a.groupSize, a.lowrankGroupSize) : a.groupSize;
}

struct CutlassLayout
{
    int64_t codes;
    int64_t scales;
    int64_t totalBytes;
};

EORA_HD CutlassLayout cutlassLayout(EoraAttrs const& a)
{
    int64_t const kExt = static_cast<int64_t>(a.inFeatures) + a.rank;
    CutlassLayout l{};
    l.codes = 0;
    l.scales = alignUp(a.outFeatures * kExt / 2, 256);
    l.totalBytes = l.scales + alignUp(kExt / cutlassGroup(a) * a.outFeatures * 2, 256);
    return l;
}

//! Byte j of row n of the K-major copy, from W ([K, N/2] spec layout) and B ([r, N/2]).
EORA_HD uint8_t cutlassCodeByte(uint8_t const* w, uint8_t const* b, int64_t K, int64_t N, int64_t n, int64_t j)
{
    uint32_t out = 0;
    for (int32_t h = 0; h < 2; ++h)
    {
        int64_t const k = 2 * j + h;
        uint8_t const* row = k < K ? w + k * (N / 2) : b + (k - K) * (N / 2);
        uint32_t const byte = row[n >> 1];
        out |= (((n & 1) ? (byte >> 4) : byte) & 0xFu) << (4 * h);
    }
    return static_cast<uint8_t>(out);
}

//! Index into W's (or, past K, B's) scale matrix of the copy's scale (kg, n); sets fromB.
EORA_HD int64_t cutlassScaleSource(EoraAttrs const& a, int64_t kg, int64_t n, bool& fromB)
{
    int64_t const k = kg * cutlassGroup(a);
    fromB = k >= a.inFeatures;
    return fromB ? ((k - a.inFeatures) / a.lowrankGroupSize) * a.outFeatures + n : (k / a.groupSize) * a.outFeatures + n;
}

} // namespace eora

#endif // EORA_LINEAR_PACKED_H
