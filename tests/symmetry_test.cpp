// Properties of the group actions: invariance, equivariance, closed form = autograd.
#include "test_util.h"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/pooling.h>

#include <common/models.h>
#include <teleport/internal/inner_state.h>
#include <teleport/internal/parameters.h>
#include <teleport/internal/tensor_ops.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include <optional>
#include <random>

namespace teleport::testing {
namespace {

class SymmetryTest : public DeviceTest {};
TELEPORT_DEVICE_TESTS(SymmetryTest);

struct Case {
  Act act;
  bool bias;
  Parametrization param;
};

const std::vector<Case> kCases = {
    {Act::kIdentity, true, Parametrization::kLinear},
    {Act::kIdentity, false, Parametrization::kExp},
    {Act::kReLU, true, Parametrization::kLinear},
    {Act::kReLU, false, Parametrization::kExp},
    {Act::kLeakyReLU, true, Parametrization::kExp},
    {Act::kLeakyReLU, false, Parametrization::kLinear},
};

void expect_action_keeps_outputs(torch::TensorOptions options, double tol) {
  for (const auto& c : kCases) {
    auto model = make_mlp({5, 7, 6, 4}, c.act, c.bias, options);
    const auto batch = random_batch(9, 5, 4, options);
    const BatchLoss objective(model, batch.input, batch.target, mse());
    torch::NoGradGuard no_grad;
    const at::Tensor out = objective.forward();
    const double loss = objective.loss().item<double>();
    const auto syms = discover(model).symmetries;
    ASSERT_EQ(syms.size(), 2u);
    for (const auto& s : syms) s->apply_(random_element(*s, c.param, 0.3));
    EXPECT_LE(rel_diff(objective.forward(), out), tol);
    EXPECT_NEAR(objective.loss().item<double>(), loss, tol * std::abs(loss));
  }
}

TEST_P(SymmetryTest, ActionKeepsOutputsAndLossFloat64) {
  expect_action_keeps_outputs(f64(), 1e-10);
}

TEST_P(SymmetryTest, ActionKeepsOutputsAndLossFloat32) { expect_action_keeps_outputs(f32(), 1e-5); }

TEST_P(SymmetryTest, ActionChangesTheWeights) {
  // Guards the tests above against an action that does nothing.
  auto model = make_mlp({5, 7, 4}, Act::kReLU, true, f64());
  const auto before = clone_all(model->parameters());
  const auto syms = discover(model).symmetries;
  syms[0]->apply_(random_element(*syms[0], Parametrization::kLinear, 0.3));
  EXPECT_GT(rel_diff(model->parameters()[0], before[0]), 1e-3);
}

TEST_P(SymmetryTest, GradientsTransportEquivariantly) {
  for (const auto& c : kCases) {
    auto model = make_mlp({5, 7, 6, 4}, c.act, c.bias, f64());
    const auto batch = random_batch(9, 5, 4, f64());
    const BatchLoss objective(model, batch.input, batch.target, mse());
    backward(objective, model);
    const auto syms = discover(model).symmetries;
    std::vector<at::Tensor> grads;
    for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
    // Transport copies of the gradients, then compare with a real backward.
    const auto params = model->parameters();
    transport_and_apply(syms, params, grads,
                        [&](const Symmetry& s) { return random_element(s, c.param, 0.3); });
    backward(objective, model);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_LE(rel_diff(grads[i], params[i].grad()), 1e-9) << "parameter " << i;
    }
  }
}

TEST_P(SymmetryTest, ClosedFormDirectionMatchesAutograd) {
  for (const auto& c : kCases) {
    auto model = make_mlp({5, 7, 6, 4}, c.act, c.bias, f64(), 3);
    const auto batch = random_batch(9, 5, 4, f64());
    const BatchLoss objective(model, batch.input, batch.target, mse());
    const auto syms = discover(model).symmetries;
    const auto closed = directions(syms, Method::kClosedForm, &objective);
    const auto autograd = directions(syms, Method::kAutograd, &objective);
    ASSERT_EQ(closed.size(), autograd.size());
    for (size_t k = 0; k < closed.size(); ++k) {
      EXPECT_GT(closed[k].norm().item<double>(), 0.0);
      EXPECT_LE(rel_diff(closed[k], autograd[k]), 1e-9) << syms[k]->name();
    }
  }
}

// pullback() takes one cotangent per parameter; the data-dependent one also
// needs the batch whose inputs define the action.
TEST_P(SymmetryTest, PullbackChecksItsArguments) {
  auto model = make_mlp({5, 7, 6, 4}, Act::kLeakyReLU, true, f64(), 3);
  const auto scaling = discover(model).symmetries.front();
  const auto params = scaling->parameters();
  EXPECT_NE(error_of([&] {
              scaling->pullback(params, {params[0]}, nullptr, {});
            }).find("expected 3 cotangents, got 1"),
            std::string::npos);
  const auto data_dependent =
      discover(model, DiscoverOptions().data_dependent(true)).symmetries.front();
  EXPECT_NE(error_of([&] {
              data_dependent->pullback(params, params, nullptr, {});
            }).find("the data-dependent action needs a batch"),
            std::string::npos);
}

TEST_P(SymmetryTest, ClosedFormFromGradMatchesBatchGradient) {
  auto model = make_mlp({5, 7, 4}, Act::kReLU, true, f64());
  const auto batch = random_batch(9, 5, 4, f64());
  const BatchLoss objective(model, batch.input, batch.target, mse());
  backward(objective, model);
  const auto syms = discover(model).symmetries;
  EXPECT_LE(rel_diff(directions(syms, Method::kClosedForm)[0],
                     directions(syms, Method::kClosedForm, &objective)[0]),
            1e-12);
}

TEST_P(SymmetryTest, InversesAreExact) {
  for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
    torch::manual_seed(0);
    const at::Tensor T = torch::randn({6, 6}, f64()) * 0.2;
    const auto e = GroupElement::from_algebra(T, false, p);
    EXPECT_LE(rel_diff(torch::mm(e.g, e.g_inv), torch::eye(6, f64())), 1e-13);
    const auto d = GroupElement::from_algebra(torch::randn({6}, f64()) * 0.2, true, p);
    EXPECT_LE(rel_diff(d.g * d.g_inv, torch::ones({6}, f64())), 1e-15);
    const auto c = e.compose(e.inverse());
    EXPECT_LE(rel_diff(c.g, torch::eye(6, f64())), 1e-13);
  }
}

