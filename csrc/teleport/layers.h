#pragma once

#include <teleport/symmetry.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>

namespace teleport {
namespace detail {
/// The symmetry of `kind` between two layers, each a torch::nn::Linear or
/// Conv1d/2d/3d (groups = 1), `b` taking `a`'s outputs. Throws for any other
/// module and for shapes that do not fit (expected/got).
std::shared_ptr<Symmetry> layer_symmetry(SymmetryKind kind,
                                         const std::shared_ptr<torch::nn::Module>& a,
                                         const std::shared_ptr<torch::nn::Module>& b);
}  // namespace detail

/// Positive scaling of the outputs of layer `a` (rows of a Linear, output
/// channels of a Conv) undone on the inputs of `b`: exact when only ReLU,
/// LeakyReLU, MaxPool, Dropout/Dropout2d/3d, Flatten or Identity stand between
/// them. A Linear after a flattened Conv undoes it on each channel's block of
/// columns. For a custom Module, one line per pair of layers:
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

/// The full GL(n) on the outputs of `a` and the inputs of `b`: exact only
/// when nothing nonlinear stands between them (Identity, Flatten, AvgPool,
/// AdaptiveAvgPool, or nothing: maps that are linear per channel).
template <typename A, typename B>
std::shared_ptr<Symmetry> gl(const torch::nn::ModuleHolder<A>& a,
                             const torch::nn::ModuleHolder<B>& b) {
  return detail::layer_symmetry(SymmetryKind::kLinearGL, a.ptr(), b.ptr());
}

}  // namespace teleport
