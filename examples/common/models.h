#pragma once
// The MNIST example's networks: an MLP (a Sequential, whose symmetries
// discover() finds) and the LibTorch MNIST example's CNN (a custom Module that
// declares its own); how the training loop sees either.

#include <teleport/layers.h>
#include <teleport/symmetry.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace teleport::examples {

// The network of the LibTorch MNIST example, as a custom Module that declares
// its symmetries: positive scalings, since ReLU, max-pooling and dropout stand
// between its layers. (It returns logits; the example's log_softmax + NLL is
// the cross-entropy used here.)
struct NetImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(1, 10, 5)};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(10, 20, 5)};
  torch::nn::Dropout2d conv2_drop;
  torch::nn::Linear fc1{320, 50}, fc2{50, 10};

  NetImpl() {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv2_drop", conv2_drop);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }
  at::Tensor forward(at::Tensor x) {
    x = x.view({-1, 1, 28, 28});
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(conv2_drop->forward(conv2->forward(x)), 2));
    x = torch::relu(fc1->forward(x.view({-1, 320})));
    x = torch::dropout(x, /*p=*/0.5, /*train=*/is_training());
    return fc2->forward(x);
  }
  teleport::SymmetryList symmetries() {
    return {teleport::scaling(conv1, conv2), teleport::scaling(conv2, fc1),
            teleport::scaling(fc1, fc2)};
  }
};
TORCH_MODULE(Net);

// Either network, as the training loop sees it.
struct Model {
  std::shared_ptr<torch::nn::Module> module;  // parameters, train() and eval()
  std::function<at::Tensor(const at::Tensor&)> forward;
  torch::nn::Sequential mlp{nullptr};  // the MLP, for discover() and teleport batches
  teleport::SymmetryList declared;     // the CNN's own symmetries
};

inline torch::nn::Sequential build_mlp(const std::vector<int64_t>& hidden, const std::string& act,
                                       torch::Device device) {
  torch::nn::Sequential model;
  int64_t in = 784;
  for (int64_t h : hidden) {
    model->push_back(torch::nn::Linear(in, h));
    if (act == "relu") {
      model->push_back(torch::nn::ReLU());
    } else {
      model->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
    }
    in = h;
  }
  model->push_back(torch::nn::Linear(in, 10));
  model->to(device);
  return model;
}

inline at::Tensor cross_entropy(const at::Tensor& out, const at::Tensor& target) {
  return torch::nn::functional::cross_entropy(out, target);
}

// The network --model asks for (--hidden and --activation for the MLP), on
// `device` in `dtype`.
inline Model build_model(const std::string& model, const std::vector<int64_t>& hidden,
                         const std::string& activation, torch::Device device, torch::Dtype dtype) {
  if (model == "cnn") {
    Net net;
    net->to(device, dtype);
    return {net.ptr(), [net](const at::Tensor& x) mutable { return net->forward(x); }, nullptr,
            net->symmetries()};
  }
  auto mlp = build_mlp(hidden, activation, device);
  mlp->to(dtype);
  return {mlp.ptr(), [mlp](const at::Tensor& x) mutable { return mlp->forward(x); }, mlp, {}};
}

}  // namespace teleport::examples
