#include <teleport/objective.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

namespace teleport {
namespace {

// The override for `p`, or `p` itself.
const at::Tensor& lookup(const ParameterOverrides& overrides, const at::Tensor& p) {
  for (const auto& o : overrides) {
    if (p.defined() && o.first.is_same(p)) return o.second;
  }
  return p;
}

}  // namespace

Objective::Objective(torch::nn::Sequential model, at::Tensor input,
                     at::Tensor target, LossFn loss_fn)
    : model_(std::move(model)),
      input_(std::move(input)),
      target_(std::move(target)),
      loss_fn_(std::move(loss_fn)) {
  TORCH_CHECK(!model_.is_empty(), "Objective: expected a model, got an empty holder");
  TORCH_CHECK(input_.defined(), "Objective: expected an input batch, got an undefined tensor");
  TORCH_CHECK(loss_fn_ != nullptr, "Objective: expected a loss function, got none");
}

at::Tensor Objective::forward(const ParameterOverrides& overrides) const {
  at::Tensor x = input_;
  for (auto& module : *model_.ptr()) {
    if (auto* linear = module.ptr()->as<torch::nn::Linear>()) {
      x = at::linear(x, lookup(overrides, linear->weight), lookup(overrides, linear->bias));
    } else {
      x = module.forward(x);
    }
  }
  return x;
}

at::Tensor Objective::loss(const ParameterOverrides& overrides) const {
  at::Tensor l = loss_fn_(forward(overrides), target_);
  TORCH_CHECK(l.numel() == 1, "Objective: expected the loss function to return a scalar, got ",
              l.sizes());
  return l.reshape({});
}

}  // namespace teleport
