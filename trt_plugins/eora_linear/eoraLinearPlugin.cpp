/*
 * eoraLinearPlugin.cpp: IPluginV3 glue of EoraLinear (shapes, types, attributes, serialization, enqueue).
 *
 * How the library registers itself with TensorRT lives in eoraPluginRegistration.cpp; the kernels in
 * eoraLinearKernel.cu. Every device-side effect here goes through eoraPluginDeviceOps.h so the CPU harness
 * can check streams and timing without a GPU.
 */
#include "eoraLinearPlugin.h"
#include "eoraLinearKernel.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

using namespace nvinfer1;

namespace eora
{
namespace plugin
{
namespace
{

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
thread_local std::string tPluginLastError;

// ----- Device effects (eoraPluginDeviceOps.h): CUDA by default, recording fakes in the CPU harness ---------

int32_t cudaAllocate(void** ptr, size_t bytes)
{
    if (cudaMalloc(ptr, bytes) != cudaSuccess)
    {
        cudaGetLastError();
        *ptr = nullptr;
        return 1;
    }
    return 0;
}

int32_t cudaRelease(void* ptr)
{
    return cudaFree(ptr) == cudaSuccess ? 0 : 1;
}

int32_t cudaZeroAsync(void* ptr, int32_t value, size_t bytes, cudaStream_t stream)
{
    if (cudaMemsetAsync(ptr, value, bytes, stream) != cudaSuccess)
    {
        cudaGetLastError();
        return 1;
    }
    return 0;
}

int32_t cudaCapturing(cudaStream_t stream)
{
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    return (stream != nullptr && cudaStreamIsCapturing(stream, &status) == cudaSuccess
               && status != cudaStreamCaptureStatusNone)
        ? 1
        : 0;
}

EoraDeviceOps const kCudaOps{cudaAllocate, cudaRelease, cudaZeroAsync, cudaCapturing, eoraSparse24Compact,
    eoraLinearPack, eoraLinearForward};
EoraDeviceOps gOps = kCudaOps;

//! Bumped by eoraPluginWeightsChanged(): every instance's compacted 2:4 weight becomes stale.
std::atomic<uint64_t> gRefitEpoch{0};

//! The crossover a new engine is built with: $EORA_GEMV_MAX_M at build time (an experiment knob), else the
//! library default. Read once per engine build, then serialized; the run time never reads the variable.
int32_t buildTimeGemvMaxM()
{
    char const* v = std::getenv("EORA_GEMV_MAX_M");
    long const n = v != nullptr ? std::strtol(v, nullptr, 10) : 0;
    return n > 0 && n <= kMaxGemvMaxM ? static_cast<int32_t>(n) : kDefaultGemvMaxM;
}

//! The spec's attribute names, in the spec's order (tests compare this list with graphs/eora_linear.spec.json).
struct IntField
{
    char const* name;
    int32_t EoraAttrs::*member;
};
constexpr IntField kIntFields[] = {
    {"in_features", &EoraAttrs::inFeatures},
    {"out_features", &EoraAttrs::outFeatures},
    {"rank", &EoraAttrs::rank},
    {"weight_bits", &EoraAttrs::weightBits},
    {"group_size", &EoraAttrs::groupSize},
    {"lowrank_bits", &EoraAttrs::lowrankBits},
    {"lowrank_group_size", &EoraAttrs::lowrankGroupSize},
    {"sparse24", &EoraAttrs::sparse24},
    {"has_bias", &EoraAttrs::hasBias},
};
constexpr int32_t kNumIntFields = sizeof(kIntFields) / sizeof(kIntFields[0]);

//! Serialized planning inputs (not ONNX attributes: the creator's getFieldNames does not list them).
constexpr char const* kFieldGemvMaxM = "gemv_max_m";
constexpr char const* kFieldMaxRows = "max_rows";
constexpr char const* kFieldWorkspace = "workspace_bytes";

int64_t rowsOf(Dims const& d)
{
    int64_t m = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
    {
        m *= d.d[i];
    }
    return m;
}

char const* roleName(int32_t role)
{
    static char const* const names[] = {"x", "w", "w_scale", "a", "a_scale", "b", "b_scale", "bias"};
    return role >= 0 && role < kNumRoles ? names[role] : "?";
}

char const* typeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "FP32";
    case DataType::kHALF: return "FP16";
    case DataType::kINT8: return "INT8";
    case DataType::kINT32: return "INT32";
    case DataType::kINT64: return "INT64";
    case DataType::kINT4: return "INT4";
    case DataType::kBF16: return "BF16";
    default: return "other";
    }
}

EoraLinearParams paramsOf(EoraAttrs const& a)
{
    EoraLinearParams p;
    eoraLinearParamsInit(&p);
    p.inFeatures = a.inFeatures;
    p.outFeatures = a.outFeatures;
    p.rank = a.rank;
    p.weightBits = a.weightBits;
    p.groupSize = a.groupSize;
    p.lowrankBits = a.lowrankBits;
    p.lowrankGroupSize = a.lowrankGroupSize;
    p.sparse24 = a.sparse24;
    p.hasBias = a.hasBias;
    return p;
}

} // namespace

