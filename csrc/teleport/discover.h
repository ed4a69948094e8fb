#pragma once

#include <teleport/symmetry.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include <string>
#include <vector>

namespace teleport {

struct DiscoverOptions {
  /// GL(n) where nothing nonlinear stands between two layers (else scaling).
  TORCH_ARG(bool, linear_gl) = true;
  /// The paper's data-dependent GL(n) across a lone LeakyReLU, not scaling.
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
///  - ReLU, LeakyReLU, Dropout or MaxPool among them: positive scaling (with
///    `data_dependent`, a lone LeakyReLU between Linears: the data-dependent GL);
///  - an affine BatchNorm counts as a layer whose outputs are scaled through its
///    weight and bias (positive scaling only); a layer feeding it gets none;
///  - a Conv before a Linear needs a Flatten: each channel owns a block of columns;
///  - any other module, a grouped convolution, a Linear before a Conv, shapes
///    that do not fit, frozen tensors or tied weights: none, and a note says why.
Discovery discover(const torch::nn::Sequential& model, const DiscoverOptions& options = {});

/// The symmetries of any module tree, e.g. `teleport::discover(*net)`:
///  - every Sequential: its chain as above (assuming its parent runs it as a
///    whole: what forward() does with it is not known from the tree);
///  - every MultiheadAttention: teleport::attention()'s groups;
///  - every TransformerEncoderLayer / DecoderLayer: its attentions and, with
///    ReLU, the scaling of its feed-forward block;
///  - anything else: its children. notes() names what got nothing and why (a
///    GELU feed-forward, a LayerNorm whose readers the tree does not tell, a
///    Linear outside a Sequential, frozen projections).
Discovery discover(const torch::nn::Module& model, const DiscoverOptions& options = {});

}  // namespace teleport
