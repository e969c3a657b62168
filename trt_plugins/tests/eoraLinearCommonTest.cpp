/*
 * CPU unit test of eoraLinearCommon.h (g++ only: no CUDA, no TensorRT).
 *
 * tests/test_plugin_cpu.py writes fixture files from eora_export/quant.py (codes, packed bytes, fp16 scales
 * and dequantized values, 2:4 matrices, attribute sets) and runs this program on each. Every check prints
 * "FAIL <what>" on a mismatch; the last line is "common: <n> passed, <m> failed" and the exit code is the
 * number of failures (capped), so the Python side can assert on both.
 *
 * Fixture format: whitespace-separated tokens, one section after another:
 *   int4 R C  <R*C codes> <R*C/2 packed bytes>            codes in [-8,7], packed along C (spec layout)
 *   int8 n    <n codes>
 *   dequant K N G  <K*N codes> <K/G*N scale fp16 bits> <K*N expected fp16 bits>   all in the [K, N] layout
 *   sparse K N  <K*N/2 packed bytes> <ok> <K/2*N/2 value bytes> <K/4*N/2 meta bytes>
 *   index n   n x (9 attributes, count, 8 indices)
 *   validate n  n x (9 attributes, expected 0/1)
 *   plan n    n x (9 attributes, M)        invariants of the launch planner
 *   wsmax n   n x (9 attributes, maxM, gemvMaxM)   workspaceBytesMax against a brute-force scan of every M
 *   splitk n  n x (splits, tiles, launches, seed)  the split-K counter protocol, simulated
 *   packed K N G  <K*N codes> <K*N/2 packed bytes> <K/G*N scale bits> <K*N expected fp16 bits>
 *             the skinny path's packed layout: repack, decode as the kernel does, dequantize
 *   cutlass K N r G LG  <W bytes> <B bytes> <W scale bits> <B scale bits> <expected K-major bytes> <expected scales>
 *             the CUTLASS path's copy of [W ; B]
 */
#include "eoraLinearCommon.h"
#include "eoraLinearPacked.h"

#include <cmath>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

using namespace eora;

namespace
{

int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& what)
{
    if (ok)
    {
        ++gPassed;
    }
    else
    {
        ++gFailed;
        if (gFailed <= 50)
        {
            std::printf("FAIL %s\n", what.c_str());
        }
    }
}

//! float -> fp16 bits, round to nearest even (normal and subnormal range; inputs here are finite).
uint16_t floatToHalfBits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t const sign = (u >> 16) & 0x8000u;
    float const a = std::fabs(f);
    if (a == 0.0f)
    {
        return static_cast<uint16_t>(sign);
    }
    if (a >= 65520.0f)
    {
        return static_cast<uint16_t>(sign | 0x7C00u);
    }
    int e;
    std::frexp(a, &e); // a = m * 2^e, m in [0.5, 1)
    int exp16 = e - 1 + 15;
    if (exp16 <= 0)
    {
        // subnormal: units of 2^-24
        float const q = std::nearbyint(a * 16777216.0f);
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
    }
    float const scaled = std::ldexp(a, 10 - (e - 1)); // in [1024, 2048)
    float r = std::nearbyint(scaled);                  // default rounding mode: to nearest even
    if (r >= 2048.0f)
    {
        r = 1024.0f;
        ++exp16;
    }
    if (exp16 >= 31)
    {
        return static_cast<uint16_t>(sign | 0x7C00u);
    }
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp16) << 10) | (static_cast<uint32_t>(r) - 1024u));
}

EoraAttrs readAttrs(std::istream& in)
{
    EoraAttrs a;
    in >> a.inFeatures >> a.outFeatures >> a.rank >> a.weightBits >> a.groupSize >> a.lowrankBits
        >> a.lowrankGroupSize >> a.sparse24 >> a.hasBias;
    return a;
}