// Small elements on the CPU are inverted on the host, larger ones and others
// by linalg_inv_ex: both must give that call's inverse and its verdict on
// singular and non-finite matrices, and autograd must still see the inverse.
TEST_P(SymmetryTest, SmallAndLargeInversesAgreeWithLinalgInv) {
  torch::manual_seed(0);
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    const auto opts = torch::TensorOptions(GetParam()).dtype(dtype);
    const double tol = dtype == torch::kDouble ? 1e-12 : 2e-5;
    for (int64_t n : {1, 2, 6, 16, 17, 40}) {
      const at::Tensor T = torch::randn({n, n}, opts) * 0.3;
      const auto e = GroupElement::from_algebra(T, false, Parametrization::kLinear);
      const auto [expected, info] = at::linalg_inv_ex(T + torch::eye(n, opts));
      EXPECT_EQ(e.g_inv.scalar_type(), dtype);
      EXPECT_LE(rel_diff(e.g_inv, expected), tol) << "n = " << n;
      EXPECT_TRUE(e.invertible.item<bool>());
      // g = I + T singular: a zero row, and a repeated one.
      at::Tensor zero_row = -torch::eye(n, opts);
      at::Tensor repeated = torch::randn({n, n}, opts);
      if (n > 1) repeated[1] = repeated[0];
      for (const auto& singular_T : {zero_row, repeated - torch::eye(n, opts)}) {
        if (n == 1 && singular_T.equal(repeated - torch::eye(n, opts))) continue;
        const auto s = GroupElement::from_algebra(singular_T, false, Parametrization::kLinear);
        const bool lapack =
            std::get<1>(at::linalg_inv_ex(singular_T + torch::eye(n, opts))).eq(0).item<bool>();
        EXPECT_EQ(s.invertible.item<bool>(), lapack) << "n = " << n;
      }
      at::Tensor poisoned = T.clone();
      poisoned[0][0] = NAN;
      const auto p = GroupElement::from_algebra(poisoned, false, Parametrization::kLinear);
      EXPECT_FALSE(torch::isfinite(p.g_inv).all().item<bool>() && p.invertible.item<bool>());
    }
    // Recorded by autograd: d tr(g⁻¹)/dT = -(g⁻²)ᵀ, on both paths.
    for (int64_t n : {5, 20}) {
      const at::Tensor T = (torch::randn({n, n}, opts) * 0.3).requires_grad_(true);
      const auto e = GroupElement::from_algebra(T, false, Parametrization::kLinear);
      const at::Tensor grad = torch::autograd::grad({e.g_inv.trace()}, {T})[0];
      const at::Tensor inv = e.g_inv.detach();
      EXPECT_LE(rel_diff(grad, -torch::mm(inv, inv).t()), tol * 10) << "n = " << n;
    }
  }
}

