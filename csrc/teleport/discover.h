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

/// The symmetries of a torch::nn::Sequential of Linear layers and elementwise
/// activations, one per hidden layer between two Linear layers:
///  - nothing, Identity or Flatten between them: GL(n);
///  - ReLU, LeakyReLU (any slope) or Dropout among them: positive scaling;
///    with `data_dependent`, a LeakyReLU alone: the data-dependent GL(n);
///  - any other module: none (a note says which module).
/// Modules before the first and after the last Linear layer do not matter.
Discovery discover(const torch::nn::Sequential& model, const DiscoverOptions& options = {});

}  // namespace teleport
