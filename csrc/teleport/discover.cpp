#include <teleport/attention.h>
#include <teleport/discover.h>
#include <teleport/internal/layer_parts.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/modules/transformerlayer.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace teleport {
namespace {

using torch::nn::Module;

// What the modules between two layers allow.
enum class Allows { kGL, kScaling, kNothing };

Allows allows(const Module& m) {
  // Linear per channel: any g commutes with them.
  if (m.as<torch::nn::Identity>() || m.as<torch::nn::Flatten>() || m.as<torch::nn::AvgPool1d>() ||
      m.as<torch::nn::AvgPool2d>() || m.as<torch::nn::AvgPool3d>() ||
      m.as<torch::nn::AdaptiveAvgPool1d>() || m.as<torch::nn::AdaptiveAvgPool2d>() ||
      m.as<torch::nn::AdaptiveAvgPool3d>()) {
    return Allows::kGL;
  }
  // Positively homogeneous per channel, or a diagonal mask: positive diagonal g only.
  if (m.as<torch::nn::ReLU>() || m.as<torch::nn::LeakyReLU>() || m.as<torch::nn::Dropout>() ||
      m.as<torch::nn::Dropout2d>() || m.as<torch::nn::Dropout3d>() ||
      m.as<torch::nn::MaxPool1d>() || m.as<torch::nn::MaxPool2d>() ||
      m.as<torch::nn::MaxPool3d>() || m.as<torch::nn::AdaptiveMaxPool1d>() ||
      m.as<torch::nn::AdaptiveMaxPool2d>() || m.as<torch::nn::AdaptiveMaxPool3d>()) {
    return Allows::kScaling;
  }
  return Allows::kNothing;
}

bool is_batch_norm(const Module& m) {
  const auto parts = detail::layer_parts(m);
  return parts && parts->kind == detail::LayerParts::Kind::kBatchNorm;
}

Allows narrower(Allows a, Allows b) { return a > b ? a : b; }

// A layer the group acts between: a Linear or a Conv of groups 1.
struct Layer {
  at::Tensor weight, bias;
  bool conv = false;
  int64_t groups = 1;
  bool batch_norm = false;  // an affine BatchNorm: a writer only
};

// A LayerNorm is no layer of a chain (it normalises over the features, and
// no group commutes with that); a BatchNorm without affine weights has
// nothing to scale.
bool layer_of(const Module& m, Layer& out) {
  using Kind = detail::LayerParts::Kind;
  const auto parts = detail::layer_parts(m);
  if (!parts || parts->kind == Kind::kLayerNorm || !parts->weight.defined()) return false;
  out = {parts->weight, parts->bias, parts->channels, parts->groups,
         parts->kind == Kind::kBatchNorm};
  return true;
}

bool trains(const at::Tensor& t) { return !t.defined() || t.requires_grad(); }

// Whether the symmetry would move a tensor that does not train: the weight,
// and the bias where the action touches it (the first layer's).
bool frozen(const Layer& l, bool with_bias) {
  return !trains(l.weight) || (with_bias && !trains(l.bias));
}

// The modules of a Sequential in order, nested Sequentials expanded, each with
// its path ("3" or "2.1").
void leaves(const torch::nn::SequentialImpl& seq, const std::string& prefix,
            std::vector<std::pair<std::string, std::shared_ptr<Module>>>& out) {
  for (size_t i = 0; i < seq.size(); ++i) {
    const auto module = seq.ptr(i);
    const std::string path = prefix + std::to_string(i);
    if (const auto* nested = module->as<torch::nn::Sequential>()) {
      leaves(*nested, path + ".", out);
    } else {
      out.emplace_back(path, module);
    }
  }
}

// The modules that stand more than once in the chain (tied weights): an
// action on one use changes the others, so no pair that touches them is a
// symmetry.
std::vector<const Module*> tied_modules(
    const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& modules) {
  std::vector<const Module*> tied;
  for (size_t i = 0; i < modules.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (modules[i].second.get() == modules[j].second.get())
        tied.push_back(modules[i].second.get());
    }
  }
  return tied;
}

