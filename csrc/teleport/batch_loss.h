#pragma once

#include <teleport/collectives.h>
#include <teleport/random_state.h>

#include <ATen/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace teleport {

/// loss(output, target) -> scalar, e.g. torch::nn::functional::cross_entropy.
using LossFn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

/// Parameters replaced by other tensors for one evaluation: {parameter, value}.
using ParameterOverrides = std::vector<std::pair<at::Tensor, at::Tensor>>;

/// A loss of the parameters themselves, with some of them replaced.
using ParametricLossFn = std::function<at::Tensor(const ParameterOverrides&)>;

/// The loss on one batch, with some parameters replaced for one evaluation,
/// differentiably: what the autograd direction, the data-dependent action and
/// the loss checks need. Either a torch::nn::Sequential of Linear layers and
/// parameter-free modules with a batch and a loss function, or any function of
/// the parameters (test functions).
///
/// Every evaluation sees the same randomness (dropout masks): the random
/// generators are set to their state at construction for each evaluation and
/// put back after it, so the loss differs between evaluations only by what
/// the parameters do, and evaluating it draws nothing from the stream. The
/// model runs in its current mode (train or eval), and its buffers (BatchNorm's
/// running statistics) are put back bitwise after every evaluation.
class BatchLoss {
 public:
  BatchLoss(torch::nn::Sequential model, at::Tensor input, at::Tensor target, LossFn loss_fn);
  explicit BatchLoss(ParametricLossFn loss);

  /// The loss with the model's own parameters, or with `overrides` in place of
  /// some Linear weights and biases. Differentiable when grad mode is on.
  at::Tensor loss(const ParameterOverrides& overrides = {}) const;

  /// The model's output on the batch, with optional overrides.
  at::Tensor forward(const ParameterOverrides& overrides = {}) const;

  /// The input (batch × features) of the Linear layer whose weight is
  /// `weight`, with optional overrides in the layers before it.
  at::Tensor input_of(const at::Tensor& weight, const ParameterOverrides& overrides = {}) const;

  /// The input and the output (its pre-activation: input · Wᵀ + b for a
  /// Linear) of that layer, each batch × features, with optional overrides in
  /// it and the layers before it. Without grad mode it reuses what the last
  /// evaluation of the loss computed for a layer it or input_of() was asked
  /// about before, where every parameter value and the batch are the same,
  /// unchanged tensors as then: no forward pass.
  std::pair<at::Tensor, at::Tensor> layer_of(const at::Tensor& weight,
                                             const ParameterOverrides& overrides = {}) const;

  /// Has every later evaluation record the input and output of the layer
  /// whose weight is `weight`, for layer_of() and traced_layer().
  void watch(const at::Tensor& weight) const;

  /// That layer's input and output, in its own shapes, as the last evaluation
  /// of the loss computed them under grad mode: part of its graph, where
  /// derivatives with respect to the layer's output can be taken. Defined only
  /// where that evaluation ran on `overrides` (the very same tensors, each
  /// parameter and the batch unchanged since), watched the layer and met its
  /// weight in no other layer; a pair of undefined tensors otherwise.
  std::pair<at::Tensor, at::Tensor> traced_layer(const at::Tensor& weight,
                                                 const ParameterOverrides& overrides = {}) const;

  bool has_model() const { return !model_.is_empty(); }

  /// This batch as one rank's slice of a global batch split over `group`
  /// (docs/design.md §10): `share` is its fraction of the global batch (its
  /// rows over all ranks' rows; default 1 / world_size). A teleport then uses
  /// the global batch's loss and gradient (share-weighted sums over the ranks),
  /// and input_of() returns every rank's rows, so that every rank computes the
  /// same teleport. Every rank must teleport with its slice at the same time.
  BatchLoss spread_over(std::shared_ptr<Collectives> group, double share = -1) const;
  /// The group of spread_over(), or nullptr.
  Collectives* group() const { return group_.get(); }
  /// This rank's fraction of the global batch (1 without a group).
  double share() const { return share_; }
  /// The global batch's loss: loss() summed over the ranks with their shares
  /// (loss() itself without a group). Detached.
  at::Tensor global_loss(const ParameterOverrides& overrides = {}) const;
  /// `x` summed over the ranks, differentiably: the gradient flowing back into
  /// it is the sum over the ranks of what each result received. `x` itself
  /// without a group.
  at::Tensor sum_over_ranks(const at::Tensor& x) const;

  /// A copy that evaluates with `fixed` in force wherever a call's own
  /// overrides say nothing (e.g. the weights as they were before a step).
  BatchLoss with_fixed(ParameterOverrides fixed) const;

 private:
  torch::nn::Sequential model_{nullptr};
  at::Tensor input_, target_;
  LossFn loss_fn_;
  ParametricLossFn parametric_;
  ParameterOverrides fixed_;
  std::shared_ptr<const RandomState> random_;
  std::vector<c10::Device> devices_;
  std::vector<at::Tensor> buffers_;  // the model's, put back after every evaluation
  std::shared_ptr<Collectives> group_;
  double share_ = 1;
  // The layers layer_of() was asked about, and their inputs and outputs as the
  // last evaluation computed them, with the values it ran on.
  struct Seen;
  std::shared_ptr<Seen> seen_;
  // Runs the model up to the layer of `stop` (through it when `through`), or to
  // the end, recording what seen_ watches.
  at::Tensor run_model(const ParameterOverrides& overrides, const at::Tensor& stop,
                       bool through) const;
  // x as rows (batch × features), gathered over the ranks when spread.
  at::Tensor rows_of(const at::Tensor& x) const;
};

/// The value `p` has under `overrides`: its override, or `p` itself.
const at::Tensor& value_of(const ParameterOverrides& overrides, const at::Tensor& p);

}  // namespace teleport
