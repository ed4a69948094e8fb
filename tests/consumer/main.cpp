// The README's snippet, built against the installed package: it must compile
// as written, and its teleports must keep the loss.
#include <teleport/teleport.h>
#include <torch/torch.h>

#include <fmt/core.h>

#include <cmath>

int main() {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(784, 128), torch::nn::ReLU(),
                                     torch::nn::Linear(128, 128), torch::nn::ReLU(),
                                     torch::nn::Linear(128, 10));
  teleport::TeleportOptimizer opt(
      model,
      std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05)),
      teleport::TeleportOptions().every(100).steps(10).lr(1e-3));

  const auto x = torch::randn({64, 784});
  const auto y = torch::randint(0, 10, {64});
  double first = 0, last = 0;
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  const auto* r = opt.last_report();
  const bool ok = opt.symmetries().size() == 2 && r != nullptr && !r->rolled_back &&
                  r->grad_norm_sq_after >= r->grad_norm_sq_before && last < first;
  fmt::print(
      "consumer: {} symmetries, teleport at step {}: |grad|^2 {:.6g} -> {:.6g}, "
      "loss {:.4f} -> {:.4f}: {}\n",
      opt.symmetries().size(), r ? r->step : -1, r ? r->grad_norm_sq_before : NAN,
      r ? r->grad_norm_sq_after : NAN, first, last, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
