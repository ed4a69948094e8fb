#pragma once
// Shared fixtures: every test runs on CPU and, when present, on CUDA.

#include <teleport/internal/parameters.h>
#include <teleport/teleport.h>

#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include <string>
#include <vector>

namespace teleport::testing {

class DeviceTest : public ::testing::TestWithParam<torch::DeviceType> {
 protected:
  void SetUp() override {
    if (GetParam() == torch::kCUDA && !torch::cuda::is_available()) {
      GTEST_SKIP() << "CUDA is not available";
    }
  }
  torch::Device device() const { return torch::Device(GetParam()); }
  torch::TensorOptions f64() const { return torch::TensorOptions(device()).dtype(torch::kDouble); }
  torch::TensorOptions f32() const { return torch::TensorOptions(device()).dtype(torch::kFloat); }
};

inline std::string device_name(const ::testing::TestParamInfo<torch::DeviceType>& info) {
  return info.param == torch::kCUDA ? "CUDA" : "CPU";
}

#define TELEPORT_DEVICE_TESTS(Fixture)                                                     \
  INSTANTIATE_TEST_SUITE_P(Devices, Fixture, ::testing::Values(torch::kCPU, torch::kCUDA), \
                           ::teleport::testing::device_name)

/// A Sequential that can stand inside another (LibTorch stores only modules
/// with a non-templated forward in a Sequential), as torchvision's models do.
struct NestedImpl : torch::nn::SequentialImpl {
  using SequentialImpl::SequentialImpl;
  at::Tensor forward(at::Tensor x) { return SequentialImpl::forward(x); }
};
TORCH_MODULE(Nested);

enum class Act { kIdentity, kReLU, kLeakyReLU };

/// Linear layers of `widths` (input first) with `act` between them, on
/// `options`' device and dtype, weights drawn after manual_seed(seed).
inline torch::nn::Sequential make_mlp(const std::vector<int64_t>& widths, Act act, bool bias,
                                      torch::TensorOptions options, uint64_t seed = 0) {
  torch::manual_seed(seed);
  torch::nn::Sequential model;
  for (size_t i = 0; i + 1 < widths.size(); ++i) {
    model->push_back(
        torch::nn::Linear(torch::nn::LinearOptions(widths[i], widths[i + 1]).bias(bias)));
    if (i + 2 < widths.size()) {
      if (act == Act::kReLU) model->push_back(torch::nn::ReLU());
      if (act == Act::kLeakyReLU) {
        model->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
      }
    }
  }
  model->to(options.device(), options.dtype().toScalarType());
  return model;
}

inline LossFn mse() {
  return [](const at::Tensor& out, const at::Tensor& target) {
    return torch::nn::functional::mse_loss(out, target);
  };
}

/// A random regression batch for `model` (first layer's inputs, last layer's outputs).
struct Batch {
  at::Tensor input, target;
};
inline Batch random_batch(int64_t n, int64_t in, int64_t out, torch::TensorOptions options,
                          uint64_t seed = 1) {
  torch::manual_seed(seed);
  return {torch::randn({n, in}, options), torch::randn({n, out}, options)};
}

/// Fills .grad with the gradient of the objective's loss; returns the loss.
inline double backward(const BatchLoss& objective, torch::nn::Sequential& model) {
  for (auto& p : model->parameters()) {
    if (p.grad().defined()) p.grad().zero_();
  }
  auto loss = objective.loss();
  loss.backward();
  return loss.item<double>();
}

/// The gradients in `.grad` of `model`'s parameters, in order.
inline std::vector<at::Tensor> grads_of(torch::nn::Sequential& model) {
  std::vector<at::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.grad());
  return out;
}

inline double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / b.norm().clamp_min(1e-300)).item<double>();
}

inline std::vector<at::Tensor> clone_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().clone());
  return out;
}

inline bool bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i].cpu(), b[i].cpu())) return false;
  }
  return true;
}

/// A random group element near the identity for `s`.
inline GroupElement random_element(const Symmetry& s, Parametrization p, double scale) {
  at::Tensor T = torch::randn_like(s.zero_algebra()) * scale;
  return GroupElement::from_algebra(T, s.diagonal(), p);
}

/// Applies an element from `element_of` to each symmetry in turn, and maps
/// `grads` (copies of the gradients of `params`, in that order) with it.
template <typename ElementOf>
void transport_and_apply(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads, ElementOf element_of) {
  for (const auto& s : syms) {
    const GroupElement e = element_of(*s);
    std::vector<at::Tensor> mine;
    for (const auto& p : s->parameters()) {
      for (size_t i = 0; i < params.size(); ++i) {
        if (params[i].is_same(p)) mine.push_back(grads[i]);
      }
    }
    s->transport_gradients_(e, mine);
    s->apply_(e);
  }
}

/// ||a - b|| <= tol (||b|| + floor): relative, with a floor for gradients of dead units.
inline ::testing::AssertionResult close(const at::Tensor& a, const at::Tensor& b, double tol,
                                        double floor = 1e-12) {
  const double err = (a - b).norm().item<double>(), scale = b.norm().item<double>() + floor;
  if (err <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "error " << err << " > " << tol << " * " << scale;
}

/// What a call throws, without the backtrace; empty when it does not throw.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace teleport::testing
