#pragma once
// Not installed: small helpers of the symmetries' sources (symmetry.cpp,
// data_dependent_gl.cpp, attention.cpp).

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

// Throws unless `params` kept the shapes recorded when the symmetry `name`
// was made, and one device and dtype.
inline void check_kept(const std::vector<at::Tensor>& params,
                       const std::vector<std::vector<int64_t>>& shapes, const std::string& name) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].sizes().vec() == shapes[i], name,
                ": its parameters were resized after it was made: expected ",
                at::IntArrayRef(shapes[i]), ", got ", shape_of(params[i]));
    TORCH_CHECK(params[i].device() == params[0].device() &&
                    params[i].scalar_type() == params[0].scalar_type(),
                name, ": expected all parameters on one device with one dtype (",
                params[0].device(), ", ", params[0].scalar_type(), "), got ", params[i].device(),
                ", ", params[i].scalar_type());
  }
}

}  // namespace teleport::detail
