// C++ CPU kernel of multi-scale deformable attention: forward and backward, fp32 and fp64.
//
// Layouts (all contiguous, checked by the Python caller and again here):
//   value               [N, S, M, D]
//   spatial_shapes      [L, 2] int64 (H, W)
//   level_start_index   [L] int64
//   sampling_locations  [N, Lq, M, L, P, 2] (x, y) in [0, 1]
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
// Forward: parallel over (N, Lq, M) (at::parallel_for threads pulling blocks of 64), vectorised over D;
// the corner rows of one (n, q, m) are prefetched before they are summed.
// Backward: corners of one query computed and their value / grad_value rows prefetched first; then
// atomics-free partitioning. Every task owns one (n, m, channel-chunk) slice of grad_value, so no
// two threads ever write the same element; the chunk's partial gradients of the locations and attention
// weights go to a per-chunk buffer that is summed afterwards (only when D is split, i.e. when N * M alone
// does not give every thread enough tasks).
// fp16 / bf16 inputs are upcast to fp32 by the Python caller (kernels/op.py) and cast back.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "ms_deform_attn_sampling.h"

namespace {

using reltag_msda::msda_accumulate_range;
using reltag_msda::msda_backward_range;
using reltag_msda::msda_combine_grad;
using reltag_msda::msda_corners;
using reltag_msda::MsdaCorners;

struct Dims {
  int64_t n, s, m, d, l, p, lq;
};

// Dynamic scheduling on top of at::parallel_for: every thread pulls blocks of `block` items from a shared
// counter until none are left, so a thread that the OS preempts (shared CI machines) does not hold the
// others back the way one static chunk per thread would. Inside an enclosing parallel region
// at::parallel_for runs inline and this degrades to a serial loop over all blocks.
template <typename F>
void parallel_blocks(int64_t total, int64_t block, const F& f) {
  if (total <= 0) return;
  const int64_t n_blocks = (total + block - 1) / block;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_blocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < n_blocks; b = next.fetch_add(1)) {
      f(b * block, std::min(total, (b + 1) * block));
    }
  });
}

// Prefetches the channel rows of the valid corners (up to 4 cache lines each) into L1, so the
// L * P * 4 scattered rows of one (n, q, m) are in flight together rather than one miss at a time.
template <int kWrite, typename scalar_t, typename acc_t>
inline void prefetch_corners(const scalar_t* v, int64_t pos_stride, const MsdaCorners<acc_t>& c, int64_t bytes) {
  for (int k = 0; k < 4; ++k) {
    if (c.pos[k] < 0) continue;
    const char* row = reinterpret_cast<const char*>(v + c.pos[k] * pos_stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, kWrite, 3);
  }
}

Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be [N, Lq, M, L, P, 2], got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be [N, Lq, M, L, P], got ",
              attention_weights.sizes());
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn CPU kernel got a tensor on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn CPU kernel needs contiguous inputs");
  }
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share a dtype, got ", value.scalar_type(), ", ",
              sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(3),
         sampling_locations.size(4), sampling_locations.size(1)};
  TORCH_CHECK(sampling_locations.size(0) == d.n && sampling_locations.size(2) == d.m &&
                  sampling_locations.size(5) == 2,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.size(0) == d.n && attention_weights.size(1) == d.lq &&
                  attention_weights.size(2) == d.m && attention_weights.size(3) == d.l &&
                  attention_weights.size(4) == d.p,
              "attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.l && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L=", d.l, ", 2], got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == d.l,
              "level_start_index must be [L=", d.l, "], got ", level_start_index.sizes());
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < d.l; ++l) {
    TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "level ", l, " has shape (", shapes[2 * l], ", ",
                shapes[2 * l + 1], ")");
    TORCH_CHECK(starts[l] == total, "level_start_index[", l, "] = ", starts[l], " but the levels before it hold ",
                total, " positions");
    total += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(total == d.s, "spatial_shapes hold ", total, " positions but value has S = ", d.s);
  return d;
}