void reportError(IErrorRecorder* recorder, char const* fmt, ...) noexcept
{
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    try
    {
        tPluginLastError = buf;
    }
    catch (...)
    {
    }
    if (recorder != nullptr)
    {
        recorder->reportError(ErrorCode::kINVALID_ARGUMENT, buf);
        return;
    }
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, buf);
        return;
    }
    std::fprintf(stderr, "[EoraLinear] ERROR: %s\n", buf);
}

// ---------------------------------------------------------------------------------------------
// EoraLinearPlugin
// ---------------------------------------------------------------------------------------------

EoraLinearPlugin::EoraLinearPlugin(EoraAttrs const& attrs)
    : EoraLinearPlugin(attrs, Planning{})
{
}

EoraLinearPlugin::EoraLinearPlugin(EoraAttrs const& attrs, Planning const& planning)
    : mAttrs(attrs)
    , mPlan(planning)
{
    if (mPlan.gemvMaxM <= 0)
    {
        mPlan.gemvMaxM = kDefaultGemvMaxM;
    }
    initFields();
}

void EoraLinearPlugin::initFields()
{
    EoraAttrs const& attrs = mAttrs;
    char buf[256];
    std::snprintf(buf, sizeof(buf),
        "EoraLinear:in=%d,out=%d,rank=%d,wbits=%d,group=%d,lrbits=%d,lrgroup=%d,sparse24=%d,bias=%d",
        attrs.inFeatures, attrs.outFeatures, attrs.rank, attrs.weightBits, attrs.groupSize, attrs.lowrankBits,
        attrs.lowrankGroupSize, attrs.sparse24, attrs.hasBias);
    mIdentity = buf;
    for (IntField const& f : kIntFields)
    {
        mSerFields.emplace_back(f.name, &(mAttrs.*(f.member)), PluginFieldType::kINT32, 1);
    }
    mSerFields.emplace_back(kFieldGemvMaxM, &mPlan.gemvMaxM, PluginFieldType::kINT32, 1);
    mSerFields.emplace_back(kFieldMaxRows, &mPlan.maxRows, PluginFieldType::kINT64, 1);
    mSerFields.emplace_back(kFieldWorkspace, &mPlan.workspaceBytes, PluginFieldType::kINT64, 1);
    mSerFc.nbFields = static_cast<int32_t>(mSerFields.size());
    mSerFc.fields = mSerFields.data();
}

EoraLinearPlugin::~EoraLinearPlugin()
{
    releaseDeviceBuffers();
}

void EoraLinearPlugin::releaseDeviceBuffers() noexcept
{
    if (mSemaphores != nullptr)
    {
        gOps.release(mSemaphores);
        mSemaphores = nullptr;
        mSemaphoresZeroed = false;
    }
    if (mSparse != nullptr)
    {
        gOps.release(mSparse);
        mSparse = nullptr;
        mSparseSource = nullptr;
    }
    if (mPacked != nullptr)
    {
        gOps.release(mPacked);
        mPacked = nullptr;
    }
}

