#pragma once

#include <teleport/symmetry.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <initializer_list>
#include <memory>
#include <vector>

namespace teleport {

/// A layer named in a braced list of scaling(): any torch::nn module holder.
class LayerRef {
 public:
  template <typename M>
  LayerRef(const torch::nn::ModuleHolder<M>& m) : module_(m.ptr()) {}  // NOLINT: implicit
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
};

namespace detail {
/// What scaling() and gl() build; shapes checked (expected/got).
std::shared_ptr<Symmetry> layer_symmetry(SymmetryKind kind,
                                         const std::shared_ptr<torch::nn::Module>& a,
                                         const std::shared_ptr<torch::nn::Module>& b);
std::shared_ptr<Symmetry> stream_symmetry(const std::vector<LayerRef>& writers,
                                          const std::vector<LayerRef>& readers);
}  // namespace detail

/// Positive scaling of the outputs of layer `a` (rows of a Linear, output
/// channels of a Conv, the affine weight and bias of a BatchNorm or of a
/// LayerNorm over the last dimension, whose readers must be Linear) undone on
/// the inputs of `b`: exact when only ReLU, LeakyReLU, MaxPool, AvgPool,
/// Dropout, Flatten or Identity stand between them. A Linear after a flattened
/// Conv undoes it on each channel's block of columns. For a custom Module:
///
///   teleport::SymmetryList syms{teleport::scaling(net->conv1, net->conv2),
///                               teleport::scaling(net->conv2, net->fc1)};
///
/// `a` and `b` are module holders (torch::nn::Linear, torch::nn::Conv2d, ...).
template <typename A, typename B>
std::shared_ptr<Symmetry> scaling(const torch::nn::ModuleHolder<A>& a,
                                  const torch::nn::ModuleHolder<B>& b) {
  return detail::layer_symmetry(SymmetryKind::kScaling, a.ptr(), b.ptr());
}

/// The scaling of a residual stream (docs/design.md §2): every writer's
/// outputs (Linear, Conv, affine BatchNorm) by g, every reader's inputs
/// (Linear, Conv) by g⁻¹; all of one width n.
///
///   teleport::scaling({net->bn0, net->block1->bn2}, {net->block1->conv1, net->block2->conv1});
inline std::shared_ptr<Symmetry> scaling(std::initializer_list<LayerRef> writers,
                                         std::initializer_list<LayerRef> readers) {
  return detail::stream_symmetry(writers, readers);
}

/// The full GL(n) on the outputs of `a` and the inputs of `b`: exact only when
/// what stands between them is linear per channel (Identity, Flatten, AvgPool).
template <typename A, typename B>
std::shared_ptr<Symmetry> gl(const torch::nn::ModuleHolder<A>& a,
                             const torch::nn::ModuleHolder<B>& b) {
  return detail::layer_symmetry(SymmetryKind::kLinearGL, a.ptr(), b.ptr());
}

}  // namespace teleport
