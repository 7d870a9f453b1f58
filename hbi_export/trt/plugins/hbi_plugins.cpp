// TensorRT IPluginV3 plugins for the hbi custom ops (docs/custom_ops.md): WeightedTokenInteraction and TokenMerge,
// plugin_namespace "hbi", plugin_version "1" -- the names the ONNX nodes carry, so TensorRT's ONNX parser matches
// them. The math is in the CUDA kernels behind hbi_kernels.h; this file only adapts them to TensorRT.
//
// Written against the TensorRT 10.x / 11.x headers (IPluginV3OneCore / Build / Runtime, IPluginCreatorV3One exist
// unchanged since 10.0, so one source serves JetPack 6's TensorRT 10.3 as well; checked against 10.3, 10.16, 11.1).
//
// One source, two libraries (CMakeLists.txt; docs/tensorrt.md, "Plugin libraries per host"), because
// IPluginRegistry::loadLibrary fails when any creator of the library is registered already:
//   libhbi_trt_plugins.so         exports getCreators / setLoggerFinder and registers nothing by itself: for
//                                 loadLibrary (hbi-export, hbi-run, trtexec --dynamicPlugins, engines that carry
//                                 their plugin library). Needs no libnvinfer at link time.
//   libhbi_trt_plugins_dlopen.so  HBI_REGISTER_ON_LOAD: a plain dlopen registers both creators under namespace
//                                 "hbi" (getPluginRegistry()->registerCreator) and dlclose deregisters them: for
//                                 LD_PRELOAD, Triton's plugins= backend option, DeepStream's custom-lib-path,
//                                 trtexec --staticPlugins, ctypes.CDLL. Linked against libnvinfer, so that it finds
//                                 the host's registry even when the host loaded TensorRT with RTLD_LOCAL.
#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "hbi_kernels.h"

#define HBI_EXPORT __attribute__((visibility("default")))

using namespace nvinfer1;

namespace hbi
{
namespace
{

char const* const kNamespace = "hbi";
char const* const kVersion = "1";

ILoggerFinder* gLoggerFinder = nullptr;  // set by loadLibrary through setLoggerFinder

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
#ifdef HBI_REGISTER_ON_LOAD
    if (logger == nullptr)
        logger = getLogger();  // libnvinfer's global logger: nobody hands a finder to a plain dlopen
#endif
    if (logger != nullptr)
        logger->log(severity, message.c_str());
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

bool readInt(PluginField const& field, int32_t& out) noexcept
{
    // The ONNX parser passes integer attributes as kINT32 (older) or kINT64; accept both.
    if (field.data == nullptr || field.length != 1)
        return false;
    if (field.type == PluginFieldType::kINT32)
        out = *static_cast<int32_t const*>(field.data);
    else if (field.type == PluginFieldType::kINT64)
        out = static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
    else
        return false;
    return true;
}

int kernelType(DataType type) noexcept
{
    return type == DataType::kHALF ? HBI_FLOAT16 : HBI_FLOAT32;
}

// What both plugins share: naming, capabilities, float/half linear I/O of one type, output type = input type.
class HbiPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs < 1)
            return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (pos < 0 || pos >= nbInputs + nbOutputs)
            return false;
        PluginTensorDesc const& desc = inOut[pos].desc;
        bool const floating = desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
        return desc.format == TensorFormat::kLINEAR && floating && desc.type == inOut[0].desc.type;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0;
    }

    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

protected:
    int32_t report(int status, char const* what) const noexcept
    {
        if (status == 0)
            return 0;
        logError(std::string("hbi::") + what + " kernel failed with CUDA error " + std::to_string(status));
        return -1;
    }
};

class WeightedTokenInteractionPlugin final : public HbiPlugin
{
public:
    static char const* name() noexcept { return "WeightedTokenInteraction"; }
    static std::vector<PluginField> fieldNames() { return {}; }
    static IPluginV3* create(PluginFieldCollection const*) noexcept
    {
        return new (std::nothrow) WeightedTokenInteractionPlugin();
    }

    char const* getPluginName() const noexcept override { return name(); }
    IPluginV3* clone() noexcept override { return new (std::nothrow) WeightedTokenInteractionPlugin(); }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != 6 || nbOutputs != 1 || inputs[0].nbDims != 3 || inputs[3].nbDims != 3)
            return -1;
        outputs[0].nbDims = 2;
        outputs[0].d[0] = inputs[0].d[0];  // Bt
        outputs[0].d[1] = inputs[3].d[0];  // Bv
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        auto const bt = static_cast<int>(in[0].dims.d[0]);
        auto const lt = static_cast<int>(in[0].dims.d[1]);
        auto const d = static_cast<int>(in[0].dims.d[2]);
        auto const bv = static_cast<int>(in[3].dims.d[0]);
        auto const lv = static_cast<int>(in[3].dims.d[1]);
        if (in[3].dims.d[2] != d)
            return report(static_cast<int>(cudaErrorInvalidValue), name());
        return report(hbi_wti_forward(kernelType(in[0].type), inputs[0], inputs[1], inputs[2], inputs[3], inputs[4],
                          inputs[5], outputs[0], bt, bv, lt, lv, d, stream),
            name());
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mFields.nbFields = 0;
        mFields.fields = nullptr;
        return &mFields;
    }

private:
    PluginFieldCollection mFields{};
};

class TokenMergePlugin final : public HbiPlugin
{
public:
    TokenMergePlugin(int32_t clusters, int32_t k)
        : mClusters(clusters)
        , mK(k)
    {
    }