IPluginCapability* EoraLinearPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* EoraLinearPlugin::clone() noexcept
{
    try
    {
        // Device buffers are per instance (each clone frees its own), so only the attributes are copied.
        auto* p = new EoraLinearPlugin(mAttrs, mPlan);
        p->mRecorder = mRecorder;
        return p;
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* EoraLinearPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* EoraLinearPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* EoraLinearPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t EoraLinearPlugin::getNbOutputs() const noexcept
{
    return 1;
}

bool EoraLinearPlugin::checkTensor(int32_t pos, DataType type, Dims const& dims) const noexcept
{
    int32_t const role = roleOfInput(mAttrs, pos);
    if (role < 0)
    {
        reportError(mRecorder, "EoraLinear: input %d does not exist for these attributes (%s)", pos,
            mIdentity.c_str());
        return false;
    }
    DataType const want = inputIsHalf(mAttrs, role) ? DataType::kHALF : DataType::kINT8;
    if (type != want)
    {
        reportError(mRecorder, "EoraLinear: input %d (%s) must be %s, got %s", pos, roleName(role), typeName(want),
            typeName(type));
        return false;
    }
    if (role == kRoleX)
    {
        int64_t const last = dims.nbDims > 0 ? dims.d[dims.nbDims - 1] : -2;
        if (dims.nbDims < 1 || (last >= 0 && last != mAttrs.inFeatures))
        {
            reportError(mRecorder, "EoraLinear: x must be [..., in_features=%d], got last dim %lld over %d dims",
                mAttrs.inFeatures, static_cast<long long>(last), dims.nbDims);
            return false;
        }
        return true;
    }
    int64_t want2[2];
    int32_t const nb = expectedInputDims(mAttrs, role, want2);
    bool ok = dims.nbDims == nb;
    for (int32_t i = 0; ok && i < nb; ++i)
    {
        ok = dims.d[i] < 0 || dims.d[i] == want2[i]; // -1: not known yet at this stage
    }
    if (!ok)
    {
        if (nb == 2)
        {
            reportError(mRecorder, "EoraLinear: input %d (%s) must have shape [%lld, %lld] for %s", pos,
                roleName(role), static_cast<long long>(want2[0]), static_cast<long long>(want2[1]), mIdentity.c_str());
        }
        else
        {
            reportError(mRecorder, "EoraLinear: input %d (%s) must have shape [%lld] for %s", pos, roleName(role),
                static_cast<long long>(want2[0]), mIdentity.c_str());
        }
    }
    return ok;
}

int32_t EoraLinearPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    int32_t const want = inputIndex(mAttrs).count;
    if (in == nullptr || out == nullptr || nbInputs != want || nbOutputs != 1)
    {
        reportError(mRecorder, "EoraLinear: expected %d inputs and 1 output for %s, got %d and %d", want,
            mIdentity.c_str(), nbInputs, nbOutputs);
        return -1;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!checkTensor(i, in[i].desc.type, in[i].desc.dims))
        {
            return -1;
        }
    }
    if (out[0].desc.type != DataType::kHALF)
    {
        reportError(mRecorder, "EoraLinear: output must be FP16, got %s", typeName(out[0].desc.type));
        return -1;
    }
    recordMaxRows(rowsOf(in[0].max));
    return 0;
}

void EoraLinearPlugin::recordMaxRows(int64_t maxM) const noexcept
{
    if (maxM < 1)
    {
        return;
    }
    // Several profiles: the engine's workspace is the largest asked for, so keep the largest of each.
    EoraLinearParams p = paramsOf(mAttrs);
    p.gemvMaxM = mPlan.gemvMaxM;
    int64_t const ws = static_cast<int64_t>(eoraLinearWorkspaceSizeMax(&p, maxM));
    mPlan.maxRows = maxM > mPlan.maxRows ? maxM : mPlan.maxRows;
    mPlan.workspaceBytes = ws > mPlan.workspaceBytes ? ws : mPlan.workspaceBytes;
}