TEST_P(SymmetryTest, MaskedElementIsIdentityWhenFalse) {
  const auto e =
      GroupElement::from_algebra(torch::randn({4, 4}, f64()), false, Parametrization::kExp);
  const auto off = e.masked(torch::zeros({}, f64().dtype(torch::kBool)));
  EXPECT_TRUE(torch::equal(off.g, torch::eye(4, f64())));
  const auto on = e.masked(torch::ones({}, f64().dtype(torch::kBool)));
  EXPECT_TRUE(torch::equal(on.g, e.g));
}

TEST_P(SymmetryTest, SquaredGradientsTransportAsSquares) {
  auto model = make_mlp({5, 7, 4}, Act::kReLU, true, f64());
  const auto batch = random_batch(9, 5, 4, f64());
  const BatchLoss objective(model, batch.input, batch.target, mse());
  backward(objective, model);
  const auto s = discover(model).symmetries.at(0);
  const auto e = random_element(*s, Parametrization::kLinear, 0.3);
  std::vector<at::Tensor> grads, sums;
  for (const auto& p : s->parameters()) {
    grads.push_back(p.grad().clone());
    sums.push_back(p.grad().square());
  }
  s->transport_gradients_(e, grads);
  s->transport_squared_gradients_(e, sums);
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_LE(rel_diff(sums[i], grads[i].square()), 1e-13);
  }
}

TEST_P(SymmetryTest, FullGLRefusesSquaredTransport) {
  auto model = make_mlp({5, 7, 4}, Act::kIdentity, true, f64());
  const auto s = discover(model).symmetries.at(0);
  EXPECT_TRUE(s->can_transport_squared_gradients());  // for its diagonal elements only
  const auto e = random_element(*s, Parametrization::kLinear, 0.1);
  std::vector<at::Tensor> sums;
  for (const auto& p : s->parameters()) sums.push_back(torch::ones_like(p));
  EXPECT_NE(error_of([&] {
              s->transport_squared_gradients_(e, sums);
            }).find("only under diagonal scaling"),
            std::string::npos);
}

TEST_P(SymmetryTest, ConstructorRejectsBadShapesAndDtypes) {
  const auto w_in = torch::randn({6, 5}, f64());
  EXPECT_NE(error_of([&] {
              LayerSymmetry(SymmetryKind::kScaling, w_in, {}, torch::randn({4, 7}, f64()));
            }).find("expected W_out with 6 columns, got [4, 7]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              LayerSymmetry(SymmetryKind::kScaling, w_in, torch::randn({5}, f64()),
                            torch::randn({4, 6}, f64()));
            }).find("expected a bias of 6 entries"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              LayerSymmetry(SymmetryKind::kLinearGL, w_in, {}, torch::randn({4, 6}, f32()));
            }).find("expected all parameters of dtype Double"),
            std::string::npos);
}

TEST_P(SymmetryTest, ResizedParametersAreReported) {
  auto w_in = torch::randn({6, 5}, f64());
  LayerSymmetry s(SymmetryKind::kScaling, w_in, {}, torch::randn({4, 6}, f64()));
  w_in.resize_({3, 5});
  EXPECT_NE(error_of([&] { s.check_unchanged(); }).find("resized after it was made"),
            std::string::npos);
}

}  // namespace
}  // namespace teleport::testing

