#pragma once
// Argument checks of the in-batch loss ops shared by every backend. The Python wrappers raise
// the user-facing ValueError/TypeError first; these guard direct torch.ops calls.
#include <ATen/ATen.h>

#include <cmath>

namespace vse {

inline void check_pair_args(const char* op, const at::Tensor& img, const at::Tensor& txt,
                            const at::Tensor& labels, int64_t row_chunk, int64_t col_chunk) {
  TORCH_CHECK(img.dim() == 2 && txt.dim() == 2, op, ": img and txt must be 2-D");
  TORCH_CHECK(img.sizes() == txt.sizes(), op, ": img and txt must have the same shape [N, D]");
  TORCH_CHECK(img.scalar_type() == txt.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(img.device() == txt.device(), op, ": img and txt must be on the same device");
  TORCH_CHECK(at::isFloatingType(img.scalar_type()), op, ": img and txt must be floating point");
  TORCH_CHECK(row_chunk >= 1 && col_chunk >= 1, op, ": chunks must be >= 1");
  if (labels.numel() > 0) {
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == img.size(0), op,
                ": labels must be 1-D with one entry per pair");
    TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64");
    TORCH_CHECK(labels.device() == img.device(), op, ": labels must be on the device of img and txt");
  }
}

// A number option of the op `op`: finite, and > 0 when `positive`, else a ValueError worded as
// the Python wrappers' (vse_cuda/_validation.py check_finite). Under torch.compile the wrappers
// leave the value to the op (a raise while tracing would end the trace), so this is the check
// a compiled call meets.
inline double checked_option(const char* op, const char* name, double value, bool positive = false) {
  TORCH_CHECK_VALUE(std::isfinite(value), op, ": ", name, " must be finite, got ", value);
  TORCH_CHECK_VALUE(!positive || value > 0, op, ": ", name, " must be > 0, got ", value);
  return value;
}

// The value of a 0-dim floating tensor option (a learnable temperature or bias may live on the
// GPU: reading it here, inside the op, keeps torch.compile's graph whole; on CUDA it waits for
// the value), checked as checked_option.
inline double checked_scalar(const char* op, const char* name, const at::Tensor& value, bool positive) {
  TORCH_CHECK_TYPE(value.dim() == 0 && at::isFloatingType(value.scalar_type()), op, ": ", name,
                   " must be a 0-dim floating-point tensor");
  return checked_option(op, name, value.item<double>(), positive);
}

// The state a forward op saved for its backward: [N, width] in the accumulate type.
inline void check_saved(const char* op, const char* name, const at::Tensor& saved, int64_t n,
                        int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == n && saved.size(1) == width, op, ": ", name,
              " must have shape [", n, ", ", width, "]");
  TORCH_CHECK(saved.scalar_type() == dtype, op, ": ", name, " must be ", dtype);
}

// A tensor a backward takes besides the inputs (saved state, index lists) is on their device.
inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& img) {
  TORCH_CHECK(t.device() == img.device(), op, ": ", name, " must be on ", img.device(), ", got ", t.device());
}

}  // namespace vse
