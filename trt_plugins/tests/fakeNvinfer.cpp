/*
 * A stand-in for libnvinfer's plugin registry, to test how libeora_plugin.so registers itself without TensorRT.
 *
 * Built by tests/test_plugin_cpu.py as a shared library named libnvinfer.so.11 (soname too), so the plugin's
 * load-time registrar finds it exactly as it would find TensorRT: by dlsym / dlopen(RTLD_NOLOAD). It exports
 *   getPluginRegistry()     a registry that records every registerCreator call;
 *   fakeLoadLibrary(path)   what IPluginRegistry::loadLibrary does: dlopen the library from inside
 *                           "libnvinfer", then register the creators its getCreators() returns;
 *   fakeRegistrations(...)  "<namespace>::<name>/<version>@<how>" lines, how = static | library | duplicate;
 *   fakeFindCreator(name)   1 if the registry holds eora::<name>/1: the lookup the ONNX parser makes.
 */
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

bool gInLoadLibrary = false;
std::string gLog;

class FakeRegistry : public IPluginRegistry
{
public:
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        auto& c = static_cast<IPluginCreatorV3One&>(creator);
        std::string const key = std::string(ns != nullptr ? ns : "") + "::" + c.getPluginName() + "/" + c.getPluginVersion();
        for (IPluginCreatorInterface* existing : mCreators)
        {
            auto* e = static_cast<IPluginCreatorV3One*>(existing);
            if (std::string(e->getPluginNamespace()) + "::" + e->getPluginName() + "/" + e->getPluginVersion() == key)
            {
                gLog += key + "@duplicate\n"; // TensorRT refuses a second creator with the same identity
                return false;
            }
        }
        mCreators.push_back(&creator);
        gLog += key + (gInLoadLibrary ? "@library\n" : "@static\n");
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = static_cast<int32_t>(mCreators.size());
        return mCreators.data();
    }
    //! What TensorRT's ONNX parser asks when it meets a node it has no importer for.
    IPluginCreatorInterface* getCreator(
        AsciiChar const* const name, AsciiChar const* const version, AsciiChar const* const ns) noexcept override
    {
        for (IPluginCreatorInterface* existing : mCreators)
        {
            auto* e = static_cast<IPluginCreatorV3One*>(existing);
            if (std::strcmp(e->getPluginName(), name) == 0 && std::strcmp(e->getPluginVersion(), version) == 0
                && std::strcmp(e->getPluginNamespace(), ns != nullptr ? ns : "") == 0)
            {
                return existing;
            }
        }
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override
    {
        return false;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        return getAllCreators(n);
    }

private:
    std::vector<IPluginCreatorInterface*> mCreators;
};

FakeRegistry gRegistry;

} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

extern "C" __attribute__((visibility("default"))) int fakeLoadLibrary(char const* path)
{
    gInLoadLibrary = true;
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    int registered = -1;
    if (h != nullptr)
    {
        using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
        auto get = reinterpret_cast<GetCreators>(dlsym(h, "getCreators"));
        registered = 0;
        int32_t n = 0;
        IPluginCreatorInterface* const* list = get != nullptr ? get(n) : nullptr;
        for (int32_t i = 0; list != nullptr && i < n; ++i)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
            registered += gRegistry.registerCreator(*list[i], c->getPluginNamespace()) ? 1 : 0;
        }
    }
    gInLoadLibrary = false;
    return registered;
}

extern "C" __attribute__((visibility("default"))) char const* fakeRegistrations()
{
    return gLog.c_str();
}

extern "C" __attribute__((visibility("default"))) int fakeFindCreator(char const* name)
{
    return gRegistry.getCreator(name, "1", "eora") != nullptr ? 1 : 0;
}
