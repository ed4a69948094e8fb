// teleport(): the ascent keeps the loss, raises the gradient, and its safeguards hold.
#include "test_util.h"

#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/gl_path.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/conv.h>

#include <optional>

namespace teleport::testing {
namespace {

class AscentTest : public DeviceTest {
 protected:
  struct Setup {
    torch::nn::Sequential model;
    Batch batch;
    SymmetryList syms;
  };
  Setup make(Act act, torch::TensorOptions options, uint64_t seed = 0) {
    Setup s{make_mlp({6, 8, 7, 3}, act, true, options, seed), random_batch(10, 6, 3, options), {}};
    s.syms = discover(s.model).symmetries;
    return s;
  }
  static TeleportOptions ascent() { return TeleportOptions().steps(5).lr(0.5).max_growth(1e6); }
};
TELEPORT_DEVICE_TESTS(AscentTest);

TEST_P(AscentTest, TeleportKeepsLossAndRaisesGradNorm) {
  for (auto options : {f64(), f32()}) {
    for (Act act : {Act::kIdentity, Act::kReLU, Act::kLeakyReLU}) {
      auto s = make(act, options);
      const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
      const TeleportReport r = teleport(s.syms, ascent(), &objective);
      ASSERT_FALSE(r.rolled_back) << r.reason;
      EXPECT_EQ(r.steps, 5);
      const double tol = options.dtype() == torch::kDouble ? 1e-10 : 1e-5;
      EXPECT_NEAR(r.loss_after, r.loss_before, tol * r.loss_before);
      EXPECT_GT(r.grad_norm_sq_after, 1.05 * r.grad_norm_sq_before);
      // The reported figures are the real ones at the new point.
      const double loss = backward(objective, s.model);
      EXPECT_NEAR(loss, r.loss_after, tol * loss);
      double norm = 0;
      for (const auto& p : detail::distinct_parameters(s.syms)) {
        norm += p.grad().square().sum().item<double>();
      }
      EXPECT_NEAR(norm, r.grad_norm_sq_after, 1e3 * tol * norm);
    }
  }
}

TEST_P(AscentTest, TeleportFromGradLeavesExactGradient) {
  auto s = make(Act::kReLU, f64());
  const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
  backward(objective, s.model);
  const TeleportReport r = teleport(s.syms, ascent());
  ASSERT_FALSE(r.rolled_back) << r.reason;
  EXPECT_TRUE(std::isnan(r.loss_before));  // not measured without a batch
  std::vector<at::Tensor> transported;
  for (const auto& p : s.model->parameters()) transported.push_back(p.grad().clone());
  backward(objective, s.model);
  const auto params = s.model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_LE(rel_diff(transported[i], params[i].grad()), 1e-9) << "parameter " << i;
  }
}

// Three code paths must agree: autograd; the closed form step by step (GL, and
// any mix of groups); the closed form on squared gradients (scalings only).
TEST_P(AscentTest, AutogradAndClosedFormTeleportsAgree) {
  auto mixed = [&](uint64_t seed) {
    torch::manual_seed(seed);
    torch::nn::Sequential m(torch::nn::Linear(6, 8), torch::nn::ReLU(), torch::nn::Linear(8, 7),
                            torch::nn::Linear(7, 5), torch::nn::LeakyReLU(),
                            torch::nn::Linear(5, 3));
    m->to(device(), torch::kDouble);
    return Setup{m, random_batch(10, 6, 3, f64()), discover(m).symmetries};
  };
  for (bool scalings_only : {true, false}) {
    for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
      const double lr = scalings_only ? 2.0 : 0.5;
      auto a = scalings_only ? make(Act::kLeakyReLU, f64(), 4) : mixed(4);
      auto b = scalings_only ? make(Act::kLeakyReLU, f64(), 4) : mixed(4);
      const BatchLoss oa(a.model, a.batch.input, a.batch.target, mse());
      const BatchLoss ob(b.model, b.batch.input, b.batch.target, mse());
      const auto ra =
          teleport(a.syms, ascent().lr(lr).parametrization(p).method(Method::kClosedForm), &oa);
      const auto rb =
          teleport(b.syms, ascent().lr(lr).parametrization(p).method(Method::kAutograd), &ob);
      ASSERT_FALSE(ra.rolled_back || rb.rolled_back) << ra.reason << rb.reason;
      EXPECT_EQ(ra.steps, rb.steps);
      EXPECT_GT(ra.grad_norm_sq_after, 1.05 * ra.grad_norm_sq_before);
      EXPECT_NEAR(ra.grad_norm_sq_after, rb.grad_norm_sq_after, 1e-9 * ra.grad_norm_sq_after);
      const auto pa = a.model->parameters(), pb = b.model->parameters();
      for (size_t i = 0; i < pa.size(); ++i) EXPECT_LE(rel_diff(pa[i], pb[i]), 1e-9);
    }
  }
}

// Two runs' weights and gradients (index 0 and 1 of each) agree within a
// relative `tolerance`, tensor by tensor.
void expect_same_point(const std::vector<std::vector<at::Tensor>>& weights,
                       const std::vector<std::vector<at::Tensor>>& grads, double tolerance) {
  for (size_t i = 0; i < weights[0].size(); ++i) {
    EXPECT_LE(rel_diff(weights[0][i], weights[1][i]), tolerance) << "parameter " << i;
    EXPECT_LE(rel_diff(grads[0][i], grads[1][i]), tolerance) << "gradient " << i;
  }
}

