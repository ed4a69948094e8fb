#pragma once
// Not installed: the inner optimizer's state map, keyed alike in LibTorch 1.x
// and 2.x, and what the optimizer adapters (internal/optimizers/) say of it.

#include <teleport/internal/optimizers/adapter.h>

#include <ATen/Tensor.h>
#include <torch/optim/optimizer.h>

#include <memory>
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
/// Every parameter of every param group, in order.
std::vector<at::Tensor> all_params(const Optimizer& opt);
/// The options of the param group holding `p`, or nullptr.
const torch::optim::OptimizerOptions* options_of(const Optimizer& opt, const at::Tensor& p);

/// Why kTransport cannot carry this optimizer's state, or "" when it can.
std::string untransportable(const Optimizer& opt);
/// One parameter's state buffers, by what they hold (`known` false for a
/// state no adapter knows; nothing for none).
Buffers buffers_of(torch::optim::OptimizerParamState* s);
/// The state the optimizer keeps for all its parameters at once (LBFGS's,
/// under the first parameter's key), or nothing (`whole` false).
Buffers whole_state(Optimizer& opt);
/// Where the squared buffers of `p` start (Adagrad's initial accumulator).
double squared_offset(const Optimizer& opt, const at::Tensor& p);

}  // namespace teleport::detail