std::string attrText(EoraAttrs const& a)
{
    char buf[160];
    std::snprintf(buf, sizeof(buf), "[in=%d out=%d r=%d wb=%d g=%d lb=%d lg=%d sp=%d bias=%d]", a.inFeatures,
        a.outFeatures, a.rank, a.weightBits, a.groupSize, a.lowrankBits, a.lowrankGroupSize, a.sparse24, a.hasBias);
    return buf;
}

void testInt4(std::istream& in)
{
    int R;
    int C;
    in >> R >> C;
    std::vector<int> codes(static_cast<size_t>(R) * C);
    std::vector<uint8_t> packed(static_cast<size_t>(R) * C / 2);
    for (int& v : codes)
    {
        in >> v;
    }
    for (uint8_t& b : packed)
    {
        int v;
        in >> v;
        b = static_cast<uint8_t>(v);
    }
    for (int r = 0; r < R; ++r)
    {
        uint8_t const* row = packed.data() + static_cast<size_t>(r) * C / 2;
        for (int c = 0; c < C; ++c)
        {
            int const want = codes[static_cast<size_t>(r) * C + c];
            check(int4At(row, c) == want, "int4At r=" + std::to_string(r) + " c=" + std::to_string(c));
            if (c % 8 == 0 && c + 8 <= C)
            {
                uint32_t word;
                std::memcpy(&word, row + c / 2, 4); // little-endian, as the kernels load it
                for (int j = 0; j < 8; ++j)
                {
                    int const wj = codes[static_cast<size_t>(r) * C + c + j];
                    check(int4FromWord(word, j) == wj, "int4FromWord r=" + std::to_string(r) + " c=" + std::to_string(c + j));
                }
                for (int p = 0; p < 4; ++p)
                {
                    uint32_t const m = int4PairMagic(word, p);
                    float const lo = halfBitsToFloat(static_cast<uint16_t>(m & 0xFFFFu)) - kInt4Magic;
                    float const hi = halfBitsToFloat(static_cast<uint16_t>(m >> 16)) - kInt4Magic;
                    check(lo == static_cast<float>(codes[static_cast<size_t>(r) * C + c + 2 * p])
                            && hi == static_cast<float>(codes[static_cast<size_t>(r) * C + c + 2 * p + 1]),
                        "int4PairMagic r=" + std::to_string(r) + " c=" + std::to_string(c + 2 * p));
                }
            }
        }
    }
}

void testInt8(std::istream& in)
{
    int n;
    in >> n;
    std::vector<int> codes(n);
    for (int& v : codes)
    {
        in >> v;
    }
    for (int i = 0; i + 4 <= n; i += 4)
    {
        uint32_t word = 0;
        for (int j = 0; j < 4; ++j)
        {
            word |= (static_cast<uint32_t>(codes[i + j]) & 0xFFu) << (8 * j);
        }
        for (int p = 0; p < 2; ++p)
        {
            uint32_t const m = int8PairMagic(word, p);
            float const lo = halfBitsToFloat(static_cast<uint16_t>(m & 0xFFFFu)) - kInt8Magic;
            float const hi = halfBitsToFloat(static_cast<uint16_t>(m >> 16)) - kInt8Magic;
            check(lo == static_cast<float>(codes[i + 2 * p]) && hi == static_cast<float>(codes[i + 2 * p + 1]),
                "int8PairMagic i=" + std::to_string(i + 2 * p));
        }
    }
}

//! The kernels compute fp16(fp32(q) * fp32(scale[k / G, n])); quant.dequantize must agree bit for bit.
void testDequant(std::istream& in)
{
    int K;
    int N;
    int G;
    in >> K >> N >> G;
    std::vector<int> codes(static_cast<size_t>(K) * N);
    std::vector<uint16_t> scales(static_cast<size_t>(K / G) * N);
    std::vector<uint16_t> expect(static_cast<size_t>(K) * N);
    for (int& v : codes)
    {
        in >> v;
    }
    for (uint16_t& s : scales)
    {
        int v;
        in >> v;
        s = static_cast<uint16_t>(v);
    }
    for (uint16_t& s : expect)
    {
        int v;
        in >> v;
        s = static_cast<uint16_t>(v);
    }
    check(scaleRows(K, G) == K / G, "scaleRows");
    int bad = 0;
    for (int k = 0; k < K; ++k)
    {
        for (int n = 0; n < N; ++n)
        {
            float const s = halfBitsToFloat(scales[static_cast<size_t>(scaleIndex(k, n, G, N))]);
            uint16_t const got = floatToHalfBits(static_cast<float>(codes[static_cast<size_t>(k) * N + n]) * s);
            if (got != expect[static_cast<size_t>(k) * N + n])
            {
                ++bad;
            }
        }
    }
    check(bad == 0, "dequant via scaleIndex: " + std::to_string(bad) + " of " + std::to_string(K * N) + " differ");
    check(scaleRow(G - 1, G) == 0 && scaleRow(G, G) == 1, "scaleRow boundaries");
}