namespace teleport::testing {
namespace {

// Random MLPs from a fixed list of seeds: 2 to 6 Linear layers of widths 1 to
// 64, each hidden layer with no activation, ReLU or LeakyReLU, with or
// without biases, float64.
struct RandomMlp {
  torch::nn::Sequential model;
  Batch batch;
  std::string description;
};

RandomMlp random_mlp(uint64_t seed, torch::TensorOptions options) {
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int layers = uniform(2, 6);
  const bool bias = uniform(0, 1) == 1;
  std::vector<int64_t> widths;
  for (int i = 0; i <= layers; ++i) widths.push_back(uniform(1, 64));
  torch::manual_seed(seed);
  torch::nn::Sequential model;
  std::string description = "seed " + std::to_string(seed) + (bias ? ", bias:" : ", no bias:");
  for (int i = 0; i < layers; ++i) {
    model->push_back(
        torch::nn::Linear(torch::nn::LinearOptions(widths[i], widths[i + 1]).bias(bias)));
    description += " " + std::to_string(widths[i]);
    if (i + 1 == layers) break;
    switch (uniform(0, 2)) {
      case 0:
        description += " -";
        break;
      case 1:
        model->push_back(torch::nn::ReLU());
        description += " relu";
        break;
      default:
        const double slope = std::uniform_real_distribution<double>(0.01, 0.5)(rng);
        model->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(slope)));
        description += " leaky";
    }
  }
  description += " " + std::to_string(widths.back());
  model->to(options.device(), options.dtype().toScalarType());
  return {model, random_batch(uniform(1, 16), widths.front(), widths.back(), options, seed + 1),
          description};
}

constexpr int kRandomModels = 40;

TEST_P(SymmetryTest, PropertiesHoldOnRandomMlps) {
  for (uint64_t seed = 0; seed < kRandomModels; ++seed) {
    auto mlp = random_mlp(seed, f64());
    SCOPED_TRACE(mlp.description);
    const BatchLoss objective(mlp.model, mlp.batch.input, mlp.batch.target, mse());
    const auto syms = discover(mlp.model).symmetries;
    ASSERT_FALSE(syms.empty());
    // Closed form = autograd.
    const auto closed = directions(syms, Method::kClosedForm, &objective);
    const auto autograd = directions(syms, Method::kAutograd, &objective);
    for (size_t k = 0; k < syms.size(); ++k) EXPECT_TRUE(close(closed[k], autograd[k], 1e-9));
    // Invariance of outputs and loss, and equivariance of gradients.
    backward(objective, mlp.model);
    const auto params = mlp.model->parameters();
    std::vector<at::Tensor> grads;
    for (const auto& p : params) grads.push_back(p.grad().clone());
    const at::Tensor out = objective.forward().detach();
    torch::manual_seed(seed);
    transport_and_apply(syms, params, grads, [](const Symmetry& s) {
      return GroupElement::from_algebra(torch::randn_like(s.zero_algebra()) * 0.3, s.diagonal(),
                                        Parametrization::kExp);
    });
    EXPECT_TRUE(close(objective.forward().detach(), out, 1e-10));
    backward(objective, mlp.model);
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(close(grads[i], params[i].grad(), 1e-9));
  }
}

}  // namespace
}  // namespace teleport::testing

namespace teleport::testing {
namespace {

namespace nn = torch::nn;

// Convolutional nets whose symmetries discover() finds: each with its input
// shape and the kinds of its symmetries, in order.
struct ConvNet {
  std::string description;
  nn::Sequential model;
  std::vector<int64_t> input;
  std::vector<SymmetryKind> kinds;
};

std::vector<ConvNet> conv_nets(torch::TensorOptions options) {
  using K = SymmetryKind;
  torch::manual_seed(4);
  std::vector<ConvNet> nets = {
      {"conv-relu-maxpool-conv (scaling), conv-flatten-linear (scaling)",
       nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)), nn::ReLU(), nn::MaxPool2d(2),
                      nn::Conv2d(nn::Conv2dOptions(4, 3, 3).padding(1)), nn::Dropout2d(0.0),
                      nn::ReLU(), nn::Flatten(), nn::Linear(3 * 3 * 3, 5)),
       {6, 2, 8, 8},
       {K::kScaling, K::kScaling}},
      {"conv-conv (GL, nothing between), 1x1 conv-avgpool-conv (GL)",
       nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)),
                      nn::Conv2d(nn::Conv2dOptions(4, 5, 1)), nn::AvgPool2d(2),
                      nn::Conv2d(nn::Conv2dOptions(5, 3, 3).bias(false)), nn::Tanh()),
       {5, 2, 8, 8},
       {K::kLinearGL, K::kLinearGL}},
      {"conv1d-flatten-linear (GL), nested Sequential",
       nn::Sequential(Nested(nn::Conv1d(nn::Conv1dOptions(3, 4, 2))), nn::Flatten(),
                      nn::Linear(4 * 5, 6), nn::LeakyReLU(), nn::Linear(6, 2)),
       {7, 3, 6},
       {K::kLinearGL, K::kScaling}},
      {"conv3d-relu-conv3d (scaling)",
       nn::Sequential(nn::Conv3d(nn::Conv3dOptions(2, 3, 2)), nn::ReLU(),
                      nn::Conv3d(nn::Conv3dOptions(3, 2, 2)), nn::Flatten()),
       {3, 2, 4, 4, 4},
       {K::kScaling}},
  };
  for (auto& n : nets) n.model->to(options.device(), options.dtype().toScalarType());
  return nets;
}

