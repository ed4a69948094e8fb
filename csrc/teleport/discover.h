#pragma once

#include <teleport/symmetry.h>

#include <torch/arg.h>
#include <torch/nn/modules/container/sequential.h>

#include <string>
#include <vector>

namespace teleport {

struct DiscoverOptions {
  /// GL(n) where nothing nonlinear stands between two Linear layers; when
  /// false, the scaling subgroup there too.
  TORCH_ARG(bool, linear_gl) = true;
  /// The paper's data-dependent GL(n) across a lone LeakyReLU, instead of
  /// scaling (exact only on batches no larger than the layer's input width).
  TORCH_ARG(bool, data_dependent) = false;
};

/// The symmetries found in a model, and a note for every pair of Linear layers
/// that got none (which module broke the chain, and why).
struct Discovery {
  SymmetryList symmetries;
  std::vector<std::string> notes;
};

/// The symmetries of a torch::nn::Sequential (nested Sequentials expanded), one
/// per pair of consecutive layers (Linear, or Conv1d/2d/3d of groups 1):
///  - only Identity, Flatten, AvgPool or AdaptiveAvgPool between them: GL(n);
///  - ReLU, LeakyReLU (any slope), Dropout/Dropout2d/3d, MaxPool or
///    AdaptiveMaxPool among them: positive scaling; with `data_dependent`, a
///    LeakyReLU alone between two Linear layers: the data-dependent GL(n);
///  - a Conv followed by a Linear needs a Flatten between them: each channel
///    then owns a block of the Linear's columns;
///  - any other module (BatchNorm among them), a grouped convolution, a Linear
///    before a Conv, or shapes that do not fit: none, and a note says why;
///  - a layer whose tensors the action would move are frozen (requires_grad
///    false), or a layer that stands twice in the chain (tied weights): none
///    for the pairs it belongs to, and a note says why.
/// Modules before the first and after the last layer do not matter.
Discovery discover(const torch::nn::Sequential& model, const DiscoverOptions& options = {});

}  // namespace teleport
