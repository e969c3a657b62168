/*
 * eoraCutlassSm90Probe.cu: a COMPILE PROBE for the M > 16 path of EoraLinear, not part of the op yet.
 *
 * It instantiates the CUTLASS 3 Hopper mixed-input GEMM (example 55's "scale only" mode: INT4 weight upcast to
 * fp16 in registers, fp16 group scales, wgmma, TMA warp-specialized cooperative schedule) with the types the
 * op needs, and checks that CUDA 13 + CUTLASS 4.2 (pip nvidia-cutlass, headers under
 * cutlass_library/source/include and source/tools/util/include) compile it for sm_90a. Measured on the 2-core
 * CPU machine: about 80 s of wall time (33 s CPU). tests/test_plugin_cpu.py compiles it when nvidia-cutlass is
 * installed; CMake builds it with -DEORA_BUILD_CUTLASS_PROBE=ON.
 *
 * What wiring it into the op needs (see README, Known issues): W and B re-laid-out once per weights generation
 * into one K-major INT4 matrix [N, K + r] (the extended K) with scales at one group size (the gcd of
 * group_size and lowrank_group_size, a multiple of the 64-deep K tile; W's scales repeated), x and t
 * side by side in the workspace ([M, K + r]; the t kernel can write its columns directly), the bias through
 * the epilogue's C operand, a kPathCutlass in the planner and its workspace in the exact bound, and the GPU
 * tests. sm_80 has no CUTLASS kernel with group scales (TensorRT-LLM extends CUTLASS 2.x for that).
 */
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
using MmaType = cutlass::half_t;
using ElementA = MmaType;                 // x [M, K] row-major
using LayoutA = cutlass::layout::RowMajor;
constexpr int AlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;
using ElementB = cutlass::int4b_t;        // W [K, N] column-major (K-major: W^T row-major)
using LayoutB = cutlass::layout::ColumnMajor;
constexpr int AlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
using LayoutA_Transpose = typename cutlass::layout::LayoutTranspose<LayoutA>::type;
using LayoutB_Transpose = typename cutlass::layout::LayoutTranspose<LayoutB>::type;
using ElementScale = cutlass::half_t;
using ElementC = cutlass::half_t;
using LayoutC = cutlass::layout::RowMajor;
constexpr int AlignmentC = 128 / cutlass::sizeof_bits<ElementC>::value;
using ElementAccumulator = float;
constexpr int TileShapeK = 128 * 8 / cutlass::sizeof_bits<MmaType>::value;
using TileShape = Shape<_128, _128, cute::Int<TileShapeK>>;
using ClusterShape = Shape<_1, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<cutlass::arch::Sm90,
    cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
    ElementAccumulator, ElementAccumulator, ElementC, typename cutlass::layout::LayoutTranspose<LayoutC>::type,
    AlignmentC, ElementC, typename cutlass::layout::LayoutTranspose<LayoutC>::type, AlignmentC,
    EpilogueSchedule>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<cutlass::arch::Sm90,
    cutlass::arch::OpClassTensorOp, cute::tuple<ElementB, ElementScale>, LayoutB_Transpose, AlignmentB, ElementA,
    LayoutA_Transpose, AlignmentA, ElementAccumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

//! The workspace CUTLASS asks for y[M, N] = x[M, K] . dequant(W) with group g; builds the Arguments exactly as
//! the op would (swapped problem: CUTLASS computes y^T = W^T x^T so the INT4 operand goes through registers).
extern "C" size_t eoraCutlassSm90ProbeWorkspace(int m, int n, int k, int g)
{
    using StrideA = cutlass::detail::TagToStrideA_t<LayoutA>;
    using StrideB = cutlass::detail::TagToStrideB_t<LayoutB>;
    using StrideS = typename CollectiveMainloop::StrideScale;
    auto sA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
    auto sB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    auto sS = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(n, k / g, 1));
    auto sC = cutlass::make_cute_packed_stride(typename GemmKernel::StrideC{}, cute::make_shape(n, m, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {n, m, k, 1},
        {nullptr, sB, nullptr, sA, nullptr, sS, g}, {{1.0f, 0.0f}, nullptr, sC, nullptr, sC}};
    return Gemm::get_workspace_size(args);
}
