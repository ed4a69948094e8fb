// The query–key and value–output groups of multi-head attention, one GL(d)
// per head, as batched d × d matrices (docs/design.md §2, §3).
#include <teleport/attention.h>
#include <teleport/internal/symmetry_helpers.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/activation.h>

#include <utility>
#include <vector>

namespace teleport {
namespace {

using detail::shape_of;

// Rows [block·E, (block+1)·E) of x (a [3E, E] weight or a [3E] bias), head by
// head times m_h: the new block, shaped as the old.
at::Tensor times_rows(const at::Tensor& m, const at::Tensor& x, int64_t block) {
  const int64_t heads = m.size(0), e = x.size(0) / 3;
  const at::Tensor rows = x.narrow(0, block * e, e);
  return at::matmul(m, rows.reshape({heads, e / heads, -1})).reshape(rows.sizes());
}

// x [k, E] with head h's block of columns times m_h.
at::Tensor times_columns(const at::Tensor& x, const at::Tensor& m) {
  const int64_t heads = m.size(0), e = x.size(1);
  return at::matmul(x.reshape({x.size(0), heads, e / heads}).transpose(0, 1), m)
      .transpose(0, 1)
      .reshape(x.sizes());
}

// Head by head, the rows of block `block` of a weight's gradient beside its
// bias's: [heads, d, E (+1)].
at::Tensor head_rows(const at::Tensor& gw, const at::Tensor& gb, int64_t block, int64_t heads) {
  const int64_t e = gw.size(1), d = e / heads;
  const at::Tensor w = gw.narrow(0, block * e, e).reshape({heads, d, e});
  if (!gb.defined()) return w;
  return at::cat({w, gb.narrow(0, block * e, e).reshape({heads, d, 1})}, 2);
}

at::Tensor gram(const at::Tensor& rows) { return at::matmul(rows, rows.transpose(-2, -1)); }

}  // namespace

AttentionSymmetry::AttentionSymmetry(Part part, at::Tensor in_proj_weight, at::Tensor in_proj_bias,
                                     at::Tensor out_proj_weight, int64_t heads, std::string name)
    : part_(part),
      w_(std::move(in_proj_weight)),
      b_(std::move(in_proj_bias)),
      out_(std::move(out_proj_weight)),
      heads_(heads),
      name_(std::move(name)) {
  TORCH_CHECK(w_.defined() && w_.dim() == 2 && w_.size(0) == 3 * w_.size(1), name_,
              ": expected a packed in_proj_weight of shape [3E, E], got ", shape_of(w_));
  const int64_t e = w_.size(1);
  TORCH_CHECK(heads_ > 0 && e % heads_ == 0, name_, ": expected a number of heads dividing ", e,
              ", got ", heads_);
  TORCH_CHECK(!b_.defined() || (b_.dim() == 1 && b_.size(0) == 3 * e), name_,
              ": expected an in_proj_bias of ", 3 * e, " entries, got ", shape_of(b_));
  TORCH_CHECK(part_ == Part::kQueryKey || (out_.defined() && out_.dim() == 2 && out_.size(1) == e),
              name_, ": expected an out_proj weight of ", e, " columns, got ", shape_of(out_));
  for (const auto& p : parameters()) shapes_.push_back(p.sizes().vec());
}

std::vector<at::Tensor> AttentionSymmetry::parameters() const {
  std::vector<at::Tensor> out{w_};
  if (b_.defined()) out.push_back(b_);
  if (part_ == Part::kValueOutput) out.push_back(out_);
  return out;
}

at::Tensor AttentionSymmetry::zero_algebra() const {
  const int64_t d = head_dim();
  return at::zeros({heads_, d, d}, w_.options());
}

at::Tensor AttentionSymmetry::direction(const std::vector<at::Tensor>& grads) const {
  TORCH_CHECK(grads.size() == parameters().size(), name_, ": expected ", parameters().size(),
              " gradients, got ", grads.size());
  const at::Tensor gb = b_.defined() ? grads[1] : at::Tensor();
  // As for a layer pair (docs/design.md §3): rows acted on by g lose
  // 2 G Gᵀ, by g^{-T} gain it; columns acted on by g^{-1} gain 2 Gᵀ G.
  if (part_ == Part::kQueryKey) {
    return (gram(head_rows(grads[0], gb, 1, heads_)) - gram(head_rows(grads[0], gb, 0, heads_))) *
           2;
  }
  const at::Tensor& go = grads.back();
  const at::Tensor cols = go.reshape({go.size(0), heads_, head_dim()}).transpose(0, 1);
  return (at::matmul(cols.transpose(-2, -1), cols) - gram(head_rows(grads[0], gb, 2, heads_))) * 2;
}

namespace {

// g acting on one attention's tensors in place (undefined ones skipped):
// `g` on the acted rows, `g_inv` as the part requires.
void act_in_place(AttentionSymmetry::Part part, const at::Tensor& g, const at::Tensor& g_inv,
                  const std::vector<at::Tensor>& tensors, bool bias) {
  const at::Tensor& w = tensors[0];
  const at::Tensor b = bias ? tensors[1] : at::Tensor();
  auto rows_ = [&](const at::Tensor& x, const at::Tensor& m, int64_t block) {
    if (!x.defined()) return;
    const int64_t e = x.size(0) / 3;
    x.narrow(0, block * e, e).copy_(times_rows(m, x, block));
  };
  if (part == AttentionSymmetry::Part::kQueryKey) {
    const at::Tensor g_inv_t = g_inv.transpose(-2, -1);
    for (const auto& x : {w, b}) {
      rows_(x, g, 0);
      rows_(x, g_inv_t, 1);
    }
    return;
  }
  for (const auto& x : {w, b}) rows_(x, g, 2);
  const at::Tensor& out = tensors.back();
  if (out.defined()) out.copy_(times_columns(out, g_inv));
}

}  // namespace

void AttentionSymmetry::apply_(const GroupElement& e, const BatchLoss*, Mode) const {
  TORCH_CHECK(!e.diagonal && e.g.dim() == 3 && e.g.size(0) == heads_, name_,
              ": expected a batch of ", heads_, " matrices, got ", shape_of(e.g));
  at::NoGradGuard no_grad;
  act_in_place(part_, e.g, e.g_inv, parameters(), b_.defined());
}

void AttentionSymmetry::transport_gradients_(const GroupElement& e,
                                             const std::vector<at::Tensor>& grads) const {
  TORCH_CHECK(grads.size() == parameters().size(), name_, ": expected ", parameters().size(),
              " tensors, got ", grads.size());
  at::NoGradGuard no_grad;
  // X -> A X maps gradients by A^{-T}: the contragredient element's action.
  const GroupElement c = e.contragredient();
  act_in_place(part_, c.g, c.g_inv, grads, b_.defined());
}

std::vector<at::Tensor> AttentionSymmetry::act(const std::vector<at::Tensor>& params,
                                               const at::Tensor& T, const BatchLoss*,
                                               const ParameterOverrides&, Mode) const {
  TORCH_CHECK(params.size() == parameters().size(), name_, ": expected ", parameters().size(),
              " tensors, got ", params.size());
  const at::Tensor g = T + at::eye(T.size(-1), T.options());
  const at::Tensor g_inv = at::linalg_inv(g);
  const int64_t e = w_.size(1);
  auto rows = [&](const at::Tensor& x) {
    if (part_ == Part::kQueryKey) {
      return at::cat(
          {times_rows(g, x, 0), times_rows(g_inv.transpose(-2, -1), x, 1), x.narrow(0, 2 * e, e)});
    }
    return at::cat({x.narrow(0, 0, 2 * e), times_rows(g, x, 2)});
  };
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool columns = part_ == Part::kValueOutput && i + 1 == params.size();
    out.push_back(columns ? times_columns(params[i], g_inv) : rows(params[i]));
  }
  return out;
}