// Closed-form GL(n) runs in the span of the gradients (docs/design.md §11);
// carrying the full gradients through every step must reach the same point.
// Both paths are forced (by default small or full-rank layers take the dense
// one). Widths above the range finder's block (64) with small batches give
// bases narrower than the layers (with 100 inputs, a first-layer gradient
// wider than the range finder's block); a large batch gives full-rank gradients; a chain
// of convolutions gives a tensor acted on from both sides in blocks (3 × 3
// kernels); from .grad and from a batch, both parametrizations, with and
// without the growth cap stopping the ascent.
TEST_P(AscentTest, SpanAndDenseGLAscentsAgree) {
  namespace nn = torch::nn;
  struct Case {
    std::string description;
    std::function<nn::Sequential()> model;
    std::vector<int64_t> input, output;
    double lr, cap;  // a growth cap that stops the ascent early
  };
  const std::vector<Case> cases = {
      {"784-like MLP 30-150-140-5, batch 6 (bases narrower than the layers)",
       [this] {
         return make_mlp({30, 150, 140, 5}, Act::kIdentity, true, f64(), 3);
       },
       {6, 30},
       {6, 5},
       2.0,
       1.5},
      {"MLP 100-150-140-5, batch 6 (a first-layer gradient of rank 5 and 100 columns)",
       [this] {
         return make_mlp({100, 150, 140, 5}, Act::kIdentity, true, f64(), 4);
       },
       {6, 100},
       {6, 5},
       2.0,
       1.5},
      {"MLP 10-12-11-4 without biases, batch 40 (full rank)",
       [this] {
         return make_mlp({10, 12, 11, 4}, Act::kIdentity, false, f64(), 5);
       },
       {40, 10},
       {40, 4},
       0.5,
       1.05},
      {"conv 2-4-5-3, 3x3 kernels, nothing between",
       [] {
         torch::manual_seed(7);
         nn::Sequential m(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)),
                          nn::Conv2d(nn::Conv2dOptions(4, 5, 3)),
                          nn::Conv2d(nn::Conv2dOptions(5, 3, 3).bias(false)));
         m->to(torch::kDouble);
         return m;
       },
       {3, 2, 9, 9},
       {3, 3, 3, 3},
       0.05,
       1.05},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.description);
    for (bool from_grad : {true, false}) {
      for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
        for (double growth : {1e6, c.cap}) {
          std::vector<TeleportReport> reports;
          std::vector<std::vector<at::Tensor>> weights, grads;
          double loss = 0;
          for (bool dense : {false, true}) {
            auto model = c.model();
            model->to(device());
            torch::manual_seed(11);
            const BatchLoss objective(model, torch::randn(c.input, f64()),
                                      torch::randn(c.output, f64()), mse());
            loss = backward(objective, model);
            const auto syms = discover(model).symmetries;
            for (const auto& s : syms) ASSERT_FALSE(s->diagonal()) << s->name();
            detail::ForceGLAscentPath path(dense ? detail::GLAscentPath::kDense
                                                 : detail::GLAscentPath::kSpan);
            const auto options =
                TeleportOptions().steps(8).lr(c.lr).max_growth(growth).parametrization(p);
            reports.push_back(teleport(syms, options, from_grad ? nullptr : &objective));
            ASSERT_FALSE(reports.back().rolled_back) << reports.back().reason;
            EXPECT_NEAR(objective.loss().item<double>(), loss, 1e-10 * loss);
            weights.push_back(clone_all(model->parameters()));
            std::vector<at::Tensor> g;
            for (const auto& t : model->parameters()) g.push_back(t.grad().clone());
            grads.push_back(g);
          }
          EXPECT_GE(reports[0].steps, growth == c.cap ? 1 : 2);
          if (growth == c.cap) {
            EXPECT_LT(reports[0].steps, 8);  // the cap stopped it
          }
          EXPECT_EQ(reports[0].steps, reports[1].steps);
          EXPECT_NEAR(reports[0].grad_norm_sq_after, reports[1].grad_norm_sq_after,
                      1e-9 * reports[1].grad_norm_sq_after);
          expect_same_point(weights, grads, 1e-9);
        }
      }
    }
  }
}

// Scalings run their vector work in plain loops on CPU and as tensor
// operations elsewhere; on CPU both can run, and must agree. (On CUDA there is
// only one path: nothing to compare.)
TEST_P(AscentTest, ScalingLoopsAndTensorOpsAgree) {
  if (GetParam() != torch::kCPU) GTEST_SKIP() << "the plain loops run on CPU only";
  for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
    for (double growth : {1e6, 1.3}) {  // with and without the growth cap stopping it
      std::vector<TeleportReport> reports;
      std::vector<std::vector<at::Tensor>> weights, grads;
      for (bool tensor_ops : {false, true}) {
        auto s = make(Act::kReLU, f64(), 6);
        const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
        backward(objective, s.model);
        std::optional<detail::TensorOpsOnCpu> switched;
        if (tensor_ops) switched.emplace();
        reports.push_back(teleport(
            s.syms,
            ascent().steps(20).lr(growth < 2 ? 5.0 : 0.5).max_growth(growth).parametrization(p)));
        weights.push_back(clone_all(s.model->parameters()));
        std::vector<at::Tensor> g;
        for (const auto& t : s.model->parameters()) g.push_back(t.grad().clone());
        grads.push_back(g);
      }
      ASSERT_FALSE(reports[0].rolled_back) << reports[0].reason;
      EXPECT_EQ(reports[0].steps, reports[1].steps);
      if (growth < 2) {
        EXPECT_LT(reports[0].steps, 20);
      }
      EXPECT_NEAR(reports[0].grad_norm_sq_after, reports[1].grad_norm_sq_after,
                  1e-12 * reports[1].grad_norm_sq_after);
      expect_same_point(weights, grads, 1e-12);
    }
  }
}

