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

private:
    //! Check one tensor's type and (known) dims against the spec; role from the input order rule.
    bool checkTensor(int32_t pos, nvinfer1::DataType type, nvinfer1::Dims const& dims) const noexcept;
    //! Persistent device buffers: split-K semaphores and the compacted 2:4 weight. Allocated outside graph
    //! capture (attachToContext or the first enqueue); returns false while they cannot be had.
    bool ensureSemaphores(cudaStream_t stream) noexcept;
    bool ensureSparse(void const* w, cudaStream_t stream) noexcept;
    bool sparseEligible() const noexcept;
    void releaseDeviceBuffers() noexcept;

    EoraAttrs mAttrs;
    std::string mIdentity;
    std::vector<nvinfer1::PluginField> mSerFields;
    nvinfer1::PluginFieldCollection mSerFc{};
    nvinfer1::IErrorRecorder* mRecorder{nullptr};
    int32_t* mSemaphores{nullptr};
    void* mSparse{nullptr};
    void const* mSparseSource{nullptr};
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
    static bool parseFields(nvinfer1::PluginFieldCollection const* fc, EoraAttrs& attrs, std::string& msg);

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFc{};
};

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
    //! load time when possible; call it after `import tensorrt` if this library was loaded first. Returns 1 if
    //! the creator is (now) registered, 0 if no TensorRT runtime is loaded.
    __attribute__((visibility("default"))) int32_t eoraRegisterPlugins(void);
    //! The last error the plugin glue reported on this thread ("" if none): lets tests check the messages.
    __attribute__((visibility("default"))) char const* eoraPluginLastError(void);
}

#endif // EORA_LINEAR_PLUGIN_H
