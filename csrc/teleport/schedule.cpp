#include <teleport/schedule.h>

#include <algorithm>

namespace teleport {

bool teleport_due(const TeleportOptions& options, int64_t step, int64_t done) {
  if (options.max_teleports() >= 0 && done >= options.max_teleports()) return false;
  if (options.until() >= 0 && step >= options.until()) return false;
  if (options.every() > 0 && step % options.every() == 0) return true;
  const auto& at = options.at();
  return std::find(at.begin(), at.end(), step) != at.end();
}

}  // namespace teleport