// The autograd ascent keeps its bookkeeping (step sizes, keep or refuse, the
// stop) in host doubles on CPU and in 0-dim tensors elsewhere; on CPU both can
// run, and must take the same decisions: the data-dependent GL(n) and
// scalings by autograd, with the growth cap far and near (sized steps,
// refusals beyond it, the stop at 7/8 of its budget), both parametrizations.
TEST_P(AscentTest, AutogradBookkeepingOnHostAndDeviceAgree) {
  if (GetParam() != torch::kCPU) GTEST_SKIP() << "host bookkeeping runs on CPU only";
  int64_t refused = 0;
  for (bool data_dependent : {true, false}) {
    for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
      for (double growth : {1e6, 1.3}) {
        std::vector<TeleportReport> reports;
        std::vector<std::vector<at::Tensor>> weights;
        for (bool tensor_ops : {false, true}) {
          auto m = make_mlp({12, 14, 13, 3}, data_dependent ? Act::kLeakyReLU : Act::kReLU, true,
                            f64(), 8);
          const auto b = random_batch(10, 12, 3, f64(), 9);
          const BatchLoss objective(m, b.input, b.target, mse());
          const auto syms =
              discover(m, DiscoverOptions().data_dependent(data_dependent)).symmetries;
          std::optional<detail::TensorOpsOnCpu> switched;
          if (tensor_ops) switched.emplace();
          reports.push_back(teleport(syms,
                                     TeleportOptions()
                                         .steps(8)
                                         .lr(data_dependent ? 2.0 : 20.0)
                                         .max_growth(growth)
                                         .method(Method::kAutograd)
                                         .parametrization(p),
                                     &objective));
          weights.push_back(clone_all(m->parameters()));
        }
        const std::string where = std::string(data_dependent ? "data-dependent" : "scalings") +
                                  ", growth " + std::to_string(growth);
        ASSERT_FALSE(reports[0].rolled_back) << where << ": " << reports[0].reason;
        EXPECT_EQ(reports[0].steps, reports[1].steps) << where;
        EXPECT_EQ(reports[0].shortened, reports[1].shortened) << where;
        EXPECT_EQ(reports[0].reason, reports[1].reason) << where;
        EXPECT_NEAR(reports[0].grad_norm_sq_after, reports[1].grad_norm_sq_after,
                    1e-12 * reports[1].grad_norm_sq_after)
            << where;
        for (size_t i = 0; i < weights[0].size(); ++i) {
          EXPECT_LE(rel_diff(weights[0][i], weights[1][i]), 1e-12) << where;
        }
        ASSERT_EQ(reports[0].elements.size(), reports[1].elements.size());
        for (size_t k = 0; k < reports[0].elements.size(); ++k) {
          EXPECT_LE(rel_diff(reports[0].elements[k].g, reports[1].elements[k].g), 1e-12) << where;
          EXPECT_LE(rel_diff(reports[0].elements[k].g_inv, reports[1].elements[k].g_inv), 1e-12)
              << where;
        }
        refused += reports[0].shortened;
      }
    }
  }
  EXPECT_GT(refused, 0);  // the refusal paths ran
}

// GL(n) declared by hand across a ReLU is not a symmetry: the loss changes,
// and the check on the batch must catch it.
SymmetryList wrong_symmetry(torch::nn::Sequential& model) {
  const auto p = model->parameters();  // W0, b0, W1, b1, W2, b2
  return {std::make_shared<LayerSymmetry>(SymmetryKind::kLinearGL, p[0], p[1], p[2])};
}

// (By autograd too, where the loss at the weights left is the ascent's own
// last evaluation rather than a fresh one.)
TEST_P(AscentTest, RollbackWhenTheLossChangesBeyondTolerance) {
  for (Method method : {Method::kClosedForm, Method::kAutograd}) {
    auto s = make(Act::kReLU, f64());
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    backward(objective, s.model);
    const auto weights = clone_all(s.model->parameters());
    std::vector<at::Tensor> grads;
    for (const auto& p : s.model->parameters()) grads.push_back(p.grad().clone());
    const auto r = teleport(wrong_symmetry(s.model), ascent().method(method), &objective);
    EXPECT_TRUE(r.rolled_back) << r.loss_before << " " << r.loss_after;
    EXPECT_NE(r.reason.find("above the tolerance"), std::string::npos) << r.reason;
    EXPECT_EQ(r.reason.rfind("rolled back", 0), std::string::npos) << r.reason;
    EXPECT_TRUE(r.elements.empty());
    EXPECT_TRUE(bitwise_equal(s.model->parameters(), weights));
    std::vector<at::Tensor> after;
    for (const auto& p : s.model->parameters()) after.push_back(p.grad());
    EXPECT_TRUE(bitwise_equal(after, grads));
    // The same teleport with a tolerance it meets is kept, and reports the loss
    // where it left the weights.
    const auto kept =
        teleport(wrong_symmetry(s.model), ascent().method(method).tolerance(1e6), &objective);
    EXPECT_FALSE(kept.rolled_back) << kept.reason;
    EXPECT_FALSE(bitwise_equal(s.model->parameters(), weights));
    EXPECT_NEAR(kept.loss_after, objective.loss().item<double>(), 1e-12 * kept.loss_after);
  }
}

TEST_P(AscentTest, NonFiniteGradientRollsBack) {
  auto s = make(Act::kReLU, f64());
  const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
  backward(objective, s.model);
  s.model->parameters()[0].grad()[0][0] = std::numeric_limits<double>::quiet_NaN();
  const auto weights = clone_all(s.model->parameters());
  const auto r = teleport(s.syms, ascent());
  EXPECT_TRUE(r.rolled_back);
  EXPECT_NE(r.reason.find("non-finite"), std::string::npos) << r.reason;
  EXPECT_TRUE(bitwise_equal(s.model->parameters(), weights));
}

// Gradient mass outside the span path's bases is carried, not dropped. Here
// the first layer's gradient is 1e16 times the second's, so the second's rows
// lie below the range finder's cut in the first symmetry's basis (their share
// of its mass is 1e-32, under the cut's 4096 m ε²) while its columns span the
// second symmetry's: its Gram outside the first basis drives the second
// symmetry's ascent, and span and dense paths must reach the same weights and
// gradients (they differ by 2e-2 when that Gram is dropped). With the last
// layer's gradient 1e16 times larger instead, the second layer's columns fall
// below the second symmetry's cut, so its rows must not be found from its
// projection on that basis (the first basis would miss them).
TEST_P(AscentTest, SpanGLCarriesGradientMassOutsideItsBases) {
  for (bool first_large : {true, false}) {
    SCOPED_TRACE(first_large ? "first layer 1e16" : "last layer 1e16");
    std::vector<std::vector<at::Tensor>> weights, grads;
    for (bool dense : {false, true}) {
      auto model = make_mlp({30, 150, 140, 5}, Act::kIdentity, true, f64(), 3);
      torch::manual_seed(5);
      const auto params = model->parameters();
      for (size_t i = 0; i < params.size(); ++i) {
        const auto& p = params[i];
        at::Tensor g = p.dim() == 2 ? torch::mm(torch::randn({p.size(0), 4}, f64()),
                                                torch::randn({4, p.size(1)}, f64()))
                                    : torch::randn(p.sizes(), f64());
        p.mutable_grad() = (first_large ? i < 2 : i >= 4) ? g * 1e16 : g;
      }
      if (!first_large) {
        // The last layer's gradient's rows orthogonal to the second's columns,
        // so that the second symmetry's basis holds none of the latter.
        const at::Tensor Q =
            std::get<0>(at::linalg_qr(params[2].grad().mm(torch::randn({150, 4}, f64()))));
        params[4].mutable_grad() = params[4].grad() - params[4].grad().mm(Q).mm(Q.t());
      }
      detail::ForceGLAscentPath path(dense ? detail::GLAscentPath::kDense
                                           : detail::GLAscentPath::kSpan);
      const auto r =
          teleport(discover(model).symmetries, TeleportOptions().steps(6).lr(0.5).max_growth(1e6));
      ASSERT_FALSE(r.rolled_back) << r.reason;
      EXPECT_EQ(r.steps, 6);
      weights.push_back(clone_all(params));
      std::vector<at::Tensor> g;
      for (const auto& t : params) g.push_back(t.grad().clone());
      grads.push_back(g);
    }
    expect_same_point(weights, grads, 1e-9);
  }
}

