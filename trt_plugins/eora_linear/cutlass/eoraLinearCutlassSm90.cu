/*
 * eoraLinearCutlassSm90.cu: the M > 16 GEMM of the opt-in CUTLASS path (kPathCutlass), for sm_90a.
 *
 * CUTLASS 3's Hopper mixed-input GEMM (example 55, "scale only": the INT4 operand is upcast to fp16 in
 * registers and multiplied by its fp16 group scale, then wgmma; TMA warp-specialized cooperative schedule).
 * The INT4 operand must be K-major and pass through registers, so the problem is swapped: CUTLASS computes
 * y^T[n, m] = W^T[n, k] x^T[k, m], whose column-major output is y row-major. The op's extended K
 * ([x | t] . [W ; B]) reaches it as one K-major matrix [N, K + r] with scales at one group size, built by
 * eoraLinearCutlassPack (eoraLinearKernel.cu). Compiles with CUDA 13.0 + nvidia-cutlass 4.2 in about 80 s on
 * 2 cores. Not yet run on a GPU: the path is opt-in (algo 5) until the GPU check has measured it.
 */
#include "eoraLinearCutlass.h"

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

namespace
{

using StrideA = cutlass::detail::TagToStrideA_t<LayoutA>;
using StrideB = cutlass::detail::TagToStrideB_t<LayoutB>;
using StrideS = typename CollectiveMainloop::StrideScale;

typename Gemm::Arguments argumentsOf(void const* a, void const* wt, void const* scales, void const* c, void* y,
    int m, int n, int k, int g)
{
    auto sA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
    auto sB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    auto sS = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(n, k / g, 1));
    auto sC = cutlass::make_cute_packed_stride(typename GemmKernel::StrideC{}, cute::make_shape(n, m, 1));
    auto sD = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{}, cute::make_shape(n, m, 1));
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGemm, {n, m, k, 1},
        {static_cast<ElementB const*>(wt), sB, static_cast<ElementA const*>(a), sA,
            static_cast<ElementScale const*>(scales), sS, g},
        {{1.0f, c != nullptr ? 1.0f : 0.0f}, static_cast<ElementC const*>(c), sC, static_cast<ElementC*>(y), sD}};
}

} // namespace

namespace eora
{

bool cutlassBuilt()
{
    return true;
}

size_t cutlassWorkspaceBytes(int64_t m, int64_t n, int64_t k, int32_t group)
{
    return Gemm::get_workspace_size(argumentsOf(nullptr, nullptr, nullptr, nullptr, nullptr, static_cast<int>(m),
        static_cast<int>(n), static_cast<int>(k), group));
}

int32_t cutlassGemm(void const* a, void const* wt, void const* scales, void const* c, void* y, int64_t m, int64_t n,
    int64_t k, int32_t group, void* scratch, size_t scratchBytes, cudaStream_t stream)
{
    auto args = argumentsOf(a, wt, scales, c, y, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), group);
    if (Gemm::get_workspace_size(args) > scratchBytes)
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess
        || gemm.initialize(args, scratch, stream) != cutlass::Status::kSuccess)
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    if (gemm.run(stream) != cutlass::Status::kSuccess)
    {
        cudaError_t const err = cudaGetLastError();
        return static_cast<int32_t>(err != cudaSuccess ? err : cudaErrorLaunchFailure);
    }
    return 0;
}

} // namespace eora
