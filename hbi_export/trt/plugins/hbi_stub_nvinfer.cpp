// A stand-in for libnvinfer, for the CPU plugin harness only (never installed, never a TensorRT): it exports
// getPluginRegistry() with a registry that records every registration, and getLogger() with a logger that records
// every message. Built with the soname of the real library (libnvinfer.so.<major>), so that a library linked
// against TensorRT (libhbi_trt_plugins_dlopen.so) binds to it when it is loaded first: the harness links it, and a
// Python test loads it with ctypes before the plugin library.
//
// What it does not show: how the real registry keys, logs or refuses. Its loadLibrary follows the documented
// contract of IPluginRegistry::loadLibrary (dlopen, getCreators, setLoggerFinder; nullptr when a creator is
// registered already) so that the harness can drive both routes; TensorRT's own implementation is not run here.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>


namespace
{
using namespace nvinfer1;

char const* const kCreatorV3 = "PLUGIN CREATOR_V3ONE";

struct Registration
{
    IPluginCreatorInterface* creator;
    std::string name;
    std::string version;
    std::string space;  // the namespace the creator was registered under
    void* library;      // the loadLibrary handle, or nullptr for a direct registerCreator
};

class RecordingLogger final : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mLines.push_back(std::to_string(static_cast<int>(severity)) + "|" + (msg != nullptr ? msg : ""));
    }

    std::vector<std::string> lines()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mLines;
    }

    void clear()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mLines.clear();
    }

private:
    std::mutex mMutex;
    std::vector<std::string> mLines;
};

RecordingLogger& recordingLogger()
{
    static RecordingLogger logger;
    return logger;
}

class StubLoggerFinder final : public ILoggerFinder
{
public:
    ILogger* findLogger() override { return &recordingLogger(); }
};

class RecordingRegistry final : public IPluginRegistry
{
public:
    ~RecordingRegistry() noexcept override = default;

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        return add(creator, pluginNamespace != nullptr ? pluginNamespace : "", nullptr);
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mAll.clear();
        for (Registration const& r : mRegistered)
            mAll.push_back(r.creator);
        *numCreators = static_cast<int32_t>(mAll.size());
        return mAll.empty() ? nullptr : mAll.data();
    }

    IPluginCreatorInterface* getCreator(AsciiChar const* const pluginName, AsciiChar const* const pluginVersion,
        AsciiChar const* const pluginNamespace) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        for (Registration const& r : mRegistered)
            if (r.name == pluginName && r.version == pluginVersion && r.space == (pluginNamespace ? pluginNamespace : ""))
                return r.creator;
        return nullptr;
    }

    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        for (auto it = mRegistered.begin(); it != mRegistered.end(); ++it)
            if (it->creator == &creator)
            {
                mEvents.push_back("deregister|" + it->name + "|" + it->version + "|" + it->space);
                mRegistered.erase(it);
                return true;
            }
        return false;
    }

    // IPluginRegistry::loadLibrary as documented: dlopen, hand over a logger finder, register every creator from
    // getCreators under its own namespace; nullptr (and nothing kept) when one of them is registered already.
    PluginLibraryHandle loadLibrary(AsciiChar const* pluginPath) noexcept override
    {
        void* handle = dlopen(pluginPath, RTLD_NOW | RTLD_LOCAL);
        if (handle == nullptr)
            return nullptr;
        using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
        using SetLoggerFinder = void (*)(ILoggerFinder*);
        auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
        auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
        if (getCreators == nullptr)
        {
            dlclose(handle);
            return nullptr;
        }
        static StubLoggerFinder finder;
        if (setLoggerFinder != nullptr)
            setLoggerFinder(&finder);
        int32_t count = 0;
        IPluginCreatorInterface* const* creators = getCreators(count);
        for (int32_t i = 0; i < count; ++i)
        {
            if (!add(*creators[i], creatorNamespace(*creators[i]), handle))
            {
                deregisterLibrary(handle);
                return nullptr;
            }
        }
        return handle;
    }

    void deregisterLibrary(PluginLibraryHandle handle) noexcept override
    {
        {
            std::lock_guard<std::mutex> lock(mMutex);
            for (auto it = mRegistered.begin(); it != mRegistered.end();)
            {
                if (it->library == handle)
                {
                    mEvents.push_back("deregister|" + it->name + "|" + it->version + "|" + it->space);
                    it = mRegistered.erase(it);
                }
                else
                    ++it;
            }
        }
        dlclose(handle);
    }

    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return -1; }

    // Since TensorRT 10.x (not in 10.3): declared without `override` so that one source compiles against both.
    virtual IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept
    {
        return getAllCreators(numCreators);
    }