// The span path keeps its ascent's books in host doubles on the CPU and in
// 0-dim tensors elsewhere (no host read per attempt); under TensorOpsOnCpu the
// latter runs here, and both must reach the same point.
TEST_P(AscentTest, SpanGLTensorOpsMatchHostBookkeeping) {
  if (GetParam() != torch::kCPU) GTEST_SKIP() << "host bookkeeping runs on CPU only";
  for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
    for (double growth : {1e6, 1.5}) {
      SCOPED_TRACE(std::to_string(growth) + (p == Parametrization::kLinear ? " linear" : " exp"));
      std::vector<TeleportReport> reports;
      std::vector<std::vector<at::Tensor>> weights, grads;
      for (bool tensor_ops : {false, true}) {
        auto model = make_mlp({100, 150, 140, 5}, Act::kIdentity, true, f64(), 4);
        const auto batch = random_batch(6, 100, 5, f64(), 2);
        const BatchLoss objective(model, batch.input, batch.target, mse());
        backward(objective, model);
        detail::ForceGLAscentPath path(detail::GLAscentPath::kSpan);
        std::optional<detail::TensorOpsOnCpu> switched;
        if (tensor_ops) switched.emplace();
        reports.push_back(
            teleport(discover(model).symmetries,
                     TeleportOptions().steps(8).lr(2.0).max_growth(growth).parametrization(p)));
        ASSERT_FALSE(reports.back().rolled_back) << reports.back().reason;
        weights.push_back(clone_all(model->parameters()));
        std::vector<at::Tensor> g;
        for (const auto& t : model->parameters()) g.push_back(t.grad().clone());
        grads.push_back(g);
      }
      EXPECT_GE(reports[0].steps, growth < 2 ? 1 : 2);
      EXPECT_EQ(reports[0].steps, reports[1].steps);
      EXPECT_EQ(reports[0].shortened, reports[1].shortened);
      EXPECT_NEAR(reports[0].grad_norm_sq_after, reports[1].grad_norm_sq_after,
                  1e-10 * reports[1].grad_norm_sq_after);
      expect_same_point(weights, grads, 1e-10);
    }
  }
}

// Small steps in the span path take their inverses as Neumann series (one to
// three terms, by the steps' norms); they must move weights and gradients as
// the dense path's LU inverses do. The step cap fixes ||T|| at 1e-5 (three
// terms in float64) and 1e-7 (two); compared are the changes, ~1e-5 of the
// weights, so that a wrong term shows.
TEST_P(AscentTest, SpanGLSmallStepsMatchTheDenseAscent) {
  for (double step : {1e-5, 1e-7}) {
    SCOPED_TRACE(step);
    std::vector<std::vector<at::Tensor>> moved, transported;
    std::vector<double> norms;
    for (bool dense : {false, true}) {
      auto model = make_mlp({30, 150, 140, 5}, Act::kIdentity, true, f64(), 3);
      const auto batch = random_batch(6, 30, 5, f64());
      const BatchLoss objective(model, batch.input, batch.target, mse());
      backward(objective, model);
      const auto params = model->parameters();
      const auto w0 = clone_all(params);
      std::vector<at::Tensor> g0;
      for (const auto& p : params) g0.push_back(p.grad().clone());
      detail::ForceGLAscentPath path(dense ? detail::GLAscentPath::kDense
                                           : detail::GLAscentPath::kSpan);
      const auto r = teleport(discover(model).symmetries,
                              TeleportOptions().steps(6).lr(10.0).max_step(step).max_growth(1e6));
      ASSERT_FALSE(r.rolled_back) << r.reason;
      EXPECT_EQ(r.steps, 6);
      norms.push_back(r.grad_norm_sq_after);
      std::vector<at::Tensor> dw, dg;
      for (size_t i = 0; i < params.size(); ++i) {
        dw.push_back(params[i].detach() - w0[i]);
        dg.push_back(params[i].grad() - g0[i]);
      }
      moved.push_back(dw);
      transported.push_back(dg);
    }
    EXPECT_NEAR(norms[0], norms[1], 1e-12 * norms[1]);
    expect_same_point(moved, transported, 1e-7);
  }
}

// The span path (bases wider than the range finder's block) on degenerate
// gradients: all zero (an empty span) and one entry non-finite. Both roll back
// and leave weights and gradients bitwise as they were, as the dense path does.
TEST_P(AscentTest, SpanGLRollsBackOnZeroAndNonFiniteGradients) {
  for (bool nan : {false, true}) {
    auto model = make_mlp({20, 100, 90, 5}, Act::kIdentity, true, f64(), 8);
    const auto batch = random_batch(4, 20, 5, f64());
    const BatchLoss objective(model, batch.input, batch.target, mse());
    backward(objective, model);
    for (auto& p : model->parameters()) p.grad().zero_();
    if (nan) model->parameters()[2].grad()[3][7] = std::numeric_limits<double>::quiet_NaN();
    const auto weights = clone_all(model->parameters());
    std::vector<at::Tensor> grads;
    for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
    detail::ForceGLAscentPath path(detail::GLAscentPath::kSpan);
    const auto r = teleport(discover(model).symmetries, ascent());
    EXPECT_TRUE(r.rolled_back);
    EXPECT_NE(r.reason.find(nan ? "non-finite" : "no ascent step raised"), std::string::npos)
        << r.reason;
    EXPECT_TRUE(bitwise_equal(model->parameters(), weights));
    std::vector<at::Tensor> after;
    for (const auto& p : model->parameters()) after.push_back(p.grad());
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_TRUE(torch::equal(after[i].isnan(), grads[i].isnan())) << i;
      EXPECT_TRUE(torch::equal(at::nan_to_num(after[i]), at::nan_to_num(grads[i]))) << i;
    }
  }
}

