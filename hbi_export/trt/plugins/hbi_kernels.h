/*
 * hbi CUDA kernels: the C entry point (no TensorRT, no C++ types), so the kernels can be built with nvcc alone,
 * loaded with ctypes and checked against the numpy reference (benchmarks/gpu_kernels.py), and called by the
 * TensorRT plugins (hbi_plugins.cpp).
 *
 * Contract: docs/custom_ops.md (domain hbi, version 1). Tensors are dense, row-major, on the device; dtype is
 * HBI_FLOAT32 or HBI_FLOAT16 for every tensor of a call; accumulation is float32. Every function returns a
 * cudaError_t value (0 = cudaSuccess; cudaErrorInvalidValue = 1 for arguments outside the documented limits).
 */
#ifndef HBI_KERNELS_H
#define HBI_KERNELS_H

#include <stddef.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { HBI_FLOAT32 = 0, HBI_FLOAT16 = 1 };

/* Largest kNN size of TokenMerge's density (the model uses 3). */
#define HBI_TOKEN_MERGE_MAX_K 16
/* Largest Lt * Lv of WeightedTokenInteraction (the similarity block of one pair lives in shared memory). */
#define HBI_WTI_MAX_BLOCK 12000

/* The kernel library's version, "1" for op version 1. */
const char* hbi_kernels_version(void);

/*
 * WeightedTokenInteraction: scores[Bt, Bv] from text tokens [Bt, Lt, D], text weights / mask [Bt, Lt],
 * video tokens [Bv, Lv, D], video weights / mask [Bv, Lv].
 */
int hbi_wti_forward(int dtype, const void* text_tokens, const void* text_weights, const void* text_mask,
                    const void* video_tokens, const void* video_weights, const void* video_mask, void* scores,
                    int bt, int bv, int lt, int lv, int d, cudaStream_t stream);

/* Bytes of device workspace hbi_token_merge_forward needs for B samples of N tokens. */
size_t hbi_token_merge_workspace_size(int b, int n);

/*
 * TokenMerge: merged[B, clusters, C] from x [B, N, C], score [B, N], mask [B, N]; DPC-kNN centres (k nearest,
 * ties by index) and the exp(score)-weighted mean of each cluster. workspace: hbi_token_merge_workspace_size bytes.
 */
int hbi_token_merge_forward(int dtype, const void* x, const void* score, const void* mask, void* merged,
                            void* workspace, int b, int n, int c, int clusters, int k, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* HBI_KERNELS_H */
