#pragma once

#include <teleport/symmetry.h>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>

namespace teleport {

/// The symmetries of one multi-head attention (docs/design.md §2): per head h
/// of width d, one GL(d) on the queries and keys and one on the values and
/// the output projection. With g_h the head's element (a batch [heads, d, d]):
///  - kQueryKey:    W_q,h -> g_h W_q,h, b_q,h -> g_h b_q,h,
///                  W_k,h -> g_h^{-T} W_k,h, b_k,h -> g_h^{-T} b_k,h;
///  - kValueOutput: W_v,h -> g_h W_v,h, b_v,h -> g_h b_v,h, and the head's
///                  columns of the output projection -> · g_h^{-1}.
/// The scores q_h k_hᵀ and the output are unchanged for every input, mask and
/// dropout mask. Gradients map exactly, so the direction has a closed form.
class AttentionSymmetry : public Symmetry {
 public:
  enum class Part { kQueryKey, kValueOutput };

  /// `in_proj_weight` [3E, E] (queries, keys, values stacked), `in_proj_bias`
  /// [3E] or undefined, `out_proj_weight` [E, E]; `heads` divides E.
  AttentionSymmetry(Part part, at::Tensor in_proj_weight, at::Tensor in_proj_bias,
                    at::Tensor out_proj_weight, int64_t heads, std::string name);

  Part part() const { return part_; }
  int64_t heads() const { return heads_; }
  /// The width d of each head.
  int64_t head_dim() const { return w_.size(1) / heads_; }

  std::string name() const override { return name_; }
  bool diagonal() const override { return false; }
  std::vector<at::Tensor> parameters() const override;
  /// [heads, d, d] zeros.
  at::Tensor zero_algebra() const override;
  bool has_closed_form() const override { return true; }
  at::Tensor direction(const std::vector<at::Tensor>& grads) const override;
  void apply_(const GroupElement& e, const BatchLoss* batch = nullptr,
              Mode mode = Mode::kExact) const override;
  bool transports_gradients() const override { return true; }
  void transport_gradients_(const GroupElement& e,
                            const std::vector<at::Tensor>& grads) const override;
  std::vector<at::Tensor> act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                              const BatchLoss* batch, const ParameterOverrides& in_force,
                              Mode mode = Mode::kExact) const override;
  void check_unchanged() const override;

 private:
  Part part_;
  at::Tensor w_, b_, out_;  // in_proj_weight, in_proj_bias, out_proj.weight
  int64_t heads_;
  std::vector<std::vector<int64_t>> shapes_;
  std::string name_;
};

namespace detail {
SymmetryList attention_symmetries(const torch::nn::Module& mha, const std::string& name);
}  // namespace detail

/// The query–key and value–output groups of every head of a
/// torch::nn::MultiheadAttention (packed projections: kdim and vdim equal to
/// the embedding size, no add_bias_kv; others are refused with a message):
///
///   teleport::SymmetryList syms = teleport::attention(layer->self_attn);
template <typename M>
SymmetryList attention(const torch::nn::ModuleHolder<M>& mha) {
  TORCH_CHECK(!mha.is_empty(),
              "teleport::attention: expected a MultiheadAttention, got an empty "
              "module holder");
  return detail::attention_symmetries(*mha.ptr(), "attention");
}

}  // namespace teleport