template <typename scalar_t>
void forward_kernel(const Dims& dm, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out) {
  using acc_t = scalar_t;  // fp32 accumulates in fp32, fp64 in fp64 (half/bf16 never reach here)
  const int64_t pos_stride = dm.m * dm.d;
  const int64_t lp = dm.l * dm.p;
  // One work item = one (n, q, m); its sampling_locations / attention_weights / output rows are at i * ...
  // because the layouts [N, Lq, M, ...] flatten (n, q, m) to exactly i.
  const int64_t row_bytes = std::min<int64_t>(dm.d * static_cast<int64_t>(sizeof(scalar_t)), 256);
  parallel_blocks(dm.n * dm.lq * dm.m, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dm.d);
    std::vector<MsdaCorners<acc_t>> corners(lp);
    std::vector<const scalar_t*> bases(dm.l);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i % dm.m;
      const int64_t n = i / (dm.m * dm.lq);
      const scalar_t* loc_i = loc + i * lp * 2;
      const scalar_t* attn_i = attn + i * lp;
      // pass 1: corners of every (level, point), their rows prefetched
      for (int64_t l = 0; l < dm.l; ++l) {
        const int64_t h = shapes[2 * l];
        const int64_t w = shapes[2 * l + 1];
        bases[l] = value + (n * dm.s + starts[l]) * pos_stride + m * dm.d;
        for (int64_t p = 0; p < dm.p; ++p) {
          const int64_t j = l * dm.p + p;
          corners[j] = msda_corners<acc_t>(loc_i[2 * j], loc_i[2 * j + 1], h, w);
          prefetch_corners<0, scalar_t, acc_t>(bases[l], pos_stride, corners[j], row_bytes);
        }
      }
      // pass 2: weighted bilinear samples, vectorised over D
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < dm.l; ++l) {
        for (int64_t p = 0; p < dm.p; ++p) {
          const int64_t j = l * dm.p + p;
          msda_accumulate_range<acc_t, scalar_t>(acc.data(), bases[l], pos_stride, corners[j], attn_i[j], dm.d);
        }
      }
      std::copy(acc.begin(), acc.end(), out + i * dm.d);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Dims& dm, int64_t chunk, int64_t n_chunks, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                     scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  using acc_t = scalar_t;
  const int64_t pos_stride = dm.m * dm.d;
  const int64_t lp = dm.l * dm.p;
  const int64_t part_loc = dm.n * dm.lq * dm.m * lp * 2;  // size of one chunk's partial grad_loc
  const int64_t part_attn = dm.n * dm.lq * dm.m * lp;
  // Task t = (n, m, chunk): owns grad_value[n, :, m, chunk*c0 : chunk*c0 + len] exclusively.
  // Static chunks (one contiguous run of heads per thread): handing out neighbouring heads dynamically made
  // two threads write interleaved 128-byte rows of grad_value and measured slower.
  at::parallel_for(0, dm.n * dm.m * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<MsdaCorners<acc_t>> corners(lp);
    std::vector<int64_t> offs(dm.l);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ck = t % n_chunks;
      const int64_t m = (t / n_chunks) % dm.m;
      const int64_t n = t / (n_chunks * dm.m);
      const int64_t d0 = ck * chunk;
      const int64_t len = std::min(dm.d, d0 + chunk) - d0;
      const int64_t row_bytes = std::min<int64_t>(len * static_cast<int64_t>(sizeof(scalar_t)), 256);
      scalar_t* gl_part = grad_loc + ck * part_loc;
      scalar_t* ga_part = grad_attn + ck * part_attn;
      for (int64_t l = 0; l < dm.l; ++l) offs[l] = (n * dm.s + starts[l]) * pos_stride + m * dm.d + d0;
      for (int64_t q = 0; q < dm.lq; ++q) {
        const int64_t i = (n * dm.lq + q) * dm.m + m;  // flattened (n, q, m)
        const scalar_t* loc_i = loc + i * lp * 2;
        const scalar_t* attn_i = attn + i * lp;
        const acc_t* g = grad_out + i * dm.d + d0;
        // pass 1: corners of every (level, point); value and grad_value rows prefetched
        for (int64_t l = 0; l < dm.l; ++l) {
          for (int64_t p = 0; p < dm.p; ++p) {
            const int64_t j = l * dm.p + p;
            corners[j] = msda_corners<acc_t>(loc_i[2 * j], loc_i[2 * j + 1], shapes[2 * l], shapes[2 * l + 1]);
            prefetch_corners<0, scalar_t, acc_t>(value + offs[l], pos_stride, corners[j], row_bytes);
            prefetch_corners<1, scalar_t, acc_t>(grad_value + offs[l], pos_stride, corners[j], row_bytes);
          }
        }
        // pass 2: grad_value scatter and the per-corner dot products, vectorised over the chunk's channels
        for (int64_t l = 0; l < dm.l; ++l) {
          for (int64_t p = 0; p < dm.p; ++p) {
            const int64_t j = l * dm.p + p;
            const acc_t a = attn_i[j];
            acc_t dot[4];
            msda_backward_range<acc_t, scalar_t>(g, value + offs[l], grad_value + offs[l], pos_stride, corners[j],
                                                 a, len, dot);
            acc_t ga = 0, gx = 0, gy = 0;
            msda_combine_grad<acc_t>(dot, corners[j], a, &ga, &gx, &gy);
            ga_part[i * lp + j] = ga;
            gl_part[(i * lp + j) * 2] = gx;
            gl_part[(i * lp + j) * 2 + 1] = gy;
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Dims dm = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor out = at::empty({dm.n, dm.lq, dm.m * dm.d}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    forward_kernel<scalar_t>(dm, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output_in) {
  const Dims dm = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output_in.dim() == 3 && grad_output_in.size(0) == dm.n && grad_output_in.size(1) == dm.lq &&
                  grad_output_in.size(2) == dm.m * dm.d,
              "grad_output must be [N, Lq, M*D] = [", dm.n, ", ", dm.lq, ", ", dm.m * dm.d, "], got ",
              grad_output_in.sizes());
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  // Split the channels only when (n, m) pairs alone leave threads idle: aim for >= 4 tasks per thread,
  // chunks of at least 8 channels (one AVX2 fp32 vector).
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = std::max<int64_t>(1, dm.n * dm.m);
  int64_t n_chunks = std::min<int64_t>((4 * threads + pairs - 1) / pairs, (dm.d + 7) / 8);
  n_chunks = std::max<int64_t>(1, n_chunks);
  const int64_t chunk = std::max<int64_t>(1, (dm.d + n_chunks - 1) / n_chunks);
  n_chunks = std::max<int64_t>(1, (dm.d + chunk - 1) / chunk);

  at::Tensor grad_value = at::zeros_like(value);
  // Per-chunk partial gradients [C, N, Lq, M, L, P(, 2)], summed over C below (C == 1: a free view).
  at::Tensor grad_loc = at::empty({n_chunks, dm.n, dm.lq, dm.m, dm.l, dm.p, 2}, value.options());
  at::Tensor grad_attn = at::empty({n_chunks, dm.n, dm.lq, dm.m, dm.l, dm.p}, value.options());
  if (dm.d == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    backward_kernel<scalar_t>(dm, chunk, n_chunks, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>());
  });
  if (n_chunks == 1) {
    return {grad_value, grad_loc.select(0, 0), grad_attn.select(0, 0)};
  }
  return {grad_value, grad_loc.sum(0), grad_attn.sum(0)};
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reltag multi-scale deformable attention, C++ CPU kernel";
  m.def("forward", &ms_deform_attn_cpu_forward, "MSDA forward (CPU, fp32/fp64)");
  m.def("backward", &ms_deform_attn_cpu_backward, "MSDA backward (CPU, fp32/fp64) -> grad value, loc, attn");
  m.def("built_with_openmp", &built_with_openmp, "whether at::parallel_for runs in parallel in this build");
}
