// What the library knows about each torch::optim optimizer's state
// (internal/inner_state.h).
#include <teleport/internal/inner_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <string>
#include <tuple>

namespace teleport::detail {

void erase_state(Optimizer& opt, const at::Tensor& p) {
  auto& state = opt.state();
  state.erase(state_key(state, p));
}

void set_state(Optimizer& opt, const at::Tensor& p,
               std::unique_ptr<torch::optim::OptimizerParamState> s) {
  auto& state = opt.state();
  state[state_key(state, p)] = std::move(s);
}

std::vector<at::Tensor> all_params(const Optimizer& opt) {
  std::vector<at::Tensor> out;
  for (const auto& group : opt.param_groups()) {
    out.insert(out.end(), group.params().begin(), group.params().end());
  }
  return out;
}

std::optional<AdamLike> adam_like(const torch::optim::OptimizerOptions* options,
                                  torch::optim::OptimizerParamState* state) {
  namespace o = torch::optim;
  AdamLike a;
  auto read = [&a](const auto& x) {
    a.lr = x.lr(), a.beta1 = std::get<0>(x.betas()), a.beta2 = std::get<1>(x.betas());
    a.eps = x.eps(), a.weight_decay = x.weight_decay(), a.amsgrad = x.amsgrad();
  };
  if (const auto* x = dynamic_cast<const o::AdamOptions*>(options)) {
    read(*x);
  } else if (const auto* x = dynamic_cast<const o::AdamWOptions*>(options)) {
    read(*x);
    a.decoupled = true;
  } else {
    return std::nullopt;
  }
  auto read_state = [&a](const auto& s) {
    a.step = s.step(), a.exp_avg = s.exp_avg(), a.exp_avg_sq = s.exp_avg_sq();
    a.max_exp_avg_sq = s.max_exp_avg_sq();
  };
  if (const auto* s = dynamic_cast<o::AdamParamState*>(state)) read_state(*s);
  if (const auto* s = dynamic_cast<o::AdamWParamState*>(state)) read_state(*s);
  return a;
}

std::string untransportable(const Optimizer& opt) {
  for (const auto& group : opt.param_groups()) {
    const auto* o = &group.options();
    double decay = 0;
    std::string what;
    if (const auto* sgd = dynamic_cast<const torch::optim::SGDOptions*>(o)) {
      if (sgd->momentum() != 0) decay = sgd->weight_decay(), what = "SGD's momentum buffer";
    } else if (const auto* a = dynamic_cast<const torch::optim::AdagradOptions*>(o)) {
      decay = a->weight_decay(), what = "Adagrad's sums";
    } else if (const auto* a = dynamic_cast<const torch::optim::AdamOptions*>(o)) {
      decay = a->weight_decay(), what = "Adam's moments";
    } else if (const auto* r = dynamic_cast<const torch::optim::RMSpropOptions*>(o)) {
      decay = r->weight_decay(), what = "RMSprop's averages";
    }
    if (decay != 0) {
      return "StatePolicy::kTransport cannot carry " + what + " with weight_decay " +
             std::to_string(decay) +
             ": they hold ∇L + λw, and no map carries that sum exactly; use "
             "StatePolicy::kKeep or kReset, or decoupled decay (AdamW)";
    }
  }
  return "";
}

Buffers buffers_of(torch::optim::OptimizerParamState* s) {
  namespace o = torch::optim;
  Buffers b;
  if (s == nullptr) return b;
  if (auto* x = dynamic_cast<o::SGDParamState*>(s)) {
    b.gradient_like = x->momentum_buffer();
  } else if (auto* x = dynamic_cast<o::AdagradParamState*>(s)) {
    b.squared = {x->sum()};
  } else if (auto* x = dynamic_cast<o::AdamParamState*>(s)) {
    b.gradient_like = x->exp_avg();
    b.squared = {x->exp_avg_sq(), x->max_exp_avg_sq()};
  } else if (auto* x = dynamic_cast<o::AdamWParamState*>(s)) {
    b.gradient_like = x->exp_avg();
    b.squared = {x->exp_avg_sq(), x->max_exp_avg_sq()};
  } else if (auto* x = dynamic_cast<o::RMSpropParamState*>(s)) {
    // Its momentum_buffer accumulates lr g/(√v + ε): under an exact scaling of
    // v that ratio is invariant up to ε, so the buffer is kept as it is.
    b.gradient_like = x->grad_avg();
    b.squared = {x->square_avg()};
  } else if (dynamic_cast<o::LBFGSParamState*>(s) == nullptr) {  // LBFGS: transport_lbfgs()
    b.known = false;
  }
  return b;
}

// The options of the param group holding `p`, or nullptr.
const torch::optim::OptimizerOptions* options_of(const Optimizer& opt, const at::Tensor& p) {
  for (const auto& group : opt.param_groups()) {
    for (const auto& q : group.params()) {
      if (q.is_same(p)) return &group.options();
    }
  }
  return nullptr;
}

// Where Adagrad's sum of squared gradients starts (its group's
// initial_accumulator_value); 0 for other optimizers.
double adagrad_offset(const Optimizer& opt, const at::Tensor& p) {
  const auto* o = dynamic_cast<const torch::optim::AdagradOptions*>(options_of(opt, p));
  return o != nullptr ? o->initial_accumulator_value() : 0.0;
}

}  // namespace teleport::detail
