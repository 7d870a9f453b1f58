// The hbi plugin libraries driven through the methods TensorRT calls, without TensorRT (docs/tensorrt.md,
// "Checking the plugins without TensorRT, and on a GPU"). Built by the CMake tree with -DHBI_BUILD_HARNESS=ON, linked
// against the stub libnvinfer (hbi_stub_nvinfer.cpp), so that getPluginRegistry() records what registers.
//
//   hbi_plugin_harness LOADLIB_SO [DLOPEN_SO] [--gpu DUMP_DIR]
//
// CPU part (no GPU, no CUDA call):
//   * routes: a plain dlopen of LOADLIB_SO registers nothing; the stub's loadLibrary (dlopen, getCreators,
//     setLoggerFinder) registers both creators under "hbi"; deregisterLibrary removes them. A plain dlopen of
//     DLOPEN_SO registers both under "hbi" by itself, the library has no getCreators, loadLibrary of the other
//     library is then refused (already registered), and dlclose deregisters them.
//   * per creator (both libraries): interface kind and version, name / version / namespace, field names; plugins
//     from the fields the ONNX parser passes (kINT32 or kINT64, extra attributes) and refusals of bad ones;
//     capabilities, clone, output count and types, format combinations, output shapes through a stand-in
//     IExprBuilder, workspace size, getFieldsToSerialize -> bytes -> createPlugin(kRUNTIME) round trip,
//     attachToContext, configurePlugin / onShapeChange.
// GPU part (--gpu DIR): enqueue of both plugins in fp32 and fp16 on a stream, including adversarial TokenMerge
// inputs (NaN, inf, overflowing tokens, every token masked), and an enqueue that must fail; inputs and outputs are
// written to DIR (cases.json + raw little-endian .bin files) for benchmarks/gpu_check.py to compare with numpy.
//
// Output: one line per check, "PASS name", "FAIL name: why"; the last line counts them. Exit 0 when none failed.
#include <NvInferRuntime.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" int32_t hbi_stub_registered(char* buffer, int32_t size);
extern "C" int32_t hbi_stub_events(char* buffer, int32_t size);
extern "C" int32_t hbi_stub_logged(char* buffer, int32_t size);
extern "C" void hbi_stub_clear();

namespace
{

int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& name, std::string const& why = "")
{
    if (ok)
        ++gPassed;
    else
        ++gFailed;
    std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), ok || why.empty() ? "" : ": ", ok ? "" : why.c_str());
    std::fflush(stdout);
}

std::vector<std::string> stubLines(int32_t (*query)(char*, int32_t))
{
    std::vector<char> buffer(1 << 16);
    query(buffer.data(), static_cast<int32_t>(buffer.size()));
    std::vector<std::string> lines;
    std::string current;
    for (char const* p = buffer.data(); *p != '\0'; ++p)
    {
        if (*p == '\n')
        {
            lines.push_back(current);
            current.clear();
        }
        else
            current += *p;
    }
    return lines;
}

std::string join(std::vector<std::string> const& lines)
{
    std::string out;
    for (std::string const& line : lines)
        out += (out.empty() ? "" : "; ") + line;
    return out.empty() ? "(none)" : out;
}

// ---------------------------------------------------------------------------------------------------------------
// A stand-in IExprBuilder: constants fold, anything else is an opaque (symbolic) expression.

class ExprImpl final : public apiv::VDimensionExpr
{
public:
    ExprImpl(bool constant, int64_t value)
        : mConstant(constant)
        , mValue(value)
    {
    }
    bool isConstant() const override { return mConstant; }
    int64_t getConstantValue() const override { return mConstant ? mValue : -1; }
    bool isSizeTensor() const override { return false; }

private:
    bool mConstant;
    int64_t mValue;
};

class Expr final : public IDimensionExpr
{
public:
    Expr(bool constant, int64_t value)
        : mImplObject(constant, value)
    {
        mImpl = &mImplObject;
    }
    ~Expr() noexcept override = default;

private:
    ExprImpl mImplObject;
};

class ExprBuilderImpl final : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override { return make(true, value); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        if (!a.isConstant() || !b.isConstant())
            return make(false, 0);
        int64_t const x = a.getConstantValue();
        int64_t const y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return make(true, x + y);
        case DimensionOperation::kPROD: return make(true, x * y);
        case DimensionOperation::kMAX: return make(true, x > y ? x : y);
        case DimensionOperation::kMIN: return make(true, x < y ? x : y);
        case DimensionOperation::kSUB: return make(true, x - y);
        default: return make(false, 0);
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return make(false, 0);
    }
    IDimensionExpr const* make(bool constant, int64_t value)
    {
        mExprs.emplace_back(new Expr(constant, value));
        return mExprs.back().get();
    }

