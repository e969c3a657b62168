/*
 * CPU harness of the EoraLinear plugin: plays TensorRT's part without libnvinfer.
 *
 * Compiled against TensorRT's public headers only and linked with libeora_plugin.so, it walks the calls a
 * builder and a runtime make: getCreators -> creator identity and field names -> createPlugin from a
 * PluginFieldCollection -> capability interfaces -> getOutputShapes (with an IExprBuilder of our own) ->
 * getOutputDataTypes -> supportsFormatCombination -> configurePlugin -> getWorkspaceSize ->
 * getFieldsToSerialize -> re-create at the runtime phase -> clone -> attachToContext (error recorder), and
 * checks that bad attributes and shapes are refused with a message.
 *
 * Output, one line each: "FIELD <name> <type> <length>" for the creator's fields, "ok <check>" or
 * "FAIL <check>: <detail>", and finally "harness: <n> passed, <m> failed". tests/test_plugin_cpu.py compares
 * the FIELD lines with graphs/eora_linear.spec.json and asserts there is no FAIL. No GPU is touched.
 *
 * The device-effects section swaps the plugin's device calls (eoraPluginDeviceOps.h) for recording fakes and
 * checks what a GPU run would do: counters zeroed on the enqueue stream, the workspace TensorRT allocated
 * passed to (and enforced on) the launch, the serialized planning inputs reaching it, 2:4 rebuilds.
 */
#include "NvInferRuntime.h"
#include "eoraLinearCommon.h"
#include "eoraLinearPacked.h"
#include "eoraPluginDeviceOps.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" char const* eoraPluginLastError(void);

namespace
{

int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& what, std::string const& detail = "")
{
    if (ok)
    {
        ++gPassed;
        std::printf("ok %s\n", what.c_str());
    }
    else
    {
        ++gFailed;
        std::printf("FAIL %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    }
}

std::string lastError()
{
    char const* e = eoraPluginLastError();
    return e != nullptr ? e : "";
}

// ----- A minimal IExprBuilder: constants and named symbols, with constant folding --------------------

class ExprImpl : public apiv::VDimensionExpr
{
public:
    ExprImpl(bool constant, int64_t value, std::string name)
        : mConstant(constant)
        , mValue(value)
        , mName(std::move(name))
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    std::string const& name() const
    {
        return mName;
    }

private:
    bool mConstant;
    int64_t mValue;
    std::string mName;
};

class Expr : public IDimensionExpr
{
public:
    Expr(bool constant, int64_t value, std::string name)
        : mImplObj(constant, value, std::move(name))
    {
        mImpl = &mImplObj;
    }
    std::string const& name() const
    {
        return mImplObj.name();
    }

private:
    ExprImpl mImplObj;
};

class BuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        mPool.push_back(std::make_unique<Expr>(true, value, std::to_string(value)));
        return mPool.back().get();
    }
    IDimensionExpr const* symbol(std::string const& name)
    {
        mPool.push_back(std::make_unique<Expr>(false, 0, name));
        return mPool.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        if (a.isConstant() && b.isConstant())
        {
            int64_t const x = a.getConstantValue();
            int64_t const y = b.getConstantValue();
            switch (op)
            {
            case DimensionOperation::kSUM: return constant(x + y);
            case DimensionOperation::kPROD: return constant(x * y);
            case DimensionOperation::kMAX: return constant(x > y ? x : y);
            case DimensionOperation::kMIN: return constant(x < y ? x : y);
            case DimensionOperation::kSUB: return constant(x - y);
            case DimensionOperation::kEQUAL: return constant(x == y);
            case DimensionOperation::kLESS: return constant(x < y);
            case DimensionOperation::kFLOOR_DIV: return y ? constant(x / y) : nullptr;
            case DimensionOperation::kCEIL_DIV: return y ? constant((x + y - 1) / y) : nullptr;
            }
            return nullptr;
        }
        mPool.push_back(std::make_unique<Expr>(false, 0, "(" + static_cast<Expr const&>(a).name() + " op"
                + std::to_string(static_cast<int>(op)) + " " + static_cast<Expr const&>(b).name() + ")"));
        return mPool.back().get();
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    std::vector<std::unique_ptr<Expr>> mPool;
};

class ExprBuilder : public IExprBuilder
{
public:
    ExprBuilder()
    {
        mImpl = &mImplObj;
    }
    IDimensionExpr const* symbol(std::string const& name)
    {
        return mImplObj.symbol(name);
    }

private:
    BuilderImpl mImplObj;
};

// ----- An error recorder and a resource context, as an execution context would give -----------------

class Recorder : public IErrorRecorder
{
public:
    int32_t getNbErrors() const noexcept override
    {
        return static_cast<int32_t>(mErrors.size());
    }
    ErrorCode getErrorCode(int32_t i) const noexcept override
    {
        return i >= 0 && i < getNbErrors() ? ErrorCode::kINVALID_ARGUMENT : ErrorCode::kUNSPECIFIED_ERROR;
    }
    ErrorDesc getErrorDesc(int32_t i) const noexcept override
    {
        return i >= 0 && i < getNbErrors() ? mErrors[i].c_str() : "";
    }
    bool hasOverflowed() const noexcept override
    {
        return false;
    }
    void clear() noexcept override
    {
        mErrors.clear();
    }
    bool reportError(ErrorCode, ErrorDesc desc) noexcept override
    {
        mErrors.emplace_back(desc != nullptr ? desc : "");
        return true;
    }
    RefCount incRefCount() noexcept override
    {
        return ++mRefs;
    }
    RefCount decRefCount() noexcept override
    {
        return --mRefs;
    }

private:
    std::vector<std::string> mErrors;
    RefCount mRefs{0};
};

class ResourceContext : public IPluginResourceContext
{
public:
    explicit ResourceContext(IErrorRecorder* r)
        : mRecorder(r)
    {
    }
    IGpuAllocator* getGpuAllocator() const noexcept override
    {
        return nullptr;
    }
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return mRecorder;
    }

private:
    IErrorRecorder* mRecorder;
};