void testSparse(std::istream& in)
{
    int K;
    int N;
    in >> K >> N;
    int64_t const rowB = N / 2;
    std::vector<uint8_t> w(static_cast<size_t>(K) * rowB);
    for (uint8_t& b : w)
    {
        int v;
        in >> v;
        b = static_cast<uint8_t>(v);
    }
    int expectOk;
    in >> expectOk;
    std::vector<uint8_t> wantVals(static_cast<size_t>(K / 2) * rowB);
    std::vector<uint8_t> wantMeta(static_cast<size_t>(K / 4) * rowB);
    for (uint8_t& b : wantVals)
    {
        int v;
        in >> v;
        b = static_cast<uint8_t>(v);
    }
    for (uint8_t& b : wantMeta)
    {
        int v;
        in >> v;
        b = static_cast<uint8_t>(v);
    }
    std::vector<uint8_t> vals(wantVals.size());
    std::vector<uint8_t> meta(wantMeta.size());
    bool allOk = true;
    for (int g = 0; g < K / 4; ++g)
    {
        for (int o = 0; o < N / 8; ++o)
        {
            uint32_t rows[4];
            for (int i = 0; i < 4; ++i)
            {
                std::memcpy(&rows[i], w.data() + (4 * g + i) * rowB + o * 4, 4);
            }
            uint32_t v0;
            uint32_t v1;
            uint32_t m;
            allOk = sparse24CompactOctet(rows, v0, v1, m) && allOk;
            std::memcpy(vals.data() + (2 * g) * rowB + o * 4, &v0, 4);
            std::memcpy(vals.data() + (2 * g + 1) * rowB + o * 4, &v1, 4);
            std::memcpy(meta.data() + g * rowB + o * 4, &m, 4);
        }
    }
    check(allOk == (expectOk != 0), "sparse24 validity flag");
    if (expectOk)
    {
        check(vals == wantVals, "sparse24 kept values match quant.py's compaction");
        check(meta == wantMeta, "sparse24 index nibbles match quant.py's compaction");
        // Decompress with the decode helpers and compare with the dense codes.
        int bad = 0;
        for (int g = 0; g < K / 4; ++g)
        {
            for (int n = 0; n < N; ++n)
            {
                int32_t i0;
                int32_t i1;
                sparse24MetaDecode(static_cast<uint32_t>(int4At(meta.data() + g * rowB, n)) & 0xFu, i0, i1);
                check(i0 < i1, "sparse24 indices ordered");
                for (int i = 0; i < 4; ++i)
                {
                    int dense = int4At(w.data() + (4 * g + i) * rowB, n);
                    int rec = i == i0 ? int4At(vals.data() + (2 * g) * rowB, n)
                                      : (i == i1 ? int4At(vals.data() + (2 * g + 1) * rowB, n) : 0);
                    bad += dense != rec;
                }
            }
        }
        check(bad == 0, "sparse24 round trip: " + std::to_string(bad) + " codes differ");
    }
    Sparse24Layout const L = sparse24Layout(K, N);
    check(L.metaOffset >= static_cast<int64_t>(wantVals.size()) && L.flagOffset >= L.metaOffset + static_cast<int64_t>(wantMeta.size())
            && L.metaOffset % 256 == 0 && L.flagOffset % 256 == 0 && L.totalBytes > L.flagOffset,
        "sparse24Layout regions are disjoint and aligned");
}

