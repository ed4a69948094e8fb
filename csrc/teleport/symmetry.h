#pragma once

#include <teleport/batch_loss.h>
#include <teleport/options.h>

#include <ATen/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace teleport {

class DataDependentGL;
namespace detail {
class LeastChange;
const LeastChange& least_change_of(const DataDependentGL& symmetry);
}  // namespace detail

/// One group element g with its exact inverse. A diagonal element holds the
/// diagonals (vectors) instead of matrices; a product of groups (one GL(d)
/// per attention head) holds a batch of matrices, [heads, d, d].
struct GroupElement {
  at::Tensor g;
  at::Tensor g_inv;
  bool diagonal = false;
  /// A 0-dim bool, false where g could not be inverted (decided on the
  /// device); undefined when g is invertible by construction.
  at::Tensor invertible;

  /// g for the algebra element T (a matrix, or a vector when diagonal).
  static GroupElement from_algebra(const at::Tensor& T, bool diagonal, Parametrization p);
  static GroupElement identity_like(const GroupElement& like);
  /// this ∘ other: first other, then this.
  GroupElement compose(const GroupElement& other) const;
  /// g⁻¹ (the two tensors swapped).
  GroupElement inverse() const { return {g_inv, g, diagonal, invertible}; }
  /// g^{-T}: its gradient map is this element's map of weights (LBFGS steps).
  GroupElement contragredient() const {
    return diagonal ? GroupElement{g_inv, g, true, invertible}
                    : GroupElement{g_inv.transpose(-2, -1), g.transpose(-2, -1), false, invertible};
  }
  /// This element where `keep` (a 0-dim bool) is true, else the identity.
  GroupElement masked(const at::Tensor& keep) const;
};

/// A group G acting on some parameters with L(g·w) = L(w). The teleport loop
/// (ascent.h) talks to symmetries only through this interface.
///
/// Your own symmetry needs six methods: name(), diagonal(), parameters(),
/// zero_algebra(), apply_() and act(). It then teleports by autograd (with a
/// batch and a loss), its gradients computed afresh after each teleport, and
/// TeleportOptimizer verifies it before its first teleport. Override the
/// defaulted methods where the action allows more (a closed-form direction,
/// exact maps of gradients and squared gradients). Example:
/// tests/symmetry_test.cpp, UserDefinedSymmetryTeleportsByAutograd.
class Symmetry {
 public:
  virtual ~Symmetry() = default;

  virtual std::string name() const = 0;
  /// Whether group elements are diagonal (held as vectors).
  virtual bool diagonal() const = 0;
  /// The tensors the action changes; gradients and other per-parameter
  /// tensors passed to the methods below come in this order.
  virtual std::vector<at::Tensor> parameters() const = 0;
  /// The algebra element at the identity, on the parameters' device and dtype.
  virtual at::Tensor zero_algebra() const = 0;

  /// Whether direction() is available. Default: no.
  virtual bool has_closed_form() const { return false; }
  /// ∂/∂T ||∇L((I+T)·w)||² at T = 0 from the gradients alone. Default: throws.
  virtual at::Tensor direction(const std::vector<at::Tensor>& grads) const;

  /// The group element for algebra element T.
  virtual GroupElement element(const at::Tensor& T, Parametrization p) const {
    return GroupElement::from_algebra(T, diagonal(), p);
  }

  /// w <- g·w, in place. Only a data-dependent action reads the batch and
  /// `mode` (kReference: the published code's arithmetic).
  virtual void apply_(const GroupElement& e, const BatchLoss* batch = nullptr,
                      Mode mode = Mode::kExact) const = 0;
  /// Whether apply_() and act() read a batch. Default: no.
  virtual bool reads_batch() const { return false; }
  /// Whether the action is exact (on `batch`, for one that reads it). Default: yes.
  virtual bool exact_for(const BatchLoss* /*batch*/) const { return true; }

  /// Whether gradients map exactly (else they are computed afresh). Default: no.
  virtual bool transports_gradients() const { return false; }
  /// Tensors that transform as gradients do (gradients, momentum buffers):
  /// X -> A_g^{-T} X, in place. Default: throws.
  virtual void transport_gradients_(const GroupElement& e,
                                    const std::vector<at::Tensor>& grads) const;
  /// Whether transport_squared_gradients_() is exact under this group's
  /// diagonal elements. Default: no.
  virtual bool can_transport_squared_gradients() const { return false; }
  /// Squared-gradient buffers (AdaGrad's sums), each entry scaled by its
  /// gradient entry's factor squared, under a diagonal element. Default: throws.
  virtual void transport_squared_gradients_(const GroupElement& e,
                                            const std::vector<at::Tensor>& sums) const;

  /// The differentiable action of g = I + T on `params` (in the order of
  /// parameters()), in that order. `in_force`: the other parameters' values,
  /// for an action that reads its layer's inputs from `batch`.
  virtual std::vector<at::Tensor> act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                                      const BatchLoss* batch, const ParameterOverrides& in_force,
                                      Mode mode = Mode::kExact) const = 0;

  /// Throws unless the parameters kept their shapes, dtype and device.
  /// Default: checks nothing.
  virtual void check_unchanged() const {}
  /// ∂/∂T ⟨c, act(params, T)⟩ at T = 0 for `cotangents` c (one per
  /// parameter); the autograd direction is this of ∂F/∂w (docs/design.md §3).
  /// Default: by autograd through act().
  virtual at::Tensor pullback(const std::vector<at::Tensor>& params,
                              const std::vector<at::Tensor>& cotangents, const BatchLoss* batch,
                              const ParameterOverrides& in_force) const;
};