// ----- Attributes -> PluginFieldCollection ----------------------------------------------------------

struct Attrs
{
    int32_t in = 256;
    int32_t out = 384;
    int32_t rank = 32;
    int32_t wbits = 4;
    int32_t group = 64;
    int32_t lbits = 4;
    int32_t lgroup = 16;
    int32_t sparse = 0;
    int32_t bias = 1;
};

//! Owns the field storage so a collection stays valid while used.
class Fields
{
public:
    explicit Fields(Attrs const& a, bool withStrings = true)
    {
        add("in_features", a.in);
        add("out_features", a.out);
        add("rank", a.rank);
        add("weight_bits", a.wbits);
        add("group_size", a.group);
        add("lowrank_bits", a.lbits);
        add("lowrank_group_size", a.lgroup);
        add("sparse24", a.sparse);
        add("has_bias", a.bias);
        if (withStrings)
        {
            addString("plugin_version", "1");
            addString("plugin_namespace", "eora");
        }
    }
    void add(char const* name, int32_t v)
    {
        mInts.push_back(std::make_unique<int32_t>(v));
        mFields.emplace_back(name, mInts.back().get(), PluginFieldType::kINT32, 1);
    }
    void addString(char const* name, char const* v)
    {
        mStrings.push_back(std::make_unique<std::string>(v));
        mFields.emplace_back(name, mStrings.back()->c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mStrings.back()->size() + 1));
    }
    void remove(char const* name)
    {
        for (size_t i = 0; i < mFields.size(); ++i)
        {
            if (std::strcmp(mFields[i].name, name) == 0)
            {
                mFields.erase(mFields.begin() + static_cast<long>(i));
                return;
            }
        }
    }
    void setType(char const* name, PluginFieldType t)
    {
        for (PluginField& f : mFields)
        {
            if (std::strcmp(f.name, name) == 0)
            {
                f.type = t;
            }
        }
    }
    PluginFieldCollection const* fc()
    {
        mFc.nbFields = static_cast<int32_t>(mFields.size());
        mFc.fields = mFields.data();
        return &mFc;
    }

private:
    std::vector<std::unique_ptr<int32_t>> mInts;
    std::vector<std::unique_ptr<std::string>> mStrings;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

// ----- Tensor descriptions of a well-formed call ---------------------------------------------------

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

struct Io
{
    std::vector<DynamicPluginTensorDesc> in;
    std::vector<DynamicPluginTensorDesc> out;
};

DynamicPluginTensorDesc desc(DataType t, Dims d, Dims mx)
{
    DynamicPluginTensorDesc x{};
    x.desc.dims = d;
    x.desc.type = t;
    x.desc.format = TensorFormat::kLINEAR;
    x.desc.scale = -1.0F;
    x.min = d;
    x.opt = d;
    x.max = mx;
    return x;
}

//! Inputs in the spec's order for attributes a; x is [-1, 16, in] with max [maxB, 16, in].
Io wellFormed(Attrs const& a, int64_t maxB)
{
    Io io;
    auto c = [](std::vector<int64_t> v) { return dims(v); };
    bool const wq = a.wbits < 16;
    bool const lq = a.lbits < 16;
    int64_t const lcols = a.lbits == 4 ? a.rank / 2 : a.rank;
    int64_t const bcols = a.lbits == 4 ? a.out / 2 : a.out;
    io.in.push_back(desc(DataType::kHALF, c({-1, 16, a.in}), c({maxB, 16, a.in})));
    io.in.push_back(desc(wq ? DataType::kINT8 : DataType::kHALF, c({a.in, wq ? a.out / 2 : a.out}),
        c({a.in, wq ? a.out / 2 : a.out})));
    if (wq)
    {
        io.in.push_back(desc(DataType::kHALF, c({a.in / a.group, a.out}), c({a.in / a.group, a.out})));
    }
    if (a.rank > 0)
    {
        io.in.push_back(desc(lq ? DataType::kINT8 : DataType::kHALF, c({a.in, lcols}), c({a.in, lcols})));
        if (lq)
        {
            io.in.push_back(desc(DataType::kHALF, c({a.in / a.lgroup, a.rank}), c({a.in / a.lgroup, a.rank})));
        }
        io.in.push_back(desc(lq ? DataType::kINT8 : DataType::kHALF, c({a.rank, bcols}), c({a.rank, bcols})));
        if (lq)
        {
            io.in.push_back(desc(DataType::kHALF, c({a.rank / a.lgroup, a.out}), c({a.rank / a.lgroup, a.out})));
        }
    }
    if (a.bias)
    {
        io.in.push_back(desc(DataType::kHALF, c({a.out}), c({a.out})));
    }
    io.out.push_back(desc(DataType::kHALF, c({-1, 16, a.out}), c({maxB, 16, a.out})));
    return io;
}