int64_t EoraLinearPlugin::workspaceGiven() const noexcept
{
    if (mPlan.workspaceBytes > 0 || mPlan.maxRows > 0)
    {
        return mPlan.workspaceBytes;
    }
    return -1;
}

int32_t EoraLinearPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || nbOutputs != 1 || inputTypes == nullptr || nbInputs < 1)
    {
        reportError(mRecorder, "EoraLinear: getOutputDataTypes needs 1 output and the inputs (got %d, %d)",
            nbOutputs, nbInputs);
        return -1;
    }
    if (inputTypes[0] != DataType::kHALF)
    {
        reportError(mRecorder, "EoraLinear: x must be FP16 (the ONNX graph is strongly typed), got %s",
            typeName(inputTypes[0]));
        return -1;
    }
    outputTypes[0] = DataType::kHALF;
    return 0;
}

int32_t EoraLinearPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    int32_t const want = inputIndex(mAttrs).count;
    if (inputs == nullptr || outputs == nullptr || nbInputs != want || nbOutputs != 1)
    {
        reportError(mRecorder, "EoraLinear: expected %d inputs and 1 output for %s, got %d and %d", want,
            mIdentity.c_str(), nbInputs, nbOutputs);
        return -1;
    }
    DimsExprs const& x = inputs[0];
    if (x.nbDims < 1)
    {
        reportError(mRecorder, "EoraLinear: x must have at least 1 dimension");
        return -1;
    }
    IDimensionExpr const* last = x.d[x.nbDims - 1];
    if (last != nullptr && last->isConstant() && last->getConstantValue() != mAttrs.inFeatures)
    {
        reportError(mRecorder, "EoraLinear: x's last dimension is %lld, in_features is %d",
            static_cast<long long>(last->getConstantValue()), mAttrs.inFeatures);
        return -1;
    }
    // Constant inputs' shapes are known here: catch a mismatched weight before the engine is built.
    for (int32_t i = 1; i < nbInputs; ++i)
    {
        Dims d{};
        d.nbDims = inputs[i].nbDims;
        for (int32_t j = 0; j < d.nbDims && j < Dims::MAX_DIMS; ++j)
        {
            IDimensionExpr const* e = inputs[i].d[j];
            d.d[j] = (e != nullptr && e->isConstant()) ? e->getConstantValue() : -1;
        }
        int64_t want2[2];
        int32_t const role = roleOfInput(mAttrs, i);
        int32_t const nb = expectedInputDims(mAttrs, role, want2);
        bool ok = d.nbDims == nb;
        for (int32_t j = 0; ok && j < nb; ++j)
        {
            ok = d.d[j] < 0 || d.d[j] == want2[j];
        }
        if (!ok)
        {
            reportError(mRecorder, "EoraLinear: input %d (%s) has the wrong shape for %s", i, roleName(role),
                mIdentity.c_str());
            return -1;
        }
    }
    outputs[0].nbDims = x.nbDims;
    for (int32_t i = 0; i + 1 < x.nbDims; ++i)
    {
        outputs[0].d[i] = x.d[i];
    }
    outputs[0].d[x.nbDims - 1] = exprBuilder.constant(mAttrs.outFeatures);
    return 0;
}

bool EoraLinearPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != inputIndex(mAttrs).count || nbOutputs != 1 || pos < 0
        || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == nbInputs)
    {
        return d.type == DataType::kHALF;
    }
    int32_t const role = roleOfInput(mAttrs, pos);
    return d.type == (inputIsHalf(mAttrs, role) ? DataType::kHALF : DataType::kINT8);
}

