#pragma once

#include <teleport/ascent.h>
#include <teleport/batch_loss.h>
#include <teleport/discover.h>
#include <teleport/options.h>
#include <teleport/symmetry.h>

#include <torch/nn/modules/container/sequential.h>
#include <torch/optim/optimizer.h>

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace teleport {

/// An optimizer that teleports on a schedule and otherwise is the optimizer it
/// wraps. Only the line that builds the optimizer changes in a training loop:
///
///   teleport::TeleportOptimizer opt(model,
///       std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05)),
///       teleport::TeleportOptions().every(100).steps(10).lr(1e-3));
///   // opt.zero_grad(); loss.backward(); opt.step();
///
/// step() teleports when the schedule says so, from `.grad` in closed form,
/// then lets the inner optimizer step; without a teleport due it is exactly
/// the inner optimizer's step. step(closure) also measures the loss before and
/// after (same randomness) and rolls back a teleport that changed it beyond
/// the tolerance. Param groups are copied to the inner optimizer before each
/// step: set learning rates here; the inner state is reached through inner().
class TeleportOptimizer : public torch::optim::Optimizer {
 public:
  using BatchFn = std::function<std::pair<at::Tensor, at::Tensor>()>;

  /// Teleports the symmetries discover() finds in `model`.
  TeleportOptimizer(torch::nn::Sequential model, std::unique_ptr<torch::optim::Optimizer> inner,
                    TeleportOptions options = {}, DiscoverOptions discover_options = {});

  /// Teleports the given symmetries of any model, e.g. a custom Module's
  /// declared with teleport::scaling(a, b) and teleport::gl(a, b).
  TeleportOptimizer(SymmetryList symmetries, std::unique_ptr<torch::optim::Optimizer> inner,
                    TeleportOptions options = {});
  /// The same for a braced list, `TeleportOptimizer({teleport::scaling(a, b), ...}, ...)`.
  TeleportOptimizer(std::initializer_list<std::shared_ptr<Symmetry>> symmetries,
                    std::unique_ptr<torch::optim::Optimizer> inner, TeleportOptions options = {})
      : TeleportOptimizer(SymmetryList(symmetries), std::move(inner), std::move(options)) {}

  /// Teleports the given symmetries; `model` serves the teleport batch and may
  /// be an empty holder (`torch::nn::Sequential(nullptr)`) when none is used.
  TeleportOptimizer(torch::nn::Sequential model, SymmetryList symmetries,
                    std::unique_ptr<torch::optim::Optimizer> inner, TeleportOptions options = {});

  at::Tensor step(LossClosure closure = nullptr) override;

  /// Teleport on batches of their own: `next_batch` gives (input, target) at
  /// each teleport, `loss_fn` the loss. Required for Method::kAutograd.
  void set_teleport_batch(BatchFn next_batch, LossFn loss_fn);

  /// Data-parallel training (docs/design.md §10): this rank holds `share` of
  /// every global batch (default 1 / world_size); `.grad` must be averaged
  /// over the ranks before step(). The group makes the teleport batch and the
  /// losses step(closure) compares global. Call it on every rank before the
  /// first step; nullptr goes back to one process.
  void set_process_group(std::shared_ptr<Collectives> group, double share = -1);

  /// The module buffers (BatchNorm's running statistics) that step(closure)
  /// leaves as one call of the closure would. A Sequential passed to the
  /// constructor gives its own; a custom Module passes `net->buffers()`.
  void set_buffers(std::vector<at::Tensor> buffers);
  Collectives* process_group() const;

  /// Options, counters, param groups and the inner state by parameter
  /// position, so a checkpoint loads into a rebuilt model (docs/design.md §9).
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  torch::optim::Optimizer& inner();
  const torch::optim::Optimizer& inner() const;
  const SymmetryList& symmetries() const;
  /// Why some pairs of layers got no symmetry (from discover()).
  const std::vector<std::string>& notes() const;
  TeleportOptions& options();
  const TeleportOptions& options() const;
  /// Optimizer steps taken so far.
  int64_t step_count() const;
  /// Teleports attempted so far (rolled-back ones included).
  int64_t teleport_count() const;
  /// The last teleport's report, or nullptr before the first.
  const TeleportReport* last_report() const;

  ~TeleportOptimizer() override;

 private:
  struct Impl;  // internal/optimizer_impl.h
  std::unique_ptr<Impl> impl_;
};

}  // namespace teleport