#if NV_TENSORRT_MAJOR < 11
    // The IPluginV2 creator API (deprecated in 10, removed in 11): the hbi plugins never use it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        mEvents.push_back("register-v2-refused");
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
#pragma GCC diagnostic pop
#endif

    std::vector<std::string> registered()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        std::vector<std::string> out;
        for (Registration const& r : mRegistered)
            out.push_back(r.name + "|" + r.version + "|" + r.space + "|" + creatorNamespace(*r.creator) + "|"
                + (r.library != nullptr ? "loadLibrary" : "registerCreator"));
        return out;
    }

    std::vector<std::string> events()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mEvents;
    }

    void clearEvents()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mEvents.clear();
    }

private:
    static IPluginCreatorV3One* asV3(IPluginCreatorInterface& creator)
    {
        InterfaceInfo const info = creator.getInterfaceInfo();
        return info.kind != nullptr && std::strcmp(info.kind, kCreatorV3) == 0 && info.major == 1
            ? static_cast<IPluginCreatorV3One*>(&creator)
            : nullptr;
    }

    static char const* creatorNamespace(IPluginCreatorInterface& creator)
    {
        IPluginCreatorV3One* v3 = asV3(creator);
        return v3 != nullptr && v3->getPluginNamespace() != nullptr ? v3->getPluginNamespace() : "";
    }

    bool add(IPluginCreatorInterface& creator, std::string const& space, void* library)
    {
        IPluginCreatorV3One* v3 = asV3(creator);
        std::lock_guard<std::mutex> lock(mMutex);
        if (v3 == nullptr)
        {
            mEvents.push_back("register-refused|not a V3One creator");
            return false;
        }
        std::string const name = v3->getPluginName();
        std::string const version = v3->getPluginVersion();
        for (Registration const& r : mRegistered)
            if (r.name == name && r.version == version && r.space == space)
            {
                mEvents.push_back("register-duplicate|" + name + "|" + version + "|" + space);
                return false;
            }
        mRegistered.push_back({&creator, name, version, space, library});
        mEvents.push_back("register|" + name + "|" + version + "|" + space);
        return true;
    }

    mutable std::mutex mMutex;
    std::vector<Registration> mRegistered;
    std::vector<std::string> mEvents;
    mutable std::vector<IPluginCreatorInterface*> mAll;
};

RecordingRegistry& recordingRegistry()
{
    static RecordingRegistry registry;
    return registry;
}

int32_t copyLines(std::vector<std::string> const& lines, char* buffer, int32_t size)
{
    std::string joined;
    for (std::string const& line : lines)
        joined += line + "\n";
    if (buffer != nullptr && size > 0)
    {
        std::strncpy(buffer, joined.c_str(), static_cast<size_t>(size) - 1);
        buffer[size - 1] = '\0';
    }
    return static_cast<int32_t>(lines.size());
}

}  // namespace

// What the real libnvinfer exports and the plugin library calls (built with default visibility: every symbol of
// the stub is exported).
extern "C" nvinfer1::IPluginRegistry* getPluginRegistry() noexcept
{
    return &recordingRegistry();
}

extern "C" nvinfer1::ILogger* getLogger() noexcept
{
    return &recordingLogger();
}

// The stub's own queries, one line per item ("name|version|namespace|creator namespace|route", "event|...",
// "severity|message"); each returns the number of lines and copies them, newline-terminated, into buffer.
extern "C" int32_t hbi_stub_registered(char* buffer, int32_t size)
{
    return copyLines(recordingRegistry().registered(), buffer, size);
}

extern "C" int32_t hbi_stub_events(char* buffer, int32_t size)
{
    return copyLines(recordingRegistry().events(), buffer, size);
}

extern "C" int32_t hbi_stub_logged(char* buffer, int32_t size)
{
    return copyLines(recordingLogger().lines(), buffer, size);
}

extern "C" void hbi_stub_clear()
{
    recordingRegistry().clearEvents();
    recordingLogger().clear();
}