    static char const* name() noexcept { return "TokenMerge"; }
    static std::vector<PluginField> fieldNames()
    {
        return {PluginField("clusters", nullptr, PluginFieldType::kINT32, 1),
            PluginField("k", nullptr, PluginFieldType::kINT32, 1)};
    }
    static IPluginV3* create(PluginFieldCollection const* fc) noexcept
    {
        int32_t clusters = -1;
        int32_t k = 3;  // the contract's default
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
                continue;
            if (std::strcmp(f.name, "clusters") == 0 && !readInt(f, clusters))
                return nullptr;
            if (std::strcmp(f.name, "k") == 0 && !readInt(f, k))
                return nullptr;
        }
        if (clusters < 1 || k < 1 || k > HBI_TOKEN_MERGE_MAX_K)
        {
            logError("hbi::TokenMerge needs clusters >= 1 and 1 <= k <= " + std::to_string(HBI_TOKEN_MERGE_MAX_K));
            return nullptr;
        }
        return new (std::nothrow) TokenMergePlugin(clusters, k);
    }

    char const* getPluginName() const noexcept override { return name(); }
    IPluginV3* clone() noexcept override { return new (std::nothrow) TokenMergePlugin(mClusters, mK); }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 3)
            return -1;
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];  // B
        outputs[0].d[1] = exprBuilder.constant(mClusters);
        outputs[0].d[2] = inputs[0].d[2];  // C
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return hbi_token_merge_workspace_size(static_cast<int>(inputs[0].max.d[0]), static_cast<int>(inputs[0].max.d[1]));
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        auto const b = static_cast<int>(in[0].dims.d[0]);
        auto const n = static_cast<int>(in[0].dims.d[1]);
        auto const c = static_cast<int>(in[0].dims.d[2]);
        return report(hbi_token_merge_forward(kernelType(in[0].type), inputs[0], inputs[1], inputs[2], outputs[0],
                          workspace, b, n, c, mClusters, mK, stream),
            name());
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialized = {PluginField("clusters", &mClusters, PluginFieldType::kINT32, 1),
            PluginField("k", &mK, PluginFieldType::kINT32, 1)};
        mFields.nbFields = static_cast<int32_t>(mSerialized.size());
        mFields.fields = mSerialized.data();
        return &mFields;
    }

private:
    int32_t mClusters;
    int32_t mK;
    std::vector<PluginField> mSerialized;
    PluginFieldCollection mFields{};
};

// One creator per plugin: the same fields at build time (from the ONNX attributes) and at runtime (from
// getFieldsToSerialize), so createPlugin does not depend on the phase.
template <class Plugin>
class HbiCreator final : public IPluginCreatorV3One
{
public:
    HbiCreator()
        : mNames(Plugin::fieldNames())
    {
        mCollection.nbFields = static_cast<int32_t>(mNames.size());
        mCollection.fields = mNames.empty() ? nullptr : mNames.data();
    }

    char const* getPluginName() const noexcept override { return Plugin::name(); }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        return Plugin::create(fc);
    }

private:
    std::vector<PluginField> mNames;
    PluginFieldCollection mCollection{};
};

using WeightedTokenInteractionCreator = HbiCreator<WeightedTokenInteractionPlugin>;
using TokenMergeCreator = HbiCreator<TokenMergePlugin>;

constexpr int32_t kNbCreators = 2;

// The library's creators, made on first use (so a registration from a static constructor finds them made).
IPluginCreatorInterface* const* creators() noexcept
{
    static WeightedTokenInteractionCreator wti;
    static TokenMergeCreator merge;
    static IPluginCreatorInterface* const all[kNbCreators] = {&wti, &merge};
    return all;
}

#ifdef HBI_REGISTER_ON_LOAD
// Registers the creators when the library is loaded and deregisters them when it is unloaded, so that a registry
// never keeps a creator whose code is gone. REGISTER_TENSORRT_PLUGIN is not used: it registers under namespace ""
// and never deregisters. The library links libnvinfer, so its destructor runs before libnvinfer's.
class RegisterOnLoad
{
public:
    RegisterOnLoad() noexcept
        : mRegistry(getPluginRegistry())
    {
        if (mRegistry == nullptr)
            return;
        for (int32_t i = 0; i < kNbCreators; ++i)
        {
            IPluginCreatorInterface* creator = creators()[i];
            mRegistered[i] = mRegistry->registerCreator(*creator, kNamespace);
            if (!mRegistered[i])
                logMessage(ILogger::Severity::kWARNING,
                    std::string("hbi: a creator ") + kNamespace + "::"
                        + static_cast<IPluginCreatorV3One*>(creator)->getPluginName()
                        + " is registered already (was libhbi_trt_plugins.so loaded too?); keeping that one");
        }
    }

    ~RegisterOnLoad()
    {
        for (int32_t i = 0; mRegistry != nullptr && i < kNbCreators; ++i)
            if (mRegistered[i])
                mRegistry->deregisterCreator(*creators()[i]);
    }

    RegisterOnLoad(RegisterOnLoad const&) = delete;
    RegisterOnLoad& operator=(RegisterOnLoad const&) = delete;

private:
    IPluginRegistry* mRegistry;
    bool mRegistered[kNbCreators] = {};
};

RegisterOnLoad const gRegisterOnLoad;
#endif

}  // namespace
}  // namespace hbi

#ifndef HBI_REGISTER_ON_LOAD
// The IPluginRegistry::loadLibrary entry points (with the kernels' C functions, all that this library exports).
extern "C" HBI_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    hbi::gLoggerFinder = finder;
}

extern "C" HBI_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = hbi::kNbCreators;
    return hbi::creators();
}
#endif
