// Properties of the group actions: invariance, equivariance, closed form = autograd.
#include "test_util.h"

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
    {Act::kIdentity, true, Parametrization::kLinear}, {Act::kIdentity, false, Parametrization::kExp},
    {Act::kReLU, true, Parametrization::kLinear},     {Act::kReLU, false, Parametrization::kExp},
    {Act::kLeakyReLU, true, Parametrization::kExp},   {Act::kLeakyReLU, false, Parametrization::kLinear},
};

// A random group element near the identity for `s`.
GroupElement random_element(const Symmetry& s, Parametrization p, double scale) {
  at::Tensor T = torch::randn_like(s.zero_algebra()) * scale;
  return GroupElement::from_algebra(T, s.diagonal(), p);
}

// Applies an element from `element_of` to each symmetry in turn, and maps
// `grads` (copies of the gradients of `params`, in that order) with it.
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

void expect_action_keeps_outputs(torch::TensorOptions options, double tol) {
  for (const auto& c : kCases) {
    auto model = make_mlp({5, 7, 6, 4}, c.act, c.bias, options);
    const auto batch = random_batch(9, 5, 4, options);
    const Objective objective(model, batch.input, batch.target, mse());
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

TEST_P(SymmetryTest, ActionKeepsOutputsAndLossFloat32) {
  expect_action_keeps_outputs(f32(), 1e-5);
}

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
    const Objective objective(model, batch.input, batch.target, mse());
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
    const Objective objective(model, batch.input, batch.target, mse());
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

TEST_P(SymmetryTest, ClosedFormFromGradMatchesBatchGradient) {
  auto model = make_mlp({5, 7, 4}, Act::kReLU, true, f64());
  const auto batch = random_batch(9, 5, 4, f64());
  const Objective objective(model, batch.input, batch.target, mse());
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

TEST_P(SymmetryTest, MaskedElementIsIdentityWhenFalse) {
  const auto e = GroupElement::from_algebra(torch::randn({4, 4}, f64()), false,
                                            Parametrization::kExp);
  const auto off = e.masked(torch::zeros({}, f64().dtype(torch::kBool)));
  EXPECT_TRUE(torch::equal(off.g, torch::eye(4, f64())));
  const auto on = e.masked(torch::ones({}, f64().dtype(torch::kBool)));
  EXPECT_TRUE(torch::equal(on.g, e.g));
}

TEST_P(SymmetryTest, SquaredGradientsTransportAsSquares) {
  auto model = make_mlp({5, 7, 4}, Act::kReLU, true, f64());
  const auto batch = random_batch(9, 5, 4, f64());
  const Objective objective(model, batch.input, batch.target, mse());
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
  EXPECT_FALSE(s->can_transport_squared_gradients());
  const auto e = random_element(*s, Parametrization::kLinear, 0.1);
  std::vector<at::Tensor> sums;
  for (const auto& p : s->parameters()) sums.push_back(torch::ones_like(p));
  EXPECT_NE(error_of([&] { s->transport_squared_gradients_(e, sums); })
                .find("only under diagonal scaling"),
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
    model->push_back(torch::nn::Linear(torch::nn::LinearOptions(widths[i], widths[i + 1]).bias(bias)));
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

// ||a - b|| <= tol (||b|| + floor): relative, with a floor for gradients of dead units.
::testing::AssertionResult close(const at::Tensor& a, const at::Tensor& b, double tol, double floor = 1e-12) {
  const double err = (a - b).norm().item<double>(), scale = b.norm().item<double>() + floor;
  if (err <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "error " << err << " > " << tol << " * " << scale;
}

constexpr int kRandomModels = 40;

TEST_P(SymmetryTest, PropertiesHoldOnRandomMlps) {
  for (uint64_t seed = 0; seed < kRandomModels; ++seed) {
    auto mlp = random_mlp(seed, f64());
    SCOPED_TRACE(mlp.description);
    const Objective objective(mlp.model, mlp.batch.input, mlp.batch.target, mse());
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