// Why layers `a` (at `a_path`) and `b` (at `b_path`), with only modules that
// allow some group between them, carry no symmetry; "" when they do.
std::string no_symmetry_reason(const Layer& a, const Layer& b, const std::string& a_path,
                               const std::string& b_path, bool a_tied, bool b_tied,
                               bool flattened) {
  const int64_t n = a.weight.size(0);
  if (a_tied || b_tied) {
    return "layer " + (a_tied ? a_path : b_path) +
           " is used more than once in the model (tied weights): an action on one use "
           "changes the others";
  }
  if (frozen(a, /*with_bias=*/true) || frozen(b, /*with_bias=*/false)) {
    return "layer " + (frozen(a, true) ? a_path : b_path) +
           " is frozen (requires_grad is false): a frozen tensor is never moved";
  }
  if (b.batch_norm) {
    return "a layer feeding a BatchNorm is scale-invariant in train mode (the BatchNorm "
           "renormalises): a different group, not teleported (docs/design.md §2)";
  }
  if (a.groups != 1 || b.groups != 1) return "a grouped convolution (groups > 1) is not supported";
  if (!a.conv && b.conv && !a.batch_norm) {
    return "a Linear before a Conv (its outputs are not channels)";
  }
  if (a.conv && !b.conv && !flattened) {
    return "a Conv before a Linear with no Flatten between (the Linear acts on the last "
           "dimension, not the channels)";
  }
  if (a.conv && !b.conv ? b.weight.size(1) % n != 0 : b.weight.size(1) != n) {
    return "the second takes " + std::to_string(b.weight.size(1)) + " features, the first gives " +
           std::to_string(n);
  }
  return "";
}

// The chain of one Sequential, its paths after `prefix`, into `found`.
void discover_chain(const torch::nn::SequentialImpl& model, const std::string& prefix,
                    const DiscoverOptions& options, Discovery& found) {
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> modules;
  leaves(model, prefix, modules);

  const std::vector<const Module*> tied = tied_modules(modules);
  auto is_tied = [&tied](const Module* m) {
    return std::find(tied.begin(), tied.end(), m) != tied.end();
  };

  Layer previous;
  const Module* previous_module = nullptr;
  bool have_previous = false;
  std::string previous_path;
  Allows between = Allows::kGL;
  std::string breaker;
  bool flattened = false;
  // The lone LeakyReLU between two Linear layers, if that is all there is.
  const torch::nn::LeakyReLUImpl* leaky = nullptr;
  int nonlinear = 0;

  for (const auto& [path, module] : modules) {
    Layer layer;
    if (!layer_of(*module, layer)) {
      const Allows a = allows(*module);
      if (a != Allows::kGL) ++nonlinear;
      if (auto* l = module->as<torch::nn::LeakyReLU>()) leaky = l;
      if (module->as<torch::nn::Flatten>()) flattened = true;
      if (a == Allows::kNothing && breaker.empty()) {
        breaker = "module " + path + " (" + module->name() + ")" +
                  (is_batch_norm(*module)
                       ? " is a BatchNorm without affine weights (nothing to scale; it makes "
                         "the layer before it scale-invariant, a different group)"
                       : " is not known to commute with any supported group");
      }
      between = narrower(between, a);
      continue;
    }
    if (have_previous) {
      const std::string pair = "layers " + previous_path + " and " + path;
      const std::string why =
          between == Allows::kNothing
              ? breaker
              : no_symmetry_reason(previous, layer, previous_path, path, is_tied(previous_module),
                                   is_tied(module.get()), flattened);
      if (!why.empty()) {
        found.notes.push_back("no symmetry between " + pair + ": " + why);
      } else if (options.data_dependent() && !previous.conv && !layer.conv &&
                 !previous.batch_norm && leaky != nullptr && nonlinear == 1 &&
                 leaky->options.negative_slope() > 0) {
        found.symmetries.push_back(std::make_shared<DataDependentGL>(
            leaky->options.negative_slope(), previous.weight, previous.bias, layer.weight,
            "data-dependent gl(" + pair + ")"));
      } else {
        const SymmetryKind kind =
            (between == Allows::kGL && options.linear_gl() && !previous.batch_norm)
                ? SymmetryKind::kLinearGL
                : SymmetryKind::kScaling;
        const std::string name =
            std::string(kind == SymmetryKind::kLinearGL ? "gl" : "scaling") + "(" + pair + ")";
        found.symmetries.push_back(std::make_shared<LayerSymmetry>(
            kind, previous.weight, previous.bias, layer.weight, name));
      }
    }
    previous = layer;
    previous_module = module.get();
    have_previous = true;
    previous_path = path;
    between = Allows::kGL;
    breaker.clear();
    flattened = false;
    leaky = nullptr;
    nonlinear = 0;
  }
}

