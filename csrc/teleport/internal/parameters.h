#pragma once
// Not installed: the symmetries' parameters, distinct, their roles checked,
// copied and restored (internal/parameters.cpp).

#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <vector>

namespace teleport::detail {

/// Copies of parameters and their gradients, restored bitwise on demand.
class Snapshot {
 public:
  explicit Snapshot(std::vector<at::Tensor> params);
  void restore() const;

 private:
  std::vector<at::Tensor> params_, values_, grads_;
};

/// Throws unless every tensor is acted on at most once per side (rows,
/// columns) by the layer symmetries, and no symmetry acts twice on one tensor:
/// a symmetry declared twice, or a layer used twice (tied weights), is no
/// symmetry. `who` starts the message.
void check_roles(const SymmetryList& symmetries, const char* who);

/// The distinct parameters of `symmetries`, in first-seen order.
std::vector<at::Tensor> distinct_parameters(const SymmetryList& symmetries);

}  // namespace teleport::detail