void testIndex(std::istream& in)
{
    int n;
    in >> n;
    for (int i = 0; i < n; ++i)
    {
        EoraAttrs const a = readAttrs(in);
        int count;
        in >> count;
        InputIndex const ix = inputIndex(a);
        bool ok = ix.count == count;
        for (int role = 0; role < kNumRoles; ++role)
        {
            int want;
            in >> want;
            ok = ok && ix.idx[role] == want;
            if (want >= 0)
            {
                ok = ok && roleOfInput(a, want) == role;
            }
        }
        ok = ok && roleOfInput(a, count) == -1;
        check(ok, "inputIndex " + attrText(a));
    }
}

void testValidate(std::istream& in)
{
    int n;
    in >> n;
    for (int i = 0; i < n; ++i)
    {
        EoraAttrs const a = readAttrs(in);
        int want;
        in >> want;
        char msg[256];
        bool const ok = validateAttrs(a, msg, sizeof(msg));
        check(ok == (want != 0), "validateAttrs " + attrText(a) + " -> " + (ok ? "valid" : msg));
        if (!ok)
        {
            check(msg[0] != '\0', "validateAttrs gives a reason " + attrText(a));
        }
    }
}

//! Planner invariants: split ranges tile the extended K exactly, splits fit the semaphore regions, workspace
//! regions are disjoint, and the max-workspace query bounds every M.
void testPlan(std::istream& in)
{
    int n;
    in >> n;
    for (int i = 0; i < n; ++i)
    {
        EoraAttrs const a = readAttrs(in);
        int64_t M;
        in >> M;
        for (int32_t algo : {static_cast<int32_t>(kPathAuto), static_cast<int32_t>(kPathGemv),
                 static_cast<int32_t>(kPathTensorCore)})
        {
            ForwardPlan const f = planForward(a, M, algo, kDefaultGemvMaxM, true);
            std::string const tag = attrText(a) + " M=" + std::to_string(M) + " algo=" + std::to_string(algo);
            check(f.path == (fastShapesOk(a) ? (algo == kPathAuto ? (M <= kDefaultGemvMaxM ? kPathGemv : kPathTensorCore) : algo)
                                             : kPathSimple),
                "path choice " + tag);
            if (f.path == kPathSimple)
            {
                continue;
            }
            KernelPlan const* plans[2] = {&f.mainPlan, a.rank > 0 ? &f.tPlan : nullptr};
            for (KernelPlan const* kp : plans)
            {
                if (kp == nullptr)
                {
                    continue;
                }
                int64_t covered = 0;
                bool contiguous = true;
                for (int32_t s = 0; s < kp->splits; ++s)
                {
                    int64_t b;
                    int64_t e;
                    splitRange(*kp, s, b, e);
                    contiguous = contiguous && b == covered && e > b;
                    covered = e;
                    if (f.path == kPathGemv)
                    {
                        contiguous = contiguous && b % kGemvRowAlign == 0;
                    }
                }
                check(contiguous && covered == kp->totalUnits, "split ranges tile K " + tag);
                check(kp->splits >= 1 && kp->splits <= kMaxSplits, "split count bounded " + tag);
                check(kp->splits == 1 || static_cast<int64_t>(kp->mTiles) * kp->nTiles <= kSemaphoreRegion,
                    "split-K tiles fit a semaphore region " + tag);
                check(static_cast<int64_t>(kp->mTiles) * kp->mTile >= M, "row tiles cover M " + tag);
            }
            int64_t const tBytes = a.rank > 0 ? M * a.rank * 2 : 0;
            bool disjoint = f.workspaceBytes >= tBytes;
            if (f.tPlan.splits > 1 && a.rank > 0)
            {
                disjoint = disjoint && f.tPartialOffset >= tBytes
                    && f.tPartialOffset + f.tPlan.splits * M * a.rank * 4 <= f.workspaceBytes;
            }
            if (f.mainPlan.splits > 1)
            {
                disjoint = disjoint && f.mainPartialOffset >= tBytes
                    && f.mainPartialOffset + f.mainPlan.splits * M * a.outFeatures * 4 <= f.workspaceBytes
                    && (f.tPlan.splits <= 1 || f.mainPartialOffset >= f.tPartialOffset + f.tPlan.splits * M * a.rank * 4);
            }
            check(disjoint, "workspace regions disjoint " + tag);
        }
        check(workspaceBytesMax(a, M, kPathAuto, kDefaultGemvMaxM)
                >= planForward(a, M, kPathAuto, kDefaultGemvMaxM, true).workspaceBytes,
            "workspaceBytesMax bounds M " + attrText(a));
        // With the packed copies, small M takes the skinny path where the shape allows it; each split owns an
        // equal share of both segments, and the shares tile each segment exactly.
        ForwardPlan const sk = planForward(a, M, kPathAuto, kDefaultGemvMaxM, true, true);
        bool const wantSkinny = M <= kDefaultGemvMaxM && M <= kSkinnyMaxM && skinnyShapesOk(a) && fastShapesOk(a);
        check((sk.path == kPathSkinny) == wantSkinny, "skinny path choice " + attrText(a) + " M=" + std::to_string(M));
        if (sk.path == kPathSkinny)
        {
            KernelPlan const* plans[2] = {&sk.mainPlan, a.rank > 0 ? &sk.tPlan : nullptr};
            for (int32_t pi = 0; pi < 2; ++pi)
            {
                KernelPlan const* kp = plans[pi];
                if (kp == nullptr)
                {
                    continue;
                }
                int64_t const u0 = a.inFeatures / kPackK;
                int64_t const u1 = pi == 0 ? a.rank / kPackK : 0;
                int64_t c0 = 0;
                int64_t c1 = 0;
                bool ok = kp->splits >= 1 && kp->splits <= kMaxSplits && kp->nTiles * kPackStripCols
                        == (pi == 0 ? a.outFeatures : a.rank);
                for (int32_t sp = 0; sp < kp->splits; ++sp)
                {
                    int64_t b0;
                    int64_t e0;
                    int64_t b1;
                    int64_t e1;
                    skinnySplitRange(*kp, sp, u0, u1, b0, e0, b1, e1);
                    ok = ok && b0 == c0 && e0 >= b0 && b1 == c1 && e1 >= b1;
                    c0 = e0;
                    c1 = e1;
                }
                check(ok && c0 == u0 && c1 == u1, "skinny split ranges tile both segments " + attrText(a));
            }
            check(sk.workspaceBytes <= workspaceBytesAt(a, M, kPathAuto, kDefaultGemvMaxM),
                "workspaceBytesAt covers the skinny plan " + attrText(a));
        }
    }
}


