/*
 * eoraLinearPlugin.h: the TensorRT glue of EoraLinear (IPluginV3 + IPluginCreatorV3One).
 *
 * Shapes, types, attributes and serialization live here; the arithmetic lives in eoraLinearKernel.cu behind
 * the C entry point eoraLinearForward, and the index rules both share are in eoraLinearCommon.h.
 */
#ifndef EORA_LINEAR_PLUGIN_H
#define EORA_LINEAR_PLUGIN_H

#include "NvInferRuntime.h"
#include "eoraLinearCommon.h"
#include "eoraPluginDeviceOps.h"

#include <string>
#include <vector>

namespace eora
{
namespace plugin
{

constexpr char const* kPLUGIN_NAME = "EoraLinear";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "eora";

//! Report an error through the context's error recorder if there is one, else TensorRT's logger (found via
//! setLoggerFinder), else stderr; the text is also kept for eoraPluginLastError().
void reportError(nvinfer1::IErrorRecorder* recorder, char const* fmt, ...) noexcept;

class EoraLinearPlugin : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit EoraLinearPlugin(EoraAttrs const& attrs);
    ~EoraLinearPlugin() override;
    EoraLinearPlugin(EoraLinearPlugin const&) = delete;
    EoraLinearPlugin& operator=(EoraLinearPlugin const&) = delete;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    EoraAttrs const& attrs() const noexcept
    {
        return mAttrs;
    }

    //! Planning inputs beyond the attributes, serialized with the engine so that a launch plans what the build
    //! planned: the GEMV / tensor-core crossover, the profile's largest M, and the workspace size reported to
    //! TensorRT (which is what TensorRT allocates and hands to enqueue).
    struct Planning
    {
        int32_t gemvMaxM{0};
        int64_t maxRows{0};
        int64_t workspaceBytes{0};
    };
    EoraLinearPlugin(EoraAttrs const& attrs, Planning const& planning);
    Planning const& planning() const noexcept
    {
        return mPlan;
    }

private:
    //! Check one tensor's type and (known) dims against the spec; role from the input order rule.
    bool checkTensor(int32_t pos, nvinfer1::DataType type, nvinfer1::Dims const& dims) const noexcept;
    //! The workspace enqueue may use: the size reported to TensorRT for this engine, or -1 when unknown.
    int64_t workspaceGiven() const noexcept;
    void recordMaxRows(int64_t maxM) const noexcept;
    //! Persistent device buffers: split-K semaphores and the compacted 2:4 weight. Allocated outside graph
    //! capture (attachToContext or the first enqueue); the semaphores are zeroed on the enqueue stream.
    bool allocateSemaphores(cudaStream_t stream) noexcept;
    bool readySemaphores(cudaStream_t stream) noexcept;
    bool ensureSparse(void const* w, cudaStream_t stream) noexcept;
    //! The packed copies of w, a, b (eoraLinearPacked.h) for M <= 16, rebuilt like the 2:4 weight.
    bool ensurePacked(EoraLinearParams const* p, cudaStream_t stream) noexcept;
    uint64_t weightsGeneration() const noexcept;
    bool sparseEligible() const noexcept;
    void releaseDeviceBuffers() noexcept;
    void initFields();

    EoraAttrs mAttrs;
    mutable Planning mPlan;
    std::string mIdentity;
    std::vector<nvinfer1::PluginField> mSerFields;
    nvinfer1::PluginFieldCollection mSerFc{};
    nvinfer1::IErrorRecorder* mRecorder{nullptr};
    int32_t* mSemaphores{nullptr};
    bool mSemaphoresZeroed{false};
    void* mSparse{nullptr};
    //! The compacted weight is valid for this weight address *and* this weights generation; the generation
    //! moves on attach, on every onShapeChange (TensorRT calls it after tensor addresses or the profile change)
    //! and on eoraPluginWeightsChanged() (refit), so a rebuilt or refitted weight is compacted again.
    void const* mSparseSource{nullptr};
    uint64_t mSparseGeneration{0};
    void* mPacked{nullptr};
    void const* mPackedSource[6]{};
    uint64_t mPackedGeneration{0};
    uint64_t mWeightsGeneration{1};
};

class EoraLinearPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    EoraLinearPluginCreator();
    ~EoraLinearPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    //! Parse a field collection into attributes; false (with the reason in msg) on unknown names, wrong types,
    //! missing required fields or values the spec forbids.
    static bool parseFields(nvinfer1::PluginFieldCollection const* fc, EoraAttrs& attrs,
        EoraLinearPlugin::Planning& planning, std::string& msg);

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFc{};
};

//! The one creator instance of this library (registered once, and listed by getCreators).
EoraLinearPluginCreator& creatorInstance();

} // namespace plugin
} // namespace eora

extern "C"
{
    //! TensorRT dynamic plugin loading (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, plans that
    //! embed their plugin libraries): the creators this library holds.
    __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
    //! TensorRT hands the library a way to reach its logger.
    __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    //! Register the creator with the plugin registry of a libnvinfer already loaded in this process. Done at
    //! load time when possible, and in a Python process right after `import tensorrt` when the library was
    //! loaded first (see eoraPluginRegistration.cpp). Returns 1 if the creator is (now) registered, 0 if no
    //! TensorRT runtime is loaded.
    __attribute__((visibility("default"))) int32_t eoraRegisterPlugins(void);
    //! The last error the plugin glue reported on this thread ("" if none): lets tests check the messages.
    __attribute__((visibility("default"))) char const* eoraPluginLastError(void);
}

#endif // EORA_LINEAR_PLUGIN_H
