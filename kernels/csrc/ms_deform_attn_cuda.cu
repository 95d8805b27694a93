// CUDA kernels of multi-scale deformable attention: forward and backward; fp32, fp64, fp16 and bf16 with
// fp32 accumulation (fp64 accumulates in fp64). Depends only on the CUDA runtime and the shared sampling
// header, so nvcc compiles it without torch headers; ms_deform_attn_cuda_bind.cpp is the torch glue.
//
// Work layout (differs from the Deformable-DETR kernel):
//  * one warp per (batch, query, head); its 32 lanes stride over the D channels (d = lane, lane + 32, ...),
//    so any D works (30, 71, 1025) with coalesced loads of the contiguous channel rows, and there is no
//    im2col_step: the batch need not divide anything;
//  * grid-stride loop over warps, 64-bit indexing throughout;
//  * backward reduces the location / attention-weight gradients across the warp with __shfl_down_sync
//    instead of a shared-memory tree specialised per block size, and adds grad_value with atomicAdd into
//    an fp32 (fp64 for double) buffer that the glue casts back, so fp16/bf16 never accumulate in 16 bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ms_deform_attn_cuda.h"
#include "ms_deform_attn_sampling.h"

// 16-bit conversions through the intrinsics: torch's extension build passes -D__CUDA_NO_HALF_CONVERSIONS__
// and -D__CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit __half <-> float conversions.
namespace reltag_msda {
template <>
__host__ __device__ __forceinline__ float msda_to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__host__ __device__ __forceinline__ float msda_to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
}  // namespace reltag_msda

namespace {

using reltag_msda::msda_accumulate_channel;
using reltag_msda::msda_combine_grad;
using reltag_msda::msda_corners;
using reltag_msda::msda_to_acc;
using reltag_msda::MsdaCorners;

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(MsdaSizes sz, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                        const scalar_t* __restrict__ attn, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t total = sz.n * sz.lq * sz.m;
  const int64_t pos_stride = sz.m * sz.d;
  const int64_t lp = sz.l * sz.p;
  const int64_t warp_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); i < total;
       i += warp_step) {
    const int64_t m = i % sz.m;
    const int64_t n = i / (sz.m * sz.lq);
    const scalar_t* loc_i = loc + i * lp * 2;
    const scalar_t* attn_i = attn + i * lp;
    for (int64_t d = lane; d < sz.d; d += 32) {
      acc_t acc = 0;
      for (int64_t l = 0; l < sz.l; ++l) {
        const int64_t h = shapes[2 * l];
        const int64_t w = shapes[2 * l + 1];
        const scalar_t* v = value + (n * sz.s + starts[l]) * pos_stride + m * sz.d + d;
        for (int64_t p = 0; p < sz.p; ++p) {
          const int64_t j = l * sz.p + p;
          const MsdaCorners<acc_t> c =
              msda_corners<acc_t>(msda_to_acc<acc_t>(loc_i[2 * j]), msda_to_acc<acc_t>(loc_i[2 * j + 1]), h, w);
          acc = msda_accumulate_channel<acc_t, scalar_t>(acc, v, pos_stride, c, msda_to_acc<acc_t>(attn_i[j]));
        }
      }
      out[i * sz.d + d] = from_acc<scalar_t>(acc);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(MsdaSizes sz, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                         const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                         const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                         acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                         scalar_t* __restrict__ grad_attn) {
  const int lane = threadIdx.x & 31;
  const int64_t total = sz.n * sz.lq * sz.m;
  const int64_t pos_stride = sz.m * sz.d;
  const int64_t lp = sz.l * sz.p;
  const int64_t warp_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // The loop bound depends on the warp index only, so all 32 lanes reach every __shfl_down_sync.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); i < total;
       i += warp_step) {
    const int64_t m = i % sz.m;
    const int64_t n = i / (sz.m * sz.lq);
    const scalar_t* loc_i = loc + i * lp * 2;
    const scalar_t* attn_i = attn + i * lp;
    const scalar_t* g_i = grad_out + i * sz.d;
    for (int64_t l = 0; l < sz.l; ++l) {
      const int64_t h = shapes[2 * l];
      const int64_t w = shapes[2 * l + 1];
      const int64_t off = (n * sz.s + starts[l]) * pos_stride + m * sz.d;
      for (int64_t p = 0; p < sz.p; ++p) {
        const int64_t j = l * sz.p + p;
        const acc_t a = msda_to_acc<acc_t>(attn_i[j]);
        const MsdaCorners<acc_t> c =
            msda_corners<acc_t>(msda_to_acc<acc_t>(loc_i[2 * j]), msda_to_acc<acc_t>(loc_i[2 * j + 1]), h, w);
        // Per-lane partial dot products sum_d grad_out[d] * value_k[d] over this lane's channels.
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t d = lane; d < sz.d; d += 32) {
          const acc_t g = msda_to_acc<acc_t>(g_i[d]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.pos[k] >= 0) {
              const int64_t idx = off + c.pos[k] * pos_stride + d;
              dot[k] += g * msda_to_acc<acc_t>(value[idx]);
              atomicAdd(grad_value + idx, (a * c.w[k]) * g);
            }
          }
        }
        acc_t ga = 0, gx = 0, gy = 0;
        msda_combine_grad<acc_t>(dot, c, a, &ga, &gx, &gy);  // linear in dot: reduce afterwards
        ga = warp_sum(ga);
        gx = warp_sum(gx);
        gy = warp_sum(gy);
        if (lane == 0) {
          grad_attn[i * lp + j] = from_acc<scalar_t>(ga);
          grad_loc[(i * lp + j) * 2] = from_acc<scalar_t>(gx);
          grad_loc[(i * lp + j) * 2 + 1] = from_acc<scalar_t>(gy);
        }
      }
    }
  }
}