//! workspaceBytesMax(maxM) must equal the largest need over every M in [1, maxM], for every algo: this is the
//! size TensorRT allocates, so a smaller value means out-of-bounds writes at some M of the profile.
void testWorkspaceMax(std::istream& in)
{
    int n;
    in >> n;
    for (int i = 0; i < n; ++i)
    {
        EoraAttrs const a = readAttrs(in);
        int64_t maxM;
        int32_t gemvMaxM;
        in >> maxM >> gemvMaxM;
        for (int32_t algo : {static_cast<int32_t>(kPathAuto), static_cast<int32_t>(kPathGemv),
                 static_cast<int32_t>(kPathTensorCore)})
        {
            int64_t brute = 0;
            int64_t at = 0;
            for (int64_t m = 1; m <= maxM; ++m)
            {
                int64_t const b = workspaceBytesAt(a, m, algo, gemvMaxM);
                if (b > brute)
                {
                    brute = b;
                    at = m;
                }
            }
            int64_t const got = workspaceBytesMax(a, maxM, algo, gemvMaxM);
            check(got == brute,
                "workspaceBytesMax " + attrText(a) + " maxM=" + std::to_string(maxM) + " algo=" + std::to_string(algo)
                    + ": reported " + std::to_string(got) + ", M=" + std::to_string(at) + " needs "
                    + std::to_string(brute));
        }
    }
    check(tcRowsPerBlock(1 << 20) <= kMaxRowsPerBlock && gemvRowsPerBlock(1 << 20) <= kMaxRowsPerBlock,
        "kMaxRowsPerBlock bounds every path's rows per block");
}

