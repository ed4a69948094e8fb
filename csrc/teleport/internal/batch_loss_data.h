#pragma once
// Not installed: what a BatchLoss holds and how it evaluates (batch_loss.cpp),
// with what the library's engines read from it: a layer's input and output,
// recorded by an evaluation of the loss, and sums over the ranks.

#include <teleport/batch_loss.h>

#include <ATen/Tensor.h>
#include <c10/core/Device.h>
#include <torch/nn/modules/container/sequential.h>

#include <memory>
#include <utility>
#include <vector>

namespace teleport {
class RandomState;  // internal/random_state.h
}  // namespace teleport

namespace teleport::detail {

class BatchLossData {
 public:
  bool has_model() const { return !model_.is_empty(); }
  at::Tensor loss(const ParameterOverrides& overrides) const;
  at::Tensor forward(const ParameterOverrides& overrides) const;
  at::Tensor global_loss(const ParameterOverrides& overrides) const;

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
  /// `x` summed over the ranks, differentiably: the gradient flowing back into
  /// it is the sum over the ranks of what each result received. `x` itself
  /// without a group.
  at::Tensor sum_over_ranks(const at::Tensor& x) const;
  /// x as rows (batch × features), gathered over the ranks when spread.
  at::Tensor rows_of(const at::Tensor& x) const;

 private:
  friend class teleport::BatchLoss;
  // Runs the model up to the layer of `stop` (through it when `through`), or to
  // the end, recording what seen_ watches.
  at::Tensor run_model(const ParameterOverrides& overrides, const at::Tensor& stop,
                       bool through) const;

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
  // last evaluation computed them, with the values it ran on (shared by copies).
  struct Seen;
  std::shared_ptr<Seen> seen_;
};

/// What `batch` holds, for the engines.
inline const BatchLossData& data_of(const BatchLoss& batch) { return *batch.data_; }

}  // namespace teleport::detail
