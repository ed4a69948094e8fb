#pragma once
// Not installed: small helpers of the symmetries' sources (symmetry.cpp,
// data_dependent_gl.cpp).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace teleport::detail {

// A rows × cols double tensor (CPU) holding `values`, row-major.
inline at::Tensor host_matrix(const std::vector<double>& values, int64_t rows, int64_t cols) {
  at::Tensor t = at::empty({rows, cols}, at::TensorOptions().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), t.data_ptr<double>());
  return t;
}

// A tensor's sizes as text, for messages.
inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace teleport::detail