TEST_P(AscentTest, GrowthCapStopsTheAscent) {
  for (Method m : {Method::kClosedForm, Method::kAutograd}) {
    auto s = make(Act::kReLU, f64());
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    const auto r = teleport(s.syms, ascent().steps(50).max_growth(1.5).method(m), &objective);
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_LT(r.steps, 50);
    EXPECT_GT(r.steps, 0);
    EXPECT_LE(r.grad_norm_sq_after, 1.5 * r.grad_norm_sq_before);
    EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
    EXPECT_NE(r.reason.find("stopped after"), std::string::npos);
    // It stopped because 7/8 of the cap's budget was used, or after too many refusals.
    const double used =
        (r.grad_norm_sq_after - r.grad_norm_sq_before) / (0.5 * r.grad_norm_sq_before);
    if (r.shortened <= TeleportOptions().max_halvings()) {
      EXPECT_GE(used, 0.875 - 1e-12);
      EXPECT_NE(r.reason.find("7/8 of the growth cap's budget used"), std::string::npos)
          << r.reason;
    }
    backward(objective, s.model);
    double norm = 0;
    for (const auto& p : detail::distinct_parameters(s.syms)) {
      norm += p.grad().square().sum().item<double>();
    }
    EXPECT_NEAR(norm, r.grad_norm_sq_after, 1e-9 * norm);
  }
}

// The step model under the growth cap (docs/design.md §6): the quadratic
// interpolation lands on its aim for an objective that is that quadratic, and
// at or below it (the linear model's answer) for a concave one; the tensor and
// double versions agree.
TEST(StepModel, InterpolationLandsOnItsAim) {
  struct Case {
    double current, rise, curvature, s, aim;
  };
  for (const Case c : {Case{1.0, 3.0, 0.5, 1.0, 1.375}, Case{2.0, 0.1, 40.0, 0.5, 2.2},
                       Case{5.0, 7.0, 0.0, 2.0, 6.0}, Case{1.0, 3.0, -1.0, 1.0, 1.5}}) {
    const double next = c.current + c.rise * c.s + c.curvature * c.s * c.s;
    const double f = detail::interpolated_shrink(c.s, c.current, c.rise, next, c.aim);
    const double s2 = f * c.s;
    const double reached = c.current + c.rise * s2 + c.curvature * s2 * s2;
    if (c.curvature >= 0) {
      EXPECT_NEAR(reached, c.aim, 1e-12 * c.aim);
    } else {
      EXPECT_NEAR(c.current + c.rise * s2, c.aim, 1e-12 * c.aim);  // the linear model's
      EXPECT_LE(reached, c.aim);
    }
    auto t = [](double x) { return torch::full({}, x, torch::kDouble); };
    const double ft =
        detail::interpolated_shrink(t(c.s), t(c.current), t(c.rise), t(next), t(c.aim))
            .item<double>();
    EXPECT_DOUBLE_EQ(ft, f);
    EXPECT_DOUBLE_EQ(detail::linear_bound(c.current, c.rise, c.aim) * c.rise, c.aim - c.current);
  }
}

// An attempt refused beyond the cap is followed by one aimed, by the
// quadratic through it, at the middle of the stopping band (15/16 of the
// budget): on an objective that is that quadratic it lands there and the
// ascent stops, two attempts in all (docs/design.md §6).
TEST(StepModel, AfterARefusalTheNextAttemptEndsTheAscent) {
  for (const double curvature : {20.0, 80.0, 320.0}) {
    const double before = 1.0, limit = 1.5, rise = 3.0;
    const auto F = [&](double s) { return before + rise * s + curvature * s * s; };
    detail::HostControl control(before, limit, TeleportOptions().steps(10).max_growth(1.5));
    const double first = control.scale(before, rise);
    EXPECT_NEAR(before + rise * first, before + 0.75 * (limit - before), 1e-12);
    ASSERT_GT(F(first), limit) << "the linear model passes the cap here";
    control.record(false, F(first));
    EXPECT_FALSE(control.done(0));
    const double second = control.scale(before, rise);
    EXPECT_NEAR(F(second), before + 0.9375 * (limit - before), 1e-12) << curvature;
    control.record(true, F(second));
    EXPECT_TRUE(control.done(1)) << "7/8 of the budget used: the ascent stops";
    EXPECT_EQ(control.taken(), 1);
    EXPECT_EQ(control.refused(), 1);
  }
}

