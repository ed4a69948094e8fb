#pragma once

// Data-parallel training on c10d (docs/design.md §10). Built when
// TELEPORT_DISTRIBUTED is on (the default where LibTorch ships c10d and the
// Gloo headers are found); link teleport::teleport as usual.

#include <teleport/collectives.h>

#include <ATen/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/arg.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace teleport {
namespace distributed {

/// Where this process stands in a job, as torchrun's environment says.
struct Rendezvous {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  /// The launcher hosts the store (TORCHELASTIC_USE_AGENT_STORE=True), not rank 0.
  bool store_by_launcher = false;
  /// Prefix of this job's keys in the store (differs between restarts).
  std::string prefix = "teleport";

  /// The environment's rendezvous, or nothing when RANK and WORLD_SIZE are both
  /// unset; a c10::Error naming the variable when one is missing or malformed.
  static std::optional<Rendezvous> from_env();
};

/// Any c10d group (ProcessGroup, or a 2.x Backend such as ProcessGroupGloo)
/// seen through teleport::Collectives, counting the bytes it sends:
///
///   auto group = std::make_shared<teleport::distributed::ProcessGroup>(
///       c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options));
///
/// Every collective waits for its result, bounded by the group's timeout.
class ProcessGroup final : public Collectives {
 public:
  template <typename Group>
  explicit ProcessGroup(c10::intrusive_ptr<Group> group)
      : rank_(group->getRank()),
        size_(group->getSize()),
        all_reduce_([group](std::vector<at::Tensor>& tensors, c10d::ReduceOp op) {
          c10d::AllreduceOptions options;
          options.reduceOp = op;
          group->allreduce(tensors, options)->wait();
        }),
        all_gather_([group](std::vector<std::vector<at::Tensor>>& out,
                            std::vector<at::Tensor>& in) { group->allgather(out, in)->wait(); }),
        holder_(std::make_shared<c10::intrusive_ptr<Group>>(std::move(group))) {}

  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return size_; }
  /// One all-reduce per bucket of at most bucket_bytes().
  void all_reduce_sum(std::vector<at::Tensor>& tensors) override;
  at::Tensor all_gather_rows(const at::Tensor& rows, int64_t& first_row) override;
  /// Elementwise maximum over the ranks, in place (one all-reduce).
  void all_reduce_max(at::Tensor& tensor);

  int64_t bucket_bytes() const { return bucket_bytes_; }
  void set_bucket_bytes(int64_t bytes);
  /// Bytes this rank has handed to collectives so far.
  int64_t bytes() const { return bytes_; }

 private:
  void all_reduce(std::vector<at::Tensor>& flat, c10d::ReduceOp op);

  int64_t rank_, size_;
  std::function<void(std::vector<at::Tensor>&, c10d::ReduceOp)> all_reduce_;
  std::function<void(std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&)> all_gather_;
  std::shared_ptr<void> holder_;  // keeps the c10d group alive
  int64_t bucket_bytes_ = int64_t{25} << 20;
  int64_t bytes_ = 0;
};

/// Joins the job `where` describes: a TCPStore at MASTER_ADDR:MASTER_PORT,
/// then Gloo for a CPU `device`, NCCL for CUDA. `timeout` bounds the
/// rendezvous and every collective; past it, a c10::Error.
std::shared_ptr<ProcessGroup> init_process_group(
    const Rendezvous& where, c10::DeviceType device = c10::DeviceType::CPU,
    std::chrono::milliseconds timeout = std::chrono::seconds(30));

/// Between backward() and step(): each parameter's `.grad` becomes the global
/// batch's gradient, the sum over the ranks of `share` (this rank's fraction
/// of the global batch; default 1 / world_size) × the local one. Every rank
/// passes the same parameters in the same order, each with a gradient.
void average_gradients(const std::vector<at::Tensor>& parameters, Collectives& group,
                       double share = -1);

/// How launch_local() runs its processes.
struct LaunchOptions {
  /// How long the others get to end after one failed, before SIGKILL.
  TORCH_ARG(std::chrono::milliseconds, grace) = std::chrono::seconds(5);
  /// Kills every process after this long (0: no limit); the result is then 124.
  TORCH_ARG(std::chrono::milliseconds, deadline) = std::chrono::milliseconds(0);
  /// More environment for every process, as NAME=value.
  TORCH_ARG(std::vector<std::string>, env) = {};
  /// Where the launcher says which process a signal killed; unset: nowhere.
  TORCH_ARG(std::function<void(const std::string&)>, log) = nullptr;
};

/// torchrun on one machine: runs `argv` (argv[0] the program's path) as
/// `nproc` processes with torchrun's environment (RANK, LOCAL_RANK,
/// WORLD_SIZE, MASTER_ADDR, MASTER_PORT; OMP_NUM_THREADS=1 where unset),
/// hosting their store itself. When one fails the others get the grace
/// period, then SIGKILL; one killed by a signal is named through `log` and
/// the others get SIGTERM at once. Signals to the launcher are passed on, and
/// no rank outlives it (docs/design.md §10). Returns 0 when every process
/// succeeded, else the first failure's exit code (128 + signal number).
int launch_local(int64_t nproc, const std::vector<std::string>& argv,
                 const LaunchOptions& options = {});

}  // namespace distributed
}  // namespace teleport