//! Simulate launches of a split-K kernel on one stream: blocks of each tile arrive in a random order, each
//! does prev = counter++ and the last one (splitKIsLast) re-arms the counter. Exactly one block per tile must be
//! last in every launch, and every counter must be armed again when a launch ends, starting from the zeroed
//! state the plugin establishes on the enqueue stream. A stale counter (not zeroed) must break it, which is why
//! the zeroing has to be ordered before the first launch.
void testSplitK(std::istream& in)
{
    int n;
    in >> n;
    for (int i = 0; i < n; ++i)
    {
        int32_t splits;
        int32_t tiles;
        int32_t launches;
        uint32_t seed;
        in >> splits >> tiles >> launches >> seed;
        auto simulate = [&](int32_t initial) {
            std::vector<int32_t> counter(static_cast<size_t>(tiles), initial);
            uint32_t rng = seed;
            bool ok = true;
            for (int32_t l = 0; l < launches; ++l)
            {
                std::vector<int32_t> arrivals;
                for (int32_t t = 0; t < tiles; ++t)
                {
                    for (int32_t s = 0; s < splits; ++s)
                    {
                        arrivals.push_back(t);
                    }
                }
                for (size_t j = arrivals.size(); j > 1; --j) // Fisher-Yates with a fixed LCG
                {
                    rng = rng * 1664525u + 1013904223u;
                    std::swap(arrivals[j - 1], arrivals[rng % j]);
                }
                std::vector<int32_t> lasts(static_cast<size_t>(tiles), 0);
                for (int32_t t : arrivals)
                {
                    int32_t const prev = counter[static_cast<size_t>(t)]++;
                    if (splitKIsLast(prev, splits))
                    {
                        ++lasts[static_cast<size_t>(t)];
                        counter[static_cast<size_t>(t)] = kSplitKArmed;
                    }
                }
                for (int32_t t = 0; t < tiles; ++t)
                {
                    ok = ok && lasts[static_cast<size_t>(t)] == 1 && counter[static_cast<size_t>(t)] == kSplitKArmed;
                }
            }
            return ok;
        };
        std::string const tag = "splits=" + std::to_string(splits) + " tiles=" + std::to_string(tiles);
        check(simulate(kSplitKArmed), "split-K protocol from zeroed counters " + tag);
        check(!simulate(kSplitKArmed + 1), "a stale counter breaks split-K (zeroing must precede it) " + tag);
    }
}