// The loss of a conv net on a random batch, with the target its own shape.
BatchLoss conv_objective(ConvNet& net, torch::TensorOptions options) {
  torch::manual_seed(5);
  const at::Tensor x = torch::randn(net.input, options);
  at::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = torch::randn_like(net.model->forward(x));
  }
  return BatchLoss(net.model, x, y, mse());
}

// Invariance (≤ 1e-10, float64), gradient equivariance and closed form =
// autograd, for every convolutional action: Conv1d/2d/3d, scaling and GL,
// channel blocks after a flatten, nested containers.
TEST_P(SymmetryTest, ConvolutionalActionsAreExactAndEquivariant) {
  for (auto& net : conv_nets(f64())) {
    SCOPED_TRACE(net.description);
    const BatchLoss objective = conv_objective(net, f64());
    const auto syms = discover(net.model).symmetries;
    ASSERT_EQ(syms.size(), net.kinds.size());
    for (size_t k = 0; k < syms.size(); ++k) {
      EXPECT_EQ(static_cast<const LayerSymmetry&>(*syms[k]).kind(), net.kinds[k])
          << syms[k]->name();
    }
    const auto closed = directions(syms, Method::kClosedForm, &objective);
    const auto autograd = directions(syms, Method::kAutograd, &objective);
    for (size_t k = 0; k < syms.size(); ++k) EXPECT_TRUE(close(closed[k], autograd[k], 1e-9));
    backward(objective, net.model);
    const auto params = net.model->parameters();
    std::vector<at::Tensor> grads;
    for (const auto& p : params) grads.push_back(p.grad().clone());
    const at::Tensor out = objective.forward().detach();
    const double loss = objective.loss().item<double>();
    const auto before = clone_all(params);
    torch::manual_seed(6);
    transport_and_apply(syms, params, grads, [](const Symmetry& s) {
      return random_element(s, Parametrization::kExp, 0.3);
    });
    EXPECT_FALSE(bitwise_equal(params, before));
    EXPECT_TRUE(close(objective.forward().detach(), out, 1e-10));
    EXPECT_NEAR(objective.loss().item<double>(), loss, 1e-10 * loss);
    backward(objective, net.model);
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(close(grads[i], params[i].grad(), 1e-9));
  }
}

// A whole teleport of a conv net: the closed form (scaling on squared
// gradients, in plain loops and in tensor operations; GL step by step) and
// autograd reach the same weights, keep the loss and report the true ||∇L||².
TEST_P(SymmetryTest, ConvolutionalTeleportsAgreeAcrossPaths) {
  const auto nets = conv_nets(f64());
  for (size_t i = 0; i < nets.size(); ++i) {
    SCOPED_TRACE(nets[i].description);
    std::vector<std::vector<at::Tensor>> weights;
    std::vector<TeleportReport> reports;
    const int paths = GetParam() == torch::kCPU ? 3 : 2;
    for (int path = 0; path < paths; ++path) {
      auto net = conv_nets(f64())[i];
      const BatchLoss objective = conv_objective(net, f64());
      const double loss = objective.loss().item<double>();
      std::optional<detail::TensorOpsOnCpu> switched;
      if (path == 2) switched.emplace();
      const auto method = path == 1 ? Method::kAutograd : Method::kClosedForm;
      const auto syms = discover(net.model).symmetries;
      reports.push_back(teleport(
          syms, TeleportOptions().steps(6).lr(0.05).max_growth(1e6).method(method), &objective));
      switched.reset();
      ASSERT_FALSE(reports.back().rolled_back) << reports.back().reason;
      EXPECT_GT(reports.back().grad_norm_sq_after, reports.back().grad_norm_sq_before);
      EXPECT_NEAR(objective.loss().item<double>(), loss, 1e-10 * loss);
      double fresh = 0;
      for (const auto& g :
           torch::autograd::grad({objective.loss()}, detail::distinct_parameters(syms))) {
        fresh += g.square().sum().item<double>();
      }
      EXPECT_NEAR(fresh, reports.back().grad_norm_sq_after, 1e-9 * fresh);
      weights.push_back(clone_all(net.model->parameters()));
    }
    for (int path = 1; path < paths; ++path) {
      EXPECT_EQ(reports[path].steps, reports[0].steps) << "path " << path;
      for (size_t j = 0; j < weights[0].size(); ++j) {
        EXPECT_TRUE(close(weights[path][j], weights[0][j], 1e-9))
            << "path " << path << " parameter " << j;
      }
    }
  }
}

