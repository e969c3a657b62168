/*
 * eoraLinearPlugin.cpp: IPluginV3 glue of EoraLinear and the plugin-library entry points.
 *
 * Loading without libnvinfer. REGISTER_TENSORRT_PLUGIN would put a static initializer in this library that
 * calls getPluginRegistry(), an undefined symbol unless libnvinfer is linked; then dlopen (ctypes.CDLL) fails
 * on any machine without TensorRT, and the kernels' C entry points become unusable there. Instead:
 *   - the library never links libnvinfer (the link uses -z defs, so a stray reference fails the build);
 *   - a load-time registrar looks for getPluginRegistry in a libnvinfer *already loaded* in the process
 *     (dlsym(RTLD_DEFAULT), then dlopen(..., RTLD_NOLOAD) so Python's RTLD_LOCAL `import tensorrt` counts
 *     too) and registers the creator only if it finds one: LD_PRELOAD, Polygraphy --plugins, Triton's
 *     plugins=..., trtexec --staticPlugins and ctypes after `import tensorrt` all work as with the macro;
 *   - when TensorRT itself is loading the library (IPluginRegistry::loadLibrary: trtexec --dynamicPlugins,
 *     plans with embedded plugin libraries) a libnvinfer frame is on the stack during load; the registrar
 *     then leaves registration to TensorRT, which reads getCreators(), so the creator is not registered twice;
 *   - eoraRegisterPlugins() does the same registration on demand; EORA_PLUGIN_AUTO_REGISTER=0/1 turns the
 *     load-time step off / forces it.
 */
#include "eoraLinearPlugin.h"
#include "eoraLinearKernel.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <execinfo.h>

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
    : mAttrs(attrs)
{
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
        cudaFree(mSemaphores);
        mSemaphores = nullptr;
    }
    if (mSparse != nullptr)
    {
        cudaFree(mSparse);
        mSparse = nullptr;
        mSparseSource = nullptr;
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
        auto* p = new EoraLinearPlugin(mAttrs);
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
    return 0;
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
    EoraLinearParams const p = paramsOf(mAttrs);
    return eoraLinearWorkspaceSizeMax(&p, maxM);
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
    return 0;
}