//! DimsExprs for the inputs: x = [batch (symbolic), 16, in], the rest constant.
std::vector<DimsExprs> exprsOf(Io const& io, ExprBuilder& b)
{
    std::vector<DimsExprs> e(io.in.size());
    for (size_t i = 0; i < io.in.size(); ++i)
    {
        Dims const& d = io.in[i].desc.dims;
        e[i].nbDims = d.nbDims;
        for (int32_t j = 0; j < d.nbDims; ++j)
        {
            e[i].d[j] = d.d[j] < 0 ? b.symbol("batch") : b.constant(d.d[j]);
        }
    }
    return e;
}

struct Plugin
{
    IPluginV3* v3 = nullptr;
    IPluginV3OneCore* core = nullptr;
    IPluginV3OneBuild* build = nullptr;
    IPluginV3OneRuntime* runtime = nullptr;
};

Plugin capabilities(IPluginV3* p)
{
    Plugin r;
    r.v3 = p;
    if (p != nullptr)
    {
        r.core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
        r.build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        r.runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    }
    return r;
}

std::string tag(Attrs const& a)
{
    char buf[128];
    std::snprintf(buf, sizeof(buf), "[r=%d wb=%d lb=%d bias=%d]", a.rank, a.wbits, a.lbits, a.bias);
    return buf;
}