//! The packed layout (eoraLinearPacked.h) from pack_int4's bytes: every (k, n) lands in exactly one nibble,
//! the kernel's AND-OR + HSUB2/HFMA2 decoding gives back the code, and HMUL2 by the permuted scale gives
//! quant.dequantize's fp16 value bit for bit.
void testPacked(std::istream& in)
{
    int64_t K;
    int64_t N;
    int32_t G;
    in >> K >> N >> G;
    std::vector<int> codes(static_cast<size_t>(K * N));
    std::vector<uint8_t> packed(static_cast<size_t>(K * N / 2));
    std::vector<uint16_t> scales(static_cast<size_t>(K / G * N));
    std::vector<uint16_t> expect(static_cast<size_t>(K * N));
    for (int& v : codes)
    {
        in >> v;
    }
    for (uint8_t& b : packed)
    {
        int v;
        in >> v;
        b = static_cast<uint8_t>(v);
    }
    for (uint16_t& v : scales)
    {
        int x;
        in >> x;
        v = static_cast<uint16_t>(x);
    }
    for (uint16_t& v : expect)
    {
        int x;
        in >> x;
        v = static_cast<uint16_t>(x);
    }
    // Repack as the repack kernel does (one word per strip, step, lane, tile) and the scales likewise.
    std::vector<uint32_t> words(static_cast<size_t>(K * N / 8), 0xDEADBEEFu);
    for (int64_t strip = 0; strip < N / kPackStripCols; ++strip)
    {
        for (int64_t step = 0; step < K / kPackK; ++step)
        {
            for (int32_t lane = 0; lane < 32; ++lane)
            {
                for (int32_t tile = 0; tile < 4; ++tile)
                {
                    words[static_cast<size_t>(((strip * (K / kPackK) + step) * 32 + lane) * 4 + tile)]
                        = packedWordFromSpec(packed.data(), N / 2, strip, step, lane, tile);
                }
            }
        }
    }
    std::vector<uint16_t> pscales(scales.size(), 0xFFFFu);
    for (int64_t g = 0; g < K / G; ++g)
    {
        for (int64_t n = 0; n < N; ++n)
        {
            pscales[static_cast<size_t>(packedScaleIndex(g, n, N))] = scales[static_cast<size_t>(g * N + n)];
        }
    }
    bool everyScale = true;
    for (uint16_t v : pscales)
    {
        everyScale = everyScale && v != 0xFFFFu;
    }
    check(everyScale, "packedScaleIndex is a permutation");
    int bad = 0;
    int badIndex = 0;
    for (int64_t k = 0; k < K; ++k)
    {
        for (int64_t n = 0; n < N; ++n)
        {
            int32_t nib;
            int64_t const wi = packedWordIndex(k, n, K, nib);
            int32_t lane = static_cast<int32_t>((wi / 4) % 32);
            int64_t const step = (wi / 4 / 32) % (K / kPackK);
            int32_t kk;
            int32_t nn;
            packedCoord(lane, nib, kk, nn);
            int64_t const kBack = (step / 4) * kPackBlockK + packedBlockRow(static_cast<int32_t>(step % 4), kk);
            badIndex += (kBack == k && nn == n % 16) ? 0 : 1;
            uint32_t pairs[4];
            packedMagicPairs(words[static_cast<size_t>(wi)], pairs);
            // nibble -> (pair, half): pair = (nib & 1) + 2 * ((nib >> 1) & 1), half = nib >> 2
            uint32_t const pr = pairs[(nib & 1) + 2 * ((nib >> 1) & 1)];
            uint16_t const h = static_cast<uint16_t>((nib >> 2) ? (pr >> 16) : (pr & 0xFFFFu));
            float const m = halfBitsToFloat(h);
            float const q = (nib & 1) ? m * kPackHiScale + kPackHiBias : m - kPackLoBias;
            float const s = halfBitsToFloat(pscales[static_cast<size_t>(packedScaleIndex(k / G, n, N))]);
            uint16_t const got = floatToHalfBits(q * s);
            bool const ok = q == static_cast<float>(codes[static_cast<size_t>(k * N + n)])
                && got == expect[static_cast<size_t>(k * N + n)];
            if (!ok && bad < 5)
            {
                check(false, "packed decode k=" + std::to_string(k) + " n=" + std::to_string(n) + " q="
                        + std::to_string(q) + " want " + std::to_string(codes[static_cast<size_t>(k * N + n)]));
            }
            bad += ok ? 0 : 1;
        }
    }
    check(bad == 0, "packed layout decodes every code and dequantizes bit-exactly (" + std::to_string(bad) + " bad)");
    check(badIndex == 0, "packedWordIndex / packedCoord agree");
    PackedLayout const L = packedLayout(EoraAttrs{static_cast<int32_t>(K), static_cast<int32_t>(N), 0, 4, G, 16, 0, 0, 0});
    check(L.wScales >= K * N / 2 && L.totalBytes >= L.wScales + K / G * N * 2, "packedLayout sizes");
}


