#pragma once
// Not installed: what the library knows about each torch::optim optimizer's
// state (docs/design.md §7): its buffers by what they hold, Adam's and AdamW's
// fields read alike, what kTransport cannot carry.

#include <teleport/optimizer.h>

#include <ATen/Tensor.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace teleport::detail {

using torch::optim::Optimizer;

/// The key an optimizer's state map uses for `p`: LibTorch 1.x keys by the
/// TensorImpl pointer printed as a string, 2.x by the pointer itself.
template <typename Map>
typename Map::key_type state_key(const Map&, const at::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

/// Per-parameter views of a flat vector laid out as LBFGS lays out its
/// parameters (concatenated, in order); writing a view writes the vector.
std::vector<at::Tensor> flat_views(const at::Tensor& flat, const std::vector<at::Tensor>& params);

/// The inner optimizer's state for parameter `p`, or nullptr; works with the
/// state keys of LibTorch 1.x (strings) and 2.x (pointers) alike.
torch::optim::OptimizerParamState* find_state(torch::optim::Optimizer& opt, const at::Tensor& p);

void erase_state(Optimizer& opt, const at::Tensor& p);
void set_state(Optimizer& opt, const at::Tensor& p,
               std::unique_ptr<torch::optim::OptimizerParamState> s);
// Every parameter of every param group, in order.
std::vector<at::Tensor> all_params(const Optimizer& opt);

// Adam's and AdamW's settings and one parameter's state, read alike (the two
// optimizers have separate types with the same fields); nothing for others.
struct AdamLike {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  bool amsgrad = false, decoupled = false;  // decoupled: AdamW's weight decay
  int64_t step = 0;
  at::Tensor exp_avg, exp_avg_sq, max_exp_avg_sq;  // undefined before the first step
};
std::optional<AdamLike> adam_like(const torch::optim::OptimizerOptions* options,
                                  torch::optim::OptimizerParamState* state);

// Why kTransport cannot carry this optimizer's state, or "" when it can.
// Weight decay added to the gradient (SGD with momentum, Adagrad, Adam,
// RMSprop) mixes λw into the buffers, and w transforms by A, ∇L by A^{-T}: no
// map carries the mixture (docs/design.md §7). AdamW's decoupled decay does
// not touch the buffers.
std::string untransportable(const Optimizer& opt);

// The inner state's buffers of one parameter, by what they hold
// (docs/design.md §7).
struct Buffers {
  at::Tensor gradient_like;         // maps as gradients do
  std::vector<at::Tensor> squared;  // sums or averages of squared gradients
  bool known = true;                // false for a state type not listed here
};
Buffers buffers_of(torch::optim::OptimizerParamState* s);

// Where Adagrad's sum of squared gradients starts (its group's
// initial_accumulator_value); 0 for other optimizers.
double adagrad_offset(const Optimizer& opt, const at::Tensor& p);

}  // namespace teleport::detail