//! The build- and run-time walk for one well-formed attribute set.
void walk(IPluginCreatorV3One* creator, Attrs const& a)
{
    std::string const t = tag(a);
    Fields f(a);
    Plugin p = capabilities(creator->createPlugin("layer", f.fc(), TensorRTPhase::kBUILD));
    check(p.v3 != nullptr, "createPlugin " + t, lastError());
    if (p.v3 == nullptr)
    {
        return;
    }
    check(p.core != nullptr && p.build != nullptr && p.runtime != nullptr, "capability interfaces " + t);
    check(std::strcmp(p.v3->getInterfaceInfo().kind, "PLUGIN") == 0
            && std::strcmp(p.core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(p.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(p.runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "interface kinds " + t);
    check(std::strcmp(p.core->getPluginName(), "EoraLinear") == 0 && std::strcmp(p.core->getPluginVersion(), "1") == 0
            && std::strcmp(p.core->getPluginNamespace(), "eora") == 0,
        "core identity " + t);
    check(p.build->getNbOutputs() == 1, "getNbOutputs " + t);

    Io io = wellFormed(a, 8);
    int32_t const nIn = static_cast<int32_t>(io.in.size());

    // getOutputShapes: leading dims pass through untouched (same expression), the last becomes out_features.
    {
        ExprBuilder b;
        std::vector<DimsExprs> ins = exprsOf(io, b);
        DimsExprs out{};
        int32_t const rc = p.build->getOutputShapes(ins.data(), nIn, nullptr, 0, &out, 1, b);
        check(rc == 0 && out.nbDims == 3 && out.d[0] == ins[0].d[0] && !out.d[0]->isConstant()
                && out.d[1]->isConstant() && out.d[1]->getConstantValue() == 16 && out.d[2]->isConstant()
                && out.d[2]->getConstantValue() == a.out,
            "getOutputShapes [batch,16,in] -> [batch,16,out] " + t, lastError());

        ins[0].d[2] = b.constant(a.in + 1);
        DimsExprs bad{};
        check(p.build->getOutputShapes(ins.data(), nIn, nullptr, 0, &bad, 1, b) != 0
                && lastError().find("in_features") != std::string::npos,
            "getOutputShapes refuses x with the wrong last dim " + t, lastError());
        ins[0].d[2] = b.constant(a.in);
        ins[1].d[0] = b.constant(a.in * 2);
        check(p.build->getOutputShapes(ins.data(), nIn, nullptr, 0, &bad, 1, b) != 0
                && lastError().find("(w)") != std::string::npos,
            "getOutputShapes refuses a mis-shaped w " + t, lastError());
        check(p.build->getOutputShapes(ins.data(), nIn - 1, nullptr, 0, &bad, 1, b) != 0,
            "getOutputShapes refuses a wrong input count " + t);
    }

    // getOutputDataTypes: strongly typed fp16 in, fp16 out.
    {
        std::vector<DataType> types;
        for (auto const& d : io.in)
        {
            types.push_back(d.desc.type);
        }
        DataType outType = DataType::kFLOAT;
        check(p.build->getOutputDataTypes(&outType, 1, types.data(), nIn) == 0 && outType == DataType::kHALF,
            "getOutputDataTypes fp16 " + t);
        types[0] = DataType::kFLOAT;
        check(p.build->getOutputDataTypes(&outType, 1, types.data(), nIn) != 0, "getOutputDataTypes refuses fp32 x " + t);
    }

    // supportsFormatCombination: the spec's types at every position, and nothing else.
    {
        std::vector<DynamicPluginTensorDesc> inOut = io.in;
        inOut.push_back(io.out[0]);
        bool all = true;
        for (int32_t pos = 0; pos <= nIn; ++pos)
        {
            all = all && p.build->supportsFormatCombination(pos, inOut.data(), nIn, 1);
        }
        check(all, "supportsFormatCombination accepts the spec's types " + t);
        bool none = true;
        for (int32_t pos = 0; pos <= nIn; ++pos)
        {
            std::vector<DynamicPluginTensorDesc> alt = inOut;
            alt[pos].desc.type = alt[pos].desc.type == DataType::kHALF ? DataType::kFLOAT : DataType::kHALF;
            none = none && !p.build->supportsFormatCombination(pos, alt.data(), nIn, 1);
            alt = inOut;
            alt[pos].desc.format = TensorFormat::kCHW32;
            none = none && !p.build->supportsFormatCombination(pos, alt.data(), nIn, 1);
        }
        check(none, "supportsFormatCombination refuses other types and formats " + t);
        check(!p.build->supportsFormatCombination(0, inOut.data(), nIn + 1, 1), "supportsFormatCombination wrong count " + t);
    }

    // configurePlugin and getWorkspaceSize.
    {
        check(p.build->configurePlugin(io.in.data(), nIn, io.out.data(), 1) == 0, "configurePlugin " + t, lastError());
        if (a.rank > 0)
        {
            Io badIo = io;
            size_t const aPos = a.wbits < 16 ? 3 : 2; // the spec's order: x, w, [w_scale], a, ...
            badIo.in[aPos].desc.dims.d[1] += 2;       // a's column count
            check(p.build->configurePlugin(badIo.in.data(), nIn, badIo.out.data(), 1) != 0
                    && lastError().find("(a)") != std::string::npos,
                "configurePlugin refuses a mis-shaped a " + t, lastError());
        }
        Io badType = io;
        badType.in[1].desc.type = DataType::kINT32;
        check(p.build->configurePlugin(badType.in.data(), nIn, badType.out.data(), 1) != 0,
            "configurePlugin refuses an INT32 w " + t);

        size_t const ws = p.build->getWorkspaceSize(io.in.data(), nIn, io.out.data(), 1);
        size_t const tBytes = static_cast<size_t>(8 * 16) * a.rank * 2; // max M = 8*16 rows of t, fp16
        check(ws >= tBytes && (a.rank > 0 || ws < (size_t(1) << 30)), "getWorkspaceSize covers t = x.A " + t,
            std::to_string(ws));
        Io bigger = wellFormed(a, 64);
        check(p.build->getWorkspaceSize(bigger.in.data(), nIn, bigger.out.data(), 1) >= (a.rank > 0 ? ws : 0),
            "getWorkspaceSize grows with the profile's max " + t);
        std::printf("WORKSPACE %s %zu\n", t.c_str(), ws);
    }

    // Serialization round trip at the runtime phase, and clone.
    {
        PluginFieldCollection const* ser = p.runtime->getFieldsToSerialize();
        check(ser != nullptr && ser->nbFields == 12 && std::strcmp(ser->fields[9].name, "gemv_max_m") == 0
                && std::strcmp(ser->fields[10].name, "max_rows") == 0
                && std::strcmp(ser->fields[11].name, "workspace_bytes") == 0,
            "getFieldsToSerialize has the 9 attributes and the 3 planning inputs " + t);
        Plugin back = capabilities(creator->createPlugin("layer", ser, TensorRTPhase::kRUNTIME));
        check(back.v3 != nullptr && back.build != nullptr
                && std::string(back.build->getMetadataString()) == p.build->getMetadataString(),
            "re-create from serialized fields " + t, lastError());
        Plugin cl = capabilities(p.v3->clone());
        check(cl.v3 != nullptr && std::string(cl.build->getMetadataString()) == p.build->getMetadataString()
                && cl.v3 != p.v3,
            "clone " + t);
        check(back.build != nullptr && back.build->getTimingCacheID() != nullptr
                && std::string(back.build->getTimingCacheID()) == p.build->getTimingCacheID(),
            "timing cache id survives serialization " + t);
        delete back.v3;
        delete cl.v3;
    }

    // attachToContext: a clone that reports through the context's error recorder.
    {
        Recorder rec;
        ResourceContext ctx(&rec);
        Plugin att = capabilities(p.runtime->attachToContext(&ctx));
        check(att.v3 != nullptr && att.v3 != p.v3, "attachToContext returns a clone " + t);
        if (att.v3 != nullptr)
        {
            Io bad = io;
            bad.in[0].desc.type = DataType::kFLOAT;
            check(att.runtime->onShapeChange(&bad.in[0].desc, 1, &bad.out[0].desc, 1) != 0 && rec.getNbErrors() > 0,
                "runtime errors go to the context's error recorder " + t);
            std::vector<PluginTensorDesc> ins;
            for (auto const& d : io.in)
            {
                PluginTensorDesc x = d.desc;
                if (x.dims.d[0] < 0)
                {
                    x.dims.d[0] = 4;
                }
                ins.push_back(x);
            }
            PluginTensorDesc outD = io.out[0].desc;
            outD.dims.d[0] = 4;
            check(att.runtime->onShapeChange(ins.data(), nIn, &outD, 1) == 0, "onShapeChange " + t, lastError());
            delete att.v3;
        }
    }
    delete p.v3;
}

// ----- Device effects, recorded: what enqueue would do on a GPU --------------------------------------

struct OpsLog
{
    std::vector<std::string> events;
    int32_t capturing = 0;
    EoraLinearParams last{};
    int32_t forwards = 0;
};
OpsLog gOps;

std::string streamName(cudaStream_t s)
{
    return "S" + std::to_string(reinterpret_cast<uintptr_t>(s));
}

int32_t fakeAllocate(void** ptr, size_t bytes)
{
    *ptr = std::aligned_alloc(256, ((bytes + 255) / 256) * 256);
    gOps.events.push_back("alloc " + std::to_string(bytes));
    return 0;
}
int32_t fakeRelease(void* ptr)
{
    std::free(ptr);
    return 0;
}
int32_t fakeMemset(void* /*ptr*/, int32_t value, size_t bytes, cudaStream_t s)
{
    gOps.events.push_back("memset " + std::to_string(value) + " " + std::to_string(bytes) + " " + streamName(s));
    return 0;
}
int32_t fakeCapturing(cudaStream_t /*s*/)
{
    return gOps.capturing;
}
int32_t fakeCompact(void const* w, int32_t /*K*/, int32_t /*N*/, void* /*out*/, cudaStream_t s)
{
    gOps.events.push_back("compact " + std::to_string(reinterpret_cast<uintptr_t>(w)) + " " + streamName(s));
    return 0;
}
int32_t fakePack(EoraLinearParams const* /*p*/, void* /*out*/, cudaStream_t s)
{
    gOps.events.push_back("pack " + streamName(s));
    return 0;
}
int32_t fakeForward(EoraLinearParams const* p, cudaStream_t s)
{
    gOps.events.push_back("forward " + streamName(s));
    gOps.last = *p;
    ++gOps.forwards;
    return 0;
}

std::string joined(std::vector<std::string> const& v)
{
    std::string r;
    for (auto const& e : v)
    {
        r += (r.empty() ? "" : " | ") + e;
    }
    return r;
}

//! Fake device pointers for every input (never dereferenced by the host code), 256-byte aligned.
std::vector<void const*> fakeInputs(int32_t n, uintptr_t base)
{
    std::vector<void const*> v;
    for (int32_t i = 0; i < n; ++i)
    {
        v.push_back(reinterpret_cast<void const*>(base + 0x100000u * static_cast<uintptr_t>(i + 1)));
    }
    return v;
}

std::vector<PluginTensorDesc> runtimeDescs(Io const& io, int64_t batch)
{
    std::vector<PluginTensorDesc> ins;
    for (auto const& d : io.in)
    {
        PluginTensorDesc x = d.desc;
        if (x.dims.d[0] < 0)
        {
            x.dims.d[0] = batch;
        }
        ins.push_back(x);
    }
    return ins;
}

int32_t runEnqueue(Plugin& pl, Io const& io, int64_t batch, void const* w, cudaStream_t s)
{
    std::vector<PluginTensorDesc> ins = runtimeDescs(io, batch);
    PluginTensorDesc out = io.out[0].desc;
    out.dims.d[0] = batch;
    std::vector<void const*> ptrs = fakeInputs(static_cast<int32_t>(ins.size()), 0x40000000u);
    if (w != nullptr)
    {
        ptrs[1] = w;
    }
    void* outs[1] = {reinterpret_cast<void*>(0x7000000u)};
    return pl.runtime->enqueue(ins.data(), &out, ptrs.data(), outs, reinterpret_cast<void*>(0x9000000u), s);
}

int64_t serializedInt(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0)
        {
            return fc->fields[i].type == PluginFieldType::kINT64 ? *static_cast<int64_t const*>(fc->fields[i].data)
                                                                 : *static_cast<int32_t const*>(fc->fields[i].data);
        }
    }
    return -1;
}

//! Llama-7B MLP shape whose workspace the v1 planner under-reported: the exact maximum over every M of the
//! profile, the planning inputs serialized and used, the counters zeroed on the enqueue stream.
void deviceEffects(IPluginCreatorV3One* creator)
{
    Attrs a;
    a.in = 4096;
    a.out = 11008;
    a.rank = 128;
    a.group = 128;
    a.lbits = 4;
    a.lgroup = 64;
    a.bias = 0;
    int64_t const maxBatch = 2500; // x is [batch, 16, in]: max M = 40000
    int64_t const maxM = maxBatch * 16;

    setenv("EORA_GEMV_MAX_M", "12", 1); // read once, at build time
    Fields f(a);
    Plugin b = capabilities(creator->createPlugin("layer", f.fc(), TensorRTPhase::kBUILD));
    check(b.v3 != nullptr, "device effects: createPlugin", lastError());
    if (b.v3 == nullptr)
    {
        return;
    }
    Io io = wellFormed(a, maxBatch);
    int32_t const nIn = static_cast<int32_t>(io.in.size());
    check(b.build->configurePlugin(io.in.data(), nIn, io.out.data(), 1) == 0, "device effects: configurePlugin");
    int64_t const ws = static_cast<int64_t>(b.build->getWorkspaceSize(io.in.data(), nIn, io.out.data(), 1));

    eora::EoraAttrs ea;
    ea.inFeatures = a.in;
    ea.outFeatures = a.out;
    ea.rank = a.rank;
    ea.weightBits = a.wbits;
    ea.groupSize = a.group;
    ea.lowrankBits = a.lbits;
    ea.lowrankGroupSize = a.lgroup;
    int64_t brute = 0;
    int64_t argmax = 0;
    for (int64_t m = 1; m <= maxM; ++m)
    {
        int64_t const need = eora::workspaceBytesAt(ea, m, eora::kPathAuto, 12);
        if (need > brute)
        {
            brute = need;
            argmax = m;
        }
    }
    check(ws >= brute, "getWorkspaceSize covers every M up to the profile max (K=4096 N=11008 r=128 maxM=40000)",
        "reported " + std::to_string(ws) + ", M=" + std::to_string(argmax) + " needs " + std::to_string(brute));

    PluginFieldCollection const* ser = b.runtime->getFieldsToSerialize();
    check(serializedInt(ser, "gemv_max_m") == 12 && serializedInt(ser, "max_rows") == maxM
            && serializedInt(ser, "workspace_bytes") == ws,
        "planning inputs serialized (gemv_max_m from the build-time env, max_rows, workspace_bytes)");

    setenv("EORA_GEMV_MAX_M", "2", 1); // a different value at run time must change nothing
    Plugin r = capabilities(creator->createPlugin("layer", ser, TensorRTPhase::kRUNTIME));
    unsetenv("EORA_GEMV_MAX_M");
    check(r.v3 != nullptr, "device effects: runtime createPlugin", lastError());
    if (r.v3 == nullptr)
    {
        delete b.v3;
        return;
    }

    EoraDeviceOps const ops{fakeAllocate, fakeRelease, fakeMemset, fakeCapturing, fakeCompact, fakePack, fakeForward};
    eoraPluginSetDeviceOps(&ops);
    gOps = OpsLog{};
    Recorder rec;
    ResourceContext ctx(&rec);
    Plugin att = capabilities(r.runtime->attachToContext(&ctx));
    std::string const sem = std::to_string(4 * eora::kSemaphoreCount);
    std::string const packedBytes = std::to_string(eora::packedLayout(ea).totalBytes);
    check(joined(gOps.events) == "alloc " + sem + " | alloc " + packedBytes,
        "attachToContext allocates the counters and the packed copies, fills nothing yet", joined(gOps.events));

    cudaStream_t const s1 = reinterpret_cast<cudaStream_t>(uintptr_t{1});
    gOps.events.clear();
    int32_t rc = runEnqueue(att, io, 1, nullptr, s1);
    check(rc == 0 && joined(gOps.events) == "memset 0 " + sem + " S1 | forward S1",
        "split-K counters zeroed on the enqueue stream, before the launch", joined(gOps.events) + " " + lastError());
    check(gOps.last.gemvMaxM == 12 && gOps.last.noSplitK == 0 && gOps.last.semaphores != nullptr,
        "the launch plans with the serialized gemv_max_m (not the run-time env)", std::to_string(gOps.last.gemvMaxM));
    check(static_cast<int64_t>(gOps.last.workspaceBytes) == ws,
        "the launch is told the workspace TensorRT allocated, not what it needs",
        std::to_string(gOps.last.workspaceBytes) + " vs " + std::to_string(ws));
    gOps.events.clear();
    rc = runEnqueue(att, io, maxBatch, nullptr, s1);
    check(rc == 0 && joined(gOps.events) == "forward S1", "later launches reuse the self-resetting counters",
        joined(gOps.events));

    // A plan larger than the engine's workspace is refused, never launched.
    {
        Io small = wellFormed(a, 1); // max M = 16
        Fields f2(a);
        Plugin b2 = capabilities(creator->createPlugin("layer", f2.fc(), TensorRTPhase::kBUILD));
        b2.build->configurePlugin(small.in.data(), nIn, small.out.data(), 1);
        int64_t const ws16 = static_cast<int64_t>(b2.build->getWorkspaceSize(small.in.data(), nIn, small.out.data(), 1));
        int64_t over = 0;
        for (int64_t batch = 2; batch <= 4096 && over == 0; ++batch)
        {
            if (eora::planForward(ea, batch * 16, eora::kPathAuto, eora::kDefaultGemvMaxM, true).workspaceBytes > ws16)
            {
                over = batch;
            }
        }
        Plugin r2 = capabilities(creator->createPlugin("layer", b2.runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
        Recorder rec2;
        ResourceContext ctx2(&rec2);
        Plugin att2 = capabilities(r2.runtime->attachToContext(&ctx2));
        gOps.events.clear();
        int32_t const forwardsBefore = gOps.forwards;
        rc = runEnqueue(att2, small, over, nullptr, s1);
        check(over > 0 && rc != 0 && gOps.forwards == forwardsBefore && rec2.getNbErrors() > 0
                && std::string(rec2.getErrorDesc(rec2.getNbErrors() - 1)).find("workspace") != std::string::npos,
            "a call needing more workspace than the engine has is refused before any launch",
            "batch " + std::to_string(over) + " rc " + std::to_string(rc));

        // M = 16 with the default crossover (16): the skinny path, packed once on the enqueue stream.
        gOps.events.clear();
        rc = runEnqueue(att2, small, 1, nullptr, s1);
        bool const packedUsed = gOps.last.packed != nullptr;
        runEnqueue(att2, small, 1, nullptr, s1);
        check(rc == 0 && packedUsed && joined(gOps.events) == "pack S1 | forward S1 | forward S1",
            "packed copies built once, on the enqueue stream, for the M <= 16 path", joined(gOps.events));
        delete att2.v3;
        delete r2.v3;
        delete b2.v3;
    }

    // An engine without the planning fields (serialized by an older plugin): no split-K, t alone in the workspace.
    {
        Fields old(a);
        Plugin r0 = capabilities(creator->createPlugin("layer", old.fc(), TensorRTPhase::kRUNTIME));
        Recorder rec0;
        ResourceContext ctx0(&rec0);
        Plugin att0 = capabilities(r0.runtime->attachToContext(&ctx0));
        rc = runEnqueue(att0, io, 4, nullptr, s1); // M = 64
        check(rc == 0 && gOps.last.noSplitK == 1 && gOps.last.workspaceBytes == static_cast<size_t>(64 * a.rank * 2),
            "an engine without a recorded workspace runs without split-K, t alone in the workspace",
            "rc " + std::to_string(rc) + " ws " + std::to_string(gOps.last.workspaceBytes) + " nosplit "
                + std::to_string(gOps.last.noSplitK) + " errors " + std::to_string(rec0.getNbErrors()) + " "
                + (rec0.getNbErrors() > 0 ? rec0.getErrorDesc(0) : ""));
        delete att0.v3;
        delete r0.v3;
    }

    // Graph capture: nothing allocated inside it; a zeroing captured into a graph is redone eagerly.
    {
        Plugin cold = capabilities(r.v3->clone());
        cudaStream_t const s2 = reinterpret_cast<cudaStream_t>(uintptr_t{2});
        gOps.events.clear();
        gOps.capturing = 1;
        rc = runEnqueue(cold, io, 1, nullptr, s2);
        check(rc == 0 && joined(gOps.events) == "forward S2" && gOps.last.noSplitK == 1 && gOps.last.semaphores == nullptr,
            "inside a capture before any buffer exists: no allocation, no split-K", joined(gOps.events));
        delete cold.v3;

        gOps.capturing = 0;
        Plugin warm = capabilities(r.runtime->attachToContext(&ctx)); // contexts are made outside captures
        gOps.events.clear();
        gOps.capturing = 1;
        rc = runEnqueue(warm, io, 1, nullptr, s2);
        gOps.capturing = 0;
        runEnqueue(warm, io, 1, nullptr, s2);
        runEnqueue(warm, io, 1, nullptr, s2);
        check(joined(gOps.events) == "memset 0 " + sem + " S2 | forward S2 | memset 0 " + sem + " S2 | forward S2 | forward S2",
            "counters zeroed inside a capture are zeroed again at the next eager launch", joined(gOps.events));
        delete warm.v3;
    }
    delete att.v3;
    delete r.v3;
    delete b.v3;
}

//! 2:4 compaction happens on the enqueue stream whenever the weights may have changed, never on the address alone.
void sparseRebuilds(IPluginCreatorV3One* creator)
{
    Attrs a;
    a.sparse = 1;
    a.bias = 0;
    Fields f(a);
    Plugin b = capabilities(creator->createPlugin("layer", f.fc(), TensorRTPhase::kBUILD));
    Io io = wellFormed(a, 1);
    int32_t const nIn = static_cast<int32_t>(io.in.size());
    b.build->configurePlugin(io.in.data(), nIn, io.out.data(), 1);
    b.build->getWorkspaceSize(io.in.data(), nIn, io.out.data(), 1);
    Plugin r = capabilities(creator->createPlugin("layer", b.runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    Recorder rec;
    ResourceContext ctx(&rec);
    gOps = OpsLog{};
    Plugin att = capabilities(r.runtime->attachToContext(&ctx));
    cudaStream_t const s3 = reinterpret_cast<cudaStream_t>(uintptr_t{3});
    void const* w1 = reinterpret_cast<void const*>(uintptr_t{0x1000});
    void const* w2 = reinterpret_cast<void const*>(uintptr_t{0x2000});
    auto compactions = [&]() {
        std::vector<std::string> c;
        for (auto const& e : gOps.events)
        {
            if (e.rfind("compact", 0) == 0)
            {
                c.push_back(e);
            }
        }
        return joined(c);
    };
    std::vector<PluginTensorDesc> ins = runtimeDescs(io, 1);
    PluginTensorDesc out = io.out[0].desc;
    out.dims.d[0] = 1;

    gOps.events.clear();
    runEnqueue(att, io, 1, w1, s3);
    runEnqueue(att, io, 1, w1, s3);
    check(compactions() == "compact 4096 S3" && gOps.last.sparse != nullptr,
        "2:4 weight compacted once, on the enqueue stream, and used", joined(gOps.events));

    gOps.events.clear();
    att.runtime->onShapeChange(ins.data(), nIn, &out, 1);
    runEnqueue(att, io, 1, w1, s3);
    check(compactions() == "compact 4096 S3", "onShapeChange (new tensor addresses or profile) recompacts at the same address",
        joined(gOps.events));

    gOps.events.clear();
    eoraPluginWeightsChanged();
    runEnqueue(att, io, 1, w1, s3);
    runEnqueue(att, io, 1, w2, s3);
    check(compactions() == "compact 4096 S3 | compact 8192 S3", "a refit and a new weight address both recompact",
        joined(gOps.events));

    gOps.events.clear();
    gOps.capturing = 1;
    runEnqueue(att, io, 1, w1, s3);
    gOps.capturing = 0;
    runEnqueue(att, io, 1, w1, s3);
    runEnqueue(att, io, 1, w1, s3);
    check(compactions() == "compact 4096 S3 | compact 4096 S3",
        "a compaction captured into a graph is not trusted by later eager launches", joined(gOps.events));

    Plugin other = capabilities(r.runtime->attachToContext(&ctx));
    gOps.events.clear();
    runEnqueue(other, io, 1, w1, s3);
    check(compactions() == "compact 4096 S3", "each context's instance compacts its own copy", joined(gOps.events));
    delete other.v3;
    delete att.v3;
    delete r.v3;
    delete b.v3;
    eoraPluginSetDeviceOps(nullptr);
}

void badAttributes(IPluginCreatorV3One* creator)
{
    auto refuse = [&](Fields& f, char const* what, char const* needle) {
        IPluginV3* p = creator->createPlugin("bad", f.fc(), TensorRTPhase::kBUILD);
        std::string const msg = lastError();
        check(p == nullptr && msg.find(needle) != std::string::npos, std::string("refuses ") + what, msg);
        delete p;
    };
    {
        Attrs a;
        Fields f(a);
        f.remove("in_features");
        refuse(f, "a missing in_features", "in_features");
    }
    {
        Attrs a;
        a.wbits = 5;
        Fields f(a);
        refuse(f, "weight_bits=5", "weight_bits");
    }
    {
        Attrs a;
        a.group = 0;
        Fields f(a);
        refuse(f, "group_size=0 with INT4 weights", "group_size");
    }
    {
        Attrs a;
        a.group = 96; // 256 % 96 != 0
        Fields f(a);
        refuse(f, "a group_size that does not divide in_features", "group_size");
    }
    {
        Attrs a;
        a.rank = 31;
        a.lgroup = 1;
        Fields f(a);
        refuse(f, "an odd rank with INT4 factors", "rank");
    }
    {
        Attrs a;
        a.lgroup = 24; // does not divide rank 32
        Fields f(a);
        refuse(f, "a lowrank_group_size that does not divide rank", "lowrank_group_size");
    }
    {
        Attrs a;
        a.lbits = 2;
        Fields f(a);
        refuse(f, "lowrank_bits=2", "lowrank_bits");
    }
    {
        Attrs a;
        a.sparse = 2;
        Fields f(a);
        refuse(f, "sparse24=2", "sparse24");
    }
    {
        Attrs a;
        a.out = 383;
        Fields f(a);
        refuse(f, "odd out_features", "out_features");
    }
    {
        Attrs a;
        Fields f(a);
        f.add("rnak", 4);
        refuse(f, "an unknown field", "rnak");
    }
    {
        Attrs a;
        Fields f(a, false);
        f.addString("plugin_version", "2");
        refuse(f, "plugin_version 2", "plugin_version");
    }
    {
        Attrs a;
        Fields f(a);
        f.setType("rank", PluginFieldType::kFLOAT32);
        refuse(f, "a float rank field", "rank");
    }
    {
        IPluginV3* p = creator->createPlugin("null", nullptr, TensorRTPhase::kBUILD);
        check(p == nullptr && !lastError().empty(), "refuses a NULL field collection", lastError());
    }
}

} // namespace

int main()
{
    int32_t nb = -1;
    IPluginCreatorInterface* const* list = getCreators(nb);
    check(nb == 1 && list != nullptr && list[0] != nullptr, "getCreators returns one creator");
    if (nb != 1 || list == nullptr || list[0] == nullptr)
    {
        std::printf("harness: %d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    check(std::strcmp(list[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is IPluginCreatorV3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(list[0]);
    check(std::strcmp(creator->getPluginName(), "EoraLinear") == 0, "creator name EoraLinear");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    check(std::strcmp(creator->getPluginNamespace(), "eora") == 0, "creator namespace eora");

    PluginFieldCollection const* names = creator->getFieldNames();
    check(names != nullptr && names->nbFields > 0, "getFieldNames");
    for (int32_t i = 0; names != nullptr && i < names->nbFields; ++i)
    {
        std::printf("FIELD %s %d %d\n", names->fields[i].name, static_cast<int>(names->fields[i].type),
            names->fields[i].length);
    }

    Attrs base;
    walk(creator, base);
    Attrs rank0;
    rank0.rank = 0;
    rank0.lbits = 16;
    rank0.lgroup = 0;
    rank0.bias = 0;
    walk(creator, rank0);
    Attrs fp16;
    fp16.wbits = 16;
    fp16.group = 0;
    fp16.lbits = 16;
    fp16.lgroup = 0;
    walk(creator, fp16);
    Attrs int8;
    int8.lbits = 8;
    int8.sparse = 1;
    walk(creator, int8);

    badAttributes(creator);
    deviceEffects(creator);
    sparseRebuilds(creator);

    std::printf("harness: %d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}
