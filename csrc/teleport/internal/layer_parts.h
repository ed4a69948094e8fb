#pragma once
// Not installed: which LibTorch modules are layers the actions reach, and the
// tensors each computes with, in one place (layers.cpp, discover.cpp,
// batch_loss.cpp and optimizer.cpp read a module through it).

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace teleport::detail {

struct LayerParts {
  enum class Kind { kLinear, kConv, kBatchNorm, kLayerNorm };
  Kind kind = Kind::kLinear;
  at::Tensor weight, bias;  // a norm's are undefined without affine parameters
  std::string what;         // the module's kind for messages: "Linear", "Conv2d", ...
  bool channels = false;    // its outputs are channels (dim 1): a Conv, a BatchNorm2d/3d
  int64_t groups = 1;       // a Conv's
  std::vector<int64_t> normalized_shape;  // a LayerNorm's
};

// The parts of a Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d or LayerNorm;
// nothing for any other module.
std::optional<LayerParts> layer_parts(const torch::nn::Module& m);

}  // namespace teleport::detail
