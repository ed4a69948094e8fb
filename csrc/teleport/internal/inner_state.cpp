// The inner optimizer's state map (internal/inner_state.h).
#include <teleport/internal/inner_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

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

const torch::optim::OptimizerOptions* options_of(const Optimizer& opt, const at::Tensor& p) {
  for (const auto& group : opt.param_groups()) {
    for (const auto& q : group.params()) {
      if (q.is_same(p)) return &group.options();
    }
  }
  return nullptr;
}

std::string untransportable(const Optimizer& opt) {
  for (const auto& group : opt.param_groups()) {
    const Adapter* a = adapter_for(&group.options());
    const std::string why = a != nullptr ? a->untransportable(group.options()) : "";
    if (!why.empty()) return why;
  }
  return "";
}

Buffers buffers_of(torch::optim::OptimizerParamState* s) {
  if (s == nullptr) return {};
  if (const Adapter* a = adapter_for(s)) return a->buffers(*s);
  Buffers b;
  b.known = false;
  return b;
}

Buffers whole_state(Optimizer& opt) {
  const auto params = all_params(opt);
  if (params.empty()) return {};
  Buffers b = buffers_of(find_state(opt, params.front()));
  return b.whole ? b : Buffers{};
}

double squared_offset(const Optimizer& opt, const at::Tensor& p) {
  const auto* options = options_of(opt, p);
  const Adapter* a = adapter_for(options);
  return a != nullptr ? a->squared_offset(*options) : 0.0;
}

}  // namespace teleport::detail