void AttentionSymmetry::check_unchanged() const {
  detail::check_kept(parameters(), shapes_, name_);
}

namespace detail {

SymmetryList attention_symmetries(const torch::nn::Module& module, const std::string& name) {
  const auto* mha = module.as<torch::nn::MultiheadAttention>();
  TORCH_CHECK(mha != nullptr, "teleport::attention: expected a torch::nn::MultiheadAttention, got ",
              module.name());
  const auto& o = mha->options;
  TORCH_CHECK(mha->_qkv_same_embed_dim,
              "teleport::attention: expected packed projections (kdim and vdim equal to "
              "embed_dim ",
              o.embed_dim(), "), got kdim ", o.kdim(), " and vdim ", o.vdim(),
              ": separate projections are not supported");
  TORCH_CHECK(!o.add_bias_kv(),
              "teleport::attention: expected add_bias_kv false, got true (the added key and "
              "value rows would have to move with every head: not supported)");
  const std::string what =
      name + "(" + std::to_string(o.embed_dim()) + ", " + std::to_string(o.num_heads()) + " heads)";
  using Part = AttentionSymmetry::Part;
  return {std::make_shared<AttentionSymmetry>(Part::kQueryKey, mha->in_proj_weight,
                                              mha->in_proj_bias, mha->out_proj->weight,
                                              o.num_heads(), what + ".query_key"),
          std::make_shared<AttentionSymmetry>(Part::kValueOutput, mha->in_proj_weight,
                                              mha->in_proj_bias, mha->out_proj->weight,
                                              o.num_heads(), what + ".value_output")};
}

}  // namespace detail
}  // namespace teleport
