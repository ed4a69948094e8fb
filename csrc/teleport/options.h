#pragma once

#include <ATen/core/Generator.h>
#include <torch/arg.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace torch::serialize {
class OutputArchive;
class InputArchive;
}  // namespace torch::serialize

namespace teleport {

struct TeleportReport;

/// How the ascent direction is computed (docs/design.md §3): kAuto is the
/// closed form when every symmetry has one (from the gradients alone), else
/// kAutograd (double backward through the action; needs a batch and a loss).
enum class Method { kAuto, kClosedForm, kAutograd };

/// How an algebra element T becomes g: kLinear g = I + T (with the exact
/// inverse, never I - T), kExp g = exp(T).
enum class Parametrization { kLinear, kExp };

/// Whose arithmetic a teleport follows.
enum class Mode {
  /// Exact inverses; the loss is kept within the tolerance or rolled back.
  kExact,
  /// The published NeurIPS 2022 code's arithmetic (I - T as the inverse, no
  /// caps, no tolerance check; non-finite values still roll back), for
  /// comparison with the paper. Its reports are marked inexact.
  kReference,
};

/// What a teleport optimizes over the group (docs/design.md §8).
enum class Objective {
  /// Maximise ||∇L||² (the paper).
  kGradNorm,
  /// Maximise Σ g²/(√v̂ + ε) over positive scalings: the first-order decrease
  /// of a step preconditioned by the inner optimizer's second moment v̂ as its
  /// next step will use it (a Preconditioner); for SGD, kGradNorm.
  kPreconditioned,
  /// Minimise the teleport batch's loss after the inner optimizer's next step
  /// (a NextStep) over positive scalings. Needs a teleport batch.
  kLookAhead,
  /// Minimise the teleport batch's sharpness (teleport::sharpness). Needs a
  /// teleport batch.
  kFlatness,
  /// Minimise Σ_k ||W_k||² over positive per-unit factors on scalings (ENorm,
  /// Stock et al. 2019) and over GL(n) on GL symmetries (the balanced
  /// factorization; directions one side does not carry are left alone, so
  /// a LoRA adapter with B = 0 is untouched). Closed form; needs no gradient.
  kBalance,
  /// No objective: a random group element near the identity for every
  /// symmetry, as far from it as the kGradNorm ascent with the same options
  /// goes (||g - I|| per symmetry), in a uniformly random direction of the
  /// algebra, drawn from `generator` (docs/design.md §8). Neural
  /// teleportation's random change of basis; the control arm of a study.
  kRandom,
  /// No element at all: the teleport is the identity, kept, so that the
  /// schedule and the state policy act alone (kReset restarts the inner
  /// optimizer's state). The control for what a teleport's state policy does.
  kStateOnly,
};

/// What happens to the inner optimizer's state at a teleport (docs/design.md §7).
enum class StatePolicy {
  /// Leave it as it is (the NeurIPS 2022 code).
  kKeep,
  /// Start it afresh, as at step 0 (the ICLR 2024 code).
  kReset,
  /// Map it where the math is exact; otherwise keep.
  kTransport,
};

/// Everything a teleport and its schedule need. Set fluently:
/// `TeleportOptions().every(100).steps(10).lr(1e-3)`.
struct TeleportOptions {
  // --- schedule ---
  /// Teleport every K optimizer steps (at steps 0, K, 2K, ...); 0 = never.
  TORCH_ARG(int64_t, every) = 0;
  /// Teleport at these optimizer steps (0-based), besides `every`.
  TORCH_ARG(std::vector<int64_t>, at) = {};
  /// Teleport only before this step; -1 = no limit.
  TORCH_ARG(int64_t, until) = -1;
  /// At most this many teleports in all; -1 = no limit.
  TORCH_ARG(int64_t, max_teleports) = -1;
  /// On demand: teleport also when ||∇L||² over the symmetries' parameters
  /// falls below this fraction of its running mean; 0 = off. Costs one host
  /// read per step. `stall_decay` weighs the past in that exponential mean;
  /// `stall_cooldown` steps come before the first such teleport and between two.
  TORCH_ARG(double, stall_fraction) = 0;
  TORCH_ARG(double, stall_decay) = 0.9;
  TORCH_ARG(int64_t, stall_cooldown) = 100;

  // --- the ascent ---
  /// Ascent steps per teleport, and their learning rate η: T = η ∂/∂T ||∇L||².
  TORCH_ARG(int64_t, steps) = 10;
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(Method, method) = Method::kAuto;
  TORCH_ARG(Parametrization, parametrization) = Parametrization::kLinear;
  TORCH_ARG(Mode, mode) = Mode::kExact;
  /// What the teleport optimizes; for kBalance `steps` counts sweeps over the
  /// symmetries and `lr`, `method`, `max_step` and `max_growth` do not apply.
  TORCH_ARG(Objective, objective) = Objective::kGradNorm;
  /// kFlatness: the norm of each random perturbation of the symmetries'
  /// parameters, how many there are, and the seed they are drawn with.
  TORCH_ARG(double, flatness_radius) = 0.1;
  TORCH_ARG(int64_t, flatness_samples) = 4;
  TORCH_ARG(int64_t, flatness_seed) = 0;
  /// kRandom's draws; undefined = LibTorch's default CPU generator (what
  /// torch::randn draws from without one). Not saved in checkpoints.
  TORCH_ARG(at::Generator, generator) = at::Generator();

  // --- safeguards (docs/design.md §6) ---
  /// Largest relative change of the loss on a batch before a rollback.
  TORCH_ARG(double, tolerance) = 1e-4;
  /// Cap on the Frobenius norm of each ascent step T (per symmetry); a
  /// diagonal factor 1 + t also stays >= 1/2 and a singular I + T is refused.
  /// In exact mode a step shorter than min(√ε, max_step) is lengthened to it.
  TORCH_ARG(double, max_step) = 0.5;
  /// Cap on ||∇L||² after / before over one teleport; steps are sized against it.
  TORCH_ARG(double, max_growth) = 10.0;
  /// Never worse: a step that does not raise ||∇L||² (or is non-finite,
  /// singular, past max_growth) is shortened and tried again, at most this
  /// many times per teleport; a teleport that raised nothing is rolled back.
  TORCH_ARG(int64_t, max_halvings) = 5;
  /// Checks every symmetry once, before its first teleport, wherever a loss
  /// is at hand (teleport::check_symmetry with a random element of norm
  /// max_step); one that fails is refused for good, with a note.
  TORCH_ARG(bool, verify) = true;

  // --- the optimizer ---
  TORCH_ARG(StatePolicy, state_policy) = StatePolicy::kTransport;
  /// Called with every report the optimizer produces.
  TORCH_ARG(std::function<void(const TeleportReport&)>, on_report) = nullptr;

  // (TORCH_ARG leaves the access private.)
 public:
  /// Throws a c10::Error naming the first option that is out of range.
  void validate() const;

  /// Every option but on_report and generator, versioned, for checkpoints.
  void serialize(torch::serialize::OutputArchive& archive) const;
  void serialize(torch::serialize::InputArchive& archive);
};

}  // namespace teleport