/// What a hidden layer's activation allows: GL(n) (nothing nonlinear), or
/// positive diagonal scaling (a positively homogeneous activation: ReLU).
enum class SymmetryKind { kLinearGL, kScaling };

/// The group acting on the width n of one hidden layer between two layers:
/// W_in -> g W_in, b_in -> g b_in, W_out -> W_out g⁻¹. Linear in the weights
/// and exact for all data: gradients map exactly and the ascent direction has
/// a closed form (docs/design.md §3).
class LayerSymmetry : public Symmetry {
 public:
  /// `w_in` is n × m (or n entries: a BatchNorm's weight, kScaling only),
  /// `b_in` has n entries or is undefined, `w_out` is k × n: the parameters
  /// themselves, changed in place.
  LayerSymmetry(SymmetryKind kind, at::Tensor w_in, at::Tensor b_in, at::Tensor w_out,
                std::string name = "");
  /// Positive scaling of a stream: `rows` (writers' weights and biases) by g
  /// on dimension 0, `columns` (readers' weights) by g⁻¹ on dimension 1.
  LayerSymmetry(std::vector<at::Tensor> rows, std::vector<at::Tensor> columns, std::string name);

  SymmetryKind kind() const { return kind_; }
  /// The width n the group acts on.
  int64_t width() const { return w_in_.size(0); }
  /// How many of parameters() it acts on by rows; the others by columns.
  size_t row_tensors() const { return rows_.size(); }

  std::string name() const override { return name_; }
  bool diagonal() const override { return kind_ == SymmetryKind::kScaling; }
  std::vector<at::Tensor> parameters() const override;
  at::Tensor zero_algebra() const override;
  bool has_closed_form() const override { return true; }
  at::Tensor direction(const std::vector<at::Tensor>& grads) const override;
  void apply_(const GroupElement& e, const BatchLoss* batch = nullptr,
              Mode mode = Mode::kExact) const override;
  bool transports_gradients() const override { return true; }
  void transport_gradients_(const GroupElement& e,
                            const std::vector<at::Tensor>& grads) const override;
  /// Under any diagonal element, GL(n)'s too (kBalance, kPreconditioned).
  bool can_transport_squared_gradients() const override { return true; }
  void transport_squared_gradients_(const GroupElement& e,
                                    const std::vector<at::Tensor>& sums) const override;
  std::vector<at::Tensor> act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                              const BatchLoss* batch, const ParameterOverrides& in_force,
                              Mode mode = Mode::kExact) const override;
  void check_unchanged() const override;

 protected:
  SymmetryKind kind_;
  at::Tensor w_in_, b_in_, w_out_;  // the first row, bias and column tensors
  std::vector<at::Tensor> rows_, columns_;
  std::vector<std::vector<int64_t>> shapes_;  // of parameters(), when made
  std::string name_;

 private:
  void check_shapes(const char* who);
};

/// The paper's data-dependent GL(n) across a LeakyReLU σ of slope a > 0
/// between two Linear layers: with H the first layer's inputs on a batch (and
/// ones for the bias), θ = [W_in b_in]ᵀ moves by the least change solving
/// H θ' = σ⁻¹(σ(H θ) gᵀ), and W_out -> W_out g⁻¹ (Mode::kReference: the
/// published least-norm solution). Exact on that batch when H has full row
/// rank (batch ≤ inputs, + 1 with a bias); otherwise it warns once and the
/// teleport relies on the tolerance. Gradients do not map (docs/design.md §3).
class DataDependentGL : public LayerSymmetry {
 public:
  DataDependentGL(double negative_slope, at::Tensor w_in, at::Tensor b_in, at::Tensor w_out,
                  std::string name = "");

  bool diagonal() const override { return false; }
  bool has_closed_form() const override { return false; }
  at::Tensor direction(const std::vector<at::Tensor>& grads) const override;
  void apply_(const GroupElement& e, const BatchLoss* batch = nullptr,
              Mode mode = Mode::kExact) const override;
  bool exact_for(const BatchLoss* batch) const override;
  bool reads_batch() const override { return true; }
  bool transports_gradients() const override { return false; }
  void transport_gradients_(const GroupElement& e,
                            const std::vector<at::Tensor>& grads) const override;
  bool can_transport_squared_gradients() const override { return false; }
  std::vector<at::Tensor> act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                              const BatchLoss* batch, const ParameterOverrides& in_force,
                              Mode mode = Mode::kExact) const override;

  /// In closed form: with H the layer's inputs on `batch` (a column of ones
  /// for the bias), Z = H θ, A = σ(Z): (H⁺ᵀ c_θ ⊘ σ'(Z))ᵀ A − W_outᵀ c_out.
  at::Tensor pullback(const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& cotangents, const BatchLoss* batch,
                      const ParameterOverrides& in_force) const override;
  double negative_slope() const { return slope_; }

 private:
  friend const detail::LeastChange& detail::least_change_of(const DataDependentGL&);
  double slope_;
  std::shared_ptr<const detail::LeastChange> solver_;  // internal/least_change.h
};

using SymmetryList = std::vector<std::shared_ptr<Symmetry>>;

}  // namespace teleport