TEST_P(SymmetryTest, ConvolutionalShapesAreCheckedClearly) {
  nn::Conv2d conv(nn::Conv2dOptions(2, 4, 3)), other(nn::Conv2d(nn::Conv2dOptions(5, 3, 3)));
  nn::Conv2d grouped(nn::Conv2dOptions(4, 4, 3).groups(2));
  nn::Linear linear(4 * 9 + 1, 3);
  EXPECT_NE(error_of([&] {
              scaling(conv, other);
            }).find("expected W_out with 4 input channels, got [3, 5, 3, 3]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              scaling(conv, linear);
            }).find("expected a multiple of 4 columns, got [3, 37]"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { scaling(conv, grouped); }).find("expected a convolution with groups = 1"),
      std::string::npos);
  nn::Tanh tanh;
  EXPECT_NE(error_of([&] {
              gl(conv, tanh);
            }).find("expected a torch::nn::Linear or Conv1d/Conv2d/Conv3d, got"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { gl(conv, nn::Conv2d(nn::Conv2dOptions(4, 2, 1))); }), "");
}

// A symmetry of the user's own, through the six methods the interface
// requires (symmetry.h): f(x) = a·b·x is unchanged by (a, b) -> (g a, b / g)
// for g > 0.
class ProductScaling : public Symmetry {
 public:
  ProductScaling(at::Tensor a, at::Tensor b) : a_(std::move(a)), b_(std::move(b)) {}
  std::string name() const override { return "product scaling"; }
  bool diagonal() const override { return true; }
  std::vector<at::Tensor> parameters() const override { return {a_, b_}; }
  at::Tensor zero_algebra() const override { return torch::zeros({1}, a_.options()); }
  void apply_(const GroupElement& e, const BatchLoss*, Mode) const override {
    torch::NoGradGuard no_grad;
    a_.mul_(e.g);
    b_.mul_(e.g_inv);
  }
  std::vector<at::Tensor> act(const std::vector<at::Tensor>& p, const at::Tensor& T,
                              const BatchLoss*, const ParameterOverrides&, Mode) const override {
    return {p[0] * (1 + T), p[1] / (1 + T)};
  }

 private:
  at::Tensor a_, b_;
};

// It passes the symmetry check, teleports by autograd keeping the loss and
// raising ||∇L||², and a closed-form teleport is refused with a clear error.
TEST_P(SymmetryTest, UserDefinedSymmetryTeleportsByAutograd) {
  torch::manual_seed(0);
  auto a = torch::full({1}, 0.5, f64()).requires_grad_(true);
  auto b = torch::full({1}, 2.0, f64()).requires_grad_(true);
  const auto x = torch::randn({8}, f64()), y = 3 * x;
  const BatchLoss objective([&](const ParameterOverrides& ov) {
    return (value_of(ov, a) * value_of(ov, b) * x - y).square().mean();
  });
  const auto sym = std::make_shared<ProductScaling>(a, b);
  const SymmetryList syms{sym};
  EXPECT_TRUE(check_symmetry(*sym, [&] { return objective.loss(); }).holds);
  const auto r =
      teleport(syms, TeleportOptions().method(Method::kAutograd).steps(5).lr(0.1), &objective);
  ASSERT_FALSE(r.rolled_back) << r.reason;
  EXPECT_GT(r.steps, 0);
  EXPECT_NEAR(r.loss_after, r.loss_before, 1e-12 * r.loss_before);
  EXPECT_GT(r.grad_norm_sq_after, 1.01 * r.grad_norm_sq_before);
  EXPECT_NEAR((a * b).item<double>(), 1.0, 1e-12);
  EXPECT_NE(a.item<double>(), 0.5);
  EXPECT_TRUE(r.gradients_stale);  // no transport_gradients_(): computed afresh
  EXPECT_NE(error_of([&] {
              teleport(syms, TeleportOptions().method(Method::kClosedForm));
            }).find("product scaling has no closed-form direction"),
            std::string::npos);
}

