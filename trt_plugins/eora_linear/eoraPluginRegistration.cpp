/*
 * eoraPluginRegistration.cpp: how libeora_plugin.so gets EoraLinear into TensorRT's plugin registry, whatever
 * loads it and in whichever order, without ever linking libnvinfer.
 *
 * REGISTER_TENSORRT_PLUGIN would put a static initializer here that calls getPluginRegistry(), an undefined
 * symbol unless libnvinfer is linked; dlopen (ctypes.CDLL) would then fail on any machine without TensorRT
 * and the kernels' C entry points would be unusable there. Instead (the link uses -z defs, so a stray
 * reference to libnvinfer fails the build):
 *
 *   who loads the library                      what registers the creator
 *   ----------------------------------------   ------------------------------------------------------------
 *   TensorRT: IPluginRegistry::loadLibrary,    TensorRT itself, from getCreators(). A libnvinfer frame is on
 *   trtexec --dynamicPlugins, embedded libs    the stack during the load, so the load-time step stays out.
 *   anything, TensorRT already in the process  the load-time step: getPluginRegistry of the loaded runtime
 *   (Triton's dlopen, LD_PRELOAD, ctypes       (dlsym(RTLD_DEFAULT), then dlopen(soname, RTLD_NOLOAD), which
 *   after `import tensorrt`, --staticPlugins)  also finds a libnvinfer Python loaded with RTLD_LOCAL).
 *   Python, before `import tensorrt`           the load-time step asks the interpreter (Py_AddPendingCall) to
 *   (polygraphy --plugins: ctypes.CDLL while   put a finder on sys.meta_path that registers right after the
 *   resolving the model, import later)         `tensorrt` module has executed, i.e. once libnvinfer is in.
 *   anything else, no TensorRT yet             nothing; eoraRegisterPlugins() registers on demand later.
 *
 * getCreators() returns no creator once this library has registered it itself, so a later loadLibrary of the
 * same file does not fail on a duplicate. EORA_PLUGIN_AUTO_REGISTER=0 turns the load-time step off, =1 forces
 * it even when TensorRT is loading the library.
 */
#include "eoraLinearPlugin.h"

#include <dlfcn.h>
#include <execinfo.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

using namespace nvinfer1;

namespace eora
{
namespace plugin
{
namespace
{

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
bool gRegistered = false;      //!< this library registered the creator itself
bool gHandedToTensorRT = false; //!< getCreators gave TensorRT the creator (loadLibrary registers it)

int32_t registerWithLoadedRuntime()
{
    std::lock_guard<std::mutex> lock(gRegisterMutex);
    if (gRegistered || gHandedToTensorRT)
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

// ----- Python: register right after `import tensorrt` ------------------------------------------------

//! Run by the interpreter with the GIL held (a pending call), so the constructor never waits for the GIL while
//! holding the dynamic loader's lock. %s is this library's path as a Python bytes literal.
constexpr char const* kPythonHook = R"PY(
def _eora_plugin_hook(lib_path):
    import sys

    def register():
        import ctypes
        try:
            ctypes.CDLL(lib_path).eoraRegisterPlugins()
        except OSError:
            pass

    if 'tensorrt' in sys.modules:
        register()
        return
    import importlib.abc
    import importlib.util

    class EoraRegisterAfterTensorRT(importlib.abc.MetaPathFinder):
        """Registers the EoraLinear plugin once `tensorrt` (and so libnvinfer) is loaded, then steps aside."""

        def find_spec(self, name, path=None, target=None):
            if name != 'tensorrt':
                return None
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                register()

            spec.loader.exec_module = exec_then_register
            return spec

    if not any(type(f).__name__ == 'EoraRegisterAfterTensorRT' for f in sys.meta_path):
        sys.meta_path.insert(0, EoraRegisterAfterTensorRT())

_eora_plugin_hook(bytes.fromhex('%s').decode('utf-8', 'surrogateescape'))
del _eora_plugin_hook
)PY";

std::string gPythonHookSource;

int pythonHookCall(void* /*unused*/)
{
    using RunFn = int (*)(char const*);
    auto run = reinterpret_cast<RunFn>(dlsym(RTLD_DEFAULT, "PyRun_SimpleString"));
    if (run != nullptr)
    {
        run(gPythonHookSource.c_str()); // errors are printed by Python and never propagate
    }
    return 0;
}

//! In a running Python interpreter, schedule the import hook; false when this is not a Python process.
bool schedulePythonHook()
{
    using IntFn = int (*)();
    using PendingFn = int (*)(int (*)(void*), void*);
    auto initialized = reinterpret_cast<IntFn>(dlsym(RTLD_DEFAULT, "Py_IsInitialized"));
    auto pending = reinterpret_cast<PendingFn>(dlsym(RTLD_DEFAULT, "Py_AddPendingCall"));
    Dl_info self{};
    if (initialized == nullptr || pending == nullptr || initialized() == 0
        || dladdr(reinterpret_cast<void*>(&schedulePythonHook), &self) == 0 || self.dli_fname == nullptr)
    {
        return false;
    }
    std::string hex;
    for (char const* c = self.dli_fname; *c != '\0'; ++c)
    {
        char b[3];
        std::snprintf(b, sizeof(b), "%02x", static_cast<unsigned char>(*c));
        hex += b;
    }
    char const* marker = std::strstr(kPythonHook, "%s");
    gPythonHookSource = std::string(kPythonHook, marker) + hex + (marker + 2);
    return pending(&pythonHookCall, nullptr) == 0;
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
        if (registerWithLoadedRuntime() == 0)
        {
            schedulePythonHook();
        }
    }
};

LoadTimeRegistrar gLoadTimeRegistrar;

} // namespace
} // namespace plugin
} // namespace eora

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&eora::plugin::creatorInstance()};
    std::lock_guard<std::mutex> lock(eora::plugin::gRegisterMutex);
    // Already in the registry through our own registration: a second copy would make TensorRT's loadLibrary fail.
    nbCreators = eora::plugin::gRegistered ? 0 : 1;
    eora::plugin::gHandedToTensorRT = eora::plugin::gHandedToTensorRT || nbCreators == 1;
    return kCreators;
}

extern "C" int32_t eoraRegisterPlugins(void)
{
    return eora::plugin::registerWithLoadedRuntime();
}