//! The CUTLASS path's copy: cutlassCodeByte / cutlassScaleSource (what its pack kernels run) against the
//! Python-built expectation (pack_int4 of the transposed extended K; scales repeated to the gcd group).
void testCutlass(std::istream& in)
{
    int32_t K;
    int32_t N;
    int32_t r;
    int32_t G;
    int32_t LG;
    in >> K >> N >> r >> G >> LG;
    auto readBytes = [&](size_t n) {
        std::vector<uint8_t> v(n);
        for (uint8_t& b : v)
        {
            int x;
            in >> x;
            b = static_cast<uint8_t>(x);
        }
        return v;
    };
    auto readHalves = [&](size_t n) {
        std::vector<uint16_t> v(n);
        for (uint16_t& h : v)
        {
            int x;
            in >> x;
            h = static_cast<uint16_t>(x);
        }
        return v;
    };
    std::vector<uint8_t> const w = readBytes(static_cast<size_t>(K) * N / 2);
    std::vector<uint8_t> const b = readBytes(static_cast<size_t>(r) * N / 2);
    std::vector<uint16_t> const ws = readHalves(static_cast<size_t>(K / G) * N);
    std::vector<uint16_t> const bs = readHalves(r > 0 ? static_cast<size_t>(r / LG) * N : 0);
    int64_t const kExt = static_cast<int64_t>(K) + r;
    EoraAttrs a{K, N, r, 4, G, r > 0 ? 4 : 16, r > 0 ? LG : 0, 0, 0};
    int32_t const gg = cutlassGroup(a);
    std::vector<uint8_t> const wantCodes = readBytes(static_cast<size_t>(N * kExt / 2));
    std::vector<uint16_t> const wantScales = readHalves(static_cast<size_t>(kExt / gg * N));
    int bad = 0;
    for (int64_t n = 0; n < N; ++n)
    {
        for (int64_t j = 0; j < kExt / 2; ++j)
        {
            bad += cutlassCodeByte(w.data(), b.data(), K, N, n, j) == wantCodes[static_cast<size_t>(n * (kExt / 2) + j)] ? 0 : 1;
        }
    }
    check(bad == 0, "cutlassCodeByte gives pack_int4 of [W ; B]^T (" + std::to_string(bad) + " bad bytes)");
    bad = 0;
    for (int64_t kg = 0; kg < kExt / gg; ++kg)
    {
        for (int64_t n = 0; n < N; ++n)
        {
            bool fromB;
            int64_t const src = cutlassScaleSource(a, kg, n, fromB);
            uint16_t const got = fromB ? bs[static_cast<size_t>(src)] : ws[static_cast<size_t>(src)];
            bad += got == wantScales[static_cast<size_t>(kg * N + n)] ? 0 : 1;
        }
    }
    check(bad == 0, "cutlassScaleSource repeats W's and B's scales at the gcd group (" + std::to_string(bad) + " bad)");
    CutlassLayout const L = cutlassLayout(a);
    check(L.scales >= N * kExt / 2 && L.totalBytes >= L.scales + kExt / gg * N * 2, "cutlassLayout sizes");
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s FIXTURE\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1]);
    if (!in)
    {
        std::fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    std::string section;
    while (in >> section)
    {
        if (section == "int4")
        {
            testInt4(in);
        }
        else if (section == "int8")
        {
            testInt8(in);
        }
        else if (section == "dequant")
        {
            testDequant(in);
        }
        else if (section == "sparse")
        {
            testSparse(in);
        }
        else if (section == "index")
        {
            testIndex(in);
        }
        else if (section == "validate")
        {
            testValidate(in);
        }
        else if (section == "plan")
        {
            testPlan(in);
        }
        else if (section == "wsmax")
        {
            testWorkspaceMax(in);
        }
        else if (section == "splitk")
        {
            testSplitK(in);
        }
        else if (section == "packed")
        {
            testPacked(in);
        }
        else if (section == "cutlass")
        {
            testCutlass(in);
        }
        else
        {
            std::fprintf(stderr, "unknown section '%s'\n", section.c_str());
            return 2;
        }
        if (!in)
        {
            std::fprintf(stderr, "fixture ended inside section '%s'\n", section.c_str());
            return 2;
        }
    }
    std::printf("common: %d passed, %d failed\n", gPassed, gFailed);
    return gFailed > 100 ? 100 : gFailed;
}
