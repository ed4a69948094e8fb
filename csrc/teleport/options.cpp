#include <teleport/options.h>

#include <c10/util/Exception.h>

#include <cmath>

namespace teleport {

void TeleportOptions::validate() const {
  TORCH_CHECK(every() >= 0, "TeleportOptions: expected every >= 0, got ", every());
  for (int64_t s : at()) {
    TORCH_CHECK(s >= 0, "TeleportOptions: expected steps in `at` >= 0, got ", s);
  }
  TORCH_CHECK(until() >= -1, "TeleportOptions: expected until >= 0 or -1 (no limit), got ",
              until());
  TORCH_CHECK(max_teleports() >= -1,
              "TeleportOptions: expected max_teleports >= 0 or -1 (no limit), got ",
              max_teleports());
  TORCH_CHECK(steps() >= 0, "TeleportOptions: expected steps >= 0, got ", steps());
  TORCH_CHECK(std::isfinite(lr()) && lr() > 0,
              "TeleportOptions: expected a finite lr > 0, got ", lr());
  TORCH_CHECK(tolerance() > 0, "TeleportOptions: expected tolerance > 0, got ", tolerance());
  TORCH_CHECK(max_step() > 0, "TeleportOptions: expected max_step > 0, got ", max_step());
  TORCH_CHECK(max_growth() >= 1,
              "TeleportOptions: expected max_growth >= 1 (a ratio of gradient norms), got ",
              max_growth());
}

}  // namespace teleport
