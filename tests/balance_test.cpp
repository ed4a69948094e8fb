// kBalance: per-unit factors on scalings, the balanced factorization on
// GL(n) (docs/design.md §8), and LoRA adapters.
#include "test_util.h"

#include <common/models.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

namespace teleport::testing {
namespace {

class BalanceTest : public DeviceTest {};
TELEPORT_DEVICE_TESTS(BalanceTest);

namespace nn = torch::nn;

// The GL pair's two sides as matrices: R = [W_in b_in] (n rows) and M, the
// reader's weight with one column per unit ([outer·inner, n]).
at::Tensor rows_of(const std::vector<at::Tensor>& p, bool bias) {
  const int64_t n = p.front().size(0);
  const at::Tensor w = p.front().detach().reshape({n, -1});
  return bias ? at::cat({w, p[1].detach().unsqueeze(1)}, 1) : w;
}
at::Tensor columns_of(const at::Tensor& w_out, int64_t n) {
  return w_out.detach().reshape({w_out.size(0), n, -1}).transpose(1, 2).reshape({-1, n});
}

// On a GL pair with nothing between (Linear → Linear with and without a
// bias, Conv → Conv) pulled far from balance by a random element, one
// kBalance sweep reaches the minimum of ||g R||² + ||M g⁻¹||² over GL(n):
// twice the nuclear norm of M R, computed independently by an SVD. Both
// sides' Gram matrices agree, the loss and the carried gradient are those of
// the function, it is no worse than the best per-unit scaling, and a second
// teleport has nothing left to do.
TEST_P(BalanceTest, GLBalanceReachesTheBalancedFactorization) {
  for (int model_kind : {0, 1, 2}) {
    SCOPED_TRACE(model_kind);
    const bool bias = model_kind != 1;
    nn::Sequential m = model_kind < 2
                           ? make_mlp({7, 5, 6}, Act::kIdentity, bias, f64(), 3)
                           : nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)),
                                            nn::Conv2d(nn::Conv2dOptions(4, 3, 2)), nn::Flatten());
    m->to(device(), torch::kDouble);
    const auto sym =
        model_kind < 2
            ? gl(nn::Linear(m->ptr<nn::LinearImpl>(0)), nn::Linear(m->ptr<nn::LinearImpl>(1)))
            : gl(nn::Conv2d(m->ptr<nn::Conv2dImpl>(0)), nn::Conv2d(m->ptr<nn::Conv2dImpl>(1)));
    const SymmetryList syms{sym};
    const int64_t n = sym->zero_algebra().size(0);
    torch::manual_seed(4);
    {  // far from balance: rows × diag(30, 1, 1/30, ...) in a random basis
      const at::Tensor q = std::get<0>(at::linalg_qr(torch::randn({n, n}, f64())));
      const at::Tensor d = at::logspace(std::log10(30.0), -std::log10(30.0), n, 10, f64());
      sym->apply_(GroupElement{at::mm(q * d, q.t()), at::mm(q / d, q.t()), false, {}});
    }
    const at::Tensor x =
        model_kind < 2 ? torch::randn({9, 7}, f64()) : torch::randn({3, 2, 7, 7}, f64());
    at::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = torch::randn_like(m->forward(x));
    }
    const BatchLoss batch(m, x, y, mse());
    const double loss = backward(batch, m);
    const auto start = clone_all(m->parameters());
    const auto p = sym->parameters();
    const double minimum =
        2 *
        at::linalg_svdvals(at::mm(columns_of(p.back(), n), rows_of(p, bias))).sum().item<double>();
    // The best per-unit scaling, from the same point.
    const auto per_unit = std::make_shared<LayerSymmetry>(SymmetryKind::kScaling, p[0],
                                                          bias ? p[1] : at::Tensor(), p.back());
    const auto scaled =
        teleport({per_unit}, TeleportOptions().objective(Objective::kBalance).steps(200));
    ASSERT_FALSE(scaled.rolled_back) << scaled.reason;
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < start.size(); ++i) m->parameters()[i].copy_(start[i]);
    }
    backward(batch, m);

    const auto r = teleport(syms, TeleportOptions().objective(Objective::kBalance).steps(1));
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_FALSE(r.elements.at(0).diagonal);
    EXPECT_NEAR(r.objective_after, minimum, 1e-9 * minimum);
    EXPECT_LT(r.objective_after, scaled.objective_after * (1 - 1e-6));
    EXPECT_NEAR(batch.loss().item<double>(), loss, 1e-10 * loss);
    const at::Tensor rows = rows_of(p, bias), cols = columns_of(p.back(), n);
    EXPECT_TRUE(close(at::mm(rows, rows.t()), at::mm(cols.t(), cols), 1e-9));
    std::vector<at::Tensor> carried;
    for (const auto& q : m->parameters()) carried.push_back(q.grad().clone());
    backward(batch, m);
    for (size_t i = 0; i < carried.size(); ++i) {
      EXPECT_TRUE(close(carried[i], m->parameters()[i].grad(), 1e-9));
    }
    // Idempotent: balanced already.
    const auto balanced = clone_all(m->parameters());
    const auto again = teleport(syms, TeleportOptions().objective(Objective::kBalance).steps(3));
    if (again.rolled_back) {
      EXPECT_NE(again.reason.find("balanced already"), std::string::npos) << again.reason;
      EXPECT_TRUE(bitwise_equal(m->parameters(), balanced));
    } else {
      for (size_t i = 0; i < balanced.size(); ++i) {
        EXPECT_TRUE(close(m->parameters()[i], balanced[i], 1e-10));
      }
    }
  }
}

