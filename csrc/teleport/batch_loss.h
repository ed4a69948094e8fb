#pragma once

#include <teleport/collectives.h>

#include <ATen/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace teleport {

class BatchLoss;
namespace detail {
class BatchLossData;
const BatchLossData& data_of(const BatchLoss& batch);
}  // namespace detail

/// loss(output, target) -> scalar, e.g. torch::nn::functional::cross_entropy.
using LossFn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

/// Parameters replaced by other tensors for one evaluation: {parameter, value}.
using ParameterOverrides = std::vector<std::pair<at::Tensor, at::Tensor>>;

/// A loss of the parameters themselves, with some of them replaced.
using ParametricLossFn = std::function<at::Tensor(const ParameterOverrides&)>;

/// The loss on one batch, with some parameters replaced for one evaluation,
/// differentiably: a torch::nn::Sequential with a batch and a loss function,
/// or any function of the parameters. Every evaluation sees the randomness
/// (dropout masks) of construction and draws nothing from the stream; the
/// model runs in its current mode, and its buffers (BatchNorm's running
/// statistics) are put back bitwise after every evaluation.
class BatchLoss {
 public:
  BatchLoss(torch::nn::Sequential model, at::Tensor input, at::Tensor target, LossFn loss_fn);
  explicit BatchLoss(ParametricLossFn loss);

  /// The loss with the model's own parameters, or with `overrides` in place of
  /// some Linear weights and biases. Differentiable when grad mode is on.
  at::Tensor loss(const ParameterOverrides& overrides = {}) const;

  /// The model's output on the batch, with optional overrides.
  at::Tensor forward(const ParameterOverrides& overrides = {}) const;

  bool has_model() const;

  /// This batch as one rank's slice of a global batch split over `group`
  /// (docs/design.md §10): `share` is its fraction of the global batch (its
  /// rows over all ranks' rows; default 1 / world_size). A teleport then uses
  /// the global batch's loss and gradient (share-weighted sums over the ranks),
  /// and a layer's inputs hold every rank's rows, so that every rank computes
  /// the same teleport. Every rank must teleport with its slice at the same time.
  BatchLoss spread_over(std::shared_ptr<Collectives> group, double share = -1) const;
  /// The group of spread_over(), or nullptr.
  Collectives* group() const;
  /// This rank's fraction of the global batch (1 without a group).
  double share() const;
  /// The global batch's loss: loss() summed over the ranks with their shares
  /// (loss() itself without a group). Detached.
  at::Tensor global_loss(const ParameterOverrides& overrides = {}) const;

  /// A copy that evaluates with `fixed` in force wherever a call's own
  /// overrides say nothing (e.g. the weights as they were before a step).
  BatchLoss with_fixed(ParameterOverrides fixed) const;

 private:
  friend const detail::BatchLossData& detail::data_of(const BatchLoss& batch);
  std::shared_ptr<detail::BatchLossData> data_;  // internal/batch_loss_data.h
};

/// The value `p` has under `overrides`: its override, or `p` itself.
const at::Tensor& value_of(const ParameterOverrides& overrides, const at::Tensor& p);

}  // namespace teleport
