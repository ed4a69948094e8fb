#pragma once

#include <teleport/symmetry.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace teleport {

/// What one teleport did. Losses are NaN where no batch measured them (a
/// teleport from `.grad` alone).
struct TeleportReport {
  /// The optimizer step it happened at; -1 when called directly.
  int64_t step = -1;
  double loss_before = std::numeric_limits<double>::quiet_NaN();
  double loss_after = std::numeric_limits<double>::quiet_NaN();
  /// ||∇L||² over the parameters the symmetries act on.
  double grad_norm_sq_before = std::numeric_limits<double>::quiet_NaN();
  double grad_norm_sq_after = std::numeric_limits<double>::quiet_NaN();
  /// The teleport objective (TeleportOptions::objective).
  double objective_before = std::numeric_limits<double>::quiet_NaN();
  double objective_after = std::numeric_limits<double>::quiet_NaN();
  /// Ascent steps taken, each raising the objective; for kBalance, the sweeps.
  int64_t steps = 0;
  /// Attempts refused and shortened (docs/design.md §6).
  int64_t shortened = 0;
  bool rolled_back = false;
  /// False in reference mode, or for a data-dependent action inexact on its batch.
  bool exact = true;
  /// True when `.grad` must be computed afresh before an optimizer step.
  bool gradients_stale = false;
  /// kTransport: true when some inner-optimizer buffer was kept because no
  /// exact map exists; `state_note` says which.
  bool state_kept = false;
  std::string state_note;
  /// Why it was rolled back or stopped early; empty otherwise.
  std::string reason;
  double seconds = 0;
  /// The group element applied, one per symmetry (empty when rolled back;
  /// `g` undefined for one listed in `skipped`).
  std::vector<GroupElement> elements;
  /// Symmetries TeleportOptimizer left out of this teleport, each with why
  /// (a frozen parameter, no gradient in `.grad`, refused by verification).
  std::vector<std::string> skipped;
};

}  // namespace teleport
