#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace teleport::detail {

/// The machine epsilon of `dtype` (float32 for anything but float64: the
/// library refuses half and bfloat16 parameters).
inline double epsilon_of(c10::ScalarType dtype) {
  return dtype == c10::kDouble ? std::numeric_limits<double>::epsilon()
                               : std::numeric_limits<float>::epsilon();
}

/// The largest change of a loss that a teleport may make: `tolerance`
/// relative to the loss, but never below the rounding of a loss computed in
/// `dtype` from terms of order one (64 ε). Near a perfect fit the loss is a
/// small difference of such terms, and its rounding no longer scales with it
/// (docs/design.md §6).
inline double allowed_loss_change(double before, double tolerance, c10::ScalarType dtype) {
  return std::max(tolerance * std::abs(before), 64 * epsilon_of(dtype));
}

}  // namespace teleport::detail