// Each engine's rise of ||∇L||² is its true derivative along the step: under a
// cap so tight that ||∇L||² is linear in the step across the budget, the
// first attempt, whose linear model passes the cap, lands at 3/4 of the
// budget, the second at 3/4 of the rest, and the ascent stops there (past
// 7/8; nothing refused).
TEST_P(AscentTest, CappedStepsLandWhereTheLinearModelAims) {
  const double growth = 1 + 1e-5;
  auto check = [&](const TeleportReport& r) {
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_EQ(r.steps, 2);
    EXPECT_EQ(r.shortened, 0);
    const double used =
        (r.grad_norm_sq_after - r.grad_norm_sq_before) / ((growth - 1) * r.grad_norm_sq_before);
    EXPECT_NEAR(used, 1 - 0.25 * 0.25, 0.01);
    EXPECT_NE(r.reason.find("7/8 of the growth cap's budget used"), std::string::npos) << r.reason;
  };
  const auto capped = ascent().lr(10).max_step(10).max_growth(growth);
  for (auto p : {Parametrization::kLinear, Parametrization::kExp}) {
    SCOPED_TRACE(p == Parametrization::kLinear ? "linear" : "exp");
    for (Method m : {Method::kClosedForm, Method::kAutograd}) {
      for (Act act : {Act::kIdentity, Act::kReLU}) {  // GL(n) and scalings
        auto s = make(act, f64(), 2);
        const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
        check(teleport(s.syms, TeleportOptions(capped).method(m).parametrization(p), &objective));
      }
    }
    {  // the span path, and the scalings' tensor operations on CPU
      auto s = make(Act::kIdentity, f64(), 2);
      const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
      detail::ForceGLAscentPath span(detail::GLAscentPath::kSpan);
      check(teleport(s.syms, TeleportOptions(capped).parametrization(p), &objective));
      auto r = make(Act::kReLU, f64(), 2);
      const BatchLoss relu(r.model, r.batch.input, r.batch.target, mse());
      backward(relu, r.model);
      detail::TensorOpsOnCpu ops;
      check(teleport(r.syms, TeleportOptions(capped).parametrization(p)));
    }
    {  // the data-dependent GL(n), by autograd (batch 10 within the widths: exact)
      torch::manual_seed(3);
      auto m = make_mlp({12, 16, 14, 3}, Act::kLeakyReLU, true, f64(), 3);
      const auto b = random_batch(10, 12, 3, f64());
      const BatchLoss objective(m, b.input, b.target, mse());
      const auto syms = discover(m, DiscoverOptions().data_dependent(true)).symmetries;
      check(teleport(syms, TeleportOptions(capped).lr(1).parametrization(p), &objective));
    }
  }
}

TEST_P(AscentTest, StepCapBoundsEachStep) {
  auto s = make(Act::kIdentity, f64());
  const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
  const auto r = teleport(s.syms, ascent().steps(1).lr(1e3).max_step(0.01), &objective);
  ASSERT_FALSE(r.rolled_back) << r.reason;
  for (const auto& e : r.elements) {
    const double step = (e.g - torch::eye(e.g.size(0), e.g.options())).norm().item<double>();
    EXPECT_LE(step, 0.01 + 1e-12);
    EXPECT_GT(step, 0.0099);
  }
}

// ||∇L||² over the symmetries' parameters, from a fresh backward pass.
double fresh_grad_norm_sq(const BatchLoss& objective, torch::nn::Sequential& model,
                          const SymmetryList& syms) {
  backward(objective, model);
  double norm = 0;
  for (const auto& p : detail::distinct_parameters(syms))
    norm += p.grad().square().sum().item<double>();
  return norm;
}

// Never worse: on every closed-form path (GL; scaling in plain loops and in
// tensor operations), with ascent rates from gentle to far too large, a kept
// teleport has raised ||∇L||² (measured afresh) and kept the loss; one that
// could not is rolled back untouched.
TEST_P(AscentTest, KeptTeleportsRaiseTheObjectiveOnEveryPath) {
  int64_t refused = 0, kept = 0;
  for (Act act : {Act::kIdentity, Act::kReLU}) {
    for (bool tensor_ops : {false, true}) {
      if (tensor_ops && GetParam() != torch::kCPU) continue;  // one path off the CPU
      for (double lr : {0.05, 0.5, 5.0, 50.0}) {
        for (uint64_t seed : {11, 12, 13}) {
          auto s = make(act, f64(), seed);
          const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
          const double loss = backward(objective, s.model);
          double before = 0;
          for (const auto& p : detail::distinct_parameters(s.syms)) {
            before += p.grad().square().sum().item<double>();
          }
          const auto weights = clone_all(s.model->parameters());
          std::optional<detail::TensorOpsOnCpu> switched;
          if (tensor_ops) switched.emplace();
          const auto r = teleport(s.syms, ascent().steps(10).lr(lr).max_step(1e6).max_growth(1e4));
          switched.reset();
          refused += r.shortened;
          if (r.rolled_back) {
            EXPECT_TRUE(bitwise_equal(s.model->parameters(), weights));
            continue;
          }
          ++kept;
          const double after = fresh_grad_norm_sq(objective, s.model, s.syms);
          EXPECT_GT(after, before) << "lr " << lr << " seed " << seed;
          EXPECT_NEAR(after, r.grad_norm_sq_after, 1e-8 * after);
          EXPECT_NEAR(objective.loss().item<double>(), loss, 1e-9 * loss);
          EXPECT_LE(r.steps + r.shortened, 10 + TeleportOptions().max_halvings() + 1);
        }
      }
    }
  }
  EXPECT_GT(refused, 0);  // the large rates overshoot: the rule was exercised
  EXPECT_GT(kept, 0);
}

// kRandom on every kind of path (scalings and GL from .grad, from a batch in
// closed form and by autograd, the data-dependent GL): the loss is kept, and
// each symmetry's element is as far from the identity as the kGradNorm
// ascent's on the same point: exactly in the algebra for the scalings
// (||log g|| = ||g_ascent - 1||), and for GL within exp's second-order term,
// | ||g - I|| - s | <= e^s - 1 - s. .grad is the gradient at the new point.
TEST_P(AscentTest, RandomElementsHaveTheAscentsSizeAndKeepTheLoss) {
  struct Path {
    const char* name;
    Act act;
    bool batch;
    Method method;
    bool data_dependent;
  };
  for (const Path& path : {Path{"scaling, .grad", Act::kReLU, false, Method::kAuto, false},
                           Path{"gl, .grad", Act::kIdentity, false, Method::kAuto, false},
                           Path{"gl, batch", Act::kIdentity, true, Method::kClosedForm, false},
                           Path{"scaling, autograd", Act::kReLU, true, Method::kAutograd, false},
                           Path{"data-dependent gl", Act::kLeakyReLU, true, Method::kAuto, true}}) {
    SCOPED_TRACE(path.name);
    auto setup = [&] {
      if (!path.data_dependent) return make(path.act, f64(), 4);
      // A batch of 10 within the widths: the data-dependent action is exact.
      auto m = make_mlp({12, 16, 14, 3}, Act::kLeakyReLU, true, f64(), 3);
      return Setup{m, random_batch(10, 12, 3, f64()),
                   discover(m, DiscoverOptions().data_dependent(true)).symmetries};
    };
    const auto options = ascent().method(path.method).max_step(0.2);
    // The ascent the random element is sized by, on its own copy.
    auto reference = setup();
    const BatchLoss ref_objective(reference.model, reference.batch.input, reference.batch.target,
                                  mse());
    backward(ref_objective, reference.model);
    const auto sized = teleport(reference.syms, options, path.batch ? &ref_objective : nullptr);
    ASSERT_FALSE(sized.rolled_back) << sized.reason;

    auto s = setup();
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    const double loss = backward(objective, s.model);
    const auto weights = clone_all(s.model->parameters());
    const auto r = teleport(s.syms, TeleportOptions(options).objective(Objective::kRandom),
                            path.batch ? &objective : nullptr);
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_FALSE(bitwise_equal(weights, s.model->parameters()));
    ASSERT_EQ(r.elements.size(), sized.elements.size());
    for (size_t k = 0; k < r.elements.size(); ++k) {
      const auto& e = r.elements[k];
      const double size = (sized.elements[k].g - GroupElement::identity_like(sized.elements[k]).g)
                              .norm()
                              .item<double>();
      ASSERT_GT(size, 0);
      if (e.diagonal) {
        EXPECT_NEAR(e.g.log().norm().item<double>(), size, 1e-10 * size);
      } else {
        const double distance = (e.g - GroupElement::identity_like(e).g).norm().item<double>();
        EXPECT_LE(std::abs(distance - size), std::expm1(size) - size + 1e-12);
      }
    }
    const auto transported = clone_all(grads_of(s.model));
    EXPECT_NEAR(backward(objective, s.model), loss, 1e-10 * loss);
    if (!path.data_dependent) {  // its gradients are stale by design
      const auto fresh = grads_of(s.model);
      for (size_t i = 0; i < fresh.size(); ++i) EXPECT_LE(rel_diff(transported[i], fresh[i]), 1e-9);
    }
  }
}

