#pragma once

#include <teleport/batch_loss.h>
#include <teleport/options.h>
#include <teleport/report.h>
#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace teleport {

/// Teleports the symmetries' parameters: `options.steps()` steps of gradient
/// ascent on ||∇L||² within the group, each re-centred at the identity, with
/// the safeguards of docs/design.md §6. The weights change in place, and so do the
/// gradients in `.grad` (mapped exactly, so an optimizer step that follows sees
/// the gradient at the new point).
///
/// Without a batch the direction comes from `.grad` in closed form and
/// the checks are the non-finite test and the caps. With one (a batch and a
/// loss) the direction comes from that batch's gradient, the loss is measured
/// before and after, and a change beyond `options.tolerance()` rolls back.
/// A rolled-back teleport leaves weights and gradients bitwise as they were.
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss* batch = nullptr);

/// The verdict of check_symmetry(): whether the loss kept within `bound`
/// (relative) under a random group element, and by how much it moved.
struct SymmetryCheck {
  bool holds = true;
  double drift = 0;  // |L(g·w) − L(w)| / |L(w)|
  double bound = 0;  // 1e-9 in float64, 1e-5 in float32
};

/// Whether `symmetry` is one of the loss `loss()` evaluates (a closure, a
/// BatchLoss's loss, the same randomness at every call): applies a random
/// group element of norm `size` (g = exp(T), T drawn from a generator seeded
/// with `seed`, so positive scalings stay positive), evaluates the loss,
/// and puts the symmetry's parameters and their `.grad` back bitwise (other
/// gradients the loss rewrites are the caller's). For symmetries that read no
/// batch (Symmetry::reads_batch()); TeleportOptimizer runs it on every such
/// symmetry before its first teleport (TeleportOptions::verify).
SymmetryCheck check_symmetry(const Symmetry& symmetry, const std::function<at::Tensor()>& loss,
                             double size = 0.5, uint64_t seed = 0);

/// The inner optimizer's preconditioner as its next step will use it, for
/// Objective::kPreconditioned: for each parameter the symmetries act on,
/// `scale` = √v̂ (v̂ its second-moment estimate, the current gradient's share
/// included, Adam's bias correction applied), and the optimizer's `eps`. The
/// objective is Σ g² / (scale + eps); under a positive scaling by f, g -> f g
/// and scale -> f scale, exactly as the inner state is transported.
struct Preconditioner {
  std::vector<std::pair<at::Tensor, at::Tensor>> scale;  // {parameter, √v̂}
  double eps = 0;
};

/// A teleport that maximises Σ g² / (√v̂ + eps) over positive scalings, from
/// the gradient in `.grad` (closed form: elementwise work, no forward or
/// backward pass), with the safeguards of teleport().
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const Preconditioner& preconditioner);

/// The inner optimizer's next step as a function of the gradient g at the
/// point it starts from, for Objective::kLookAhead (docs/design.md §8). For each
/// parameter p of the model it updates (one Term each):
///
///   ĝ = g + weight_decay·p,   m' = a·m + b·ĝ,
///   Δ = lr·m' / (√((c·v + d·ĝ²) / e) + eps)   when `adaptive`, lr·m' otherwise,
///   Δ += lr·decoupled_decay·p,                 p ← p − Δ,
///
/// with m and v its gradient-like and squared-gradient buffers (undefined:
/// zero). SGD (momentum, dampening, Nesterov), Adagrad, RMSprop (plain), Adam and
/// AdamW are of this form; TeleportOptimizer reads it from the inner optimizer.
/// At the teleported point m and v are those the state policy kTransport
/// carries there (m/f and v/f² under a scaling by f).
struct NextStep {
  struct Term {
    at::Tensor param, m, v;
    double lr = 0, weight_decay = 0, decoupled_decay = 0;
    double a = 0, b = 1, c = 0, d = 0, e = 1, eps = 0;
    bool adaptive = false;
  };
  std::vector<Term> terms;
  /// Whether m and v move with the weights (StatePolicy::kTransport) or stay
  /// as they are (kKeep; kReset gives terms without buffers).
  bool transported = true;
};

/// A teleport that lowers the teleport batch's loss after the inner
/// optimizer's next step (Objective::kLookAhead) over positive scalings, by
/// autograd through that step, with the safeguards of teleport(): a kept
/// teleport lowers it, and the batch's loss itself stays within the tolerance.
TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss& batch, const NextStep& next);

/// The sharpness Objective::kFlatness lowers, at the current weights: the mean
/// over `flatness_samples` fixed random perturbations ε of the symmetries'
/// parameters, each of norm `flatness_radius` (jointly over those parameters;
/// drawn from a generator seeded with `flatness_seed`), of L(w + ε) − L(w) on
/// the batch. The same draws at every call, so two calls compare weights only.
double sharpness(const SymmetryList& symmetries, const BatchLoss& batch,
                 const TeleportOptions& options);

/// ∂/∂T ||∇L((I+T)·w)||² at T = 0 for each symmetry: in closed form from the
/// batch's gradient (or from `.grad` when there is no batch), or
/// by double backward on the batch (Method::kAutograd).
std::vector<at::Tensor> directions(const SymmetryList& symmetries, Method method,
                                   const BatchLoss* batch = nullptr);

/// Resolves kAuto: closed form when every symmetry has one.
Method resolve_method(const SymmetryList& symmetries, Method method);

}  // namespace teleport
