#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

namespace teleport::detail {

/// Tensors (module buffers: BatchNorm's running statistics and batch counts;
/// the inner optimizer's state) as they are at construction, put back bitwise
/// at the end of the scope unless released: evaluations made for a teleport
/// never update buffers, and a state transport that throws half-way leaves
/// the state as it was (docs/design.md §6, §7).
class BufferGuard {
 public:
  explicit BufferGuard(std::vector<at::Tensor> buffers) : buffers_(std::move(buffers)) {
    values_.reserve(buffers_.size());
    for (const auto& b : buffers_) values_.push_back(b.detach().clone());
  }
  BufferGuard(const BufferGuard&) = delete;
  BufferGuard& operator=(const BufferGuard&) = delete;
  ~BufferGuard() {
    if (!released_) restore();
  }
  /// Keeps what the tensors hold now: nothing is put back at the end.
  void release() { released_ = true; }

  /// Written as BatchNorm's kernels update them, below autograd and without
  /// a version bump: a train-mode forward saves the running statistics for
  /// its backward (which does not read them), and an in-place write seen by
  /// autograd would make that backward refuse to run.
  void restore() const {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].copy_(values_[i]);
  }

 private:
  std::vector<at::Tensor> buffers_, values_;
  bool released_ = false;
};

}  // namespace teleport::detail