size_t EoraLinearPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (inputs == nullptr || nbInputs < 1)
    {
        return 0;
    }
    // The profile's largest x decides; t = x.A and the split-K partials are the only scratch.
    int64_t maxM = rowsOf(inputs[0].max);
    if (maxM < 1)
    {
        maxM = rowsOf(inputs[0].desc.dims);
    }
    if (maxM < 1)
    {
        return 0;
    }
    EoraLinearParams p = paramsOf(mAttrs);
    p.gemvMaxM = mPlan.gemvMaxM;
    size_t const ws = eoraLinearWorkspaceSizeMax(&p, maxM);
    // What is reported here is what TensorRT allocates: remember it (serialized) so enqueue checks the plan of
    // every call against it instead of trusting its own arithmetic.
    recordMaxRows(maxM);
    return ws;
}

char const* EoraLinearPlugin::getTimingCacheID() noexcept
{
    return mIdentity.c_str();
}

char const* EoraLinearPlugin::getMetadataString() noexcept
{
    return mIdentity.c_str();
}

int32_t EoraLinearPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    int32_t const want = inputIndex(mAttrs).count;
    if (in == nullptr || out == nullptr || nbInputs != want || nbOutputs != 1)
    {
        reportError(mRecorder, "EoraLinear: expected %d inputs and 1 output, got %d and %d", want, nbInputs,
            nbOutputs);
        return -1;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!checkTensor(i, in[i].type, in[i].dims))
        {
            return -1;
        }
    }
    // TensorRT calls this after tensor addresses or the profile change: constant inputs may be new buffers.
    ++mWeightsGeneration;
    return 0;
}

bool EoraLinearPlugin::allocateSemaphores(cudaStream_t stream) noexcept
{
    if (mSemaphores != nullptr)
    {
        return true;
    }
    if (gOps.isCapturing(stream))
    {
        return false; // no allocation inside a graph capture; this launch runs without split-K
    }
    void* p = nullptr;
    size_t const bytes = sizeof(int32_t) * static_cast<size_t>(eoraLinearSemaphoreCount());
    if (gOps.allocate(&p, bytes) != 0 || p == nullptr)
    {
        return false;
    }
    mSemaphores = static_cast<int32_t*>(p);
    mSemaphoresZeroed = false;
    return true;
}

bool EoraLinearPlugin::readySemaphores(cudaStream_t stream) noexcept
{
    if (!allocateSemaphores(stream))
    {
        return false;
    }
    if (!mSemaphoresZeroed)
    {
        // On the enqueue stream, so the first kernel that counts is ordered after it whatever kind of stream
        // TensorRT uses. Inside a capture the memset becomes a graph node (zeroing on every replay, which is
        // harmless) and is done again at the next eager launch, since a captured graph may never run.
        size_t const bytes = sizeof(int32_t) * static_cast<size_t>(eoraLinearSemaphoreCount());
        if (gOps.memsetAsync(mSemaphores, 0, bytes, stream) != 0)
        {
            return false;
        }
        mSemaphoresZeroed = !gOps.isCapturing(stream);
    }
    return true;
}

bool EoraLinearPlugin::sparseEligible() const noexcept
{
    return mAttrs.sparse24 == 1 && mAttrs.weightBits < 16 && mAttrs.inFeatures % 4 == 0
        && mAttrs.outFeatures % 8 == 0 && mAttrs.groupSize % 4 == 0;
}

bool EoraLinearPlugin::ensureSparse(void const* w, cudaStream_t stream) noexcept
{
    if (!sparseEligible())
    {
        return false;
    }
    bool const capturing = gOps.isCapturing(stream);
    if (mSparse == nullptr)
    {
        size_t const bytes = eoraSparse24Bytes(mAttrs.inFeatures, mAttrs.outFeatures);
        if (capturing || bytes == 0 || gOps.allocate(&mSparse, bytes) != 0)
        {
            mSparse = nullptr;
            return false;
        }
        mSparseSource = nullptr;
    }
    if (w == nullptr)
    {
        return true; // allocation only (attachToContext)
    }
    // Rebuilt whenever the weights may have changed: a new address, a new generation of this instance (attach,
    // onShapeChange) or a refit announced process-wide. Never trusted on the address alone.
    uint64_t const generation = weightsGeneration();
    if (mSparseSource != w || mSparseGeneration != generation)
    {
        if (gOps.sparse24Compact(w, mAttrs.inFeatures, mAttrs.outFeatures, mSparse, stream) != 0)
        {
            reportError(mRecorder, "%s", eoraLastError());
            return false;
        }
        // A compaction captured into a graph runs at every replay; only an eager one may be reused.
        mSparseSource = capturing ? nullptr : w;
        mSparseGeneration = generation;
    }
    return true;
}

