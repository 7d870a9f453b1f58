// Device helpers shared by the hbi kernels: loads as float, warp and block reductions.
#ifndef HBI_COMMON_CUH
#define HBI_COMMON_CUH

#include <cuda_fp16.h>

namespace hbi {

__device__ __forceinline__ float load(float const* p, long i) { return p[i]; }
__device__ __forceinline__ float load(__half const* p, long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ float warpSum(float v)
{
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Block-wide reduction with a caller-provided shared scratch of 32 floats; every thread gets the result.
template <bool kMax>
__device__ float blockReduce(float v, float* scratch)
{
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1)
    {
        float other = __shfl_xor_sync(0xffffffffu, v, off);
        v = kMax ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    int const warps = (blockDim.x + 31) >> 5;
    float r = kMax ? -INFINITY : 0.0f;
    for (int w = 0; w < warps; ++w)
        r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

}  // namespace hbi

#endif  // HBI_COMMON_CUH