private:
    std::deque<std::unique_ptr<Expr>> mExprs;
};

class ExprBuilder final : public IExprBuilder
{
public:
    ExprBuilder() { mImpl = &mImplObject; }
    ~ExprBuilder() noexcept override = default;
    IDimensionExpr const* symbol() { return mImplObject.make(false, 0); }

private:
    ExprBuilderImpl mImplObject;
};

// ---------------------------------------------------------------------------------------------------------------
// Plugin fields as TensorRT passes them, and the serialization round trip.

struct OwnedFields
{
    std::vector<std::string> names;
    std::vector<std::vector<uint8_t>> data;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    void add(char const* name, void const* bytes, size_t size, PluginFieldType type, int32_t length)
    {
        names.emplace_back(name);
        data.emplace_back(static_cast<uint8_t const*>(bytes), static_cast<uint8_t const*>(bytes) + size);
        types.push_back(type);
        lengths.push_back(length);
    }

    PluginFieldCollection const* finish()
    {
        fields.clear();
        for (size_t i = 0; i < names.size(); ++i)
            fields.emplace_back(names[i].c_str(), data[i].empty() ? nullptr : data[i].data(), types[i], lengths[i]);
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.empty() ? nullptr : fields.data();
        return &collection;
    }

    std::vector<PluginFieldType> types;
    std::vector<int32_t> lengths;
};

size_t fieldBytes(PluginFieldType type)
{
    switch (type)
    {
    case PluginFieldType::kINT64:
    case PluginFieldType::kFLOAT64: return 8;
    case PluginFieldType::kINT32:
    case PluginFieldType::kFLOAT32: return 4;
    case PluginFieldType::kINT16:
    case PluginFieldType::kFLOAT16: return 2;
    case PluginFieldType::kINT8:
    case PluginFieldType::kCHAR: return 1;
    default: return 0;  // a type the hbi plugins never serialize
    }
}

// getFieldsToSerialize -> one byte string (what an engine stores) -> fields again (what deserialization passes).
bool serialize(PluginFieldCollection const* fc, std::vector<uint8_t>& out, std::string& why)
{
    out.clear();
    if (fc == nullptr || fc->nbFields < 0 || (fc->nbFields > 0 && fc->fields == nullptr))
    {
        why = "getFieldsToSerialize returned no collection";
        return false;
    }
    auto put = [&out](void const* p, size_t n) {
        out.insert(out.end(), static_cast<uint8_t const*>(p), static_cast<uint8_t const*>(p) + n);
    };
    put(&fc->nbFields, sizeof(int32_t));
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        size_t const size = fieldBytes(f.type) * static_cast<size_t>(f.length);
        if (f.name == nullptr || (size > 0 && f.data == nullptr) || (size == 0 && f.length > 0))
        {
            why = "field " + std::to_string(i) + " has no name, no data or an unknown type";
            return false;
        }
        uint32_t const nameSize = static_cast<uint32_t>(std::strlen(f.name));
        int32_t const type = static_cast<int32_t>(f.type);
        put(&nameSize, sizeof nameSize);
        put(f.name, nameSize);
        put(&type, sizeof type);
        put(&f.length, sizeof f.length);
        put(f.data, size);
    }
    return true;
}

