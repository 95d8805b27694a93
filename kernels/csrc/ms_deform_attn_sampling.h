// Bilinear sampling for multi-scale deformable attention, shared by the C++ CPU kernel and the CUDA kernel.
//
// Semantics are those of F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False):
// a location (x, y) in [0, 1] of a level of size H x W maps to the pixel coordinate
// (x * W - 0.5, y * H - 0.5); corners outside the level contribute zero (value and gradient).
//
// Everything here is plain arithmetic on raw pointers (no torch, no CUDA runtime), compiled both by the
// host compiler (CPU kernel) and by nvcc as __host__ __device__ (CUDA kernel), so the CPU tests exercise
// the corner, weight and gradient arithmetic the GPU runs.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler does not know "#pragma unroll"
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_UNROLL
#endif
#define MSDA_SIMD
#define MSDA_SIMD_SUM_S
#else
#include <cmath>
#define MSDA_HD inline
#define MSDA_UNROLL
// Host: ask the compiler to vectorise the channel loop (needs -fopenmp or -fopenmp-simd to take effect;
// the float reduction is only vectorised with the explicit reduction clause).
#define MSDA_SIMD _Pragma("omp simd")
#define MSDA_SIMD_SUM_S _Pragma("omp simd reduction(+ : s)")
#endif

namespace reltag_msda {

MSDA_HD float msda_floor(float x) { return floorf(x); }
MSDA_HD double msda_floor(double x) { return floor(x); }

// Converts a stored element to the accumulation type (float for fp32/fp16/bf16, double for fp64).
template <typename acc_t, typename scalar_t>
MSDA_HD acc_t msda_to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// The four bilinear corners of one sampling location inside one level.
// Corner k: 0 = (y_low, x_low), 1 = (y_low, x_high), 2 = (y_high, x_low), 3 = (y_high, x_high).
// pos[k] is the flattened position y * W + x inside the level, or -1 when the corner lies outside
// (zero padding: it contributes nothing). w[k] is the bilinear weight; dw_dx[k] / dw_dy[k] are the
// derivatives of w[k] with respect to the *normalised* location (x, y), i.e. already multiplied by W / H.
template <typename acc_t>
struct MsdaCorners {
  int64_t pos[4];
  acc_t w[4];
  acc_t dw_dx[4];
  acc_t dw_dy[4];
};

template <typename acc_t>
MSDA_HD MsdaCorners<acc_t> msda_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
  MsdaCorners<acc_t> c;
  // align_corners=False: pixel centres sit at (i + 0.5) / size in normalised coordinates.
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t x_floor = msda_floor(x);
  const acc_t y_floor = msda_floor(y);
  const acc_t lx = x - x_floor;  // distance to the low corner, in [0, 1)
  const acc_t ly = y - y_floor;
  const acc_t hx = acc_t(1) - lx;
  const acc_t hy = acc_t(1) - ly;
  // Far outside (including NaN and huge values): every corner is padding. Checked in floating point so
  // the integer conversion below never overflows. x == -1 counts as inside, as in grid_sample: its
  // high corner (x = 0) has weight 0 but a non-zero location gradient. (The Deformable-DETR kernel tests
  // x > -1 and drops that gradient.)
  const bool inside = x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(width) &&
                      y < static_cast<acc_t>(height);
  const int64_t x0 = inside ? static_cast<int64_t>(x_floor) : -2;
  const int64_t y0 = inside ? static_cast<int64_t>(y_floor) : -2;
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  const bool vx0 = inside && x0 >= 0;
  const bool vx1 = inside && x1 <= width - 1;
  const bool vy0 = inside && y0 >= 0;
  const bool vy1 = inside && y1 <= height - 1;
  const acc_t fw = static_cast<acc_t>(width);
  const acc_t fh = static_cast<acc_t>(height);

