#include <teleport/objective.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

namespace teleport {
const at::Tensor& value_of(const ParameterOverrides& overrides, const at::Tensor& p) {
  for (const auto& o : overrides) {
    if (p.defined() && o.first.is_same(p)) return o.second;
  }
  return p;
}

Objective::Objective(torch::nn::Sequential model, at::Tensor input,
                     at::Tensor target, LossFn loss_fn)
    : model_(std::move(model)),
      input_(std::move(input)),
      target_(std::move(target)),
      loss_fn_(std::move(loss_fn)) {
  TORCH_CHECK(!model_.is_empty(), "Objective: expected a model, got an empty holder");
  TORCH_CHECK(input_.defined(), "Objective: expected an input batch, got an undefined tensor");
  TORCH_CHECK(loss_fn_ != nullptr, "Objective: expected a loss function, got none");
  std::vector<at::Tensor> tensors = model_->parameters();
  tensors.push_back(input_);
  devices_ = devices_of(tensors);
  random_ = std::make_shared<const RandomState>(devices_);
}

Objective::Objective(ParametricLossFn loss) : parametric_(std::move(loss)) {
  TORCH_CHECK(parametric_ != nullptr, "Objective: expected a loss function, got none");
  random_ = std::make_shared<const RandomState>();
}

namespace {

// Runs the model on x up to (not including) the Linear layer whose weight is
// `stop`, or to the end when `stop` is undefined; `overrides` first, then `fixed`.
at::Tensor run(const torch::nn::Sequential& model, at::Tensor x,
               const ParameterOverrides& overrides, const ParameterOverrides& fixed,
               const at::Tensor& stop) {
  auto lookup = [&](const at::Tensor& p) -> const at::Tensor& {
    const at::Tensor& v = value_of(overrides, p);
    return v.is_same(p) ? value_of(fixed, p) : v;
  };
  for (auto& module : *model.ptr()) {
    if (auto* linear = module.ptr()->as<torch::nn::Linear>()) {
      if (stop.defined() && linear->weight.is_same(stop)) return x;
      x = at::linear(x, lookup(linear->weight), lookup(linear->bias));
    } else {
      x = module.forward(x);
    }
  }
  TORCH_CHECK(!stop.defined(), "Objective::input_of: the model has no Linear layer with that weight");
  return x;
}

}  // namespace

namespace {

// Runs `f` with the generators as `random` captured them, then puts back
// the state they had before.
template <typename F>
at::Tensor replayed(const RandomState& random, const std::vector<c10::Device>& devices, F&& f) {
  const RandomState now(devices);
  random.restore();
  at::Tensor out;
  try {
    out = f();
  } catch (...) {
    now.restore();
    throw;
  }
  now.restore();
  return out;
}

}  // namespace

at::Tensor Objective::forward(const ParameterOverrides& overrides) const {
  TORCH_CHECK(has_model(), "Objective::forward: this objective has no model");
  return replayed(*random_, devices_,
                  [&] { return run(model_, input_, overrides, fixed_, at::Tensor()); });
}

at::Tensor Objective::input_of(const at::Tensor& weight, const ParameterOverrides& overrides) const {
  TORCH_CHECK(has_model(), "Objective::input_of: this objective has no model");
  at::Tensor x =
      replayed(*random_, devices_, [&] { return run(model_, input_, overrides, fixed_, weight); });
  return x.reshape({-1, x.size(-1)});
}

Objective Objective::with_fixed(ParameterOverrides fixed) const {
  Objective copy = *this;
  copy.fixed_ = std::move(fixed);
  return copy;
}

at::Tensor Objective::loss(const ParameterOverrides& overrides) const {
  at::Tensor l = parametric_ ? replayed(*random_, devices_, [&] { return parametric_(overrides); })
                             : loss_fn_(forward(overrides), target_);
  TORCH_CHECK(l.numel() == 1, "Objective: expected the loss function to return a scalar, got ",
              l.sizes());
  return l.reshape({});
}

}  // namespace teleport