uint64_t EoraLinearPlugin::weightsGeneration() const noexcept
{
    return mWeightsGeneration + (gRefitEpoch.load() << 32);
}

bool EoraLinearPlugin::ensurePacked(EoraLinearParams const* p, cudaStream_t stream) noexcept
{
    bool const capturing = gOps.isCapturing(stream);
    if (mPacked == nullptr)
    {
        EoraLinearParams q = paramsOf(mAttrs);
        size_t const bytes = eoraLinearPackedBytes(&q);
        if (capturing || bytes == 0 || gOps.allocate(&mPacked, bytes) != 0)
        {
            mPacked = nullptr;
            return false;
        }
        mPackedGeneration = 0;
    }
    if (p == nullptr)
    {
        return true; // allocation only (attachToContext)
    }
    // Same rule as the 2:4 weight: rebuilt for new addresses of any packed input or a new weights generation.
    void const* const src[6] = {p->w, p->wScale, p->a, p->aScale, p->b, p->bScale};
    uint64_t const generation = weightsGeneration();
    bool same = mPackedGeneration == generation;
    for (int32_t i = 0; i < 6; ++i)
    {
        same = same && mPackedSource[i] == src[i];
    }
    if (!same)
    {
        if (gOps.pack(p, mPacked, stream) != 0)
        {
            reportError(mRecorder, "%s", eoraLastError());
            return false;
        }
        for (int32_t i = 0; i < 6; ++i)
        {
            mPackedSource[i] = capturing ? nullptr : src[i]; // a captured pack is never reused eagerly
        }
        mPackedGeneration = generation;
    }
    return true;
}

int32_t EoraLinearPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        reportError(mRecorder, "EoraLinear: enqueue got NULL descriptors or pointers");
        return -1;
    }
    InputIndex const ix = inputIndex(mAttrs);
    auto in = [&](int32_t role) -> void const* { return ix.idx[role] >= 0 ? inputs[ix.idx[role]] : nullptr; };

    EoraLinearParams p = paramsOf(mAttrs);
    p.M = rowsOf(inputDesc[0].dims);
    p.x = in(kRoleX);
    p.w = in(kRoleW);
    p.wScale = in(kRoleWScale);
    p.a = in(kRoleA);
    p.aScale = in(kRoleAScale);
    p.b = in(kRoleB);
    p.bScale = in(kRoleBScale);
    p.bias = in(kRoleBias);
    p.y = outputs[0];
    p.workspace = workspace;
    p.gemvMaxM = mPlan.gemvMaxM;
    p.noSplitK = readySemaphores(stream) ? 0 : 1;
    p.semaphores = mSemaphores;
    // The compacted 2:4 weight serves the v1 GEMV only, which small M uses when the skinny path cannot.
    if (mAttrs.sparse24 == 1 && !skinnyShapesOk(mAttrs) && ensureSparse(p.w, stream))
    {
        p.sparse = mSparse;
    }
    // The skinny path needs the packed copies; build them only when a call can take that path.
    if (p.M <= kSkinnyMaxM && p.M <= mPlan.gemvMaxM && skinnyShapesOk(mAttrs) && ensurePacked(&p, stream))
    {
        p.packed = mPacked;
    }
    // The launch is told the size TensorRT allocated (what getWorkspaceSize reported, serialized with the
    // engine), never the size this call would like: a plan that needs more is refused, not written past.
    int64_t given = workspaceGiven();
    if (given < 0)
    {
        // An engine that did not record its workspace (built by an older plugin): without split-K the only
        // scratch is t for this call's M rows, which any size ever reported for the profile covers (M <= its
        // max). Slower, never out of bounds.
        p.noSplitK = 1;
        given = static_cast<int64_t>(eoraLinearWorkspaceSize(&p));
    }
    int64_t const need = static_cast<int64_t>(eoraLinearWorkspaceSize(&p));
    if (need > given)
    {
        reportError(mRecorder, "EoraLinear: M=%lld needs %lld bytes of workspace, the engine has %lld (profile max M "
                               "%lld)", static_cast<long long>(p.M), static_cast<long long>(need),
            static_cast<long long>(given), static_cast<long long>(mPlan.maxRows));
        return -1;
    }
    p.workspaceBytes = static_cast<size_t>(given);
    int32_t const rc = gOps.forward(&p, stream);
    if (rc != EORA_OK)
    {
        reportError(mRecorder, "%s", eoraLastError());
        return -1;
    }
    return 0;
}

