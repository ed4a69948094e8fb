#pragma once
// The optimizers the MNIST example and the benchmark train with, each at the
// learning rate its sweep tuned (docs/results.md).

#include <c10/util/Exception.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace teleport::examples {

// The optimizers --optimizer takes, each with the best learning rate of a
// sweep over 3 seeds, 3 epochs of the default MLP (docs/results.md).
inline const std::map<std::string, double>& default_lrs() {
  static const std::map<std::string, double> lrs = {
      {"sgd", 0.2},      {"momentum", 0.02}, {"nesterov", 0.015}, {"adagrad", 0.02},
      {"rmsprop", 1e-3}, {"adam", 1e-3},     {"adamw", 2e-3}};
  return lrs;
}

// A model's own rate where its sweep (docs/results.md) tuned one; the MLP's
// otherwise.
inline double default_lr(const std::string& model, const std::string& optimizer) {
  static const std::map<std::string, std::map<std::string, double>> tuned = {
      {"cnn", {{"sgd", 0.2}, {"adagrad", 0.01}}},
      {"resnet", {{"momentum", 0.1}}},
      {"vit", {{"adam", 3e-3}, {"adamw", 3e-3}}},
      {"lora", {{"momentum", 2.5e-3}}},  // the controlled study's tuned baseline
  };
  const auto m = tuned.find(model);
  if (m != tuned.end() && m->second.count(optimizer) > 0) return m->second.at(optimizer);
  return default_lrs().at(optimizer);
}

// `momentum` and `nesterov` are SGD with momentum 0.9 (the second with
// Nesterov's form); `sgd` takes --momentum. AdamW keeps LibTorch's default
// decoupled weight decay (1e-2).
inline std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                               std::vector<at::Tensor> params,
                                                               double lr, double momentum) {
  namespace o = torch::optim;
  if (name == "sgd") return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(momentum));
  if (name == "momentum") return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(0.9));
  if (name == "nesterov") {
    return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(0.9).nesterov(true));
  }
  if (name == "adagrad") return std::make_unique<o::Adagrad>(params, o::AdagradOptions(lr));
  if (name == "rmsprop") return std::make_unique<o::RMSprop>(params, o::RMSpropOptions(lr));
  if (name == "adam") return std::make_unique<o::Adam>(params, o::AdamOptions(lr));
  TORCH_CHECK(name == "adamw", "make_optimizer: unknown optimizer ", name);
  return std::make_unique<o::AdamW>(params, o::AdamWOptions(lr));
}

}  // namespace teleport::examples
