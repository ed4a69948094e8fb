#pragma once
// Not installed: the solves behind DataDependentGL (data_dependent_gl.cpp):
// the least change of the first layer's weights that keeps its activations'
// images, from a thin QR of the layer's inputs, kept while the inputs are the
// same, unchanged tensor (docs/design.md §3).

#include <teleport/options.h>
#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>

namespace teleport::detail {

class LeastChange {
 public:
  /// For a layer of `inputs` inputs and `width` outputs, with a bias or not,
  /// across a LeakyReLU of slope `slope`; `name` starts the messages.
  LeastChange(double slope, int64_t inputs, int64_t width, bool bias, std::string name)
      : slope_(slope), inputs_(inputs), width_(width), bias_(bias), name_(std::move(name)) {}

  /// [W_in b_in] solving inputs · [W b]ᵀ = σ⁻¹(σ(inputs · [W b]ᵀ) gᵀ): the
  /// least change in exact mode (into w and b themselves when `in_place`), the
  /// least-norm solution in reference mode; `known_z`, where given, is inputs ·
  /// [W b]ᵀ.
  std::pair<at::Tensor, at::Tensor> solve(const at::Tensor& h, const at::Tensor& w,
                                          const at::Tensor& b, const at::Tensor& g, Mode mode,
                                          bool in_place = false,
                                          const at::Tensor& known_z = {}) const;
  /// ∂/∂T ⟨c, act⟩ at T = 0 for the layer's inputs H (rows), its outputs Z and
  /// the cotangents [c_W c_b] and c_out of W_out: (H⁺ᵀ c_θ ⊘ σ'(Z))ᵀ σ(Z) −
  /// W_outᵀ c_out.
  at::Tensor pullback(const at::Tensor& h, const at::Tensor& z, const at::Tensor& c_w,
                      const at::Tensor& c_b, const at::Tensor& w_out,
                      const at::Tensor& c_out) const;
  /// The same from ∂F/∂Z, the derivative with respect to the layer's output
  /// Z = H θ (rows, batch × n), where H, the layer's inputs (rows, without
  /// the ones), is a constant of F, so that c_θ = Hᵀ ∂F/∂Z: (P ∂F/∂Z ⊘
  /// σ'(Z))ᵀ A − W_outᵀ c_out, with P the projection onto the span of H's
  /// columns (the identity within the rank condition: no solve).
  at::Tensor pullback_from_output(const at::Tensor& dF_dz, const at::Tensor& h, const at::Tensor& z,
                                  const at::Tensor& w_out, const at::Tensor& c_out) const;
  /// [H 1][H 1]ᵀ (the ones for the bias), in double, for the layer's inputs
  /// H (rows) within the rank condition (batch ≤ inputs + 1, else undefined):
  /// the gradient of W_in and b_in, δᵀ[H 1] with δ = ∂L/∂Z, has the squared
  /// norm tr(δᵀ G δ). Kept with the factors of H; NaN where H is not finite.
  at::Tensor input_gram(const at::Tensor& h) const;

 private:
  // The thin QR of the layer's inputs (a column of ones for the bias), in
  // double (a Cholesky QR for float32 weights): of inputsᵀ when `wide`
  // (batch ≤ inputs), of inputs otherwise; Q also in the inputs' dtype
  // (q_work); R is NaN where the inputs are not finite.
  struct Factors {
    at::Tensor q, q_work, r, gram;  // gram: inputs inputsᵀ where wide
    bool wide = true;
  };
  Factors factors(const at::Tensor& h) const;
  // TORCH_CHECKs that h is the layer's inputs as rows.
  void check_layer_rows(const at::Tensor& h, const char* what) const;
  // Exact mode, from the factors: W + ΔW and b + Δb for [ΔW Δb]ᵀ = inputs⁺ x
  // (into w and b when `in_place`), and (inputs⁺)ᵀ [c_W c_b]ᵀ.
  std::pair<at::Tensor, at::Tensor> moved(const Factors& f, const at::Tensor& x, at::Tensor w,
                                          at::Tensor b, bool in_place) const;
  at::Tensor pulled(const Factors& f, const at::Tensor& c_w, const at::Tensor& c_b) const;

  double slope_;
  int64_t inputs_, width_;
  bool bias_;
  std::string name_;
  // The cache of factors(): the inputs it was built from (kept alive, so
  // their memory is not reused), their version, and their factors.
  mutable at::Tensor cached_h_;
  mutable int64_t cached_version_ = -1;
  mutable Factors cached_;
};

/// The solves of `symmetry`.
inline const LeastChange& least_change_of(const DataDependentGL& symmetry) {
  return *symmetry.solver_;
}

}  // namespace teleport::detail
