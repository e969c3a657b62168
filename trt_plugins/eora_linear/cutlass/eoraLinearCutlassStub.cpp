/*
 * eoraLinearCutlassStub.cpp: the CUTLASS path when the build has no CUTLASS headers or no sm_90a target:
 * not available (eoraLinearCutlassBytes reports 0 and the planner never offers the path).
 */
#include "eoraLinearCutlass.h"

namespace eora
{

bool cutlassBuilt()
{
    return false;
}

size_t cutlassWorkspaceBytes(int64_t, int64_t, int64_t, int32_t)
{
    return 0;
}

int32_t cutlassGemm(void const*, void const*, void const*, void const*, void*, int64_t, int64_t, int64_t, int32_t,
    void*, size_t, cudaStream_t)
{
    return static_cast<int32_t>(cudaErrorNotSupported);
}

} // namespace eora