bool EoraLinearPlugin::ensureSemaphores(cudaStream_t stream) noexcept
{
    if (mSemaphores != nullptr)
    {
        return true;
    }
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (stream != nullptr && cudaStreamIsCapturing(stream, &status) == cudaSuccess
        && status != cudaStreamCaptureStatusNone)
    {
        return false; // no allocation inside a graph capture; this launch runs without split-K
    }
    size_t const bytes = sizeof(int32_t) * static_cast<size_t>(eoraLinearSemaphoreCount());
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess)
    {
        cudaGetLastError();
        return false;
    }
    if (cudaMemset(p, 0, bytes) != cudaSuccess)
    {
        cudaFree(p);
        cudaGetLastError();
        return false;
    }
    mSemaphores = static_cast<int32_t*>(p);
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
    if (mSparse == nullptr)
    {
        cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
        if (stream != nullptr && cudaStreamIsCapturing(stream, &status) == cudaSuccess
            && status != cudaStreamCaptureStatusNone)
        {
            return false;
        }
        size_t const bytes = eoraSparse24Bytes(mAttrs.inFeatures, mAttrs.outFeatures);
        if (bytes == 0 || cudaMalloc(&mSparse, bytes) != cudaSuccess)
        {
            cudaGetLastError();
            mSparse = nullptr;
            return false;
        }
        mSparseSource = nullptr;
    }
    if (w == nullptr)
    {
        return true; // allocation only (attachToContext)
    }
    // TensorRT keeps constant inputs at a fixed address for the engine's life, so compaction runs once per
    // weight address (refitting the weight in place is not supported for sparse24; see README).
    if (mSparseSource != w)
    {
        if (eoraSparse24Compact(w, mAttrs.inFeatures, mAttrs.outFeatures, mSparse, stream) != EORA_OK)
        {
            reportError(mRecorder, "%s", eoraLastError());
            return false;
        }
        mSparseSource = w;
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
    p.noSplitK = ensureSemaphores(stream) ? 0 : 1;
    p.semaphores = mSemaphores;
    if (mAttrs.sparse24 == 1 && ensureSparse(p.w, stream))
    {
        p.sparse = mSparse;
    }
    // TensorRT allocated getWorkspaceSize() for the profile's largest x, which covers this call's plan.
    p.workspaceBytes = eoraLinearWorkspaceSize(&p);
    int32_t const rc = eoraLinearForward(&p, stream);
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
        p->ensureSemaphores(nullptr);
        p->ensureSparse(nullptr, nullptr);
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

bool EoraLinearPluginCreator::parseFields(PluginFieldCollection const* fc, EoraAttrs& attrs, std::string& msg)
{
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
        IntField const* match = nullptr;
        for (IntField const& k : kIntFields)
        {
            if (name == k.name)
            {
                match = &k;
            }
        }
        if (match == nullptr)
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
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        EoraAttrs attrs;
        std::string msg;
        if (!parseFields(fc, attrs, msg))
        {
            reportError(nullptr, "%s", msg.c_str());
            return nullptr;
        }
        return new EoraLinearPlugin(attrs);
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

// ---------------------------------------------------------------------------------------------
// Registration without linking libnvinfer
// ---------------------------------------------------------------------------------------------

namespace
{

EoraLinearPluginCreator& creatorInstance()
{
    static EoraLinearPluginCreator creator;
    return creator;
}

using GetRegistryFn = IPluginRegistry* (*) ();

//! getPluginRegistry of a TensorRT runtime already in the process, or null. RTLD_NOLOAD never loads one.
GetRegistryFn findLoadedRegistry()
{
    if (void* s = dlsym(RTLD_DEFAULT, "getPluginRegistry"))
    {
        return reinterpret_cast<GetRegistryFn>(s);
    }
    static char const* const kNames[] = {"libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so",
        "libnvinfer_lean.so.11", "libnvinfer_lean.so.10", "libnvinfer_dispatch.so.11", "libnvinfer_dispatch.so.10"};
    for (char const* name : kNames)
    {
        void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
        if (h == nullptr)
        {
            continue;
        }
        void* s = dlsym(h, "getPluginRegistry");
        dlclose(h); // balances the NOLOAD reference; the library stays loaded by its owner
        if (s != nullptr)
        {
            return reinterpret_cast<GetRegistryFn>(s);
        }
    }
    return nullptr;
}

//! True if a TensorRT runtime library is on the call stack: this load is IPluginRegistry::loadLibrary, which
//! registers getCreators() itself (registering here too would make it fail on a duplicate).
bool loadedByTensorRT()
{
    void* frames[96];
    int const n = backtrace(frames, 96);
    for (int i = 0; i < n; ++i)
    {
        Dl_info info{};
        if (dladdr(frames[i], &info) == 0 || info.dli_fname == nullptr)
        {
            continue;
        }
        char const* base = std::strrchr(info.dli_fname, '/');
        base = base != nullptr ? base + 1 : info.dli_fname;
        if (std::strncmp(base, "libnvinfer.so", 13) == 0 || std::strncmp(base, "libnvinfer_lean.so", 18) == 0
            || std::strncmp(base, "libnvinfer_dispatch.so", 22) == 0)
        {
            return true;
        }
    }
    return false;
}

std::mutex gRegisterMutex;
bool gRegistered = false;

int32_t registerWithLoadedRuntime()
{
    std::lock_guard<std::mutex> lock(gRegisterMutex);
    if (gRegistered)
    {
        return 1;
    }
    GetRegistryFn const get = findLoadedRegistry();
    IPluginRegistry* reg = get != nullptr ? get() : nullptr;
    if (reg == nullptr)
    {
        return 0;
    }
    gRegistered = reg->registerCreator(creatorInstance(), kPLUGIN_NAMESPACE);
    return gRegistered ? 1 : 0;
}

struct LoadTimeRegistrar
{
    LoadTimeRegistrar()
    {
        char const* env = std::getenv("EORA_PLUGIN_AUTO_REGISTER");
        bool const forced = env != nullptr && std::strcmp(env, "1") == 0;
        bool const off = env != nullptr && std::strcmp(env, "0") == 0;
        if (off || (!forced && loadedByTensorRT()))
        {
            return;
        }
        registerWithLoadedRuntime();
    }
};

LoadTimeRegistrar gLoadTimeRegistrar;

} // namespace

} // namespace plugin
} // namespace eora

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&eora::plugin::creatorInstance()};
    nbCreators = 1;
    return kCreators;
}

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    eora::plugin::gLoggerFinder.store(finder);
}

extern "C" int32_t eoraRegisterPlugins(void)
{
    return eora::plugin::registerWithLoadedRuntime();
}

extern "C" char const* eoraPluginLastError(void)
{
    return eora::plugin::tPluginLastError.c_str();
}