  c.pos[0] = (vy0 && vx0) ? y0 * width + x0 : -1;
  c.pos[1] = (vy0 && vx1) ? y0 * width + x1 : -1;
  c.pos[2] = (vy1 && vx0) ? y1 * width + x0 : -1;
  c.pos[3] = (vy1 && vx1) ? y1 * width + x1 : -1;
  c.w[0] = hy * hx;
  c.w[1] = hy * lx;
  c.w[2] = ly * hx;
  c.w[3] = ly * lx;
  // d/dx of the weights in pixel units, times W for normalised units (x_pixel = loc_x * W - 0.5).
  c.dw_dx[0] = -hy * fw;
  c.dw_dx[1] = hy * fw;
  c.dw_dx[2] = -ly * fw;
  c.dw_dx[3] = ly * fw;
  c.dw_dy[0] = -hx * fh;
  c.dw_dy[1] = -lx * fh;
  c.dw_dy[2] = hx * fh;
  c.dw_dy[3] = lx * fh;
  return c;
}

// Forward, one channel: acc += attn * sample(channel). `value` points at channel d of position 0 of the
// level for this (batch, head); consecutive positions are `pos_stride` elements apart (M * D).
template <typename acc_t, typename scalar_t>
MSDA_HD acc_t msda_accumulate_channel(acc_t acc, const scalar_t* value, int64_t pos_stride,
                                      const MsdaCorners<acc_t>& c, acc_t attn) {
MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (c.pos[k] >= 0) {
      acc += (attn * c.w[k]) * msda_to_acc<acc_t>(value[c.pos[k] * pos_stride]);
    }
  }
  return acc;
}

// Forward, a contiguous run of `channels` channels (the CPU kernel; vectorised over D by the compiler):
// acc[d] += attn * sample(d) for d in [0, channels). Same expression as msda_accumulate_channel.
template <typename acc_t, typename scalar_t>
MSDA_HD void msda_accumulate_range(acc_t* __restrict__ acc, const scalar_t* __restrict__ value,
                                   int64_t pos_stride, const MsdaCorners<acc_t>& c, acc_t attn,
                                   int64_t channels) {
  for (int k = 0; k < 4; ++k) {
    if (c.pos[k] < 0) continue;
    const acc_t coeff = attn * c.w[k];
    const scalar_t* __restrict__ v = value + c.pos[k] * pos_stride;
MSDA_SIMD
    for (int64_t d = 0; d < channels; ++d) {
      acc[d] += coeff * msda_to_acc<acc_t>(v[d]);
    }
  }
}

// Backward helper: from the per-corner dot products dot[k] = sum_d grad_out[d] * value_k[d] (over the
// channels this caller owns), the contributions to the attention weight and location gradients:
//   d out / d attn  = sum_k w_k * dot_k
//   d out / d loc_x = attn * sum_k dw_dx_k * dot_k   (and likewise for y)
template <typename acc_t>
MSDA_HD void msda_combine_grad(const acc_t dot[4], const MsdaCorners<acc_t>& c, acc_t attn,
                               acc_t* grad_attn, acc_t* grad_x, acc_t* grad_y) {
  acc_t ga = 0, gx = 0, gy = 0;
MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    ga += c.w[k] * dot[k];
    gx += c.dw_dx[k] * dot[k];
    gy += c.dw_dy[k] * dot[k];
  }
  *grad_attn += ga;
  *grad_x += attn * gx;
  *grad_y += attn * gy;
}

// Backward, a contiguous run of channels (the CPU kernel). Adds attn * w_k * grad_out[d] to grad_value at
// every valid corner (the caller guarantees no other thread writes this (batch, head, channel) slice) and
// returns the per-corner dot products for msda_combine_grad. grad_value is in the accumulation type.
template <typename acc_t, typename scalar_t>
MSDA_HD void msda_backward_range(const acc_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                 acc_t* __restrict__ grad_value, int64_t pos_stride,
                                 const MsdaCorners<acc_t>& c, acc_t attn, int64_t channels, acc_t dot[4]) {
  for (int k = 0; k < 4; ++k) {
    dot[k] = 0;
    if (c.pos[k] < 0) continue;
    const acc_t coeff = attn * c.w[k];
    const scalar_t* __restrict__ v = value + c.pos[k] * pos_stride;
    acc_t* __restrict__ gv = grad_value + c.pos[k] * pos_stride;
    acc_t s = 0;
MSDA_SIMD_SUM_S
    for (int64_t d = 0; d < channels; ++d) {
      s += grad_out[d] * msda_to_acc<acc_t>(v[d]);
      gv[d] += coeff * grad_out[d];
    }
    dot[k] = s;
  }
}

}  // namespace reltag_msda