// The draws come from the options' generator: the same seed gives the same
// elements bit for bit, another seed others. With nothing to size them by
// (zero gradients) a random teleport rolls back and says why.
TEST_P(AscentTest, RandomElementsFollowTheGeneratorAndNeedAnAscent) {
  auto run = [&](uint64_t seed) {
    auto s = make(Act::kReLU, f64(), 4);
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    backward(objective, s.model);
    const auto r = teleport(
        s.syms,
        ascent().objective(Objective::kRandom).generator(at::detail::createCPUGenerator(seed)));
    EXPECT_FALSE(r.rolled_back) << r.reason;
    return clone_all(s.model->parameters());
  };
  EXPECT_TRUE(bitwise_equal(run(1), run(1)));
  EXPECT_FALSE(bitwise_equal(run(1), run(2)));

  auto s = make(Act::kReLU, f64());
  const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
  backward(objective, s.model);
  for (auto& p : s.model->parameters()) p.grad().zero_();
  const auto weights = clone_all(s.model->parameters());
  const auto r = teleport(s.syms, ascent().objective(Objective::kRandom));
  EXPECT_TRUE(r.rolled_back);
  EXPECT_NE(r.reason.find("sizes the random element took no step"), std::string::npos) << r.reason;
  EXPECT_TRUE(bitwise_equal(s.model->parameters(), weights));

  // Where the sizing ascent refuses every step (no growth allowed), the
  // report counts its refusals, as the kGradNorm teleport from there does.
  backward(objective, s.model);
  const auto capped = ascent().max_growth(1.0);
  const auto sizing = teleport(s.syms, TeleportOptions(capped));
  ASSERT_TRUE(sizing.rolled_back);
  ASSERT_GT(sizing.shortened, 0);
  const auto refused = teleport(s.syms, TeleportOptions(capped).objective(Objective::kRandom));
  EXPECT_TRUE(refused.rolled_back);
  EXPECT_EQ(refused.shortened, sizing.shortened);
  EXPECT_NE(refused.reason.find(std::to_string(sizing.shortened) + " refused"), std::string::npos)
      << refused.reason;
}

// A teleport that ends no better than it started is rolled back: with zero
// gradients no step can raise ||∇L||².
TEST_P(AscentTest, TeleportThatRaisesNothingIsRolledBack) {
  for (Act act : {Act::kIdentity, Act::kReLU}) {
    auto s = make(act, f64());
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    backward(objective, s.model);
    for (auto& p : s.model->parameters()) p.grad().zero_();
    const auto weights = clone_all(s.model->parameters());
    const auto r = teleport(s.syms, ascent());
    EXPECT_TRUE(r.rolled_back);
    EXPECT_EQ(r.steps, 0);
    EXPECT_NE(r.reason.find("no ascent step raised"), std::string::npos) << r.reason;
    EXPECT_EQ(r.reason.rfind("rolled back", 0), std::string::npos)
        << r.reason;  // said once, by the flag
    EXPECT_TRUE(bitwise_equal(s.model->parameters(), weights));
  }
}

// A scale 1 + t must stay positive across a ReLU: with a step cap above 1 and
// a large rate the step is shortened, and the loss stays exact.
TEST_P(AscentTest, LargeStepCapKeepsScalingsPositive) {
  for (bool tensor_ops : {false, true}) {
    if (tensor_ops && GetParam() != torch::kCPU) continue;
    auto s = make(Act::kReLU, f64(), 5);
    const BatchLoss objective(s.model, s.batch.input, s.batch.target, mse());
    const double loss = backward(objective, s.model);
    std::optional<detail::TensorOpsOnCpu> switched;
    if (tensor_ops) switched.emplace();
    const auto r = teleport(s.syms, ascent().steps(10).lr(50).max_step(1.8).max_growth(1e12));
    switched.reset();
    ASSERT_FALSE(r.rolled_back) << r.reason;
    for (const auto& e : r.elements) EXPECT_GT(e.g.min().item<double>(), 0);
    EXPECT_NEAR(objective.loss().item<double>(), loss, 1e-10 * loss);
  }
}

