#include <teleport/internal/layer_parts.h>
#include <teleport/layers.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <string>
#include <utility>

namespace teleport {
namespace detail {
namespace {

struct Layer {
  at::Tensor weight, bias;
  std::string what;
  bool last_dim = false;  // a LayerNorm: its outputs are the last dimension
};

// A LayerNorm's outputs are features of the last dimension: only a Linear
// reading exactly those undoes the scaling (a flatten would mix positions).
void check_reader(const Layer& writer, const Layer& reader) {
  TORCH_CHECK(!writer.last_dim ||
                  (reader.what == "Linear" && reader.weight.size(1) == writer.weight.size(0)),
              "teleport::scaling: expected a LayerNorm's reader to be a Linear of ",
              writer.weight.size(0), " input features, got ", reader.what, " of weight shape ",
              reader.weight.sizes());
}

Layer layer_of(const std::shared_ptr<torch::nn::Module>& m, bool writer) {
  TORCH_CHECK(m != nullptr, "teleport: expected a layer, got an empty module holder");
  const auto parts = layer_parts(*m);
  using Kind = LayerParts::Kind;
  if (parts && parts->kind == Kind::kConv) {
    TORCH_CHECK(parts->groups == 1, "teleport: expected a convolution with groups = 1, got ",
                parts->what, " with groups = ", parts->groups,
                " (grouped convolutions are not supported)");
  }
  if (parts && parts->kind == Kind::kBatchNorm && writer) {
    TORCH_CHECK(parts->weight.defined(), "teleport: expected an affine ", parts->what,
                " (its weight and bias carry the scaling), got one with affine = false");
  }
  if (parts && parts->kind == Kind::kLayerNorm && writer) {
    TORCH_CHECK(parts->weight.defined(),
                "teleport: expected an elementwise-affine LayerNorm (its weight and bias carry "
                "the scaling), got one with elementwise_affine = false");
    TORCH_CHECK(parts->normalized_shape.size() == 1,
                "teleport: expected a LayerNorm over the last dimension only, got "
                "normalized_shape ",
                at::IntArrayRef(parts->normalized_shape));
  }
  const bool norm = parts && (parts->kind == Kind::kBatchNorm || parts->kind == Kind::kLayerNorm);
  TORCH_CHECK(parts && (writer || !norm),
              "teleport: expected a torch::nn::Linear or Conv1d/Conv2d/Conv3d",
              writer ? ", an affine BatchNorm1d/2d/3d or an elementwise-affine LayerNorm" : "",
              ", got ", m->name());
  return {parts->weight, parts->bias, parts->what, parts->kind == Kind::kLayerNorm};
}

}  // namespace

std::optional<LayerParts> layer_parts(const torch::nn::Module& m) {
  using Kind = LayerParts::Kind;
  auto parts = [](Kind kind, const at::Tensor& weight, const at::Tensor& bias, const char* what,
                  bool channels = false, int64_t groups = 1) {
    LayerParts p;
    p.kind = kind, p.weight = weight, p.bias = bias, p.what = what;
    p.channels = channels, p.groups = groups;
    return p;
  };
  if (const auto* l = m.as<torch::nn::Linear>())
    return parts(Kind::kLinear, l->weight, l->bias, "Linear");
  auto conv = [&](const auto& c, const char* what) {
    return parts(Kind::kConv, c.weight, c.bias, what, true, c.options.groups());
  };
  if (const auto* c = m.as<torch::nn::Conv1d>()) return conv(*c, "Conv1d");
  if (const auto* c = m.as<torch::nn::Conv2d>()) return conv(*c, "Conv2d");
  if (const auto* c = m.as<torch::nn::Conv3d>()) return conv(*c, "Conv3d");
  // A BatchNorm1d's outputs may be features (before a Linear) or channels
  // (before a Conv1d); 2d and 3d ones give channels.
  if (const auto* b = m.as<torch::nn::BatchNorm1d>()) {
    return parts(Kind::kBatchNorm, b->weight, b->bias, "BatchNorm1d");
  }
  if (const auto* b = m.as<torch::nn::BatchNorm2d>()) {
    return parts(Kind::kBatchNorm, b->weight, b->bias, "BatchNorm2d", true);
  }
  if (const auto* b = m.as<torch::nn::BatchNorm3d>()) {
    return parts(Kind::kBatchNorm, b->weight, b->bias, "BatchNorm3d", true);
  }
  if (const auto* n = m.as<torch::nn::LayerNorm>()) {
    LayerParts p = parts(Kind::kLayerNorm, n->weight, n->bias, "LayerNorm");
    p.normalized_shape = n->options.normalized_shape();
    return p;
  }
  return std::nullopt;
}

std::shared_ptr<Symmetry> layer_symmetry(SymmetryKind kind,
                                         const std::shared_ptr<torch::nn::Module>& a,
                                         const std::shared_ptr<torch::nn::Module>& b) {
  const Layer in = layer_of(a, /*writer=*/kind == SymmetryKind::kScaling);
  const Layer out = layer_of(b, /*writer=*/false);
  check_reader(in, out);
  const std::string name = std::string(kind == SymmetryKind::kScaling ? "scaling" : "gl") + "(" +
                           in.what + " " + std::to_string(in.weight.size(0)) + " -> " + out.what +
                           ")";
  return std::make_shared<LayerSymmetry>(kind, in.weight, in.bias, out.weight, name);
}

std::shared_ptr<Symmetry> stream_symmetry(const std::vector<LayerRef>& writers,
                                          const std::vector<LayerRef>& readers) {
  TORCH_CHECK(!writers.empty() && !readers.empty(),
              "teleport::scaling: expected at least one writer and one reader, got ",
              writers.size(), " and ", readers.size());
  std::vector<at::Tensor> rows, columns;
  std::string what;
  int64_t n = -1;
  std::vector<Layer> written;
  for (const auto& w : writers) {
    const Layer l = layer_of(w.module(), /*writer=*/true);
    written.push_back(l);
    TORCH_CHECK(n < 0 || l.weight.size(0) == n, "teleport::scaling: expected every writer to give ",
                n, " outputs, got ", l.what, " with ", l.weight.size(0));
    n = l.weight.size(0);
    rows.push_back(l.weight);
    if (l.bias.defined()) rows.push_back(l.bias);
    what += (what.empty() ? "" : ", ") + l.what;
  }
  what += " -> ";
  for (size_t i = 0; i < readers.size(); ++i) {
    const Layer l = layer_of(readers[i].module(), /*writer=*/false);
    for (const auto& w : written) check_reader(w, l);
    columns.push_back(l.weight);
    what += (i == 0 ? "" : ", ") + l.what;
  }
  return std::make_shared<LayerSymmetry>(std::move(rows), std::move(columns),
                                         "scaling(" + std::to_string(n) + ": " + what + ")");
}

}  // namespace detail
}  // namespace teleport
