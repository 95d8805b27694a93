// C ABI between the torch glue (ms_deform_attn_cuda_bind.cpp, host compiler) and the CUDA kernels
// (ms_deform_attn_cuda.cu, nvcc). Raw pointers only, so the .cu never includes torch headers and nvcc
// compiles it without the torch include tree.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes
enum { MSDA_FLOAT32 = 0, MSDA_FLOAT64 = 1, MSDA_FLOAT16 = 2, MSDA_BFLOAT16 = 3 };

// Sizes of one call. All tensors contiguous:
//   value [n, s, m, d], spatial_shapes [l, 2] int64 (H, W), level_start_index [l] int64,
//   sampling_locations [n, lq, m, l, p, 2], attention_weights [n, lq, m, l, p], output [n, lq, m * d].
typedef struct {
  int64_t n, s, m, d, l, p, lq;
} MsdaSizes;

// Returns a cudaError_t as int (0 = success). `stream` is a cudaStream_t.
int msda_cuda_forward(int dtype, MsdaSizes sz, const void* value, const int64_t* spatial_shapes,
                      const int64_t* level_start_index, const void* sampling_locations,
                      const void* attention_weights, void* output, void* stream);

// grad_value_acc is in the accumulation type (float for fp32/fp16/bf16, double for fp64), zero-filled by
// the caller; grad_loc and grad_attn have the input dtype and are fully written here.
int msda_cuda_backward(int dtype, MsdaSizes sz, const void* value, const int64_t* spatial_shapes,
                       const int64_t* level_start_index, const void* sampling_locations,
                       const void* attention_weights, const void* grad_output, void* grad_value_acc,
                       void* grad_loc, void* grad_attn, void* stream);

// cudaGetErrorString of a code returned above.
const char* msda_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
