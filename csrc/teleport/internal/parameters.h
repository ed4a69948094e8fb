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

/// The distinct parameters of `symmetries`, in first-seen order.
std::vector<at::Tensor> distinct_parameters(const SymmetryList& symmetries);

/// How many of a symmetry's parameters it acts on by rows (dimension 0): a
/// LayerSymmetry says; otherwise all but the last. The rest it acts on by
/// columns (dimension 1).
size_t row_tensors(const Symmetry& symmetry);

/// Where each symmetry's parameters sit in `params`.
std::vector<std::vector<size_t>> positions(const SymmetryList& symmetries,
                                           const std::vector<at::Tensor>& params);

/// Which symmetry acts on which side of which tensor, computed once per
/// teleport: the distinct parameters, each symmetry's positions among them,
/// and for each parameter the layer symmetry acting on its rows (outputs) and
/// on its columns (inputs), -1 for none.
struct Roles {
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> where;
  std::vector<int> rows, columns;
};

/// The roles of `symmetries`. Throws unless every tensor is acted on at most
/// once per side by the layer symmetries, and no symmetry acts twice on one
/// tensor: a symmetry declared twice, or a layer used twice (tied weights), is
/// no symmetry. `who` starts the message.
Roles roles_of(const SymmetryList& symmetries, const char* who);

}  // namespace teleport::detail
