#pragma once
// The MNIST example's networks: an MLP (a Sequential, whose symmetries
// discover() finds), the LibTorch MNIST example's CNN and a small ResNet
// (custom Modules that declare their own); how the training loop sees them.

#include <teleport/discover.h>
#include <teleport/layers.h>
#include <teleport/symmetry.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformercoder.h>

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

// A post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) +
// shortcut(x)), the shortcut a 1×1 conv + BatchNorm where the shape changes.
struct BasicBlockImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, down_conv{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, down_bn{nullptr};

  BasicBlockImpl(int64_t in, int64_t out, int64_t stride) {
    namespace nn = torch::nn;
    auto conv = [](int64_t i, int64_t o, int64_t k, int64_t s) {
      return nn::Conv2d(nn::Conv2dOptions(i, o, k).stride(s).padding(k / 2).bias(false));
    };
    conv1 = register_module("conv1", conv(in, out, 3, stride));
    bn1 = register_module("bn1", nn::BatchNorm2d(out));
    conv2 = register_module("conv2", conv(out, out, 3, 1));
    bn2 = register_module("bn2", nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      down_conv = register_module("down_conv", conv(in, out, 1, stride));
      down_bn = register_module("down_bn", nn::BatchNorm2d(out));
    }
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor out = torch::relu(bn1->forward(conv1->forward(x)));
    out = bn2->forward(conv2->forward(out));
    return torch::relu(out + (down_conv.is_empty() ? x : down_bn->forward(down_conv->forward(x))));
  }
};
TORCH_MODULE(BasicBlock);

// A small ResNet for 28×28 inputs: a 3×3 stem conv + BatchNorm + ReLU, three
// stages of one basic block each (`widths` channels, strides 1, 2, 2),
// global average pooling and a Linear. Its symmetries (docs/design.md §2):
// each block's bn1 scales conv2's inputs, and each stage's residual stream is
// scaled by all its writers (the BatchNorm that opens it, every block's bn2)
// and undone on all its readers (the conv1 of the blocks in it, the next
// stage's conv1 and down_conv, or the final Linear).
struct ResNetImpl : torch::nn::Module {
  torch::nn::Conv2d conv0{nullptr};
  torch::nn::BatchNorm2d bn0{nullptr};
  BasicBlock block1{nullptr}, block2{nullptr}, block3{nullptr};
  torch::nn::Linear fc{nullptr};

  explicit ResNetImpl(std::vector<int64_t> widths = {16, 32, 64}, int64_t classes = 10) {
    namespace nn = torch::nn;
    conv0 = register_module("conv0",
                            nn::Conv2d(nn::Conv2dOptions(1, widths[0], 3).padding(1).bias(false)));
    bn0 = register_module("bn0", nn::BatchNorm2d(widths[0]));
    block1 = register_module("block1", BasicBlock(widths[0], widths[0], 1));
    block2 = register_module("block2", BasicBlock(widths[0], widths[1], 2));
    block3 = register_module("block3", BasicBlock(widths[1], widths[2], 2));
    fc = register_module("fc", nn::Linear(widths[2], classes));
  }
  at::Tensor forward(at::Tensor x) {
    if (x.dim() == 2) x = x.view({-1, 1, 28, 28});
    x = torch::relu(bn0->forward(conv0->forward(x)));
    x = block3->forward(block2->forward(block1->forward(x)));
    return fc->forward(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1));
  }
  teleport::SymmetryList symmetries() {
    return {
        teleport::scaling(block1->bn1, block1->conv2),
        teleport::scaling(block2->bn1, block2->conv2),
        teleport::scaling(block3->bn1, block3->conv2),
        teleport::scaling({bn0, block1->bn2}, {block1->conv1, block2->conv1, block2->down_conv}),
        teleport::scaling({block2->down_bn, block2->bn2}, {block3->conv1, block3->down_conv}),
        teleport::scaling({block3->down_bn, block3->bn2}, {fc}),
    };
  }
};
TORCH_MODULE(ResNet);

// A small vision transformer for 28×28 inputs: 7×7 patches (16 tokens)
// embedded by a Linear, a learned class token and position embeddings, a
// TransformerEncoder of `layers` post-norm layers (ReLU feed-forward), a final
// LayerNorm on the class token and a Linear head. Its symmetries: what
// teleport::discover() finds in the tree (each attention's query–key and
// value–output groups, each feed-forward block's scaling) and the head's
// scaling(norm, head), which only a Linear reads.
struct ViTImpl : torch::nn::Module {
  torch::nn::Linear embed{nullptr};
  at::Tensor cls, pos;
  torch::nn::TransformerEncoder encoder{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};

