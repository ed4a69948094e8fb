#pragma once
// Not installed: the random generators' state, replayed (internal/random_state.cpp).

#include <ATen/Tensor.h>
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include <memory>
#include <utility>
#include <vector>

namespace teleport {

/// The state of the default random generators of the CPU and of some devices,
/// captured so that two evaluations of a loss see the same randomness
/// (dropout masks): the loss before a teleport and after it must differ only
/// by what the teleport did.
class RandomState {
 public:
  /// Captures the CPU's generator and that of every device in `devices`.
  explicit RandomState(const std::vector<c10::Device>& devices = {});
  /// Sets the generators back to the captured state.
  void restore() const;

 private:
  // The CPU's generator as a copy of its engine (a few kilobytes copied,
  // against get_state()'s tensor and set_state()'s checks at every
  // evaluation of a loss); other devices' through their state tensors.
  struct CpuState;
  at::Generator cpu_;
  std::shared_ptr<const CpuState> cpu_state_;
  std::vector<std::pair<at::Generator, at::Tensor>> states_;
};

/// The distinct devices of `tensors`.
std::vector<c10::Device> devices_of(const std::vector<at::Tensor>& tensors);

}  // namespace teleport
