#include <teleport/layers.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <string>
#include <utility>

namespace teleport {
namespace detail {
namespace {

struct Layer {
  at::Tensor weight, bias;
  std::string what;
};

template <typename Conv>
Layer conv_layer(const Conv& conv, const std::string& what) {
  TORCH_CHECK(conv.options.groups() == 1, "teleport: expected a convolution with groups = 1, got ",
              what, " with groups = ", conv.options.groups(),
              " (grouped convolutions are not supported)");
  return {conv.weight, conv.bias, what};
}

Layer layer_of(const std::shared_ptr<torch::nn::Module>& m) {
  TORCH_CHECK(m != nullptr, "teleport: expected a layer, got an empty module holder");
  if (const auto* l = m->as<torch::nn::Linear>()) return {l->weight, l->bias, "Linear"};
  if (const auto* c = m->as<torch::nn::Conv1d>()) return conv_layer(*c, "Conv1d");
  if (const auto* c = m->as<torch::nn::Conv2d>()) return conv_layer(*c, "Conv2d");
  if (const auto* c = m->as<torch::nn::Conv3d>()) return conv_layer(*c, "Conv3d");
  TORCH_CHECK(false, "teleport: expected a torch::nn::Linear or Conv1d/Conv2d/Conv3d, got ",
              m->name());
}

}  // namespace

std::shared_ptr<Symmetry> layer_symmetry(SymmetryKind kind,
                                         const std::shared_ptr<torch::nn::Module>& a,
                                         const std::shared_ptr<torch::nn::Module>& b) {
  const Layer in = layer_of(a), out = layer_of(b);
  const std::string name = std::string(kind == SymmetryKind::kScaling ? "scaling" : "gl") + "(" +
                           in.what + " " + std::to_string(in.weight.size(0)) + " -> " + out.what +
                           ")";
  return std::make_shared<LayerSymmetry>(kind, in.weight, in.bias, out.weight, name);
}

}  // namespace detail
}  // namespace teleport