// A LoRA adapter, A = Linear(in, r) then B = Linear(r, out), no biases. With
// B = 0 (where LoRA starts) no invertible g attains the infimum, which
// shrinks A to zero: the teleport leaves the adapter as it is. With B of
// rank one, B = u vᵀ, the directions B does not read are left alone (A's
// rows there unchanged), the one it reads is balanced (||vᵀ A|| = ||B v|| for
// unit v), the loss is kept, and a second teleport has nothing to do.
TEST_P(BalanceTest, GLBalanceLeavesAZeroOrRankDeficientAdapterUsable) {
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    SCOPED_TRACE(dtype);
    const auto options = dtype == torch::kDouble ? f64() : f32();
    const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
    auto m = make_mlp({9, 4, 6}, Act::kIdentity, false, options, 8);
    const nn::Linear lora_a(m->ptr<nn::LinearImpl>(0)), lora_b(m->ptr<nn::LinearImpl>(1));
    const at::Tensor a = lora_a->weight, b = lora_b->weight;
    const SymmetryList syms{gl(lora_a, lora_b)};
    const Batch data = random_batch(12, 9, 6, options, 9);
    const BatchLoss batch(m, data.input, data.target, mse());
    const auto opts = TeleportOptions().objective(Objective::kBalance).steps(2);
    {
      torch::NoGradGuard no_grad;
      b.zero_();
    }
    backward(batch, m);
    auto before = clone_all(m->parameters());
    const auto zero = teleport(syms, opts);
    EXPECT_TRUE(zero.rolled_back);
    EXPECT_TRUE(bitwise_equal(m->parameters(), before));

    const at::Tensor u = torch::randn({6}, options), v = torch::randn({4}, options);
    {
      torch::NoGradGuard no_grad;
      b.copy_(at::outer(u, v) * 1e-3);  // small, as after a few steps
    }
    const double loss = backward(batch, m);
    before = clone_all(m->parameters());
    const auto r = teleport(syms, opts);
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_NEAR(batch.loss().item<double>(), loss, tol * loss);
    EXPECT_LT(r.objective_after, r.objective_before);
    const at::Tensor unit = v / v.norm();
    const at::Tensor off = at::eye(4, options) - at::outer(unit, unit);
    EXPECT_TRUE(close(at::mm(off, a.detach()), at::mm(off, before[0]), tol));
    const double read = at::mv(a.detach().t(), unit).norm().item<double>();
    EXPECT_NEAR(read, at::mv(b.detach(), unit).norm().item<double>(), 1e3 * tol * read);
    EXPECT_TRUE(a.isfinite().all().item<bool>() && b.isfinite().all().item<bool>());
    const auto balanced = clone_all(m->parameters());
    const auto again = teleport(syms, opts);
    if (!again.rolled_back) {
      for (size_t i = 0; i < balanced.size(); ++i) {
        EXPECT_TRUE(close(m->parameters()[i], balanced[i], 1e3 * tol));
      }
    }
  }
}

