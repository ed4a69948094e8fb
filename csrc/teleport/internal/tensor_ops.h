#pragma once
// Not installed: a switch for the tests that compare the two ways teleports
// run on CPU.

namespace teleport::detail {

/// While one is alive, teleports on CPU run the way they run on other
/// devices: the scaling ascent's vector work as tensor operations instead of
/// plain loops, and the autograd ascent's bookkeeping on 0-dim tensors instead
/// of host values. The previous choice comes back when it is destroyed, on a
/// throw too.
class TensorOpsOnCpu {
 public:
  TensorOpsOnCpu();
  ~TensorOpsOnCpu();
  TensorOpsOnCpu(const TensorOpsOnCpu&) = delete;
  TensorOpsOnCpu& operator=(const TensorOpsOnCpu&) = delete;

 private:
  bool previous_;
};

}  // namespace teleport::detail
