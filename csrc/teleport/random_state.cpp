#include <teleport/random_state.h>

#include <ATen/Context.h>

#include <algorithm>
#include <mutex>

namespace teleport {

RandomState::RandomState(const std::vector<c10::Device>& devices) {
  std::vector<c10::Device> all = {c10::Device(c10::kCPU)};
  for (const auto& d : devices) {
    if (std::find(all.begin(), all.end(), d) == all.end()) all.push_back(d);
  }
  for (const auto& d : all) {
    at::Generator gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    states_.emplace_back(gen, gen.get_state());
  }
}

void RandomState::restore() const {
  for (const auto& [gen, state] : states_) {
    at::Generator g = gen;
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(state);
  }
}

std::vector<c10::Device> devices_of(const std::vector<at::Tensor>& tensors) {
  std::vector<c10::Device> out;
  for (const auto& t : tensors) {
    if (t.defined() && std::find(out.begin(), out.end(), t.device()) == out.end()) {
      out.push_back(t.device());
    }
  }
  return out;
}

}  // namespace teleport