// A step whose I + T is singular is refused before anything is written: with
// no halving left the teleport rolls back with weights and .grad untouched;
// with halvings a shorter step is taken.
TEST_P(AscentTest, SingularStepIsRefusedNotThrown) {
  for (int64_t halvings : {0, 5}) {
    auto w_in = torch::ones({1, 1}, f64()).requires_grad_(true);
    auto w_out = torch::ones({1, 1}, f64()).requires_grad_(true);
    w_in.mutable_grad() = torch::ones({1, 1}, f64());  // D = 2 (0 - 1) = -2
    w_out.mutable_grad() = torch::zeros({1, 1}, f64());
    const SymmetryList syms = {
        std::make_shared<LayerSymmetry>(SymmetryKind::kLinearGL, w_in, at::Tensor(), w_out)};
    // lr 0.5: T = -1, g = I + T = 0.
    const auto options = TeleportOptions().steps(3).lr(0.5).max_step(10).max_halvings(halvings);
    TeleportReport r;
    ASSERT_EQ(error_of([&] { r = teleport(syms, options); }), "");
    if (halvings == 0) {
      EXPECT_TRUE(r.rolled_back);
      EXPECT_EQ(w_in.item<double>(), 1.0);
      EXPECT_EQ(w_in.grad().item<double>(), 1.0);
      EXPECT_EQ(w_out.grad().item<double>(), 0.0);
    } else {
      ASSERT_FALSE(r.rolled_back) << r.reason;
      EXPECT_GE(r.shortened, 1);
      EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
      // Still the same function: w_out w_in unchanged.
      EXPECT_NEAR((w_out * w_in).item<double>(), 1.0, 1e-12);
    }
  }
}

// kFlatness: each kept teleport lowers the sharpness (the measure computed
// afresh by sharpness(), not by the ascent), on scalings and on GL(n), and
// the loss stays where it was.
TEST_P(AscentTest, FlatnessTeleportLowersSharpnessKeepingTheLoss) {
  for (Act act : {Act::kReLU, Act::kIdentity}) {
    auto m = make_mlp({5, 9, 8, 3}, act, true, f64(), 11);
    const Batch data = random_batch(16, 5, 3, f64(), 12);
    const BatchLoss batch(m, data.input, data.target, mse());
    const auto syms = discover(m).symmetries;
    ASSERT_EQ(syms.size(), 2u);
    const auto opts = TeleportOptions()
                          .objective(Objective::kFlatness)
                          .steps(5)
                          .lr(1.0)
                          .flatness_radius(0.5)
                          .flatness_samples(3);
    int64_t kept = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const double before = sharpness(syms, batch, opts);
      const double loss = batch.loss().item<double>();
      const auto r = teleport(syms, opts, &batch);
      const double after = sharpness(syms, batch, opts);
      EXPECT_NEAR(batch.loss().item<double>(), loss, 1e-10 * loss);
      if (r.rolled_back) {
        EXPECT_EQ(after, before) << r.reason;
        continue;
      }
      ++kept;
      EXPECT_LT(after, before);
      EXPECT_NEAR(r.objective_before, before, 1e-9 * std::abs(before));
      EXPECT_NEAR(r.objective_after, after, 1e-9 * std::abs(after));
    }
    EXPECT_GE(kept, 1) << "no teleport was kept: the test would prove nothing";
    // Another seed draws other perturbations: another measure.
    EXPECT_NE(sharpness(syms, batch, opts),
              sharpness(syms, batch, TeleportOptions(opts).flatness_seed(1)));
  }
  auto s = make(Act::kReLU, f64());
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent().objective(Objective::kFlatness));
            }).find("need a teleport batch"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent().objective(Objective::kLookAhead));
            }).find("need a teleport batch"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { TeleportOptions().flatness_radius(0).validate(); }).find("flatness_radius"),
      std::string::npos);
}

// Near a perfect fit (float32, batch loss ~1e-9) the gradients are tiny, and
// a step of η D in gradient units is below float32's resolution of the
// weights: with the default options every teleport was rolled back with "no
// ascent step raised". Steps are lengthened to the dtype's resolution
// (docs/design.md §6), so the teleport acts at any gradient scale, from a
// batch and from .grad alike, and keeps the loss.
TEST_P(AscentTest, TeleportActsAtTinyGradients) {
  for (Act act : {Act::kIdentity, Act::kReLU}) {
    for (bool from_batch : {true, false}) {
      auto s = make(act, f32(), 3);
      torch::Tensor target;
      {
        torch::NoGradGuard no_grad;
        target = s.model->forward(s.batch.input) + 3e-5 * torch::randn_like(s.batch.target);
      }
      const BatchLoss objective(s.model, s.batch.input, target, mse());
      const double loss = backward(objective, s.model);
      ASSERT_LT(loss, 1e-8);
      const TeleportReport r = from_batch ? teleport(s.syms, TeleportOptions(), &objective)
                                          : teleport(s.syms, TeleportOptions());
      ASSERT_FALSE(r.rolled_back) << r.reason;
      EXPECT_GT(r.steps, 0);
      const double after = fresh_grad_norm_sq(objective, s.model, s.syms);
      EXPECT_GT(after, 1.001 * r.grad_norm_sq_before);
      EXPECT_LE(std::abs(objective.loss().item<double>() - loss), 1e-4 * loss + 1e-12);
    }
  }
}

TEST_P(AscentTest, NoSymmetriesIsANoOp) {
  const auto r = teleport({}, ascent());
  EXPECT_FALSE(r.rolled_back);
  EXPECT_EQ(r.steps, 0);
  EXPECT_NE(r.reason.find("no symmetries"), std::string::npos);
}

TEST_P(AscentTest, BadInputGetsClearErrors) {
  auto s = make(Act::kReLU, f64());
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent());
            }).find("expected gradients in .grad (call loss.backward() before step())"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent().method(Method::kAutograd));
            }).find("needs a batch and a loss"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { teleport(s.syms, ascent().lr(0)); }).find("expected a finite lr > 0, got 0"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { teleport(s.syms, ascent().steps(-1)); }).find("expected steps >= 0, got -1"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { teleport(s.syms, ascent().tolerance(0)); }).find("expected tolerance > 0"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent().max_step(INFINITY));
            }).find("expected a finite max_step > 0, got inf"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              teleport(s.syms, ascent().max_halvings(-1));
            }).find("expected max_halvings >= 0, got -1"),
            std::string::npos);
  auto other = make(Act::kReLU, f32());
  SymmetryList mixed = {s.syms[0], other.syms[0]};
  EXPECT_NE(error_of([&] { teleport(mixed, ascent()); }).find("one device with one dtype"),
            std::string::npos);
}

}  // namespace
}  // namespace teleport::testing
