#pragma once
// Not installed: a switch for the tests that compare the two ways the scaling
// ascent runs on CPU.

namespace teleport::detail {

/// While one is alive, scaling teleports on CPU run their vector work as
/// tensor operations (the way they run on other devices) instead of plain
/// loops. The previous choice comes back when it is destroyed, on a throw too.
class ScalingTensorOpsOnCpu {
 public:
  ScalingTensorOpsOnCpu();
  ~ScalingTensorOpsOnCpu();
  ScalingTensorOpsOnCpu(const ScalingTensorOpsOnCpu&) = delete;
  ScalingTensorOpsOnCpu& operator=(const ScalingTensorOpsOnCpu&) = delete;

 private:
  bool previous_;
};

}  // namespace teleport::detail