// TeleportOptimizer on a LoRA model (the examples' LoRAMLP: a frozen MLP
// with an adapter on each Linear), Adam inside, balance teleports: the base
// never moves, the first teleport (every B = 0) leaves the adapters alone,
// and every later kept one keeps each adapter's product B·A and lowers
// ||A||² + ||B||².
TEST_P(BalanceTest, LoRAFineTuningTeleportsOnlyTheAdapters) {
  auto base = make_mlp({10, 8, 6, 4}, Act::kReLU, true, f64(), 2);
  const auto frozen = clone_all(base->parameters());
  torch::manual_seed(3);
  examples::LoRAMLP net(base, 2);
  net->to(device(), torch::kDouble);
  std::vector<at::Tensor> trainable;
  for (const auto& p : net->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  ASSERT_EQ(trainable.size(), 6u);  // A and B of three adapters
  const at::Tensor x = torch::randn({16, 10}, f64());
  const at::Tensor y = torch::randint(0, 4, {16}, f64().dtype(torch::kLong));
  auto products = [&] {
    std::vector<at::Tensor> out;
    for (const auto& a : net->adapters)
      out.push_back(at::mm(a->b->weight, a->a->weight).detach().clone());
    return out;
  };
  std::vector<at::Tensor> before;
  std::vector<TeleportReport> reports;
  TeleportOptimizer opt(
      net->symmetries(),
      std::make_unique<torch::optim::Adam>(trainable, torch::optim::AdamOptions(1e-2)),
      TeleportOptions()
          .every(3)
          .objective(Objective::kBalance)
          .on_report([&](const TeleportReport& r) {
            reports.push_back(r);
            if (r.rolled_back) return;
            const auto now = products();
            for (size_t i = 0; i < now.size(); ++i) {
              EXPECT_TRUE(close(now[i], before[i], 1e-10)) << i;
            }
          }));
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), y).backward();
    before = products();
    opt.step();
  }
  EXPECT_TRUE(bitwise_equal(base->parameters(), frozen));
  ASSERT_EQ(reports.size(), 4u);
  EXPECT_TRUE(reports[0].rolled_back);
  EXPECT_NE(reports[0].reason.find("one side of each pair is zero"), std::string::npos);
  int64_t kept = 0;
  for (size_t i = 1; i < reports.size(); ++i) {
    if (reports[i].rolled_back) continue;
    ++kept;
    EXPECT_LT(reports[i].objective_after, reports[i].objective_before);
    EXPECT_FALSE(reports[i].elements.at(0).diagonal);
  }
  EXPECT_GT(kept, 0);
}