// A small ResNet of the example's shape (examples/common/models.h) in float64,
// its BatchNorm statistics made non-trivial by a few train-mode passes, with
// the symmetries it declares: in-block BatchNorm -> Conv scalings and three
// residual streams.
struct SmallResNet {
  examples::ResNet net{std::vector<int64_t>{4, 6, 8}, 3};
  at::Tensor x, y;
  SymmetryList syms;

  explicit SmallResNet(torch::TensorOptions options) {
    torch::manual_seed(21);
    net->to(options.device(), torch::kDouble);
    x = torch::randn({6, 1, 12, 12}, options);
    y = torch::randint(0, 3, {6}, options.dtype(torch::kLong));
    for (int i = 0; i < 3; ++i) net->forward(x + 0.1 * i);
    syms = net->symmetries();
  }
  at::Tensor loss() { return torch::nn::functional::cross_entropy(net->forward(x), y); }
  // The loss's gradients, every parameter's, fresh.
  std::vector<at::Tensor> grads() {
    const auto params = net->parameters();
    return torch::autograd::grad({loss()}, params);
  }
  double grad_norm_sq() {
    double s = 0;
    for (const auto& g : grads()) s += g.square().sum().item<double>();
    return s;
  }
};

// Kept actions of every ResNet symmetry (BatchNorm writers, streams) leave
// the outputs unchanged in train and eval mode, and eval mode's running
// statistics as they were (they describe the BatchNorms' inputs).
TEST_P(SymmetryTest, ResNetSymmetriesKeepOutputsInTrainAndEvalMode) {
  SmallResNet r(f64());
  ASSERT_EQ(r.syms.size(), 6u);
  for (bool train : {true, false}) {
    SCOPED_TRACE(train ? "train mode" : "eval mode");
    r.net->train(train);
    const auto buffers = clone_all(r.net->buffers());
    const at::Tensor before = r.net->forward(r.x).detach();
    if (train) {  // a train-mode pass updates the statistics: put them back
      const auto now = r.net->buffers();
      for (size_t i = 0; i < now.size(); ++i) now[i].copy_(buffers[i]);
    }
    const auto params = clone_all(r.net->parameters());
    for (const auto& s : r.syms) s->apply_(random_element(*s, Parametrization::kExp, 0.5));
    EXPECT_FALSE(bitwise_equal(params, r.net->parameters()));
    EXPECT_TRUE(close(r.net->forward(r.x).detach(), before, 1e-10));
    if (!train) {
      EXPECT_TRUE(bitwise_equal(buffers, r.net->buffers()));
    }
  }
}

// The gradient map is equivariant under the ResNet's actions, and each
// closed-form direction is the derivative of ||∇L||² along the group
// (central differences of the objective itself, in float64).
TEST_P(SymmetryTest, ResNetGradientsMapAndClosedFormsAreDerivatives) {
  SmallResNet r(f64());
  const auto params = r.net->parameters();
  std::vector<at::Tensor> grads = r.grads();
  std::vector<at::Tensor> directions_now;
  for (const auto& s : r.syms) {
    std::vector<at::Tensor> mine;
    for (const auto& p : s->parameters()) {
      for (size_t i = 0; i < params.size(); ++i) {
        if (params[i].is_same(p)) mine.push_back(grads[i]);
      }
    }
    directions_now.push_back(s->direction(mine));
  }
  for (size_t k = 0; k < r.syms.size(); ++k) {
    SCOPED_TRACE(r.syms[k]->name());
    const auto& s = *r.syms[k];
    const at::Tensor u = torch::randn_like(s.zero_algebra());
    const double eps = 1e-4;
    auto objective_at = [&](double t) {
      const auto saved = clone_all(params);
      s.apply_(GroupElement::from_algebra(u * t, true, Parametrization::kLinear));
      const double f = r.grad_norm_sq();
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(saved[i]);
      return f;
    };
    const double fd = (objective_at(eps) - objective_at(-eps)) / (2 * eps);
    const double closed = (directions_now[k] * u).sum().item<double>();
    EXPECT_NEAR(closed, fd, 1e-6 * (std::abs(fd) + 1e-12));
  }
  std::vector<at::Tensor> mapped = clone_all(grads);
  transport_and_apply(r.syms, params, mapped, [](const Symmetry& s) {
    return random_element(s, Parametrization::kExp, 0.4);
  });
  const auto fresh = r.grads();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(close(mapped[i], fresh[i], 1e-9));
}

