#include <teleport/discover.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <memory>

namespace teleport {
namespace {

// What the modules between two Linear layers allow.
enum class Allows { kGL, kScaling, kNothing };

Allows allows(const torch::nn::Module& m) {
  if (m.as<torch::nn::Identity>() || m.as<torch::nn::Flatten>()) return Allows::kGL;
  if (m.as<torch::nn::ReLU>() || m.as<torch::nn::LeakyReLU>()) return Allows::kScaling;
  // A dropout mask is diagonal: it commutes with diagonal g only.
  if (m.as<torch::nn::Dropout>()) return Allows::kScaling;
  return Allows::kNothing;
}

Allows narrower(Allows a, Allows b) { return a > b ? a : b; }

}  // namespace

Discovery discover(const torch::nn::Sequential& model, const DiscoverOptions& options) {
  TORCH_CHECK(!model.is_empty(), "discover: expected a Sequential, got an empty holder");
  Discovery found;
  torch::nn::LinearImpl* previous = nullptr;
  size_t previous_index = 0;
  Allows between = Allows::kGL;
  std::string breaker;
  // The lone LeakyReLU between two Linear layers, if that is all there is.
  const torch::nn::LeakyReLUImpl* leaky = nullptr;
  int nonlinear = 0;

  for (size_t i = 0; i < model->size(); ++i) {
    const auto module = model->ptr(i);
    auto* linear = module->as<torch::nn::Linear>();
    if (linear == nullptr) {
      const Allows a = allows(*module);
      if (a != Allows::kGL) ++nonlinear;
      if (auto* l = module->as<torch::nn::LeakyReLU>()) leaky = l;
      if (a == Allows::kNothing && breaker.empty()) {
        breaker = "module " + std::to_string(i) + " (" + module->name() + ")";
      }
      between = narrower(between, a);
      continue;
    }
    if (previous != nullptr) {
      const std::string pair =
          "layers " + std::to_string(previous_index) + " and " + std::to_string(i);
      if (between == Allows::kNothing) {
        found.notes.push_back("no symmetry between " + pair + ": " + breaker +
                              " is not known to commute with any supported group");
      } else if (linear->weight.size(1) != previous->weight.size(0)) {
        found.notes.push_back("no symmetry between " + pair + ": the second takes " +
                              std::to_string(linear->weight.size(1)) +
                              " features, the first gives " +
                              std::to_string(previous->weight.size(0)));
      } else if (options.data_dependent() && leaky != nullptr && nonlinear == 1 &&
                 leaky->options.negative_slope() > 0) {
        found.symmetries.push_back(std::make_shared<DataDependentGL>(
            leaky->options.negative_slope(), previous->weight, previous->bias, linear->weight,
            "data-dependent gl(" + pair + ")"));
      } else {
        const SymmetryKind kind = (between == Allows::kGL && options.linear_gl())
                                      ? SymmetryKind::kLinearGL
                                      : SymmetryKind::kScaling;
        const std::string name =
            std::string(kind == SymmetryKind::kLinearGL ? "gl" : "scaling") + "(" + pair + ")";
        found.symmetries.push_back(std::make_shared<LayerSymmetry>(
            kind, previous->weight, previous->bias, linear->weight, name));
      }
    }
    previous = linear;
    previous_index = i;
    between = Allows::kGL;
    breaker.clear();
    leaky = nullptr;
    nonlinear = 0;
  }
  return found;
}

}  // namespace teleport
