#include <teleport/internal/schedule.h>

#include <algorithm>
#include <cmath>

namespace teleport {

bool teleport_allowed(const TeleportOptions& options, int64_t step, int64_t done) {
  if (options.max_teleports() >= 0 && done >= options.max_teleports()) return false;
  return options.until() < 0 || step < options.until();
}

bool teleport_due(const TeleportOptions& options, int64_t step, int64_t done) {
  if (!teleport_allowed(options, step, done)) return false;
  if (options.every() > 0 && step % options.every() == 0) return true;
  const auto& at = options.at();
  return std::find(at.begin(), at.end(), step) != at.end();
}

bool StallDetector::update(const TeleportOptions& options, double grad_norm_sq, int64_t step) {
  if (!std::isfinite(grad_norm_sq)) return false;  // nothing to learn from
  const double before = mean_;
  mean_ = std::isnan(mean_)
              ? grad_norm_sq
              : options.stall_decay() * mean_ + (1 - options.stall_decay()) * grad_norm_sq;
  const bool stalled = options.stall_fraction() > 0 && !std::isnan(before) &&
                       step - last_ >= options.stall_cooldown() &&
                       grad_norm_sq < options.stall_fraction() * before;
  if (stalled) last_ = step;
  return stalled;
}

}  // namespace teleport
