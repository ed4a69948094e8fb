#pragma once

#include <teleport/symmetry.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace teleport {

/// What one teleport did. Losses are NaN where no batch was there to measure
/// them (a teleport from `.grad` alone, whose loss invariance is guaranteed by
/// the math, not measured).
struct TeleportReport {
  /// The optimizer step it happened at; -1 when called directly.
  int64_t step = -1;
  double loss_before = std::numeric_limits<double>::quiet_NaN();
  double loss_after = std::numeric_limits<double>::quiet_NaN();
  /// ||∇L||² over the parameters the symmetries act on.
  double grad_norm_sq_before = std::numeric_limits<double>::quiet_NaN();
  double grad_norm_sq_after = std::numeric_limits<double>::quiet_NaN();
  /// The teleport objective (TeleportOptions::objective): ||∇L||² for
  /// kGradNorm, Σ||W||² over the symmetries' parameters for kBalance, the loss
  /// after the next step for kLookAhead, sharpness() for kFlatness.
  double objective_before = std::numeric_limits<double>::quiet_NaN();
  double objective_after = std::numeric_limits<double>::quiet_NaN();
  /// Ascent steps taken: each one raised ||∇L||² (fewer than asked when no
  /// shortened step did); for kBalance, the sweeps.
  int64_t steps = 0;
  /// Attempts refused (lower, non-finite, singular or beyond the growth cap),
  /// each shortening the steps after it (docs/design.md §6).
  int64_t shortened = 0;
  bool rolled_back = false;
  /// False for arithmetic that does not keep the loss: reference mode, or a
  /// data-dependent action on a batch too large for it to be exact.
  bool exact = true;
  /// True when `.grad` could not be mapped to the new point (data-dependent
  /// actions) and must be computed afresh before an optimizer step.
  bool gradients_stale = false;
  /// With StatePolicy::kTransport: true when some inner-optimizer buffer was
  /// kept because no exact map exists (squared gradients under full GL(n)),
  /// and `state_note` says which.
  bool state_kept = false;
  std::string state_note;
  /// Why it was rolled back (then `rolled_back` is true) or stopped early;
  /// empty otherwise.
  std::string reason;
  double seconds = 0;
  /// The group element applied, one per symmetry (empty when rolled back);
  /// from TeleportOptimizer, an undefined one (`g` undefined) for a symmetry
  /// listed in `skipped`.
  std::vector<GroupElement> elements;
  /// Symmetries TeleportOptimizer left out of this teleport, each with why
  /// (a frozen parameter, or no gradient in `.grad` because this forward pass
  /// did not use it); the others teleported.
  std::vector<std::string> skipped;
};

}  // namespace teleport
