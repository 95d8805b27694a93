// Torch glue of the CUDA kernels: checks, allocation, dtype codes, then the C launchers of
// ms_deform_attn_cuda.cu. Host compiler only; needs no CUDA headers (the stream comes from Python as an
// integer, torch.cuda.current_stream().cuda_stream).

#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <vector>

#include "ms_deform_attn_cuda.h"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return MSDA_FLOAT32;
    case at::kDouble:
      return MSDA_FLOAT64;
    case at::kHalf:
      return MSDA_FLOAT16;
    case at::kBFloat16:
      return MSDA_BFLOAT16;
    default:
      TORCH_CHECK(false, "ms_deform_attn CUDA kernel supports float32, float64, float16, bfloat16; got ", t);
  }
  return -1;
}

MsdaSizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4 && sampling_locations.dim() == 6 && attention_weights.dim() == 5,
              "ms_deform_attn CUDA: value ", value.sizes(), ", sampling_locations ", sampling_locations.sizes(),
              ", attention_weights ", attention_weights.sizes(), " have the wrong ranks");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_cuda(), "ms_deform_attn CUDA kernel got a tensor on ", t->device());
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn CUDA: tensors on ", t->device(), " and ",
                value.device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn CUDA kernel needs contiguous inputs");
  }
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share a dtype");
  MsdaSizes sz{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(3),
               sampling_locations.size(4), sampling_locations.size(1)};
  TORCH_CHECK(sampling_locations.size(0) == sz.n && sampling_locations.size(2) == sz.m &&
                  sampling_locations.size(5) == 2 && attention_weights.size(0) == sz.n &&
                  attention_weights.size(1) == sz.lq && attention_weights.size(2) == sz.m &&
                  attention_weights.size(3) == sz.l && attention_weights.size(4) == sz.p,
              "ms_deform_attn CUDA: inconsistent shapes value ", value.sizes(), ", sampling_locations ",
              sampling_locations.sizes(), ", attention_weights ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.size(0) == sz.l && level_start_index.size(0) == sz.l,
              "ms_deform_attn CUDA: spatial_shapes / level_start_index do not have L = ", sz.l, " rows");
  return sz;
}

void check_status(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", msda_cuda_error_string(code));
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights, int64_t stream) {
  const MsdaSizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  c10::DeviceGuard guard(value.device());
  at::Tensor out = at::zeros({sz.n, sz.lq, sz.m * sz.d}, value.options());
  check_status(msda_cuda_forward(dtype_code(value.scalar_type()), sz, value.data_ptr(),
                                 spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                                 sampling_locations.data_ptr(), attention_weights.data_ptr(), out.data_ptr(),
                                 reinterpret_cast<void*>(stream)),
               "msda_cuda_forward");
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output_in,
                                 int64_t stream) {
  const MsdaSizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output_in.dim() == 3 && grad_output_in.size(0) == sz.n && grad_output_in.size(1) == sz.lq &&
                  grad_output_in.size(2) == sz.m * sz.d,
              "grad_output must be [N, Lq, M*D], got ", grad_output_in.sizes());
  c10::DeviceGuard guard(value.device());
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  // fp16 / bf16 accumulate grad_value in fp32 (atomicAdd into 16-bit would lose most of the sum).
  const at::ScalarType acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  check_status(msda_cuda_backward(dtype_code(value.scalar_type()), sz, value.data_ptr(),
                                  spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                                  sampling_locations.data_ptr(), attention_weights.data_ptr(),
                                  grad_output.data_ptr(), grad_value.data_ptr(), grad_loc.data_ptr(),
                                  grad_attn.data_ptr(), reinterpret_cast<void*>(stream)),
               "msda_cuda_backward");
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reltag multi-scale deformable attention, CUDA kernel glue";
  m.def("forward", &forward, "MSDA forward (CUDA)");
  m.def("backward", &backward, "MSDA backward (CUDA) -> grad value, loc, attn");
}
