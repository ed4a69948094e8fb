#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <vector>

namespace teleport {

/// What a teleport needs from a process group when its data is split over
/// processes (docs/design.md §10): sums and concatenations over the ranks,
/// called in the same order on every rank. teleport::distributed::ProcessGroup
/// (teleport/distributed.h) provides it over c10d; the core library depends on
/// this interface only, so it builds without c10d.
class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  /// Replaces every tensor by its sum over the ranks.
  virtual void all_reduce_sum(std::vector<at::Tensor>& tensors) = 0;
  /// Every rank's `rows` (one trailing shape; row counts may differ),
  /// concatenated along dimension 0 in rank order; `first_row` is where this
  /// rank's rows start in the result.
  virtual at::Tensor all_gather_rows(const at::Tensor& rows, int64_t& first_row) = 0;
};

}  // namespace teleport
