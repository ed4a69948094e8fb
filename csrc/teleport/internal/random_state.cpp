#include <teleport/internal/random_state.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include <algorithm>
#include <mutex>
#include <utility>

namespace teleport {

// The cached samples' types as the generator declares them (c10::optional in
// LibTorch 1.13, std::optional in later releases).
struct RandomState::CpuState {
  at::mt19937 engine;
  decltype(std::declval<at::CPUGeneratorImpl&>().next_float_normal_sample()) next_float_normal;
  decltype(std::declval<at::CPUGeneratorImpl&>().next_double_normal_sample()) next_double_normal;
};

RandomState::RandomState(const std::vector<c10::Device>& devices)
    : cpu_(at::globalContext().defaultGenerator(c10::Device(c10::kCPU))) {
  {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    auto* cpu = cpu_.get<at::CPUGeneratorImpl>();
    cpu_state_ = std::make_shared<const CpuState>(
        CpuState{cpu->engine(), cpu->next_float_normal_sample(), cpu->next_double_normal_sample()});
  }
  std::vector<c10::Device> others;
  for (const auto& d : devices) {
    if (d.is_cpu() || std::find(others.begin(), others.end(), d) != others.end()) continue;
    others.push_back(d);
    at::Generator gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    states_.emplace_back(gen, gen.get_state());
  }
}

void RandomState::restore() const {
  {
    at::Generator g = cpu_;
    std::lock_guard<std::mutex> lock(g.mutex());
    auto* cpu = g.get<at::CPUGeneratorImpl>();
    cpu->set_engine(cpu_state_->engine);
    cpu->set_next_float_normal_sample(cpu_state_->next_float_normal);
    cpu->set_next_double_normal_sample(cpu_state_->next_double_normal);
  }
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
