#pragma once
// Not installed: the optimizer's schedule (internal/schedule.cpp).

#include <teleport/options.h>

#include <cstdint>
#include <limits>

namespace teleport {

/// Whether the schedule in `options` (every, at, until, max_teleports) asks for
/// a teleport before optimizer step `step` (0-based), `done` teleports so far.
bool teleport_due(const TeleportOptions& options, int64_t step, int64_t done);

/// Whether `until` and `max_teleports` still allow a teleport before `step`.
bool teleport_allowed(const TeleportOptions& options, int64_t step, int64_t done);

/// The on-demand schedule: teleport when ||∇L||² falls below
/// `stall_fraction` of its running mean (an exponential average with weight
/// `stall_decay` on the past), at least `stall_cooldown` steps after the start
/// and after the last teleport it asked for.
class StallDetector {
 public:
  /// Records ||∇L||² at `step`; true when training has stalled and a teleport
  /// is allowed now (the caller checks until and max_teleports).
  bool update(const TeleportOptions& options, double grad_norm_sq, int64_t step);
  /// The running mean, NaN before the first value.
  double mean() const { return mean_; }
  /// The step of the last teleport it asked for (0 before any).
  int64_t last() const { return last_; }
  /// Sets both, as a checkpoint recorded them.
  void restore(double mean, int64_t last) {
    mean_ = mean;
    last_ = last;
  }

 private:
  double mean_ = std::numeric_limits<double>::quiet_NaN();
  int64_t last_ = 0;  // the step of the last teleport asked for, or 0
};

}  // namespace teleport