// Whole teleports of the ResNet: the closed-form ascent raises ||∇L||² and
// keeps the loss; kBalance lowers Σ||W||² over the symmetries' parameters.
TEST_P(SymmetryTest, ResNetTeleportsRaiseTheGradientAndBalanceTheStreams) {
  for (Objective objective : {Objective::kGradNorm, Objective::kBalance}) {
    SmallResNet r(f64());
    r.net->eval();  // one function of the weights: the teleport sees the loss it keeps
    const double loss = r.loss().item<double>();
    r.loss().backward();
    const auto report =
        teleport(r.syms, TeleportOptions().objective(objective).steps(5).lr(0.1).max_growth(1e6));
    ASSERT_FALSE(report.rolled_back) << report.reason;
    if (objective == Objective::kGradNorm) {
      EXPECT_GT(report.grad_norm_sq_after, report.grad_norm_sq_before);
    } else {
      EXPECT_LT(report.objective_after, report.objective_before);
    }
    EXPECT_NEAR(r.loss().item<double>(), loss, 1e-10 * loss);
  }
}

// The inner state carried across a teleport under these diagonal actions:
// p ⊙ m is invariant for SGD's momentum and Adam's first moment (p scales by
// a, m by 1/a), p² ⊙ v for Adam's second moment.
TEST_P(SymmetryTest, ResNetStateTransportKeepsItsInvariants) {
  for (bool adam : {false, true}) {
    SCOPED_TRACE(adam ? "Adam" : "SGD with momentum");
    SmallResNet r(f64());
    const auto params = r.net->parameters();
    std::unique_ptr<torch::optim::Optimizer> inner;
    if (adam) {
      inner = std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-3));
    } else {
      inner =
          std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(1e-2).momentum(0.9));
    }
    auto invariants = [&](torch::optim::Optimizer& o) {
      std::vector<at::Tensor> out;
      for (const auto& p : params) {
        auto* state = detail::find_state(o, p);
        if (adam) {
          const auto& s = static_cast<torch::optim::AdamParamState&>(*state);
          out.push_back(p.detach() * s.exp_avg());
          out.push_back(p.detach().square() * s.exp_avg_sq());
        } else {
          out.push_back(p.detach() *
                        static_cast<torch::optim::SGDParamState&>(*state).momentum_buffer());
        }
      }
      return out;
    };
    std::vector<at::Tensor> before;
    int64_t checked = 0;
    TeleportOptimizer* self = nullptr;
    TeleportOptimizer opt(
        r.syms, std::move(inner),
        TeleportOptions().every(2).steps(3).lr(0.05).on_report([&](const TeleportReport& report) {
          if (report.rolled_back || before.empty()) return;
          const auto after = invariants(self->inner());
          for (size_t i = 0; i < after.size(); ++i) {
            EXPECT_TRUE(close(after[i], before[i], 1e-12, 1e-300));
          }
          ++checked;
        }));
    self = &opt;
    opt.set_buffers(r.net->buffers());
    for (int step = 0; step < 5; ++step) {
      if (step > 0) before = invariants(opt.inner());
      opt.step([&] {
        opt.zero_grad();
        auto l = r.loss();
        l.backward();
        return l;
      });
    }
    EXPECT_EQ(checked, 2);
  }
}

// A stream whose widths do not agree, a non-affine BatchNorm, and a
// BatchNorm as a reader are refused when declared, with expected/got.
TEST_P(SymmetryTest, MismatchedStreamsAreRefusedWhenDeclared) {
  examples::ResNet net(std::vector<int64_t>{4, 6, 8}, 3);
  EXPECT_NE(error_of([&] {
              teleport::scaling({net->bn0, net->block2->bn2}, {net->block1->conv1});
            }).find("expected every writer to give 4 outputs, got BatchNorm2d with 6"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] {
        teleport::scaling({net->bn0, net->block1->bn2}, {net->block1->conv1, net->block3->conv1});
      }).find("expected every reader with 4 input channels, got [8, 6, 3, 3]"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport::scaling({net->bn0}, {net->block2->bn1});
            }).find("expected a torch::nn::Linear or Conv1d/Conv2d/Conv3d, got"),
            std::string::npos);
  nn::BatchNorm2d plain(nn::BatchNormOptions(4).affine(false));
  EXPECT_NE(error_of([&] {
              teleport::scaling(plain, net->block1->conv1);
            }).find("expected an affine BatchNorm2d"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport::gl(net->bn0, net->block1->conv1);
            }).find("expected a torch::nn::Linear or Conv1d/Conv2d/Conv3d, got"),
            std::string::npos);
}

}  // namespace
}  // namespace teleport::testing
