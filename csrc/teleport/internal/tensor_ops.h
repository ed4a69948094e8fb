#pragma once
// Not installed: a switch for the tests that compare the two ways teleports
// run on CPU.

#include <ATen/Tensor.h>

#include <vector>

namespace teleport::detail {

/// While one is alive, teleports on CPU run the way they run on other
/// devices: the scaling ascent's vector work as tensor operations instead of
/// plain loops, the autograd ascent's bookkeeping on 0-dim tensors instead of
/// host values, and the data-dependent action's Cholesky QR of small float32
/// inputs through ATen instead of host loops. The previous choice comes
/// back when it is destroyed, on a throw too.
class TensorOpsOnCpu {
 public:
  TensorOpsOnCpu();
  ~TensorOpsOnCpu();
  TensorOpsOnCpu(const TensorOpsOnCpu&) = delete;
  TensorOpsOnCpu& operator=(const TensorOpsOnCpu&) = delete;

 private:
  bool previous_;
};

// Whether the bookkeeping of an ascent on tensors like these, and the small
// Cholesky QRs of the data-dependent action on them, run on the host: on the
// CPU, where reading a value costs nothing and dozens of ATen calls on tiny
// tensors do not, unless a TensorOpsOnCpu is alive.
bool host_bookkeeping(const at::Tensor& like);
bool host_bookkeeping(const std::vector<at::Tensor>& params);

}  // namespace teleport::detail
