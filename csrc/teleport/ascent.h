#pragma once

#include <teleport/batch_loss.h>
#include <teleport/options.h>
#include <teleport/report.h>
#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace teleport {

/// Teleports the symmetries' parameters: `options.steps()` steps of gradient
/// ascent on ||∇L||² within the group, with the safeguards of docs/design.md
/// §6. Weights and `.grad` change in place (gradients mapped exactly). Without
/// a batch the direction comes from `.grad` in closed form; with one, from
/// that batch's gradient, and a loss change beyond `options.tolerance()` rolls
/// back. A rolled-back teleport leaves weights and gradients bitwise as they were.
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss* batch = nullptr);

/// The verdict of check_symmetry().
struct SymmetryCheck {
  bool holds = true;
  double drift = 0;  // |L(g·w) − L(w)| / |L(w)|
  double bound = 0;  // 1e-9 in float64, 1e-5 in float32
};

/// Whether `symmetry` is one of the loss `loss()` evaluates (the same
/// randomness at every call): applies g = exp(T), T random of norm `size`
/// (seeded with `seed`), evaluates the loss, and puts the symmetry's
/// parameters and their `.grad` back bitwise. For symmetries that read no batch.
SymmetryCheck check_symmetry(const Symmetry& symmetry, const std::function<at::Tensor()>& loss,
                             double size = 0.5, uint64_t seed = 0);

/// The inner optimizer's preconditioner as its next step will use it, for
/// Objective::kPreconditioned: √v̂ for each parameter the symmetries act on
/// (the current gradient counted, bias-corrected) and `eps`; the objective is
/// Σ g² / (scale + eps).
struct Preconditioner {
  std::vector<std::pair<at::Tensor, at::Tensor>> scale;  // {parameter, √v̂}
  double eps = 0;
};

/// A teleport that maximises Σ g² / (√v̂ + eps) over positive scalings, from
/// `.grad` in closed form, with the safeguards of teleport().
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const Preconditioner& preconditioner);

/// The inner optimizer's next step as a function of the gradient g, for
/// Objective::kLookAhead (docs/design.md §8); one Term per parameter p:
///
///   ĝ = g + weight_decay·p,   m' = a·m + b·ĝ,
///   Δ = lr·m' / (√((c·v + d·ĝ²) / e) + eps)   when `adaptive`, lr·m' otherwise,
///   Δ += lr·decoupled_decay·p,                 p ← p − Δ,
///
/// with m and v its gradient-like and squared buffers (undefined: zero): SGD,
/// Adagrad, plain RMSprop, Adam and AdamW.
struct NextStep {
  struct Term {
    at::Tensor param, m, v;
    double lr = 0, weight_decay = 0, decoupled_decay = 0;
    double a = 0, b = 1, c = 0, d = 0, e = 1, eps = 0;
    bool adaptive = false;
  };
  std::vector<Term> terms;
  /// Whether m and v move with the weights (kTransport) or stay (kKeep).
  bool transported = true;
};

/// A teleport that lowers the batch's loss after the inner optimizer's next
/// step (Objective::kLookAhead) over positive scalings, by autograd through
/// that step, with the safeguards of teleport().
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss& batch, const NextStep& next);

/// The sharpness Objective::kFlatness lowers: the mean of L(w + ε) − L(w) on
/// the batch over `flatness_samples` fixed random perturbations ε of the
/// symmetries' parameters of norm `flatness_radius` (seeded with `flatness_seed`).
double sharpness(const SymmetryList& symmetries, const BatchLoss& batch,
                 const TeleportOptions& options);

/// ∂/∂T ||∇L((I+T)·w)||² at T = 0 for each symmetry: in closed form from the
/// batch's gradient (or `.grad`), or by double backward (Method::kAutograd).
std::vector<at::Tensor> directions(const SymmetryList& symmetries, Method method,
                                   const BatchLoss* batch = nullptr);

}  // namespace teleport