// The groups of one attention, or a note saying why none.
void discover_attention(const Module& m, const std::string& path, Discovery& found) {
  const auto* mha = m.as<torch::nn::MultiheadAttention>();
  if (!trains(mha->in_proj_weight) || !trains(mha->in_proj_bias) ||
      !trains(mha->out_proj->weight)) {
    found.notes.push_back("no attention symmetry in " + path +
                          ": its projections are frozen (requires_grad is false)");
    return;
  }
  try {
    for (auto& s : detail::attention_symmetries(m, "attention " + path))
      found.symmetries.push_back(std::move(s));
  } catch (const c10::Error& e) {
    found.notes.push_back("no attention symmetry in " + path + ": " + e.what_without_backtrace());
  }
}

// A transformer layer's attentions and, with ReLU, its feed-forward scaling
// (linear1 -> ReLU -> dropout -> linear2). Its LayerNorms also feed the
// residual stream: no scaling there.
template <typename LayerImpl>
void discover_transformer_layer(const LayerImpl& layer, const std::string& path, Discovery& found) {
  for (const auto& child : layer.named_children()) {
    if (child.value()->template as<torch::nn::MultiheadAttention>())
      discover_attention(*child.value(), path + "." + child.key(), found);
  }
  const std::string ffn = path + ".linear1 -> " + path + ".linear2";
  if (layer.options.activation().index() != 0) {  // kReLU is the variant's first
    found.notes.push_back("no scaling in the feed-forward block " + ffn +
                          ": its activation is not ReLU (GELU or a custom function is not "
                          "positively homogeneous)");
  } else if (!trains(layer.linear1->weight) || !trains(layer.linear1->bias) ||
             !trains(layer.linear2->weight)) {
    found.notes.push_back("no scaling in " + ffn + ": frozen (requires_grad is false)");
  } else {
    found.symmetries.push_back(std::make_shared<LayerSymmetry>(
        SymmetryKind::kScaling, layer.linear1->weight, layer.linear1->bias, layer.linear2->weight,
        "scaling(" + ffn + ")"));
  }
  found.notes.push_back("no scaling after the LayerNorms of " + path +
                        ": their outputs feed the residual stream, not only Linear layers");
}

void walk(const Module& m, const std::string& path, const DiscoverOptions& options,
          Discovery& found) {
  const std::string prefix = path.empty() ? "" : path + ".";
  const std::string here = path.empty() ? "the model" : path;
  if (const auto* seq = m.as<torch::nn::Sequential>()) {
    discover_chain(*seq, prefix, options, found);
  } else if (m.as<torch::nn::MultiheadAttention>()) {
    discover_attention(m, here, found);
  } else if (const auto* l = m.as<torch::nn::TransformerEncoderLayer>()) {
    discover_transformer_layer(*l, here, found);
  } else if (const auto* l = m.as<torch::nn::TransformerDecoderLayer>()) {
    discover_transformer_layer(*l, here, found);
  } else if (m.as<torch::nn::LayerNorm>()) {
    found.notes.push_back("no scaling after the LayerNorm " + here +
                          ": which layers read it is not known from the module tree; if only "
                          "Linear layers do, declare teleport::scaling(norm, reader)");
  } else if (Layer layer; layer_of(m, layer)) {
    found.notes.push_back("no symmetry for the layer " + here +
                          " outside a Sequential: the order forward() runs it in is not known "
                          "from the module tree; declare teleport::scaling(a, b)");
  } else {
    for (const auto& child : m.named_children())
      walk(*child.value(), prefix + child.key(), options, found);
  }
}

}  // namespace

Discovery discover(const torch::nn::Sequential& model, const DiscoverOptions& options) {
  TORCH_CHECK(!model.is_empty(), "discover: expected a Sequential, got an empty holder");
  Discovery found;
  discover_chain(*model, "", options, found);
  return found;
}

Discovery discover(const torch::nn::Module& model, const DiscoverOptions& options) {
  Discovery found;
  walk(model, "", options, found);
  return found;
}

}  // namespace teleport
