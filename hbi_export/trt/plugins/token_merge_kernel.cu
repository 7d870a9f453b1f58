// hbi::TokenMerge on CUDA (docs/custom_ops.md, "TokenMerge"). One block per sample; the N x N distances and the
// per-token state live in a device workspace (hbi_token_merge_workspace_size), so N is not bounded by shared memory.
// Each step follows the contract line by line; the comments name the line.
#include "hbi_common.cuh"
#include "hbi_kernels.h"

namespace hbi {
namespace {

constexpr int kThreads = 256;
constexpr float kMergeEps = 1e-6f;

struct Workspace  // per sample, carved from one allocation
{
    float* dist;     // (N, N)
    float* sq;       // (N,)
    float* density;  // (N,)
    float* centre;   // (N,)  centre score
    int* centres;    // (N,)  the first `clusters` are used
    int* assign;     // (N,)
};

__host__ __device__ inline size_t sampleBytes(int n)
{
    return (static_cast<size_t>(n) * n + 3 * static_cast<size_t>(n)) * sizeof(float) + 2 * static_cast<size_t>(n) * sizeof(int);
}

__device__ Workspace carve(void* base, int sample, int n)
{
    char* p = static_cast<char*>(base) + sampleBytes(n) * sample;
    Workspace w;
    w.dist = reinterpret_cast<float*>(p);
    w.sq = w.dist + static_cast<size_t>(n) * n;
    w.density = w.sq + n;
    w.centre = w.density + n;
    w.centres = reinterpret_cast<int*>(w.centre + n);
    w.assign = w.centres + n;
    return w;
}

__device__ __forceinline__ int clampIndex(int i, int n)
{
    return i < 0 ? 0 : (i < n ? i : n - 1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tokenMergeKernel(T const* __restrict__ x, T const* __restrict__ score,
    T const* __restrict__ mask, T* __restrict__ merged, void* workspace, int n, int c, int clusters, int k)
{
    __shared__ float scratch[32];
    int const s = blockIdx.x;
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const warps = kThreads / 32;
    T const* xs = x + static_cast<long>(s) * n * c;
    T const* ms = mask + static_cast<long>(s) * n;
    T const* ss = score + static_cast<long>(s) * n;
    Workspace w = carve(workspace, s, n);

    // |x_i|^2
    for (int i = warp; i < n; i += warps)
    {
        float acc = 0.0f;
        for (int ch = lane; ch < c; ch += 32)
        {
            float const v = load(xs, static_cast<long>(i) * c + ch);
            acc += v * v;
        }
        acc = warpSum(acc);
        if (lane == 0)
            w.sq[i] = acc;
    }
    __syncthreads();

    // dist[i, j] = sqrt(max(d2, 0)) / sqrt(C), computed once per unordered pair: exactly symmetric, zero diagonal.
    float const invSqrtC = rsqrtf(static_cast<float>(c));
    for (int p = warp; p < n * n; p += warps)
    {
        int const i = p / n;
        int const j = p - i * n;
        if (j < i)
            continue;
        float dot = 0.0f;
        if (i != j)
        {
            for (int ch = lane; ch < c; ch += 32)
                dot += load(xs, static_cast<long>(i) * c + ch) * load(xs, static_cast<long>(j) * c + ch);
            dot = warpSum(dot);
        }
        if (lane == 0)
        {
            float const d2 = (w.sq[i] + w.sq[j]) - 2.0f * dot;
            float const d = i == j ? 0.0f : sqrtf(fmaxf(d2, 0.0f)) * invSqrtC;
            w.dist[i * n + j] = d;
            w.dist[j * n + i] = d;
        }
    }
    __syncthreads();

    // fill = max dist + 1 (per sample); dist[i, j] = fill where mask[j] == 0
    float localMax = 0.0f;
    for (int p = threadIdx.x; p < n * n; p += kThreads)
        localMax = fmaxf(localMax, w.dist[p]);
    float const fill = blockReduce<true>(localMax, scratch) + 1.0f;
    for (int p = threadIdx.x; p < n * n; p += kThreads)
        if (!(load(ms, p % n) > 0.0f))
            w.dist[p] = fill;
    __syncthreads();
    localMax = 0.0f;
    for (int p = threadIdx.x; p < n * n; p += kThreads)
        localMax = fmaxf(localMax, w.dist[p]);
    float const distMax = blockReduce<true>(localMax, scratch);  // after the fill, as the reference

    // density[i] = exp(-mean of the k' smallest dist[i, :]^2) * mask[i]   (k' = min(k, N), self included)
    int const kk = k < n ? k : n;
    for (int i = threadIdx.x; i < n; i += kThreads)
    {
        float best[HBI_TOKEN_MERGE_MAX_K];
        int filled = 0;
        for (int j = 0; j < n; ++j)  // insertion into the ascending list of the kk smallest
        {
            float const d = w.dist[i * n + j];
            if (filled == kk && !(d < best[kk - 1]))
                continue;
            int pos = filled < kk ? filled++ : kk - 1;
            while (pos > 0 && best[pos - 1] > d)
            {
                best[pos] = best[pos - 1];
                --pos;
            }
            best[pos] = d;
        }
        float sum = 0.0f;
        for (int q = 0; q < kk; ++q)
            sum += best[q] * best[q];
        w.density[i] = load(ms, i) > 0.0f ? expf(-(sum / static_cast<float>(kk))) : 0.0f;
    }
    __syncthreads();

    // parent[i] = min over j that outrank i of dist[i, j] (else distMax); centre score = parent * density
    for (int i = threadIdx.x; i < n; i += kThreads)
    {
        float const di = w.density[i];
        float parent = distMax;
        bool any = false;
        for (int j = 0; j < n; ++j)
        {
            float const dj = w.density[j];
            if (dj > di || (dj == di && j < i))
            {
                float const d = w.dist[i * n + j];
                parent = any ? fminf(parent, d) : d;
                any = true;
            }
        }
        // A NaN score (parent = inf from an overflowing |x|^2 or an inf fill, times density 0) ranks last, as in the
        // reference's argsort: the rank below needs a total order. With a NaN every comparison is false, so the NaN
        // token and the best finite one would share rank 0 and some slot of `centres` would never be written.
        float const centreScore = parent * di;
        w.centre[i] = isnan(centreScore) ? -INFINITY : centreScore;
    }
    // Every slot defined before the ranks land (they overwrite each one exactly once: the order is total now).
    for (int q = threadIdx.x; q < clusters; q += kThreads)
        w.centres[q] = q;
    __syncthreads();

    // centres: the `clusters` highest centre scores, descending, lower index first on ties (a rank by counting)
    for (int i = threadIdx.x; i < n; i += kThreads)
    {
        float const si = w.centre[i];
        int rank = 0;
        for (int j = 0; j < n; ++j)
        {
            float const sj = w.centre[j];
            rank += (sj > si || (sj == si && j < i)) ? 1 : 0;
        }
        if (rank < clusters)
            w.centres[rank] = i;
    }
    __syncthreads();

    // assign[t] = c if t is centre c, else argmin_c dist[centres[c], t] (first on equal distance). The centre index
    // is clamped to [0, N): a defect above must not turn into a read outside this sample's distances.
    for (int t = threadIdx.x; t < n; t += kThreads)
    {
        int bestC = 0;
        float bestD = w.dist[clampIndex(w.centres[0], n) * n + t];
        for (int q = 1; q < clusters; ++q)
        {
            float const d = w.dist[clampIndex(w.centres[q], n) * n + t];
            if (d < bestD)
            {
                bestD = d;
                bestC = q;
            }
        }
        for (int q = 0; q < clusters; ++q)
            if (w.centres[q] == t)
                bestC = q;
        w.assign[t] = bestC;
    }
    __syncthreads();

    // merged[q] = sum_{t in q} exp(score_t) x_t / (sum_{t in q} exp(score_t) + 1e-6)
    T* out = merged + static_cast<long>(s) * clusters * c;
    for (int p = threadIdx.x; p < clusters * c; p += kThreads)
    {
        int const q = p / c;
        int const ch = p - q * c;
        float num = 0.0f;
        float den = 0.0f;
        for (int t = 0; t < n; ++t)
        {
            if (w.assign[t] != q)
                continue;
            float const wt = expf(load(ss, t));
            num += wt * load(xs, static_cast<long>(t) * c + ch);
            den += wt;
        }
        store(out, p, num / (den + kMergeEps));
    }
}

template <typename T>
int launch(void const* x, void const* score, void const* mask, void* merged, void* workspace, int b, int n, int c,
    int clusters, int k, cudaStream_t stream)
{
    tokenMergeKernel<T><<<b, kThreads, 0, stream>>>(static_cast<T const*>(x), static_cast<T const*>(score),
        static_cast<T const*>(mask), static_cast<T*>(merged), workspace, n, c, clusters, k);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace hbi

extern "C" size_t hbi_token_merge_workspace_size(int b, int n)
{
    return b > 0 && n > 0 ? hbi::sampleBytes(n) * static_cast<size_t>(b) : 0;
}

extern "C" int hbi_token_merge_forward(int dtype, void const* x, void const* score, void const* mask, void* merged,
    void* workspace, int b, int n, int c, int clusters, int k, cudaStream_t stream)
{
    if (b < 0 || n < 1 || c < 1 || clusters < 1 || clusters > n || k < 1 || k > HBI_TOKEN_MERGE_MAX_K
        || n > 46340 || (b > 0 && workspace == nullptr))
        return static_cast<int>(cudaErrorInvalidValue);
    if (b == 0)
        return static_cast<int>(cudaSuccess);
    if (dtype == HBI_FLOAT32)
        return hbi::launch<float>(x, score, mask, merged, workspace, b, n, c, clusters, k, stream);
    if (dtype == HBI_FLOAT16)
        return hbi::launch<__half>(x, score, mask, merged, workspace, b, n, c, clusters, k, stream);
    return static_cast<int>(cudaErrorInvalidValue);
}
