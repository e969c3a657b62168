/*
 * eoraLinearCommon.h: the index math of the EoraLinear op, shared by the CUDA kernels, the
 * TensorRT glue and the CPU unit tests.
 *
 * Everything here is plain integer arithmetic on the layouts fixed by graphs/eora_linear.spec.json,
 * written once as __host__ __device__ inline functions so the layout rules the kernels run on are the
 * rules a g++-compiled test checks against eora_export/quant.py. No CUDA header is needed: under
 * g++ EORA_HD expands to `inline`.
 */
#ifndef EORA_LINEAR_COMMON_H
#define EORA_LINEAR_COMMON_H

#include <cstddef>
#include <cstdint>
#include <cstdio>

#if defined(__CUDACC__)
#define EORA_HD __host__ __device__ __forceinline__
#else
#define EORA_HD inline
#endif

namespace eora
{

// ---------------------------------------------------------------------------------------------
// Attributes and the input order rule
// ---------------------------------------------------------------------------------------------

//! The spec's integer attributes (plugin_version / plugin_namespace are fixed strings).
struct EoraAttrs
{
    int32_t inFeatures{0};
    int32_t outFeatures{0};
    int32_t rank{0};
    int32_t weightBits{4};
    int32_t groupSize{0};
    int32_t lowrankBits{16};
    int32_t lowrankGroupSize{0};
    int32_t sparse24{0};
    int32_t hasBias{0};
};

//! Roles of the op's inputs, in the spec's order.
enum InputRole : int32_t
{
    kRoleX = 0,
    kRoleW,
    kRoleWScale,
    kRoleA,
    kRoleAScale,
    kRoleB,
    kRoleBScale,
    kRoleBias,
    kNumRoles
};

//! Position of each role among the inputs actually present (-1 when absent), and how many there are.
struct InputIndex
{
    int32_t idx[kNumRoles];
    int32_t count;
};

//! The spec's rule: x, w, w_scale if weight_bits < 16, then if rank > 0: a, a_scale if lowrank_bits < 16,
//! b, b_scale if lowrank_bits < 16, then bias if has_bias. Absent inputs are omitted, not left empty,
//! so every later index shifts; eora_export.onnx.spec.input_names computes the same list.
EORA_HD InputIndex inputIndex(EoraAttrs const& a)
{
    InputIndex r{};
    for (int32_t i = 0; i < kNumRoles; ++i)
    {
        r.idx[i] = -1;
    }
    int32_t n = 0;
    r.idx[kRoleX] = n++;
    r.idx[kRoleW] = n++;
    if (a.weightBits < 16)
    {
        r.idx[kRoleWScale] = n++;
    }
    if (a.rank > 0)
    {
        r.idx[kRoleA] = n++;
        if (a.lowrankBits < 16)
        {
            r.idx[kRoleAScale] = n++;
        }
        r.idx[kRoleB] = n++;
        if (a.lowrankBits < 16)
        {
            r.idx[kRoleBScale] = n++;
        }
    }
    if (a.hasBias)
    {
        r.idx[kRoleBias] = n++;
    }
    r.count = n;
    return r;
}

//! The role of input position `pos`, or -1 when pos is out of range.
EORA_HD int32_t roleOfInput(EoraAttrs const& a, int32_t pos)
{
    InputIndex const ix = inputIndex(a);
    for (int32_t role = 0; role < kNumRoles; ++role)
    {
        if (ix.idx[role] == pos)
        {
            return role;
        }
    }
    return -1;
}

//! Validate attributes against the spec's value sets and constraints. Returns true when valid; otherwise
//! writes a one-line reason naming the attribute and the rule into msg. Host only (snprintf).
inline bool validateAttrs(EoraAttrs const& a, char* msg, size_t msgLen)
{
    char scratch[8];
    if (msg == nullptr || msgLen == 0)
    {
        msg = scratch;
        msgLen = sizeof(scratch);
    }
    msg[0] = '\0';
    if (a.inFeatures <= 0)
    {
        std::snprintf(msg, msgLen, "in_features must be positive (got %d)", a.inFeatures);
        return false;
    }
    if (a.outFeatures <= 0 || a.outFeatures % 2 != 0)
    {
        std::snprintf(msg, msgLen, "out_features must be positive and even (got %d)", a.outFeatures);
        return false;
    }
    if (a.weightBits != 3 && a.weightBits != 4 && a.weightBits != 16)
    {
        std::snprintf(msg, msgLen, "weight_bits must be 3, 4 or 16 (got %d)", a.weightBits);
        return false;
    }
    if (a.weightBits < 16)
    {
        if (a.groupSize <= 0 || a.groupSize % 2 != 0 || a.inFeatures % a.groupSize != 0)
        {
            std::snprintf(msg, msgLen, "group_size must be a positive even divisor of in_features=%d (got %d)",
                a.inFeatures, a.groupSize);
            return false;
        }
    }
    else if (a.groupSize != 0)
    {
        std::snprintf(msg, msgLen, "group_size must be 0 when weight_bits is 16 (got %d)", a.groupSize);
        return false;
    }
    if (a.rank < 0)
    {
        std::snprintf(msg, msgLen, "rank must be >= 0 (got %d)", a.rank);
        return false;
    }
    // Same rules, in the same order of precedence, as eora_export/onnx/spec.py (validate_attrs): the value
    // sets hold whatever the rank, and a group size is only allowed where there are quantized factors.
    if (a.lowrankBits != 4 && a.lowrankBits != 8 && a.lowrankBits != 16)
    {
        std::snprintf(msg, msgLen, "lowrank_bits must be 4, 8 or 16 (got %d)", a.lowrankBits);
        return false;
    }
    int32_t const lg = a.lowrankGroupSize;
    if (a.rank > 0 && a.lowrankBits < 16)
    {
        if (a.lowrankBits == 4 && a.rank % 2 != 0)
        {
            std::snprintf(msg, msgLen, "rank must be even when lowrank_bits is 4 (got rank=%d)", a.rank);
            return false;
        }
        if (lg <= 0 || a.inFeatures % lg != 0 || a.rank % lg != 0)
        {
            std::snprintf(msg, msgLen,
                "lowrank_group_size must divide both in_features=%d and rank=%d (got %d)", a.inFeatures, a.rank, lg);
            return false;
        }
    }
    else if (lg != 0)
    {
        std::snprintf(msg, msgLen, "lowrank_group_size must be 0 when rank is 0 or lowrank_bits is 16 (got %d)", lg);
        return false;
    }
    if (a.sparse24 != 0 && a.sparse24 != 1)
    {
        std::snprintf(msg, msgLen, "sparse24 must be 0 or 1 (got %d)", a.sparse24);
        return false;
    }
    if (a.hasBias != 0 && a.hasBias != 1)
    {
        std::snprintf(msg, msgLen, "has_bias must be 0 or 1 (got %d)", a.hasBias);
        return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Storage formats
// ---------------------------------------------------------------------------------------------

//! How a [rows, cols] matrix is stored. kInt4Sparse is the compacted 2:4 weight (see below) and only
//! ever describes w; kNone marks an absent second segment of the extended K.
enum MatFormat : int32_t
{
    kFmtInt4 = 0,
    kFmtInt8 = 1,
    kFmtFp16 = 2,
    kFmtInt4Sparse = 3,
    kFmtNone = 4
};

//! 3- and 4-bit codes share the INT4 container (spec: "bits_3"), 8 bits is one int8 per value.
EORA_HD int32_t formatOfBits(int32_t bits)
{
    return bits <= 4 ? kFmtInt4 : (bits == 8 ? kFmtInt8 : kFmtFp16);
}

//! Bytes of one row of `cols` values.
EORA_HD int64_t rowBytes(int32_t fmt, int64_t cols)
{
    return fmt == kFmtInt4 ? cols / 2 : (fmt == kFmtInt8 ? cols : 2 * cols);
}

// ---------------------------------------------------------------------------------------------
// INT4 unpacking (spec: element 2j in the low nibble of byte j, 2j+1 in the high nibble, along N)
// ---------------------------------------------------------------------------------------------

//! Sign-extend a 4-bit two's complement code: 0x8..0xF are -8..-1.
EORA_HD int32_t signExtend4(uint32_t nibble)
{
    return static_cast<int32_t>((nibble & 0xFu) ^ 0x8u) - 8;
}

//! Code of column n in a packed row.
EORA_HD int32_t int4At(uint8_t const* row, int64_t n)
{
    uint32_t const byte = row[n >> 1];
    return signExtend4((n & 1) ? (byte >> 4) : byte);
}

//! Code of column c (0..7) of a little-endian 32-bit word holding 8 consecutive columns: byte j holds
//! columns 2j (low) and 2j+1 (high), so column c sits at bits 4c..4c+3.
EORA_HD int32_t int4FromWord(uint32_t word, int32_t c)
{
    return signExtend4(word >> (4 * c));
}

//! Columns 2p and 2p+1 of a packed word as two fp16 bit patterns (low half = column 2p) whose values are
//! 1024 + 8 + q exactly: 0x6400 is 1024.0 in fp16 and its ulp is 1, so or-ing an integer u < 1024 into
//! the mantissa gives 1024 + u. Subtracting kInt4Magic then yields q exactly in fp16 with two integer ops
//! and one half2 subtract, instead of eight int-to-float conversions.
EORA_HD uint32_t int4PairMagic(uint32_t word, int32_t p)
{
    uint32_t const b = (word >> (8 * p)) & 0xFFu;
    uint32_t const v = (b & 0x0Fu) | ((b & 0xF0u) << 12);
    return (v ^ 0x00080008u) | 0x64006400u;
}
constexpr float kInt4Magic = 1032.0f;

//! Same for int8 codes: bytes 2p and 2p+1 of the word; (q ^ 0x80) = q + 128 in [0, 255], so the fp16 value
//! is 1024 + 128 + q.
EORA_HD uint32_t int8PairMagic(uint32_t word, int32_t p)
{
    uint32_t const lo = (word >> (16 * p)) & 0xFFu;
    uint32_t const hi = (word >> (16 * p + 8)) & 0xFFu;
    return ((lo | (hi << 16)) ^ 0x00800080u) | 0x64006400u;
}
constexpr float kInt8Magic = 1152.0f;

//! fp16 bits -> float on the host (normal, subnormal, zero, inf/nan): lets the CPU test read the magic
//! patterns and fp16 scales without a CUDA header.
inline float halfBitsToFloat(uint16_t h)
{
    uint32_t const sign = (h >> 15) & 1u;
    int32_t const exp = (h >> 10) & 0x1F;
    uint32_t const man = h & 0x3FFu;
    float v;
    if (exp == 0)
    {
        v = static_cast<float>(man) * (1.0f / 16777216.0f); // man * 2^-24
    }
    else if (exp == 31)
    {
        v = man ? __builtin_nanf("") : __builtin_inff();
    }
    else
    {
        float const m = 1.0f + static_cast<float>(man) / 1024.0f;
        int32_t e = exp - 15;
        v = m;
        while (e > 0)
        {
            v *= 2.0f;
            --e;
        }
        while (e < 0)
        {
            v *= 0.5f;
            ++e;
        }
    }
    return sign ? -v : v;
}

// ---------------------------------------------------------------------------------------------
// Scale index math (spec: scale[k // group, n] of a row-major [K/group, N] float16 matrix)
// ---------------------------------------------------------------------------------------------

EORA_HD int64_t scaleRow(int64_t k, int32_t groupSize)
{
    return k / groupSize;
}

EORA_HD int64_t scaleIndex(int64_t k, int64_t n, int32_t groupSize, int64_t cols)
{
    return (k / groupSize) * cols + n;
}

EORA_HD int64_t scaleRows(int64_t rows, int32_t groupSize)
{
    return groupSize > 0 ? rows / groupSize : 0;
}

//! Expected shape of a constant input (every role but x), from the spec's "inputs" table: 2-D matrices
//! [rows, stored cols] (INT4 stores cols/2 bytes per row), bias 1-D [N]. Returns the number of dims.
EORA_HD int32_t expectedInputDims(EoraAttrs const& a, int32_t role, int64_t (&dims)[2])
{
    int64_t const K = a.inFeatures;
    int64_t const N = a.outFeatures;
    int64_t const r = a.rank;
    bool const wq = a.weightBits < 16;
    int32_t const lf = formatOfBits(a.lowrankBits);
    dims[0] = 0;
    dims[1] = 0;
    switch (role)
    {
    case kRoleW:
        dims[0] = K;
        dims[1] = wq ? N / 2 : N;
        return 2;
    case kRoleWScale:
        dims[0] = scaleRows(K, a.groupSize);
        dims[1] = N;
        return 2;
    case kRoleA:
        dims[0] = K;
        dims[1] = lf == kFmtInt4 ? r / 2 : r;
        return 2;
    case kRoleAScale:
        dims[0] = scaleRows(K, a.lowrankGroupSize);
        dims[1] = r;
        return 2;
    case kRoleB:
        dims[0] = r;
        dims[1] = lf == kFmtInt4 ? N / 2 : N;
        return 2;
    case kRoleBScale:
        dims[0] = scaleRows(r, a.lowrankGroupSize);
        dims[1] = N;
        return 2;
    case kRoleBias:
        dims[0] = N;
        return 1;
    default: return 0;
    }
}

//! True when the role's tensor holds fp16 values (x, scales, bias, unquantized w/a/b); false for the
//! int8 containers of INT4/INT8 codes.
EORA_HD bool inputIsHalf(EoraAttrs const& a, int32_t role)
{
    switch (role)
    {
    case kRoleW: return a.weightBits >= 16;
    case kRoleA:
    case kRoleB: return a.lowrankBits >= 16;
    default: return true;
    }
}

// ---------------------------------------------------------------------------------------------
// 2:4 compaction of the INT4 weight
// ---------------------------------------------------------------------------------------------
//
// sparse24=1 promises that every 4 consecutive k (k = 4g..4g+3) of each column n hold at most 2 non-zero
// codes. The compacted form keeps exactly 2 codes per group and a 4-bit index nibble:
//   values [K/2, N]  INT4, packed along N like w; row 2g+j is the j-th kept code of group g (i0 < i1)
//   meta   [K/4, N]  4-bit nibbles packed along N like INT4; nibble = i0 | (i1 << 2)
//   flag   int32     0 when every group satisfied the promise; non-zero makes the kernel use dense w
// A word of 8 columns then reads the same way in all three arrays, so the GEMV loads 3 words per group
// of 4 rows instead of 4 (0.75x the bytes) and does half the multiply-adds.

//! Pick the two kept positions of one group of 4 codes: every non-zero is kept; if fewer than 2 are
//! non-zero the lowest remaining positions fill in (their codes are 0, so any choice is exact).
//! Returns false when more than 2 codes are non-zero (the weight is not 2:4).
EORA_HD bool sparse24Select(int32_t q0, int32_t q1, int32_t q2, int32_t q3, int32_t& i0, int32_t& i1)
{
    int32_t const q[4] = {q0, q1, q2, q3};
    int32_t kept[2] = {-1, -1};
    int32_t nk = 0;
    int32_t nz = 0;
    for (int32_t i = 0; i < 4; ++i)
    {
        if (q[i] != 0)
        {
            ++nz;
            if (nk < 2)
            {
                kept[nk++] = i;
            }
        }
    }
    for (int32_t i = 0; i < 4 && nk < 2; ++i)
    {
        if (q[i] == 0 && kept[0] != i)
        {
            kept[nk++] = i;
        }
    }
    i0 = kept[0] < kept[1] ? kept[0] : kept[1];
    i1 = kept[0] < kept[1] ? kept[1] : kept[0];
    return nz <= 2;
}

EORA_HD uint32_t sparse24MetaNibble(int32_t i0, int32_t i1)
{
    return static_cast<uint32_t>(i0) | (static_cast<uint32_t>(i1) << 2);
}

EORA_HD void sparse24MetaDecode(uint32_t nibble, int32_t& i0, int32_t& i1)
{
    i0 = static_cast<int32_t>(nibble & 3u);
    i1 = static_cast<int32_t>((nibble >> 2) & 3u);
}

//! Compact one group of 4 rows for 8 columns: rows[i] is the packed word of row 4g+i. Writes the two value
//! words (rows 2g, 2g+1 of `values`) and the meta word (row g of `meta`). Returns false if any of the 8
//! columns had more than 2 non-zeros.
EORA_HD bool sparse24CompactOctet(uint32_t const rows[4], uint32_t& val0, uint32_t& val1, uint32_t& meta)
{
    bool ok = true;
    val0 = 0;
    val1 = 0;
    meta = 0;
    for (int32_t c = 0; c < 8; ++c)
    {
        uint32_t const shift = 4u * static_cast<uint32_t>(c);
        uint32_t const n0 = (rows[0] >> shift) & 0xFu;
        uint32_t const n1 = (rows[1] >> shift) & 0xFu;
        uint32_t const n2 = (rows[2] >> shift) & 0xFu;
        uint32_t const n3 = (rows[3] >> shift) & 0xFu;
        int32_t i0 = 0;
        int32_t i1 = 1;
        // A zero code is the nibble 0 in two's complement, so the raw nibbles decide non-zero-ness.
        ok = sparse24Select(static_cast<int32_t>(n0), static_cast<int32_t>(n1), static_cast<int32_t>(n2),
                 static_cast<int32_t>(n3), i0, i1)
            && ok;
        uint32_t const nib[4] = {n0, n1, n2, n3};
        val0 |= nib[i0] << shift;
        val1 |= nib[i1] << shift;
        meta |= sparse24MetaNibble(i0, i1) << shift;
    }
    return ok;
}

EORA_HD int64_t alignUp(int64_t v, int64_t a)
{
    return (v + a - 1) / a * a;
}

EORA_HD int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

//! Byte offsets of the compacted 2:4 buffer for a [K, N] weight (K % 4 == 0, N % 8 == 0).
struct Sparse24Layout
{
    int64_t valuesOffset;
    int64_t metaOffset;
    int64_t flagOffset;
    int64_t totalBytes;
};

EORA_HD Sparse24Layout sparse24Layout(int64_t K, int64_t N)
{
    Sparse24Layout l{};
    l.valuesOffset = 0;
    l.metaOffset = alignUp((K / 2) * (N / 2), 256);
    l.flagOffset = l.metaOffset + alignUp((K / 4) * (N / 2), 256);
    l.totalBytes = l.flagOffset + 256;
    return l;
}

// ---------------------------------------------------------------------------------------------
// Launch planning (pure functions so the plugin's workspace query, the launcher and the tests agree)
// ---------------------------------------------------------------------------------------------

enum Path : int32_t
{
    kPathAuto = 0,
    kPathGemv = 1,        //!< CUDA-core GEMV, M rows in chunks of MT <= 8, split-K
    kPathTensorCore = 2,  //!< WMMA fp16 tensor-core GEMM with INT4 dequant into shared memory
    kPathSimple = 3,      //!< one thread per output: any shape, any alignment; also the on-GPU cross-check
    kPathSkinny = 4,      //!< M <= 16: mma.sync with the weight as the A operand, packed INT4 (eoraLinearPacked.h)
    kPathCutlass = 5      //!< opt-in, sm_90a: CUTLASS mixed-input GEMM over the extended K (cutlass/)
};

constexpr int64_t kCutlassScratch = int64_t{1} << 20; //!< reserved for CUTLASS's own workspace (checked at launch)

constexpr int32_t kGemvTileN = 128;     //!< columns per GEMV block: 16 lanes x 8 columns
constexpr int32_t kGemvRowAlign = 64;   //!< split-K row ranges are multiples of this (and of 4 for 2:4)
constexpr int32_t kTcTileN = 128;
constexpr int32_t kTcTileK = 32;
constexpr int32_t kTargetCtas = 264;    //!< 2 x 132 SMs (H100 SXM); device independent so workspace is too
constexpr int32_t kMaxSplits = 32;      //!< thin GEMMs (t = x.A: N = r) need many splits to fill the GPU
constexpr int32_t kSemaphoreRegion = 512;               //!< counters per kernel (t kernel, main kernel)
constexpr int32_t kSemaphoreCount = 2 * kSemaphoreRegion;
constexpr int32_t kDefaultGemvMaxM = 16;
constexpr int32_t kSkinnyMaxM = 16;          //!< two m16n8k16 B operands of 8 rows each
constexpr int32_t kSkinnyTargetCtas = 528;   //!< 4 blocks of 128 threads per H100/H200 SM: bytes in flight
constexpr int32_t kPackStripCols = 64;       //!< skinny: columns per block (4 MMA tiles of 16)
constexpr int32_t kPackK = 16;               //!< skinny: k per MMA step
constexpr int32_t kMaxGemvMaxM = 4096;  //!< largest crossover accepted from a serialized engine or the build env

//! Grid and split-K shape of one kernel launch.
struct KernelPlan
{
    int32_t mTile;        //!< rows per block (GEMV: MT, tensor core: BM)
    int32_t mTiles;
    int32_t nTiles;
    int32_t splits;       //!< split-K factor; > 1 means fp32 partials + last-block fix-up
    int64_t unitsPerSplit; //!< GEMV: rows of the extended K; tensor core: K tiles
    int64_t totalUnits;
};

//! GEMV MT: the smallest of 1, 2, 4, 8 that holds M (larger M loops over chunks of 8 in grid.z).
EORA_HD int32_t gemvRowsPerBlock(int64_t M)
{
    return M <= 1 ? 1 : (M <= 2 ? 2 : (M <= 4 ? 4 : 8));
}

//! Tensor-core BM: 32 up to M = 64 (fewer wasted rows at small batch), 128 beyond.
EORA_HD int32_t tcRowsPerBlock(int64_t M)
{
    return M <= 64 ? 32 : 128;
}

//! Skinny plan: one block per 64-column strip and split; each split takes an equal share of *each* segment's
//! k16 steps (see skinnySplitRange), so the residual's rows, which wait for t = x.A, are spread over every
//! block's tail instead of forming one trailing split that waits alone.
EORA_HD KernelPlan planSkinny(int64_t M, int64_t N, int64_t rows0, int64_t rows1)
{
    KernelPlan p{};
    p.mTile = kSkinnyMaxM;
    p.mTiles = static_cast<int32_t>(ceilDiv(M, kSkinnyMaxM));
    p.nTiles = static_cast<int32_t>(ceilDiv(N, kPackStripCols));
    p.totalUnits = rows0 / kPackK + rows1 / kPackK;
    int64_t const tiles = static_cast<int64_t>(p.mTiles) * p.nTiles;
    int64_t splits = ceilDiv(kSkinnyTargetCtas, tiles);
    splits = splits > kMaxSplits ? kMaxSplits : splits;
    int64_t const maxByWork = p.totalUnits / 16; // >= 16 k16 steps per block: 4 per warp
    splits = splits > maxByWork ? maxByWork : splits;
    if (splits < 1 || tiles > kSemaphoreRegion)
    {
        splits = 1;
    }
    p.splits = static_cast<int32_t>(splits);
    p.unitsPerSplit = ceilDiv(p.totalUnits, splits);
    return p;
}

//! k16 steps [b0, e0) of segment 0 and [b1, e1) of segment 1 owned by split s of a skinny plan.
EORA_HD void skinnySplitRange(KernelPlan const& p, int32_t s, int64_t units0, int64_t units1, int64_t& b0, int64_t& e0,
    int64_t& b1, int64_t& e1)
{
    // Multiples of 16 steps, so each of the 4 warps gets whole batches of 4 and group boundaries (64 or 128
    // rows) fall between batches.
    int64_t const per0 = alignUp(ceilDiv(units0, p.splits), 16);
    int64_t const per1 = alignUp(ceilDiv(units1, p.splits), 16);
    b0 = s * per0 < units0 ? s * per0 : units0;
    e0 = b0 + per0 < units0 ? b0 + per0 : units0;
    b1 = s * per1 < units1 ? s * per1 : units1;
    e1 = b1 + per1 < units1 ? b1 + per1 : units1;
}

//! Plan one kernel over an extended K of rows0 (+ rows1) rows and N columns.
EORA_HD KernelPlan planKernel(int32_t path, int64_t M, int64_t N, int64_t rows0, int64_t rows1)
{
    if (path == kPathSkinny)
    {
        return planSkinny(M, N, rows0, rows1);
    }
    KernelPlan p{};
    bool const gemv = path == kPathGemv;
    p.mTile = gemv ? gemvRowsPerBlock(M) : tcRowsPerBlock(M);
    p.mTiles = static_cast<int32_t>(ceilDiv(M, p.mTile));
    p.nTiles = static_cast<int32_t>(ceilDiv(N, gemv ? kGemvTileN : kTcTileN));
    p.totalUnits = gemv ? rows0 + rows1 : ceilDiv(rows0, kTcTileK) + ceilDiv(rows1, kTcTileK);
    int64_t const tiles = static_cast<int64_t>(p.mTiles) * p.nTiles;
    int64_t splits = ceilDiv(kTargetCtas, tiles);
    splits = splits > kMaxSplits ? kMaxSplits : splits;
    // Keep each split worth its fix-up: >= 128 rows (GEMV: 8 rows per row lane) or >= 4 K tiles (tensor core).
    int64_t const maxByWork = gemv ? p.totalUnits / 128 : p.totalUnits / 4;
    splits = splits > maxByWork ? maxByWork : splits;
    if (splits < 1 || tiles > kSemaphoreRegion)
    {
        splits = 1;
    }
    int64_t per = ceilDiv(p.totalUnits, splits);
    if (gemv)
    {
        per = alignUp(per, kGemvRowAlign);
    }
    per = per < 1 ? 1 : per;
    p.unitsPerSplit = per;
    p.splits = static_cast<int32_t>(ceilDiv(p.totalUnits, per));
    if (p.splits < 1)
    {
        p.splits = 1;
    }
    return p;
}

//! Units [begin, end) of split s.
EORA_HD void splitRange(KernelPlan const& p, int32_t s, int64_t& begin, int64_t& end)
{
    begin = static_cast<int64_t>(s) * p.unitsPerSplit;
    end = begin + p.unitsPerSplit;
    end = end > p.totalUnits ? p.totalUnits : end;
}

//! Everything one forward call launches, and the workspace it needs.
struct ForwardPlan
{
    int32_t path;
    KernelPlan tPlan;     //!< t = x.A (valid when rank > 0 and path != simple)
    KernelPlan mainPlan;
    int64_t tOffset;      //!< fp16 [M, rank] (CUTLASS path: t lives in columns K.. of [x | t])
    int64_t tPartialOffset;
    int64_t mainPartialOffset;
    int64_t workspaceBytes;
    int64_t aExtOffset;   //!< CUTLASS path: fp16 [M, K + r], x and t side by side
    int64_t cOffset;      //!< CUTLASS path: fp16 [M, N] bias rows (the epilogue's C), when has_bias
    int64_t scratchOffset; //!< CUTLASS path: kCutlassScratch bytes for CUTLASS
};

//! The fast paths load 8 columns (and 8 activations) per vector access, so they need these multiples;
//! anything else goes to the simple kernel.
EORA_HD bool fastShapesOk(EoraAttrs const& a)
{
    return a.outFeatures % 8 == 0 && a.inFeatures % 8 == 0 && (a.rank == 0 || a.rank % 8 == 0);
}

//! Shapes the skinny path takes: INT4 (or 3-bit) dense weight, N, K and the group size multiples of 64; with a
//! residual, INT4 factors whose rank and group size are multiples of 64 (t = x.A runs on the same path, N = r).
EORA_HD bool skinnyShapesOk(EoraAttrs const& a)
{
    // 64: a strip of columns, and the k-permutation block of the packed layout (eoraLinearPacked.h).
    // A 2:4 weight takes it too, read dense: the v1 compacted GEMV saves a quarter of the bytes but spends ~16
    // instructions per weight (ALU-bound near 16% of HBM peak on an H200), the skinny loop ~2 (memory-bound).
    bool const w = a.weightBits <= 4 && a.outFeatures % 64 == 0 && a.inFeatures % 64 == 0 && a.groupSize % 64 == 0;
    bool const r = a.rank == 0 || (a.lowrankBits == 4 && a.rank % 64 == 0 && a.lowrankGroupSize % 64 == 0);
    return w && r;
}

//! algo: kPathAuto or a forced path; gemvMaxM: auto picks a small-M path for M <= gemvMaxM; aligned: every
//! pointer is 16-byte aligned (the fast paths' vector loads need it); packed: the packed copies of the INT4
//! matrices (eoraLinearPacked.h) are supplied, so M <= 16 can take the skinny path. Without them, or for shapes
//! it cannot take, the skinny path (auto or forced) becomes the GEMV.
EORA_HD ForwardPlan planForward(EoraAttrs const& a, int64_t M, int32_t algo, int32_t gemvMaxM, bool aligned,
    bool packed = false, bool cutlass = false)
{
    ForwardPlan f{};
    int32_t path = algo;
    if (path == kPathCutlass)
    {
        // Opt-in only (never chosen by auto until measured): needs the CUTLASS copies and the skinny shapes.
        if (cutlass && skinnyShapesOk(a) && aligned && fastShapesOk(a))
        {
            f.path = kPathCutlass;
            int64_t off = 0;
            int64_t const kExt = static_cast<int64_t>(a.inFeatures) + a.rank;
            f.aExtOffset = off;
            f.tOffset = off; // t sits in the columns K.. of [x | t]; the t kernel writes there with ldo = K + r
            off += alignUp(M * kExt * 2, 256);
            if (a.rank > 0)
            {
                f.tPlan = planKernel(kPathTensorCore, M, a.rank, a.inFeatures, 0);
                if (f.tPlan.splits > 1)
                {
                    f.tPartialOffset = off;
                    off += alignUp(static_cast<int64_t>(f.tPlan.splits) * M * a.rank * 4, 256);
                }
            }
            if (a.hasBias)
            {
                f.cOffset = off;
                off += alignUp(M * a.outFeatures * 2, 256);
            }
            f.scratchOffset = off;
            off += kCutlassScratch;
            f.workspaceBytes = off;
            return f;
        }
        path = kPathTensorCore;
    }
    if (path == kPathAuto)
    {
        path = M <= gemvMaxM ? kPathSkinny : kPathTensorCore;
    }
    if (path == kPathSkinny && !(packed && M <= kSkinnyMaxM && skinnyShapesOk(a)))
    {
        path = kPathGemv;
    }
    if (!fastShapesOk(a) || !aligned)
    {
        path = kPathSimple;
    }
    f.path = path;
    int64_t off = 0;
    if (a.rank > 0)
    {
        f.tOffset = off;
        off += alignUp(M * a.rank * 2, 256);
    }
    if (path != kPathSimple)
    {
        if (a.rank > 0)
        {
            f.tPlan = planKernel(path, M, a.rank, a.inFeatures, 0);
            if (f.tPlan.splits > 1)
            {
                f.tPartialOffset = off;
                off += alignUp(static_cast<int64_t>(f.tPlan.splits) * M * a.rank * 4, 256);
            }
        }
        f.mainPlan = planKernel(path, M, a.outFeatures, a.inFeatures, a.rank);
        if (f.mainPlan.splits > 1)
        {
            f.mainPartialOffset = off;
            off += alignUp(static_cast<int64_t>(f.mainPlan.splits) * M * a.outFeatures * 4, 256);
        }
    }
    f.workspaceBytes = off;
    return f;
}

//! Rows per block of the widest tile any path uses: with it, kSplitKMaxM below bounds where split-K can occur.
constexpr int64_t kMaxRowsPerBlock = 128;

//! Past this many rows no plan splits K: a split needs fewer than kTargetCtas output tiles (ceilDiv(264, tiles)
//! >= 2), and a tile holds at most kMaxRowsPerBlock rows, so M > (kTargetCtas - 1) * kMaxRowsPerBlock means at
//! least kTargetCtas tiles. From there on the workspace is t alone, which grows with M.
constexpr int64_t kSplitKMaxM = static_cast<int64_t>(kTargetCtas) * kMaxRowsPerBlock;

//! Largest workspace over every M in [1, maxM]. Exact: split-K makes the need non-monotonic in M, so every M
//! up to kSplitKMaxM is planned (a few microseconds each, at build time only); above it the need is
//! monotonic (t = x.A alone) and maxM itself decides. The CPU test compares this with a brute-force scan.
//! Workspace for M rows whether or not the packed copies turn up at run time (the plugin builds them at the
//! first enqueue; a call inside a graph capture before that runs without them).
inline int64_t workspaceBytesAt(EoraAttrs const& a, int64_t M, int32_t algo, int32_t gemvMaxM)
{
    int64_t const plain = planForward(a, M, algo, gemvMaxM, true, false).workspaceBytes;
    int64_t const packed = planForward(a, M, algo, gemvMaxM, true, true).workspaceBytes;
    return plain > packed ? plain : packed;
}

inline int64_t workspaceBytesMax(EoraAttrs const& a, int64_t maxM, int32_t algo, int32_t gemvMaxM)
{
    int64_t best = 0;
    int64_t const scanTo = maxM < kSplitKMaxM ? maxM : kSplitKMaxM;
    for (int64_t m = 1; m <= scanTo; ++m)
    {
        int64_t const b = workspaceBytesAt(a, m, algo, gemvMaxM);
        best = b > best ? b : best;
    }
    if (maxM > scanTo)
    {
        int64_t const b = workspaceBytesAt(a, maxM, algo, gemvMaxM);
        best = b > best ? b : best;
    }
    return best;
}

// ---------------------------------------------------------------------------------------------
// Split-K semaphore protocol (host-testable; the kernels call the same two functions)
// ---------------------------------------------------------------------------------------------
//
// One int32 counter per output tile. It must be zero before the first launch that uses it: the plugin
// zeroes it with cudaMemsetAsync on the *enqueue* stream (a legacy-stream cudaMemset is not ordered before
// work on a non-blocking stream). Every block of the tile adds one when its partial is written; the block
// that sees splits - 1 is last, sums the partials and stores zero again, so the counter is zero after every
// launch (self-resetting) and the next launch on the same stream may reuse it without another memset.

//! True for the block that arrives last (prev is atomicAdd's return value).
EORA_HD bool splitKIsLast(int32_t prev, int32_t splits)
{
    return prev == splits - 1;
}

//! The value the last block leaves in the counter for the next launch.
constexpr int32_t kSplitKArmed = 0;

} // namespace eora

#endif // EORA_LINEAR_COMMON_H