// kBalance from a deliberately unbalanced network (MLP and CNN, scaling and
// GL symmetries): the loss is kept, Σ||W||² falls, and after convergence every
// hidden unit's incoming norm (row and bias) equals its outgoing norm. (The
// linear MLP widens, so that every GL pair has a balanced point: both sides
// of full rank.)
TEST_P(BalanceTest, BalanceEqualisesEveryUnitAndKeepsTheLoss) {
  namespace nn = torch::nn;
  for (int model_kind : {0, 1, 2}) {
    torch::manual_seed(12);
    nn::Sequential m = model_kind == 0 ? make_mlp({6, 8, 7, 3}, Act::kReLU, true, f64(), 12)
                       : model_kind == 1
                           ? make_mlp({6, 5, 6, 8}, Act::kIdentity, true, f64(), 12)
                           : nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 4, 3)), nn::ReLU(),
                                            nn::Conv2d(nn::Conv2dOptions(4, 3, 3)), nn::Flatten(),
                                            nn::Linear(3 * 4 * 4, 5));
    m->to(device(), torch::kDouble);
    {  // unbalance: inflate every second layer's weights
      torch::NoGradGuard no_grad;
      auto params = m->parameters();
      for (size_t i = 0; i < params.size(); i += 4) params[i].mul_(30);
    }
    const at::Tensor x =
        model_kind == 2 ? torch::randn({4, 2, 8, 8}, f64()) : torch::randn({10, 6}, f64());
    at::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = torch::randn_like(m->forward(x));
    }
    const BatchLoss batch(m, x, y, mse());
    const double loss = backward(batch, m);
    const auto syms = discover(m).symmetries;
    const auto r = teleport(syms, TeleportOptions().objective(Objective::kBalance).steps(200));
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_LT(r.objective_after, 0.5 * r.objective_before);
    EXPECT_NEAR(batch.loss().item<double>(), loss, 1e-10 * loss);
    // .grad was carried to the new point: it is the gradient there.
    std::vector<at::Tensor> carried;
    for (const auto& p : m->parameters()) carried.push_back(p.grad().clone());
    backward(batch, m);
    for (size_t i = 0; i < carried.size(); ++i) {
      EXPECT_LE(rel_diff(carried[i], m->parameters()[i].grad()), 1e-9);
    }
    for (const auto& s : syms) {
      const auto p = s->parameters();
      const int64_t n = p.front().size(0);
      at::Tensor in = p.front().detach().square().reshape({n, -1}).sum(1);
      if (p.size() == 3) in = in + p[1].detach().square();
      const at::Tensor out =
          p.back().detach().square().reshape({p.back().size(0), n, -1}).sum(at::IntArrayRef{0, 2});
      EXPECT_LE((in / out - 1).abs().max().item<double>(), 1e-3) << s->name();
    }
    // Balanced already: nothing left to lower, so the next one is rolled back.
    const auto again = teleport(syms, TeleportOptions().objective(Objective::kBalance).steps(5));
    if (again.rolled_back) {
      EXPECT_NE(again.reason.find("balanced already"), std::string::npos) << again.reason;
    } else {
      EXPECT_LT(again.objective_after, again.objective_before);
    }
  }
}

// kBalance honours max_growth: where balancing would raise ||∇L||² beyond
// the cap, the factors are shortened towards 1; the sum of squared weights
// still falls and the loss stays.
TEST_P(BalanceTest, BalanceKeepsWithinTheGrowthCap) {
  auto m = make_mlp({6, 9, 3}, Act::kReLU, true, f64(), 5);
  const Batch data = random_batch(10, 6, 3, f64(), 6);
  const BatchLoss batch(m, data.input, data.target, mse());
  const auto syms = discover(m).symmetries;
  ASSERT_EQ(syms.size(), 1u);
  // Start where ||∇L||² is least on the orbit: each unit's factor c with
  // c⁴ = ‖g_in‖² / ‖g_out‖² (rows ÷ c, columns × c). Balancing moves away
  // from there, so it raises ||∇L||².
  backward(batch, m);
  {
    const auto p = syms[0]->parameters();
    const at::Tensor in = p[0].grad().square().sum(1) + p[1].grad().square();
    const at::Tensor out = p[2].grad().square().sum(0);
    const at::Tensor c = (in / out).pow(0.25);
    syms[0]->apply_(GroupElement{c, c.reciprocal(), true, {}});
  }
  const double loss = backward(batch, m);
  const auto start = clone_all(m->parameters());
  const auto opts = TeleportOptions().objective(Objective::kBalance).steps(50);
  const auto free = teleport(syms, TeleportOptions(opts).max_growth(1e12));
  ASSERT_FALSE(free.rolled_back) << free.reason;
  const double growth = free.grad_norm_sq_after / free.grad_norm_sq_before;
  ASSERT_GT(growth, 1.01);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < start.size(); ++i) m->parameters()[i].copy_(start[i]);
  }
  backward(batch, m);
  const double cap = 1 + (growth - 1) / 3;
  const auto r = teleport(syms, TeleportOptions(opts).max_growth(cap));
  ASSERT_FALSE(r.rolled_back) << r.reason;
  EXPECT_GT(r.shortened, 0);
  EXPECT_LE(r.grad_norm_sq_after, cap * r.grad_norm_sq_before);
  EXPECT_LT(r.objective_after, r.objective_before);
  EXPECT_NEAR(batch.loss().item<double>(), loss, 1e-10 * loss);
}

}  // namespace
}  // namespace teleport::testing