IPluginV3* EoraLinearPlugin::attachToContext(IPluginResourceContext* context) noexcept
{
    auto* p = static_cast<EoraLinearPlugin*>(clone());
    if (p != nullptr && context != nullptr)
    {
        p->mRecorder = context->getErrorRecorder();
    }
    if (p != nullptr)
    {
        // Context creation is outside any CUDA-graph capture: the right moment for persistent buffers. A
        // failure here (e.g. no device yet) is not an error; enqueue tries again.
        p->allocateSemaphores(nullptr);
        if (!skinnyShapesOk(p->mAttrs))
        {
            p->ensureSparse(nullptr, nullptr);
        }
        if (skinnyShapesOk(p->mAttrs))
        {
            p->ensurePacked(nullptr, nullptr);
        }
    }
    return p;
}

PluginFieldCollection const* EoraLinearPlugin::getFieldsToSerialize() noexcept
{
    return &mSerFc;
}

// ---------------------------------------------------------------------------------------------
// EoraLinearPluginCreator
// ---------------------------------------------------------------------------------------------

EoraLinearPluginCreator::EoraLinearPluginCreator()
{
    for (IntField const& f : kIntFields)
    {
        mFields.emplace_back(f.name, nullptr, PluginFieldType::kINT32, 1);
    }
    // The ONNX node also carries these two for TensorRT's parser; accepted (and checked) when passed on.
    mFields.emplace_back("plugin_version", nullptr, PluginFieldType::kCHAR, 0);
    mFields.emplace_back("plugin_namespace", nullptr, PluginFieldType::kCHAR, 0);
    mFc.nbFields = static_cast<int32_t>(mFields.size());
    mFc.fields = mFields.data();
}

PluginFieldCollection const* EoraLinearPluginCreator::getFieldNames() noexcept
{
    return &mFc;
}

char const* EoraLinearPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* EoraLinearPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* EoraLinearPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