  explicit ViTImpl(int64_t d_model = 64, int64_t heads = 4, int64_t feed_forward = 128,
                   int64_t layers = 2, int64_t classes = 10, double dropout = 0.0) {
    namespace nn = torch::nn;
    embed = register_module("embed", nn::Linear(49, d_model));
    cls = register_parameter("cls", torch::randn({1, 1, d_model}) * 0.02);
    pos = register_parameter("pos", torch::randn({17, 1, d_model}) * 0.02);
    encoder = register_module("encoder", nn::TransformerEncoder(nn::TransformerEncoderOptions(
                                             nn::TransformerEncoderLayerOptions(d_model, heads)
                                                 .dim_feedforward(feed_forward)
                                                 .dropout(dropout),
                                             layers)));
    norm = register_module("norm", nn::LayerNorm(nn::LayerNormOptions({d_model})));
    head = register_module("head", nn::Linear(d_model, classes));
  }
  at::Tensor forward(const at::Tensor& x) {
    const int64_t b = x.size(0);
    // [B, 28, 28] -> 16 patches of 7×7 -> tokens [16, B, 49] (sequence first).
    const at::Tensor patches =
        x.reshape({b, 4, 7, 4, 7}).permute({1, 3, 0, 2, 4}).reshape({16, b, 49});
    at::Tensor t = torch::cat({cls.expand({1, b, cls.size(2)}), embed->forward(patches)}) + pos;
    t = encoder->forward(t);
    return head->forward(norm->forward(t[0]));
  }
  teleport::SymmetryList symmetries() {
    teleport::SymmetryList syms = teleport::discover(*this).symmetries;
    syms.push_back(teleport::scaling(norm, head));
    return syms;
  }
};
TORCH_MODULE(ViT);

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

// A frozen Linear with a rank-r adapter (LoRA, Hu et al. 2021):
// base(x) + B(A(x)), A: in → r (LibTorch's default init), B: r → out, zero at
// the start, neither with a bias. B·A has the exact GL(r) symmetry
// A → g A, B → B g⁻¹, declared as teleport::gl(a, b).
struct LoRALinearImpl : torch::nn::Module {
  LoRALinearImpl(const torch::nn::Linear& pretrained, int64_t rank)
      : base(register_module("base", pretrained)),
        a(register_module(
            "a",
            torch::nn::Linear(
                torch::nn::LinearOptions(pretrained->options.in_features(), rank).bias(false)))),
        b(register_module(
            "b",
            torch::nn::Linear(
                torch::nn::LinearOptions(rank, pretrained->options.out_features()).bias(false)))) {
    for (auto& p : base->parameters()) p.requires_grad_(false);
    torch::NoGradGuard no_grad;
    b->weight.zero_();
  }
  at::Tensor forward(const at::Tensor& x) { return base->forward(x) + b->forward(a->forward(x)); }
  torch::nn::Linear base, a, b;
};
TORCH_MODULE(LoRALinear);

// A pretrained MLP, frozen, with a LoRA adapter of rank `rank` on each of its
// Linear layers; its activations stay. The only trainable parameters are the
// adapters', and each adapter is one GL(rank) symmetry.
struct LoRAMLPImpl : torch::nn::Module {
  LoRAMLPImpl(const torch::nn::Sequential& pretrained, int64_t rank) {
    for (const auto& m : pretrained->children()) {
      if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
        adapters.emplace_back(torch::nn::Linear(linear), rank);
        net->push_back(adapters.back());
      } else if (auto relu = std::dynamic_pointer_cast<torch::nn::ReLUImpl>(m)) {
        net->push_back(torch::nn::ReLU(relu));
      } else {
        net->push_back(
            torch::nn::LeakyReLU(std::dynamic_pointer_cast<torch::nn::LeakyReLUImpl>(m)));
      }
    }
    register_module("net", net);
  }
  at::Tensor forward(const at::Tensor& x) { return net->forward(x); }
  teleport::SymmetryList symmetries() const {
    teleport::SymmetryList out;
    for (const auto& adapter : adapters) out.push_back(teleport::gl(adapter->a, adapter->b));
    return out;
  }
  torch::nn::Sequential net;
  std::vector<LoRALinear> adapters;
};
TORCH_MODULE(LoRAMLP);

inline at::Tensor cross_entropy(const at::Tensor& out, const at::Tensor& target) {
  return torch::nn::functional::cross_entropy(out, target);
}

// The network --model asks for (--hidden and --activation for the MLP), on
// `device` in `dtype`.
inline Model build_model(const std::string& model, const std::vector<int64_t>& hidden,
                         const std::string& activation, torch::Device device, torch::Dtype dtype) {
  if (model == "vit") {
    ViT net;
    net->to(device, dtype);
    return {net.ptr(), [net](const at::Tensor& x) mutable { return net->forward(x); }, nullptr,
            net->symmetries()};
  }
  if (model == "resnet") {
    ResNet net;
    net->to(device, dtype);
    return {net.ptr(), [net](const at::Tensor& x) mutable { return net->forward(x); }, nullptr,
            net->symmetries()};
  }
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

// --model lora: a copy of `pretrained` (frozen) with fresh adapters of `rank`.
inline Model build_lora(const torch::nn::Sequential& pretrained, int64_t rank) {
  LoRAMLP net(torch::nn::Sequential(
                  std::dynamic_pointer_cast<torch::nn::SequentialImpl>(pretrained->clone())),
              rank);
  const auto p = pretrained->parameters().front();
  net->to(p.device(), p.scalar_type());
  return {net.ptr(), [net](const at::Tensor& x) mutable { return net->forward(x); }, nullptr,
          net->symmetries()};
}

}  // namespace teleport::examples
