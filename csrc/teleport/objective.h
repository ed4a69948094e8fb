#pragma once

#include <ATen/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

#include <functional>
#include <utility>
#include <vector>

namespace teleport {

/// loss(output, target) -> scalar, e.g. torch::nn::functional::cross_entropy.
using LossFn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

/// Parameters replaced by other tensors for one evaluation: {parameter, value}.
using ParameterOverrides = std::vector<std::pair<at::Tensor, at::Tensor>>;

/// The loss of a torch::nn::Sequential on one batch. Some of its Linear
/// layers' parameters can be replaced for one evaluation, differentiably,
/// which is what the autograd direction and the loss checks need.
class Objective {
 public:
  Objective(torch::nn::Sequential model, at::Tensor input, at::Tensor target,
            LossFn loss_fn);

  /// The loss with the model's own parameters, or with `overrides` in place of
  /// some Linear weights and biases. Differentiable when grad mode is on.
  at::Tensor loss(const ParameterOverrides& overrides = {}) const;

  /// The model's output on the batch, with optional overrides.
  at::Tensor forward(const ParameterOverrides& overrides = {}) const;

  const torch::nn::Sequential& model() const { return model_; }

 private:
  torch::nn::Sequential model_;
  at::Tensor input_, target_;
  LossFn loss_fn_;
};

}  // namespace teleport