bool EoraLinearPluginCreator::parseFields(
    PluginFieldCollection const* fc, EoraAttrs& attrs, EoraLinearPlugin::Planning& planning, std::string& msg)
{
    planning = EoraLinearPlugin::Planning{};
    if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr))
    {
        msg = "EoraLinear: no PluginFieldCollection given";
        return false;
    }
    attrs = EoraAttrs{};
    bool seenIn = false;
    bool seenOut = false;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr)
        {
            msg = "EoraLinear: field " + std::to_string(i) + " has no name";
            return false;
        }
        std::string const name = f.name;
        if (name == "plugin_version" || name == "plugin_namespace")
        {
            if (f.type != PluginFieldType::kCHAR || f.data == nullptr || f.length < 0)
            {
                msg = "EoraLinear: field '" + name + "' must be a string (kCHAR)";
                return false;
            }
            std::string value(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
            value = value.substr(0, value.find('\0'));
            char const* const want = name == "plugin_version" ? kPLUGIN_VERSION : kPLUGIN_NAMESPACE;
            if (value != want)
            {
                msg = "EoraLinear: " + name + " is '" + value + "', this library implements '" + want + "'";
                return false;
            }
            continue;
        }
        bool const planField = name == kFieldGemvMaxM || name == kFieldMaxRows || name == kFieldWorkspace;
        IntField const* match = nullptr;
        for (IntField const& k : kIntFields)
        {
            if (name == k.name)
            {
                match = &k;
            }
        }
        if (match == nullptr && !planField)
        {
            msg = "EoraLinear: unknown field '" + name + "' (see graphs/eora_linear.spec.json for the attributes)";
            return false;
        }
        if (f.data == nullptr || f.length != 1)
        {
            msg = "EoraLinear: field '" + name + "' must hold exactly one integer";
            return false;
        }
        int64_t v;
        if (f.type == PluginFieldType::kINT32)
        {
            v = *static_cast<int32_t const*>(f.data);
        }
        else if (f.type == PluginFieldType::kINT64)
        {
            v = *static_cast<int64_t const*>(f.data);
        }
        else
        {
            msg = "EoraLinear: field '" + name + "' must be INT32 or INT64";
            return false;
        }
        if (planField)
        {
            int64_t const hi = name == kFieldGemvMaxM ? kMaxGemvMaxM : INT64_MAX;
            if (v < 0 || v > hi)
            {
                msg = "EoraLinear: field '" + name + "' is out of range (got " + std::to_string(v) + ")";
                return false;
            }
            if (name == kFieldGemvMaxM)
            {
                planning.gemvMaxM = static_cast<int32_t>(v);
            }
            else if (name == kFieldMaxRows)
            {
                planning.maxRows = v;
            }
            else
            {
                planning.workspaceBytes = v;
            }
            continue;
        }
        if (v < INT32_MIN || v > INT32_MAX)
        {
            msg = "EoraLinear: field '" + name + "' is out of the int32 range";
            return false;
        }
        attrs.*(match->member) = static_cast<int32_t>(v);
        seenIn = seenIn || name == "in_features";
        seenOut = seenOut || name == "out_features";
    }
    if (!seenIn || !seenOut)
    {
        msg = std::string("EoraLinear: required field '") + (seenIn ? "out_features" : "in_features") + "' is missing";
        return false;
    }
    char why[256];
    if (!validateAttrs(attrs, why, sizeof(why)))
    {
        msg = std::string("EoraLinear: ") + why;
        return false;
    }
    return true;
}

IPluginV3* EoraLinearPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        EoraAttrs attrs;
        EoraLinearPlugin::Planning planning;
        std::string msg;
        if (!parseFields(fc, attrs, planning, msg))
        {
            reportError(nullptr, "%s", msg.c_str());
            return nullptr;
        }
        if (planning.gemvMaxM == 0 && phase == TensorRTPhase::kBUILD)
        {
            planning.gemvMaxM = buildTimeGemvMaxM();
        }
        return new EoraLinearPlugin(attrs, planning);
    }
    catch (std::exception const& e)
    {
        reportError(nullptr, "EoraLinear: createPlugin failed: %s", e.what());
    }
    catch (...)
    {
        reportError(nullptr, "EoraLinear: createPlugin failed");
    }
    return nullptr;
}

EoraLinearPluginCreator& creatorInstance()
{
    static EoraLinearPluginCreator creator;
    return creator;
}

} // namespace plugin
} // namespace eora

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    eora::plugin::gLoggerFinder.store(finder);
}

extern "C" char const* eoraPluginLastError(void)
{
    return eora::plugin::tPluginLastError.c_str();
}

extern "C" void eoraPluginSetDeviceOps(EoraDeviceOps const* ops)
{
    eora::plugin::gOps = ops != nullptr ? *ops : eora::plugin::kCudaOps;
}

extern "C" void eoraPluginWeightsChanged(void)
{
    ++eora::plugin::gRefitEpoch;
}
