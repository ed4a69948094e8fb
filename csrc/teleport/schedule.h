#pragma once

#include <teleport/options.h>

#include <cstdint>

namespace teleport {

/// Whether the schedule in `options` (every, at, until, max_teleports) asks for
/// a teleport before optimizer step `step` (0-based), `done` teleports so far.
bool teleport_due(const TeleportOptions& options, int64_t step, int64_t done);

}  // namespace teleport
