// hbi::WeightedTokenInteraction on CUDA (docs/custom_ops.md). One block per (text, video) pair:
//   S[i, j]     = <t_i, v_j> * tmask[i] * vmask[j]            (masked entries 0, not -inf)
//   scores[a,b] = (sum_i tw[i] max_j S[i, j] + sum_j vw[j] max_i S[i, j]) / 2
// S of one pair (Lt x Lv floats) lives in shared memory and is never written to global memory.
#include "hbi_common.cuh"
#include "hbi_kernels.h"

namespace hbi {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads) wtiKernel(T const* __restrict__ tTok, T const* __restrict__ tW,
    T const* __restrict__ tM, T const* __restrict__ vTok, T const* __restrict__ vW, T const* __restrict__ vM,
    T* __restrict__ scores, int bv, int lt, int lv, int d)
{
    extern __shared__ float sim[];  // (Lt, Lv)
    __shared__ float scratch[32];
    int const b = blockIdx.x;  // video
    int const a = blockIdx.y;  // text
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const warps = kThreads / 32;
    T const* t = tTok + static_cast<long>(a) * lt * d;
    T const* v = vTok + static_cast<long>(b) * lv * d;

    // One warp per (i, j): lanes stride over D (coalesced), then a warp sum.
    for (int p = warp; p < lt * lv; p += warps)
    {
        int const i = p / lv;
        int const j = p - i * lv;
        float const m = load(tM, static_cast<long>(a) * lt + i) * load(vM, static_cast<long>(b) * lv + j);
        float acc = 0.0f;
        if (m != 0.0f)
        {
            for (int c = lane; c < d; c += 32)
                acc += load(t, static_cast<long>(i) * d + c) * load(v, static_cast<long>(j) * d + c);
            acc = warpSum(acc);
        }
        if (lane == 0)
            sim[p] = acc * m;
    }
    __syncthreads();

    float part = 0.0f;
    for (int i = threadIdx.x; i < lt; i += kThreads)  // text -> video: max over video tokens
    {
        float best = sim[i * lv];
        for (int j = 1; j < lv; ++j)
            best = fmaxf(best, sim[i * lv + j]);
        part += load(tW, static_cast<long>(a) * lt + i) * best;
    }
    for (int j = threadIdx.x; j < lv; j += kThreads)  // video -> text: max over text tokens
    {
        float best = sim[j];
        for (int i = 1; i < lt; ++i)
            best = fmaxf(best, sim[i * lv + j]);
        part += load(vW, static_cast<long>(b) * lv + j) * best;
    }
    float const total = blockReduce<false>(part, scratch);
    if (threadIdx.x == 0)
        store(scores, static_cast<long>(a) * bv + b, 0.5f * total);
}

template <typename T>
int launch(void const* tt, void const* tw, void const* tm, void const* vt, void const* vw, void const* vm,
    void* out, int bt, int bv, int lt, int lv, int d, cudaStream_t stream)
{
    dim3 grid(bv, bt);
    size_t const smem = static_cast<size_t>(lt) * lv * sizeof(float);
    wtiKernel<T><<<grid, kThreads, smem, stream>>>(static_cast<T const*>(tt), static_cast<T const*>(tw),
        static_cast<T const*>(tm), static_cast<T const*>(vt), static_cast<T const*>(vw), static_cast<T const*>(vm),
        static_cast<T*>(out), bv, lt, lv, d);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace hbi

extern "C" int hbi_wti_forward(int dtype, void const* text_tokens, void const* text_weights, void const* text_mask,
    void const* video_tokens, void const* video_weights, void const* video_mask, void* scores, int bt, int bv, int lt,
    int lv, int d, cudaStream_t stream)
{
    if (bt < 0 || bv < 0 || lt < 1 || lv < 1 || d < 1 || lt > HBI_WTI_MAX_BLOCK || lt * lv > HBI_WTI_MAX_BLOCK
        || bt > 65535)  // grid.y limit
        return static_cast<int>(cudaErrorInvalidValue);
    if (bt == 0 || bv == 0)
        return static_cast<int>(cudaSuccess);
    if (dtype == HBI_FLOAT32)
        return hbi::launch<float>(text_tokens, text_weights, text_mask, video_tokens, video_weights, video_mask,
            scores, bt, bv, lt, lv, d, stream);
    if (dtype == HBI_FLOAT16)
        return hbi::launch<__half>(text_tokens, text_weights, text_mask, video_tokens, video_weights, video_mask,
            scores, bt, bv, lt, lv, d, stream);
    return static_cast<int>(cudaErrorInvalidValue);
}

extern "C" char const* hbi_kernels_version(void)
{
    return "1";
}