unsigned int blocks_for(int64_t warps) {
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  // Grid-stride loops cover the rest; 2^20 blocks keep every SM busy on any current GPU.
  return static_cast<unsigned int>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
}

template <typename scalar_t, typename acc_t>
int forward_typed(MsdaSizes sz, const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,
                  const void* attn, void* out, cudaStream_t stream) {
  const int64_t warps = sz.n * sz.lq * sz.m;
  if (warps == 0 || sz.d == 0) return static_cast<int>(cudaSuccess);
  msda_forward_kernel<scalar_t, acc_t><<<blocks_for(warps), kThreads, 0, stream>>>(
      sz, static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(loc),
      static_cast<const scalar_t*>(attn), static_cast<scalar_t*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename scalar_t, typename acc_t>
int backward_typed(MsdaSizes sz, const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,
                   const void* attn, const void* grad_out, void* grad_value, void* grad_loc, void* grad_attn,
                   cudaStream_t stream) {
  const int64_t warps = sz.n * sz.lq * sz.m;
  if (warps == 0) return static_cast<int>(cudaSuccess);
  msda_backward_kernel<scalar_t, acc_t><<<blocks_for(warps), kThreads, 0, stream>>>(
      sz, static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(loc),
      static_cast<const scalar_t*>(attn), static_cast<const scalar_t*>(grad_out), static_cast<acc_t*>(grad_value),
      static_cast<scalar_t*>(grad_loc), static_cast<scalar_t*>(grad_attn));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int msda_cuda_forward(int dtype, MsdaSizes sz, const void* value, const int64_t* spatial_shapes,
                                 const int64_t* level_start_index, const void* sampling_locations,
                                 const void* attention_weights, void* output, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case MSDA_FLOAT32:
      return forward_typed<float, float>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights, output, s);
    case MSDA_FLOAT64:
      return forward_typed<double, double>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, output, s);
    case MSDA_FLOAT16:
      return forward_typed<__half, float>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, output, s);
    case MSDA_BFLOAT16:
      return forward_typed<__nv_bfloat16, float>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                                 attention_weights, output, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int msda_cuda_backward(int dtype, MsdaSizes sz, const void* value, const int64_t* spatial_shapes,
                                  const int64_t* level_start_index, const void* sampling_locations,
                                  const void* attention_weights, const void* grad_output, void* grad_value_acc,
                                  void* grad_loc, void* grad_attn, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case MSDA_FLOAT32:
      return backward_typed<float, float>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, grad_output, grad_value_acc, grad_loc, grad_attn, s);
    case MSDA_FLOAT64:
      return backward_typed<double, double>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights, grad_output, grad_value_acc, grad_loc, grad_attn, s);
    case MSDA_FLOAT16:
      return backward_typed<__half, float>(sz, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, grad_output, grad_value_acc, grad_loc, grad_attn, s);
    case MSDA_BFLOAT16:
      return backward_typed<__nv_bfloat16, float>(sz, value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights, grad_output,
                                                  grad_value_acc, grad_loc, grad_attn, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* msda_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