void deserialize(std::vector<uint8_t> const& bytes, OwnedFields& out)
{
    size_t at = 0;
    auto get = [&](void* p, size_t n) {
        std::memcpy(p, bytes.data() + at, n);
        at += n;
    };
    int32_t count = 0;
    get(&count, sizeof count);
    for (int32_t i = 0; i < count; ++i)
    {
        uint32_t nameSize = 0;
        get(&nameSize, sizeof nameSize);
        std::string name(reinterpret_cast<char const*>(bytes.data() + at), nameSize);
        at += nameSize;
        int32_t type = 0;
        int32_t length = 0;
        get(&type, sizeof type);
        get(&length, sizeof length);
        size_t const size = fieldBytes(static_cast<PluginFieldType>(type)) * static_cast<size_t>(length);
        out.add(name.c_str(), bytes.data() + at, size, static_cast<PluginFieldType>(type), length);
        at += size;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One creator and its plugins through the TensorRT-facing methods.

struct PluginDeleter
{
    void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

IPluginCreatorV3One* asCreatorV3(IPluginCreatorInterface* creator)
{
    if (creator == nullptr)
        return nullptr;
    InterfaceInfo const info = creator->getInterfaceInfo();
    bool const v3 = info.kind != nullptr && std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1;
    return v3 ? static_cast<IPluginCreatorV3One*>(creator) : nullptr;
}

template <class Capability>
Capability* capability(IPluginV3* plugin, PluginCapabilityType type, char const* kind)
{
    IPluginCapability* cap = plugin->getCapabilityInterface(type);
    if (cap == nullptr)
        return nullptr;
    InterfaceInfo const info = cap->getInterfaceInfo();
    return info.kind != nullptr && std::strcmp(info.kind, kind) == 0 ? static_cast<Capability*>(cap) : nullptr;
}

IPluginV3OneCore* core(IPluginV3* p)
{
    return capability<IPluginV3OneCore>(p, PluginCapabilityType::kCORE, "PLUGIN_V3ONE_CORE");
}
IPluginV3OneBuild* build(IPluginV3* p)
{
    return capability<IPluginV3OneBuild>(p, PluginCapabilityType::kBUILD, "PLUGIN_V3ONE_BUILD");
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return capability<IPluginV3OneRuntime>(p, PluginCapabilityType::kRUNTIME, "PLUGIN_V3ONE_RUNTIME");
}

DynamicPluginTensorDesc tensorDesc(DataType type, std::vector<int64_t> const& dims, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
        d.desc.dims.d[i] = d.min.d[i] = d.opt.d[i] = d.max.d[i] = dims[i];
    d.min.nbDims = d.opt.nbDims = d.max.nbDims = d.desc.dims.nbDims;
    return d;
}

std::vector<uint8_t> serialized(IPluginV3* plugin, std::string& why)
{
    std::vector<uint8_t> bytes;
    IPluginV3OneRuntime* rt = runtime(plugin);
    if (rt == nullptr || !serialize(rt->getFieldsToSerialize(), bytes, why))
        bytes.clear();
    return bytes;
}

struct OpSpec
{
    char const* name;
    int32_t nbInputs;
    std::vector<std::string> fieldNames;
};

// The fields the ONNX parser passes for a node (its attributes), here for TokenMerge(clusters=3, k=2).
OwnedFields onnxFields(OpSpec const& op, PluginFieldType intType)
{
    OwnedFields f;
    if (op.fieldNames.empty())
        return f;
    int64_t const clusters64 = 3, k64 = 2;
    int32_t const clusters32 = 3, k32 = 2;
    bool const wide = intType == PluginFieldType::kINT64;
    f.add("clusters", wide ? static_cast<void const*>(&clusters64) : &clusters32, wide ? 8 : 4, intType, 1);
    f.add("k", wide ? static_cast<void const*>(&k64) : &k32, wide ? 8 : 4, intType, 1);
    char const ns[] = "hbi";
    f.add("plugin_namespace", ns, 3, PluginFieldType::kCHAR, 3);  // attributes the plugin does not use
    return f;
}

void checkCreator(IPluginCreatorInterface* iface, OpSpec const& op, std::string const& where)
{
    std::string const at = where + " " + op.name;
    IPluginCreatorV3One* creator = asCreatorV3(iface);
    check(creator != nullptr, at + " creator is an IPluginCreatorV3One (interface 'PLUGIN CREATOR_V3ONE' 1.x)");
    if (creator == nullptr)
        return;
    check(std::strcmp(creator->getPluginName(), op.name) == 0 && std::strcmp(creator->getPluginVersion(), "1") == 0
            && std::strcmp(creator->getPluginNamespace(), "hbi") == 0,
        at + " creator name / version / namespace", std::string(creator->getPluginName()) + " / "
            + creator->getPluginVersion() + " / " + creator->getPluginNamespace());
    PluginFieldCollection const* names = creator->getFieldNames();
    bool namesOk = names != nullptr && names->nbFields == static_cast<int32_t>(op.fieldNames.size());
    for (int32_t i = 0; namesOk && i < names->nbFields; ++i)
        namesOk = names->fields[i].name != nullptr && op.fieldNames[i] == names->fields[i].name;
    check(namesOk, at + " getFieldNames lists the ONNX attributes");

    for (PluginFieldType intType : {PluginFieldType::kINT32, PluginFieldType::kINT64})
    {
        OwnedFields fields = onnxFields(op, intType);
        PluginPtr plugin(creator->createPlugin(op.name, fields.finish(), TensorRTPhase::kBUILD));
        check(plugin != nullptr, at + " createPlugin(kBUILD) from the parser's fields ("
                + (intType == PluginFieldType::kINT32 ? "kINT32" : "kINT64") + ")");
    }
    if (!op.fieldNames.empty())
    {
        hbi_stub_clear();
        int32_t const bad[][2] = {{0, 3}, {3, 0}, {3, 17}};
        bool refused = true;
        for (auto const& values : bad)
        {
            OwnedFields f;
            f.add("clusters", &values[0], 4, PluginFieldType::kINT32, 1);
            f.add("k", &values[1], 4, PluginFieldType::kINT32, 1);
            IPluginV3* p = creator->createPlugin(op.name, f.finish(), TensorRTPhase::kBUILD);
            refused = refused && p == nullptr;
            delete p;
        }
        OwnedFields missing;
        IPluginV3* p = creator->createPlugin(op.name, missing.finish(), TensorRTPhase::kBUILD);
        refused = refused && p == nullptr;
        delete p;
        float const notAnInt = 3.0f;
        OwnedFields wrongType;
        wrongType.add("clusters", &notAnInt, 4, PluginFieldType::kFLOAT32, 1);
        p = creator->createPlugin(op.name, wrongType.finish(), TensorRTPhase::kBUILD);
        refused = refused && p == nullptr;
        delete p;
        check(refused, at + " createPlugin refuses clusters < 1, k outside 1..16, a missing or non-integer clusters");
        check(!stubLines(hbi_stub_logged).empty(), at + " a refused attribute is logged as an error",
            "nothing reached the logger");
    }

    OwnedFields fields = onnxFields(op, PluginFieldType::kINT64);
    PluginPtr plugin(creator->createPlugin(op.name, fields.finish(), TensorRTPhase::kBUILD));
    if (plugin == nullptr)
        return;
    IPluginV3OneCore* c = core(plugin.get());
    IPluginV3OneBuild* b = build(plugin.get());
    IPluginV3OneRuntime* r = runtime(plugin.get());
    check(c != nullptr && b != nullptr && r != nullptr, at + " capability interfaces core / build / runtime");
    if (c == nullptr || b == nullptr || r == nullptr)
        return;
    check(std::strcmp(c->getPluginName(), op.name) == 0 && std::strcmp(c->getPluginVersion(), "1") == 0
            && std::strcmp(c->getPluginNamespace(), "hbi") == 0,
        at + " plugin name / version / namespace");
    check(b->getNbOutputs() == 1, at + " one output");

    DataType out = DataType::kINT8;
    DataType const inFloat[6] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT,
        DataType::kFLOAT, DataType::kFLOAT};
    DataType const inHalf[6] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF,
        DataType::kHALF};
    bool typesOk = b->getOutputDataTypes(&out, 1, inFloat, op.nbInputs) == 0 && out == DataType::kFLOAT;
    typesOk = typesOk && b->getOutputDataTypes(&out, 1, inHalf, op.nbInputs) == 0 && out == DataType::kHALF;
    check(typesOk, at + " getOutputDataTypes: the output takes the input type");

    int32_t const n = op.nbInputs + 1;
    auto combination = [&](DataType type, TensorFormat format, int32_t odd, DataType oddType) {
        std::vector<DynamicPluginTensorDesc> io;
        for (int32_t i = 0; i < n; ++i)
            io.push_back(tensorDesc(i == odd ? oddType : type, {2, 3, 4}, format));
        bool all = true;
        for (int32_t pos = 0; pos < n; ++pos)
            all = all && b->supportsFormatCombination(pos, io.data(), op.nbInputs, 1);
        return all;
    };
    check(combination(DataType::kFLOAT, TensorFormat::kLINEAR, -1, DataType::kFLOAT)
            && combination(DataType::kHALF, TensorFormat::kLINEAR, -1, DataType::kHALF)
            && !combination(DataType::kFLOAT, TensorFormat::kLINEAR, 1, DataType::kHALF)
            && !combination(DataType::kINT8, TensorFormat::kLINEAR, -1, DataType::kINT8)
            && !combination(DataType::kFLOAT, TensorFormat::kCHW32, -1, DataType::kFLOAT),
        at + " supportsFormatCombination: linear fp32 or fp16, one type for all; not int8, mixed or CHW32");
    {
        std::vector<DynamicPluginTensorDesc> io(n, tensorDesc(DataType::kFLOAT, {2, 3, 4}));
        check(!b->supportsFormatCombination(n, io.data(), op.nbInputs, 1)
                && !b->supportsFormatCombination(-1, io.data(), op.nbInputs, 1),
            at + " supportsFormatCombination: a position outside the inputs and outputs is refused");
    }

    ExprBuilder exprs;
    IDimensionExpr const* batchA = exprs.symbol();
    IDimensionExpr const* batchB = exprs.symbol();
    std::vector<DimsExprs> inputs(op.nbInputs);
    if (op.nbInputs == 6)  // WTI: text (Bt, Lt, D), weights / mask (Bt, Lt), video (Bv, Lv, D), (Bv, Lv)
    {
        IDimensionExpr const* lt = exprs.constant(32);
        IDimensionExpr const* lv = exprs.constant(12);
        IDimensionExpr const* d = exprs.constant(512);
        inputs[0] = {3, {batchA, lt, d}};
        inputs[1] = inputs[2] = {2, {batchA, lt}};
        inputs[3] = {3, {batchB, lv, d}};
        inputs[4] = inputs[5] = {2, {batchB, lv}};
    }
    else  // TokenMerge: x (B, N, C), score / mask (B, N)
    {
        IDimensionExpr const* tokens = exprs.constant(12);
        IDimensionExpr const* channels = exprs.constant(512);
        inputs[0] = {3, {batchA, tokens, channels}};
        inputs[1] = inputs[2] = {2, {batchA, tokens}};
    }
    DimsExprs shape{};
    bool shapeOk = b->getOutputShapes(inputs.data(), op.nbInputs, nullptr, 0, &shape, 1, exprs) == 0;
    if (op.nbInputs == 6)
        shapeOk = shapeOk && shape.nbDims == 2 && shape.d[0] == batchA && shape.d[1] == batchB;
    else
        shapeOk = shapeOk && shape.nbDims == 3 && shape.d[0] == batchA && shape.d[1]->isConstant()
            && shape.d[1]->getConstantValue() == 3 && shape.d[2] == inputs[0].d[2];
    check(shapeOk, at + " getOutputShapes: " + (op.nbInputs == 6 ? "(Bt, Bv)" : "(B, clusters, C)"));
    check(b->getOutputShapes(inputs.data(), op.nbInputs - 1, nullptr, 0, &shape, 1, exprs) != 0,
        at + " getOutputShapes refuses a wrong input count");

    std::vector<DynamicPluginTensorDesc> io;
    if (op.nbInputs == 6)
        io = {tensorDesc(DataType::kFLOAT, {4, 32, 512}), tensorDesc(DataType::kFLOAT, {4, 32}),
            tensorDesc(DataType::kFLOAT, {4, 32}), tensorDesc(DataType::kFLOAT, {8, 12, 512}),
            tensorDesc(DataType::kFLOAT, {8, 12}), tensorDesc(DataType::kFLOAT, {8, 12}),
            tensorDesc(DataType::kFLOAT, {4, 8})};
    else
        io = {tensorDesc(DataType::kFLOAT, {64, 12, 512}), tensorDesc(DataType::kFLOAT, {64, 12}),
            tensorDesc(DataType::kFLOAT, {64, 12}), tensorDesc(DataType::kFLOAT, {64, 3, 512})};
    io[0].min.d[0] = 1;  // a profile 1..64 (1..4 for WTI)
    check(b->configurePlugin(io.data(), op.nbInputs, &io[op.nbInputs], 1) == 0, at + " configurePlugin");
    size_t const workspace = b->getWorkspaceSize(io.data(), op.nbInputs, &io[op.nbInputs], 1);
    size_t const wantWorkspace = op.nbInputs == 6 ? 0 : 64u * ((12u * 12u + 3u * 12u) * 4u + 2u * 12u * 4u);
    check(workspace == wantWorkspace, at + " getWorkspaceSize for the profile's largest shape",
        std::to_string(workspace) + " bytes, want " + std::to_string(wantWorkspace));

    std::string why;
    std::vector<uint8_t> const bytes = serialized(plugin.get(), why);
    check(why.empty(), at + " getFieldsToSerialize gives fields that serialize", why);
    OwnedFields restored;
    deserialize(bytes, restored);
    PluginPtr revived(creator->createPlugin(op.name, restored.finish(), TensorRTPhase::kRUNTIME));
    check(revived != nullptr && serialized(revived.get(), why) == bytes,
        at + " serialize -> createPlugin(kRUNTIME) -> the same fields");
    PluginPtr copy(plugin->clone());
    check(copy != nullptr && copy.get() != plugin.get() && serialized(copy.get(), why) == bytes,
        at + " clone: a new object with the same fields");
    PluginPtr attached(r->attachToContext(nullptr));
    check(attached != nullptr && attached.get() != plugin.get() && serialized(attached.get(), why) == bytes,
        at + " attachToContext: a new object with the same fields");
    std::vector<PluginTensorDesc> plain;
    for (DynamicPluginTensorDesc const& d : io)
        plain.push_back(d.desc);
    check(r->onShapeChange(plain.data(), op.nbInputs, &plain[op.nbInputs], 1) == 0, at + " onShapeChange");
}

OpSpec const kWti{"WeightedTokenInteraction", 6, {}};
OpSpec const kMerge{"TokenMerge", 3, {"clusters", "k"}};

void checkRegisteredCreators(std::string const& where)
{
    IPluginRegistry* registry = getPluginRegistry();
    checkCreator(registry->getCreator("WeightedTokenInteraction", "1", "hbi"), kWti, where);
    checkCreator(registry->getCreator("TokenMerge", "1", "hbi"), kMerge, where);
}

std::string dlopenError()
{
    char const* error = dlerror();
    return error != nullptr ? error : "";
}

bool registeredBoth(char const* route)
{
    std::vector<std::string> const lines = stubLines(hbi_stub_registered);
    std::string const suffix = std::string("|hbi|hbi|") + route;
    return lines.size() == 2 && lines[0] == "WeightedTokenInteraction|1" + suffix
        && lines[1] == "TokenMerge|1" + suffix;
}

void checkLoadLibraryRoute(char const* path)
{
    IPluginRegistry* registry = getPluginRegistry();
    void* plain = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    check(plain != nullptr, "loadLibrary library: loads (RTLD_NOW: no undefined symbol)", dlopenError());
    if (plain == nullptr)
        return;
    check(stubLines(hbi_stub_registered).empty(), "loadLibrary library: a plain dlopen registers nothing",
        join(stubLines(hbi_stub_registered)));
    check(dlsym(plain, "getCreators") != nullptr && dlsym(plain, "setLoggerFinder") != nullptr,
        "loadLibrary library: exports getCreators and setLoggerFinder");
    void* handle = registry->loadLibrary(path);
    check(handle != nullptr && registeredBoth("loadLibrary"),
        "loadLibrary library: IPluginRegistry::loadLibrary registers both creators under namespace hbi",
        join(stubLines(hbi_stub_registered)));
    if (handle != nullptr)
    {
        checkRegisteredCreators("loadLibrary library:");
        registry->deregisterLibrary(handle);
        check(stubLines(hbi_stub_registered).empty(), "loadLibrary library: deregisterLibrary removes both");
    }
    dlclose(plain);
}

void checkDlopenRoute(char const* path, char const* loadLibraryPath)
{
    IPluginRegistry* registry = getPluginRegistry();
    hbi_stub_clear();
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    check(handle != nullptr, "dlopen library: loads (RTLD_NOW, RTLD_LOCAL)", dlopenError());
    if (handle == nullptr)
        return;
    check(registeredBoth("registerCreator"),
        "dlopen library: a plain dlopen registers both creators under namespace hbi",
        join(stubLines(hbi_stub_events)));
    check(dlsym(handle, "getCreators") == nullptr,
        "dlopen library: no getCreators (loadLibrary must not register it a second time)");
    checkRegisteredCreators("dlopen library:");
    void* second = registry->loadLibrary(loadLibraryPath);
    check(second == nullptr, "dlopen library: loadLibrary of libhbi_trt_plugins.so is then refused (registered)");
    if (second != nullptr)
        registry->deregisterLibrary(second);
    dlclose(handle);
    check(stubLines(hbi_stub_registered).empty(), "dlopen library: dlclose deregisters both creators",
        join(stubLines(hbi_stub_registered)));
}

// ---------------------------------------------------------------------------------------------------------------
// GPU: enqueue through IPluginV3OneRuntime, inputs and outputs written for gpu_check.py.

struct Lcg
{
    uint64_t state;
    float uniform()  // [-1, 1)
    {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        return static_cast<float>((state >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
    }
};

struct Case
{
    std::string name;
    OpSpec const* op;
    DataType type;
    std::vector<std::vector<int64_t>> shapes;  // inputs, then the output
    std::vector<std::vector<float>> values;   // inputs
    int32_t clusters;
};

size_t elements(std::vector<int64_t> const& shape)
{
    size_t n = 1;
    for (int64_t d : shape)
        n *= static_cast<size_t>(d);
    return n;
}

std::vector<uint8_t> toBytes(std::vector<float> const& v, DataType type)
{
    std::vector<uint8_t> out(v.size() * (type == DataType::kHALF ? 2 : 4));
    for (size_t i = 0; i < v.size(); ++i)
    {
        if (type == DataType::kHALF)
        {
            __half const h = __float2half_rn(v[i]);
            std::memcpy(out.data() + 2 * i, &h, 2);
        }
        else
            std::memcpy(out.data() + 4 * i, &v[i], 4);
    }
    return out;
}

#define CUDA_OK(call) ((call) == cudaSuccess)

bool enqueueCase(Case const& c, std::string const& dir, std::string& json, std::string& why)
{
    IPluginCreatorV3One* creator = asCreatorV3(getPluginRegistry()->getCreator(c.op->name, "1", "hbi"));
    OwnedFields fields;
    int32_t const k = 3;
    if (c.op == &kMerge)
    {
        fields.add("clusters", &c.clusters, 4, PluginFieldType::kINT32, 1);
        fields.add("k", &k, 4, PluginFieldType::kINT32, 1);
    }
    PluginPtr plugin(creator != nullptr ? creator->createPlugin(c.op->name, fields.finish(), TensorRTPhase::kRUNTIME)
                                        : nullptr);
    IPluginV3OneRuntime* r = plugin ? runtime(plugin.get()) : nullptr;
    IPluginV3OneBuild* b = plugin ? build(plugin.get()) : nullptr;
    if (r == nullptr || b == nullptr)
    {
        why = "no plugin";
        return false;
    }
    size_t const nIn = c.values.size();
    std::vector<DynamicPluginTensorDesc> dyn;
    std::vector<PluginTensorDesc> desc;
    for (auto const& shape : c.shapes)
    {
        dyn.push_back(tensorDesc(c.type, shape));
        desc.push_back(dyn.back().desc);
    }
    size_t const itemSize = c.type == DataType::kHALF ? 2 : 4;
    size_t const workspaceBytes = b->getWorkspaceSize(dyn.data(), static_cast<int32_t>(nIn), &dyn[nIn], 1);
    std::vector<void*> device(nIn + 2, nullptr);
    cudaStream_t stream = nullptr;
    bool ok = CUDA_OK(cudaStreamCreate(&stream));
    std::string files;
    for (size_t i = 0; ok && i < nIn; ++i)
    {
        std::vector<uint8_t> const bytes = toBytes(c.values[i], c.type);
        ok = CUDA_OK(cudaMalloc(&device[i], bytes.size()))
            && CUDA_OK(cudaMemcpyAsync(device[i], bytes.data(), bytes.size(), cudaMemcpyHostToDevice, stream));
        std::string const file = c.name + ".in" + std::to_string(i) + ".bin";
        std::ofstream(dir + "/" + file, std::ios::binary).write(reinterpret_cast<char const*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
        files += std::string(files.empty() ? "" : ", ") + "\"" + file + "\"";
    }
    size_t const outBytes = elements(c.shapes[nIn]) * itemSize;
    ok = ok && CUDA_OK(cudaMalloc(&device[nIn], outBytes)) && CUDA_OK(cudaMemsetAsync(device[nIn], 0xFF, outBytes, stream));
    ok = ok && (workspaceBytes == 0 || CUDA_OK(cudaMalloc(&device[nIn + 1], workspaceBytes)));
    int32_t status = -1;
    std::vector<uint8_t> out(outBytes);
    if (ok)
    {
        status = r->enqueue(desc.data(), &desc[nIn], device.data(), &device[nIn], device[nIn + 1], stream);
        ok = CUDA_OK(cudaMemcpyAsync(out.data(), device[nIn], outBytes, cudaMemcpyDeviceToHost, stream))
            && CUDA_OK(cudaStreamSynchronize(stream));
    }
    if (!ok)
        why = std::string("CUDA: ") + cudaGetErrorString(cudaGetLastError());
    std::string const outFile = c.name + ".out.bin";
    std::ofstream(dir + "/" + outFile, std::ios::binary).write(reinterpret_cast<char const*>(out.data()),
        static_cast<std::streamsize>(out.size()));
    std::string shapes;
    for (auto const& shape : c.shapes)
    {
        std::string s;
        for (int64_t d : shape)
            s += (s.empty() ? "" : ", ") + std::to_string(d);
        shapes += std::string(shapes.empty() ? "" : ", ") + "[" + s + "]";
    }
    json += std::string(json.empty() ? "" : ",\n") + "  {\"name\": \"" + c.name + "\", \"op\": \"" + c.op->name
        + "\", \"dtype\": \"" + (c.type == DataType::kHALF ? "float16" : "float32") + "\", \"clusters\": "
        + std::to_string(c.clusters) + ", \"k\": 3, \"inputs\": [" + files + "], \"output\": \"" + outFile
        + "\", \"shapes\": [" + shapes + "], \"enqueue_status\": " + std::to_string(status) + "}";
    for (void* p : device)
        if (p != nullptr)
            cudaFree(p);
    if (stream != nullptr)
        cudaStreamDestroy(stream);
    if (ok && status != 0)
        why = "enqueue returned " + std::to_string(status);
    return ok && status == 0;
}

std::vector<Case> gpuCases()
{
    std::vector<Case> cases;
    Lcg rng{12345};
    auto fill = [&rng](size_t n, float scale) {
        std::vector<float> v(n);
        for (float& x : v)
            x = rng.uniform() * scale;
        return v;
    };
    for (DataType type : {DataType::kFLOAT, DataType::kHALF})
    {
        std::string const suffix = type == DataType::kHALF ? "_fp16" : "_fp32";
        int64_t const bt = 3, bv = 5, lt = 7, lv = 4, d = 64;
        std::vector<float> tmask(bt * lt, 1.0f), vmask(bv * lv, 1.0f);
        tmask[lt - 1] = 0.0f;  // one padded text token
        vmask[lv - 1] = 0.0f;
        cases.push_back({"wti" + suffix, &kWti, type, {{bt, lt, d}, {bt, lt}, {bt, lt}, {bv, lv, d}, {bv, lv}, {bv, lv},
                                                     {bt, bv}},
            {fill(bt * lt * d, 0.2f), fill(bt * lt, 0.5f), tmask, fill(bv * lv * d, 0.2f), fill(bv * lv, 0.5f), vmask},
            0});
        int64_t const b = 4, n = 12, ch = 32;
        std::vector<int64_t> const x{b, n, ch}, s{b, n}, merged{b, 4, ch}, all{b, n, ch};
        std::vector<float> mask(b * n, 1.0f);
        for (int64_t t = 8; t < n; ++t)
            mask[1 * n + t] = 0.0f;  // sample 1: four padded tokens
        std::vector<float> score = fill(b * n, 1.0f);
        for (size_t i = 0; i < mask.size(); ++i)
            score[i] = mask[i] > 0 ? score[i] : -1e4f;
        cases.push_back({"merge" + suffix, &kMerge, type, {x, s, s, merged}, {fill(b * n * ch, 1.0f), score, mask}, 4});
        // Adversarial (outside the contract): sample 0 one overflowing token (|x|^2 = inf -> NaN centre scores),
        // sample 1 a NaN, sample 2 an inf, sample 3 every token masked; clusters == N, where slots went unwritten.
        std::vector<float> xa = fill(b * n * ch, 1.0f);
        for (int64_t c = 0; c < ch; ++c)
            xa[(0 * n + 5) * ch + c] *= 1e20f;
        xa[(1 * n + 2) * ch + 7] = std::nanf("");
        xa[(2 * n + 9) * ch + 3] = INFINITY;
        std::vector<float> maskA(b * n, 1.0f);
        for (int64_t t = 0; t < n; ++t)
            maskA[3 * n + t] = 0.0f;
        cases.push_back({"merge_adversarial" + suffix, &kMerge, type, {x, s, s, {b, n, ch}}, {xa, score, maskA},
            static_cast<int32_t>(n)});
    }
    return cases;
}

void checkGpu(std::string const& dir)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    {
        check(false, "gpu: a CUDA device is visible", cudaGetErrorString(cudaGetLastError()));
        return;
    }
    std::string json;
    for (Case const& c : gpuCases())
    {
        std::string why;
        check(enqueueCase(c, dir, json, why), "gpu: enqueue " + c.name + " (" + c.op->name + ")", why);
    }
    std::ofstream(dir + "/cases.json") << "[\n" << json << "\n]\n";

    // D of the text tokens differs from the video tokens': enqueue must refuse (and log), not launch.
    hbi_stub_clear();
    Case bad = gpuCases()[0];
    bad.name = "wti_mismatched_width";
    bad.shapes[3][2] = 32;
    bad.values[3].resize(elements(bad.shapes[3]));
    std::string ignored, why;
    bool const launched = enqueueCase(bad, dir, ignored, why);
    check(!launched && why.rfind("enqueue returned", 0) == 0, "gpu: enqueue refuses a text / video width mismatch",
        why);
    check(!stubLines(hbi_stub_logged).empty(), "gpu: the refused enqueue is logged");
}

}  // namespace

int main(int argc, char** argv)
{
    std::vector<std::string> paths;
    std::string gpuDir;
    for (int i = 1; i < argc; ++i)
    {
        if (std::strcmp(argv[i], "--gpu") == 0 && i + 1 < argc)
            gpuDir = argv[++i];
        else
            paths.emplace_back(argv[i]);
    }
    if (paths.empty() || paths.size() > 2)
    {
        std::fprintf(stderr, "usage: %s libhbi_trt_plugins.so [libhbi_trt_plugins_dlopen.so] [--gpu DUMP_DIR]\n",
            argv[0]);
        return 2;
    }
    std::printf("harness: TensorRT headers %d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
    checkLoadLibraryRoute(paths[0].c_str());
    if (paths.size() == 2)
        checkDlopenRoute(paths[1].c_str(), paths[0].c_str());
    if (!gpuDir.empty())
    {
        // Kept loaded to the end: a library whose (static) CUDA runtime has run is not unloaded under a live context.
        check(getPluginRegistry()->loadLibrary(paths[0].c_str()) != nullptr, "gpu: loadLibrary for the enqueue checks");
        checkGpu(gpuDir);
    }
    std::printf("harness: %d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}
