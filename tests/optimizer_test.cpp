// TeleportOptimizer: a drop-in for the optimizer it wraps.
#include "test_util.h"

#include <teleport/internal/inner_state.h>
#include <teleport/internal/random_state.h>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/pooling.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/schedulers/step_lr.h>
#include <torch/optim/sgd.h>
#include <torch/serialize.h>

#include <sstream>

namespace teleport::testing {
namespace {

using torch::optim::Adagrad;
using torch::optim::AdagradOptions;
using torch::optim::SGD;
using torch::optim::SGDOptions;

class OptimizerTest : public DeviceTest {
 protected:
  torch::nn::Sequential model(uint64_t seed = 0) {
    return make_mlp({6, 8, 7, 3}, Act::kReLU, true, f64(), seed);
  }
  // Batch t of a fixed stream.
  Batch batch(int64_t t) { return random_batch(10, 6, 3, f64(), 100 + t); }

  // One ordinary training step: zero_grad, forward, backward, step.
  void train_step(torch::optim::Optimizer& opt, torch::nn::Sequential& m, int64_t t) {
    const Batch b = batch(t);
    opt.zero_grad();
    mse()(m->forward(b.input), b.target).backward();
    opt.step();
  }
  torch::optim::Optimizer::LossClosure closure(torch::optim::Optimizer& opt,
                                               torch::nn::Sequential& m, int64_t t) {
    return [this, &opt, &m, t] {
      const Batch b = batch(t);
      opt.zero_grad();
      auto loss = mse()(m->forward(b.input), b.target);
      loss.backward();
      return loss;
    };
  }
  std::unique_ptr<SGD> sgd(torch::nn::Sequential& m) {
    return std::make_unique<SGD>(m->parameters(), SGDOptions(0.05).momentum(0.9));
  }
  std::unique_ptr<Adagrad> adagrad(torch::nn::Sequential& m) {
    return std::make_unique<Adagrad>(m->parameters(), AdagradOptions(0.05));
  }
  static TeleportOptions teleports() {
    return TeleportOptions().every(3).steps(4).lr(0.05).max_growth(1e6);
  }
  using MakeInner = std::function<std::unique_ptr<torch::optim::Optimizer>(torch::nn::Sequential&)>;
  // Every torch::optim optimizer, in the configurations whose state differs.
  static std::vector<std::pair<std::string, MakeInner>> every_optimizer() {
    namespace o = torch::optim;
    auto params = [](torch::nn::Sequential& m) { return m->parameters(); };
    return {
        {"sgd", [=](auto& m) { return std::make_unique<o::SGD>(params(m), o::SGDOptions(0.05)); }},
        {"momentum",
         [=](auto& m) {
           return std::make_unique<o::SGD>(params(m), o::SGDOptions(0.05).momentum(0.9));
         }},
        {"nesterov",
         [=](auto& m) {
           return std::make_unique<o::SGD>(params(m),
                                           o::SGDOptions(0.05).momentum(0.9).nesterov(true));
         }},
        {"adagrad",
         [=](auto& m) { return std::make_unique<o::Adagrad>(params(m), o::AdagradOptions(0.05)); }},
        {"adam",
         [=](auto& m) { return std::make_unique<o::Adam>(params(m), o::AdamOptions(0.01)); }},
        {"adam amsgrad",
         [=](auto& m) {
           return std::make_unique<o::Adam>(params(m), o::AdamOptions(0.01).amsgrad(true));
         }},
        {"adamw",
         [=](auto& m) { return std::make_unique<o::AdamW>(params(m), o::AdamWOptions(0.01)); }},
        {"rmsprop",
         [=](auto& m) {
           return std::make_unique<o::RMSprop>(
               params(m), o::RMSpropOptions(0.01).centered(true).momentum(0.5));
         }},
        {"lbfgs",
         [=](auto& m) {
           return std::make_unique<o::LBFGS>(params(m), o::LBFGSOptions(0.5).max_iter(3));
         }},
    };
  }
};
TELEPORT_DEVICE_TESTS(OptimizerTest);

// A per-parameter state tensor of the inner optimizer.
template <typename State, typename Get>
at::Tensor state_of(torch::optim::Optimizer& opt, const at::Tensor& p, Get get) {
  auto* s = dynamic_cast<State*>(detail::find_state(opt, p));
  return s == nullptr ? at::Tensor() : get(*s);
}

TEST_P(OptimizerTest, WithTeleportOffIsBitIdenticalToTheBareOptimizer) {
  for (const auto& [name, make] : every_optimizer()) {
    auto bare_model = model(), wrapped_model = model();
    auto bare = make(bare_model);
    TeleportOptimizer wrapped(wrapped_model, make(wrapped_model));
    for (int64_t t = 0; t < 50; ++t) {
      if (name == "lbfgs") {  // needs its closure
        bare->step(closure(*bare, bare_model, t));
        wrapped.step(closure(wrapped, wrapped_model, t));
      } else {
        train_step(*bare, bare_model, t);
        train_step(wrapped, wrapped_model, t);
      }
    }
    EXPECT_EQ(wrapped.teleport_count(), 0) << name;
    EXPECT_EQ(wrapped.step_count(), 50) << name;
    EXPECT_TRUE(bitwise_equal(bare_model->parameters(), wrapped_model->parameters())) << name;
  }
}

TEST_P(OptimizerTest, LRSchedulerReachesTheInnerOptimizer) {
  auto bare_model = model(), wrapped_model = model();
  auto bare = sgd(bare_model);
  TeleportOptimizer wrapped(wrapped_model, sgd(wrapped_model));
  torch::optim::StepLR bare_sched(*bare, 2, 0.5), wrapped_sched(wrapped, 2, 0.5);
  for (int64_t t = 0; t < 7; ++t) {
    train_step(*bare, bare_model, t);
    train_step(wrapped, wrapped_model, t);
    bare_sched.step();
    wrapped_sched.step();
  }
  train_step(wrapped, wrapped_model, 7);
  train_step(*bare, bare_model, 7);
  EXPECT_DOUBLE_EQ(wrapped.inner().param_groups()[0].options().get_lr(), 0.05 / 8);
  EXPECT_TRUE(bitwise_equal(bare_model->parameters(), wrapped_model->parameters()));
}

TEST_P(OptimizerTest, TeleportsOnScheduleKeepingTheLoss) {
  auto m = model();
  std::vector<TeleportReport> reports;
  TeleportOptimizer opt(
      m, sgd(m), teleports().on_report([&](const TeleportReport& r) { reports.push_back(r); }));
  for (int64_t t = 0; t < 8; ++t) opt.step(closure(opt, m, t));
  ASSERT_EQ(reports.size(), 3u);  // steps 0, 3, 6
  EXPECT_EQ(opt.teleport_count(), 3);
  ASSERT_NE(opt.last_report(), nullptr);
  EXPECT_EQ(opt.last_report()->step, 6);
  for (const auto& r : reports) {
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
    EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
  }
}

TEST_P(OptimizerTest, TeleportChangesTheTrajectory) {
  // Guards the bit-identity test above against a teleport that does nothing.
  auto a = model(), b = model();
  TeleportOptimizer plain(a, sgd(a)), teleporting(b, sgd(b), teleports());
  for (int64_t t = 0; t < 4; ++t) {
    train_step(plain, a, t);
    train_step(teleporting, b, t);
  }
  EXPECT_FALSE(bitwise_equal(a->parameters(), b->parameters()));
}

TEST_P(OptimizerTest, RolledBackTeleportLeavesThePlainStep) {
  auto bare_model = model(), wrapped_model = model();
  auto bare = sgd(bare_model);
  // GL(n) across a ReLU is no symmetry: the closure sees the loss change.
  const auto p = wrapped_model->parameters();
  SymmetryList wrong = {std::make_shared<LayerSymmetry>(SymmetryKind::kLinearGL, p[0], p[1], p[2])};
  // The rollback itself: verification (which would refuse it first) off.
  TeleportOptimizer wrapped(wrapped_model, wrong, sgd(wrapped_model),
                            teleports().lr(1.0).verify(false));
  bare->step(closure(*bare, bare_model, 0));
  wrapped.step(closure(wrapped, wrapped_model, 0));
  ASSERT_NE(wrapped.last_report(), nullptr);
  EXPECT_TRUE(wrapped.last_report()->rolled_back)
      << wrapped.last_report()->loss_before << " " << wrapped.last_report()->loss_after << " "
      << wrapped.last_report()->steps << " " << wrapped.last_report()->reason;
  EXPECT_NE(wrapped.last_report()->reason.find("beyond the tolerance"), std::string::npos);
  EXPECT_TRUE(bitwise_equal(bare_model->parameters(), wrapped_model->parameters()));
  // And the inner optimizer's state is the bare one's, bit for bit.
  std::vector<at::Tensor> bare_state, wrapped_state;
  for (size_t i = 0; i < p.size(); ++i) {
    bare_state.push_back(state_of<torch::optim::SGDParamState>(
        *bare, bare_model->parameters()[i], [](auto& s) { return s.momentum_buffer(); }));
    wrapped_state.push_back(state_of<torch::optim::SGDParamState>(
        wrapped.inner(), p[i], [](auto& s) { return s.momentum_buffer(); }));
  }
  EXPECT_TRUE(bitwise_equal(bare_state, wrapped_state));
}

// A checkpoint taken mid-run with teleports loads into a rebuilt model and
// optimizer (other initial weights, default options) and resumes bit for bit,
// for every optimizer.
TEST_P(OptimizerTest, SaveLoadResumesIdentically) {
  for (const auto& [name, make] : every_optimizer()) {
    SCOPED_TRACE(name);
    auto m = model();
    TeleportOptimizer opt(m, make(m), teleports());
    for (int64_t t = 0; t < 5; ++t) opt.step(closure(opt, m, t));
    std::stringstream model_stream, opt_stream;
    torch::save(m, model_stream);
    torch::save(opt, opt_stream);
    for (int64_t t = 5; t < 11; ++t) opt.step(closure(opt, m, t));

    auto m2 = model(/*seed=*/99);
    TeleportOptimizer opt2(m2, make(m2), TeleportOptions());
    torch::load(m2, model_stream);
    torch::load(opt2, opt_stream);
    EXPECT_EQ(opt2.step_count(), 5) << name;
    EXPECT_EQ(opt2.options().every(), 3) << name;
    for (int64_t t = 5; t < 11; ++t) opt2.step(closure(opt2, m2, t));
    EXPECT_EQ(opt2.teleport_count(), opt.teleport_count()) << name;
    EXPECT_TRUE(bitwise_equal(m->parameters(), m2->parameters())) << name;
  }
}

// Every option survives a checkpoint into an optimizer built with defaults.
TEST_P(OptimizerTest, CheckpointKeepsEveryOption) {
  auto m = model();
  const auto set = TeleportOptions()
                       .every(7)
                       .at({2, 9})
                       .until(500)
                       .max_teleports(4)
                       .stall_fraction(0.25)
                       .stall_decay(0.5)
                       .stall_cooldown(33)
                       .steps(3)
                       .lr(0.25)
                       .method(Method::kAutograd)
                       .parametrization(Parametrization::kExp)
                       .mode(Mode::kReference)
                       .tolerance(3e-3)
                       .max_step(0.125)
                       .max_growth(6.5)
                       .max_halvings(2)
                       .state_policy(StatePolicy::kReset);
  TeleportOptimizer opt(m, sgd(m), set);
  std::stringstream stream;
  torch::save(opt, stream);
  auto m2 = model(5);
  bool called = false;
  TeleportOptimizer loaded(
      m2, sgd(m2), TeleportOptions().on_report([&](const TeleportReport&) { called = true; }));
  torch::load(loaded, stream);
  const auto& o = loaded.options();
  EXPECT_EQ(o.every(), 7);
  EXPECT_EQ(o.at(), (std::vector<int64_t>{2, 9}));
  EXPECT_EQ(o.until(), 500);
  EXPECT_EQ(o.max_teleports(), 4);
  EXPECT_EQ(o.stall_fraction(), 0.25);
  EXPECT_EQ(o.stall_decay(), 0.5);
  EXPECT_EQ(o.stall_cooldown(), 33);
  EXPECT_EQ(o.steps(), 3);
  EXPECT_EQ(o.lr(), 0.25);
  EXPECT_EQ(o.method(), Method::kAutograd);
  EXPECT_EQ(o.parametrization(), Parametrization::kExp);
  EXPECT_EQ(o.mode(), Mode::kReference);
  EXPECT_EQ(o.tolerance(), 3e-3);
  EXPECT_EQ(o.max_step(), 0.125);
  EXPECT_EQ(o.max_growth(), 6.5);
  EXPECT_EQ(o.max_halvings(), 2);
  EXPECT_EQ(o.state_policy(), StatePolicy::kReset);
  ASSERT_TRUE(o.on_report() != nullptr);  // the loading optimizer's own callback stays
  o.on_report()(TeleportReport{});
  EXPECT_TRUE(called);
  // The objective (kBalance has exact arithmetic only, so on its own).
  TeleportOptimizer balancing(m, sgd(m), TeleportOptions().objective(Objective::kBalance));
  std::stringstream balance_stream;
  torch::save(balancing, balance_stream);
  torch::load(loaded, balance_stream);
  EXPECT_EQ(loaded.options().objective(), Objective::kBalance);
}

// On demand: a gradient that collapses (a synthetic plateau: the loss scaled
// down 100-fold from step 30) makes the optimizer teleport there, once per
// cooldown; steady training never does.
TEST_P(OptimizerTest, OnDemandTeleportsWhenTheGradientCollapses) {
  auto m = model();
  std::vector<int64_t> fired;
  TeleportOptimizer opt(
      m, sgd(m),
      TeleportOptions().steps(3).lr(0.05).stall_fraction(0.1).stall_cooldown(15).on_report(
          [&](const TeleportReport& r) { fired.push_back(r.step); }));
  for (int64_t t = 0; t < 60; ++t) {
    const double scale = t < 30 ? 1.0 : 0.01;
    opt.step([&] {
      opt.zero_grad();
      const Batch b = batch(t % 3);
      auto loss = mse()(m->forward(b.input), b.target) * scale;
      loss.backward();
      return loss;
    });
  }
  ASSERT_FALSE(fired.empty());
  EXPECT_EQ(fired.front(), 30);
  for (size_t i = 1; i < fired.size(); ++i) EXPECT_GE(fired[i] - fired[i - 1], 15);
}

// A RandomState replays every draw of the CPU's generator (and the device's):
// uniform, integer and normal ones, whose Box–Muller pair leaves one sample
// cached in the generator, so an odd count of normal draws must replay too.
TEST_P(OptimizerTest, RandomStateReplaysEveryDraw) {
  torch::manual_seed(11);
  const auto opts = torch::TensorOptions(device()).dtype(torch::kDouble);
  auto draws = [&] {
    std::vector<at::Tensor> out = {
        torch::randn({1}, torch::kDouble), torch::randn({1}, torch::kFloat),
        torch::rand({5}, torch::kDouble),  torch::randint(0, 1000, {7}),
        torch::randn({33}, opts),          torch::rand({3}, opts)};
    return out;
  };
  torch::randn({1}, torch::kDouble);  // a normal sample left cached
  const RandomState state(devices_of({torch::zeros({1}, opts)}));
  const auto first = draws();
  state.restore();
  const auto again = draws();
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(torch::equal(first[i], again[i])) << i;
  const auto next = draws();  // the stream goes on from where the replay left it
  EXPECT_FALSE(torch::equal(next[2], first[2]));
}

// Dropout draws new masks at every forward; the loss before and after a
// teleport must see the same ones, or every exact teleport looks inexact.
TEST_P(OptimizerTest, DropoutModelsTeleportWithTheSameMasksBeforeAndAfter) {
  torch::manual_seed(3);
  torch::nn::Sequential m(torch::nn::Linear(6, 16), torch::nn::ReLU(), torch::nn::Dropout(0.5),
                          torch::nn::Linear(16, 12), torch::nn::ReLU(), torch::nn::Linear(12, 3));
  m->to(device(), torch::kDouble);
  m->train();
  std::vector<TeleportReport> reports;
  TeleportOptimizer opt(m, sgd(m), teleports().every(2).on_report([&](const TeleportReport& r) {
    reports.push_back(r);
  }));
  for (int64_t t = 0; t < 16; ++t) opt.step(closure(opt, m, t));
  ASSERT_EQ(reports.size(), 8u);
  for (const auto& r : reports) {
    EXPECT_FALSE(r.rolled_back) << r.reason;
    EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
  }
  // The random stream advanced as by one call of the closure: what a plain
  // step draws next, this one draws next too.
  auto a = model(), b = model();
  const auto draw = [&](torch::optim::Optimizer& o, torch::nn::Sequential& mm, bool) {
    torch::manual_seed(8);
    o.step([&] {
      o.zero_grad();
      auto loss = mse()(torch::dropout(mm->forward(batch(0).input), 0.5, true), batch(0).target);
      loss.backward();
      return loss;
    });
    return torch::rand({4}, torch::kDouble);
  };
  TeleportOptimizer plain(a, sgd(a)), teleporting(b, sgd(b), teleports().every(1));
  EXPECT_TRUE(torch::equal(draw(plain, a, false), draw(teleporting, b, true)));
  EXPECT_EQ(teleporting.teleport_count(), 1);
  EXPECT_FALSE(teleporting.last_report()->rolled_back) << teleporting.last_report()->reason;
}

// LBFGS needs its closure: it is passed through, and with teleports the
// training still converges; with none due it is the bare LBFGS, bit for bit.
// Its history is carried: under scaling p ⊙ y (gradient differences, the last
// gradient) and s ⊘ p (steps, the search direction) are invariant elementwise,
// and so every yᵀs, ρ = 1/yᵀs kept.
TEST_P(OptimizerTest, LbfgsRunsInsideWithItsClosureAndHistoryCarried) {
  namespace o = torch::optim;
  const auto lbfgs = [](torch::nn::Sequential& mm) {
    return std::make_unique<o::LBFGS>(mm->parameters(), o::LBFGSOptions(0.5).max_iter(5));
  };
  auto bare_model = model(), plain_model = model(), tele_model = model();
  auto bare = lbfgs(bare_model);
  TeleportOptimizer plain(plain_model, lbfgs(plain_model));
  const auto params = tele_model->parameters();
  // Per-parameter views of LBFGS's flat vectors, and the invariants they keep.
  const auto views = [&](const at::Tensor& flat) { return detail::flat_views(flat, params); };
  const auto invariants = [&](o::LBFGSParamState& st) {
    std::vector<at::Tensor> out;
    auto add = [&](const at::Tensor& flat, bool weight_like) {
      const auto v = views(flat);
      for (size_t i = 0; i < v.size(); ++i) {
        const auto p = params[i].detach();
        out.push_back((weight_like ? v[i] / p : v[i] * p).clone());
      }
    };
    for (const auto& y : st.old_dirs()) add(y, false);
    for (const auto& s : st.old_stps()) add(s, true);
    add(st.prev_flat_grad(), false);
    add(st.d(), true);
    return out;
  };
  std::vector<at::Tensor> before;
  int64_t checked = 0;
  TeleportOptimizer* self = nullptr;
  TeleportOptimizer tele(
      tele_model, lbfgs(tele_model), teleports().on_report([&](const TeleportReport& r) {
        if (before.empty()) return;  // no history yet
        ASSERT_FALSE(r.rolled_back) << r.reason;
        auto& st =
            static_cast<o::LBFGSParamState&>(*detail::find_state(self->inner(), params.front()));
        const auto now = invariants(st);
        ASSERT_EQ(now.size(), before.size());
        for (size_t i = 0; i < now.size(); ++i) EXPECT_LE(rel_diff(now[i], before[i]), 1e-10) << i;
        for (size_t i = 0; i < st.old_dirs().size(); ++i) {
          const double ys = st.old_dirs()[i].dot(st.old_stps()[i]).item<double>();
          EXPECT_NEAR(ys * st.ro()[i].item<double>(), 1.0, 1e-10);
        }
        ++checked;
      }));
  self = &tele;
  double first = 0, last = 0;
  for (int64_t t = 0; t < 10; ++t) {
    auto* st = dynamic_cast<o::LBFGSParamState*>(detail::find_state(tele.inner(), params.front()));
    before = st != nullptr && !st->old_dirs().empty() ? invariants(*st) : std::vector<at::Tensor>{};
    bare->step(closure(*bare, bare_model, 0));
    plain.step(closure(plain, plain_model, 0));
    const double loss = tele.step(closure(tele, tele_model, 0)).item<double>();
    if (t == 0) first = loss;
    last = loss;
  }
  EXPECT_TRUE(bitwise_equal(bare_model->parameters(), plain_model->parameters()));
  EXPECT_GT(tele.teleport_count(), 0);
  EXPECT_GT(checked, 0);
  EXPECT_LT(last, 0.5 * first);
}

// Weight decay added to the gradient puts λw into the inner buffers, which no
// map carries: kTransport refuses it clearly; kKeep teleports, keeping the
// data loss (what the closure returns) exactly.
TEST_P(OptimizerTest, WeightDecayWithTransportIsRefusedAndKeepWorks) {
  auto m = model();
  const auto decayed = [](torch::nn::Sequential& mm) {
    return std::make_unique<SGD>(mm->parameters(),
                                 SGDOptions(0.05).momentum(0.9).weight_decay(1e-3));
  };
  const std::string error = error_of([&] { TeleportOptimizer opt(m, decayed(m), teleports()); });
  EXPECT_NE(error.find("kTransport cannot carry SGD's momentum buffer with weight_decay"),
            std::string::npos)
      << error;
  EXPECT_NE(error_of([&] {
              TeleportOptimizer opt(
                  m,
                  std::make_unique<Adagrad>(m->parameters(), AdagradOptions(0.1).weight_decay(0.1)),
                  teleports());
            }).find("Adagrad's sums"),
            std::string::npos);
  // Without momentum SGD holds no state: nothing to carry, so it is accepted.
  EXPECT_EQ(error_of([&] {
              TeleportOptimizer opt(
                  m, std::make_unique<SGD>(m->parameters(), SGDOptions(0.05).weight_decay(1e-3)),
                  teleports());
            }),
            "");
  std::vector<TeleportReport> reports;
  TeleportOptimizer keep(
      m, decayed(m),
      teleports().state_policy(StatePolicy::kKeep).on_report([&](const TeleportReport& r) {
        reports.push_back(r);
      }));
  for (int64_t t = 0; t < 7; ++t) keep.step(closure(keep, m, t));
  ASSERT_EQ(reports.size(), 3u);
  for (const auto& r : reports) {
    EXPECT_FALSE(r.rolled_back) << r.reason;
    EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
  }
  // A group turned to weight decay later is caught at the next teleport.
  TeleportOptimizer later(m, sgd(m), teleports());
  static_cast<SGDOptions&>(later.param_groups()[0].options()).weight_decay(1e-2);
  EXPECT_NE(error_of([&] { later.step(closure(later, m, 0)); }).find("weight_decay"),
            std::string::npos);
}

// Every buffer of every torch::optim optimizer, by kind, under a scaling
// teleport (inner learning rate 0, so only the teleport moves the weights):
// p ⊙ m is invariant for gradient-like buffers, p² ⊙ v for squared ones.
// Under full GL(n) SGD's momentum maps by g^{-T}; an adaptive optimizer's
// moments (first and second) are kept as a unit, and the report says so.
TEST_P(OptimizerTest, TransportCarriesEveryOptimizersBuffersByKind) {
  namespace o = torch::optim;
  using Make = std::function<std::unique_ptr<o::Optimizer>(std::vector<at::Tensor>)>;
  using Get = std::function<std::vector<std::pair<bool, at::Tensor>>(o::OptimizerParamState*)>;
  // {name, make, buffers as (squared?, tensor)}
  const std::vector<std::tuple<std::string, Make, Get>> cases = {
      {"sgd momentum",
       [](auto p) { return std::make_unique<o::SGD>(p, o::SGDOptions(0).momentum(0.9)); },
       [](auto* s) {
         return std::vector<std::pair<bool, at::Tensor>>{
             {false, static_cast<o::SGDParamState*>(s)->momentum_buffer()}};
       }},
      {"adagrad", [](auto p) { return std::make_unique<o::Adagrad>(p, o::AdagradOptions(0)); },
       [](auto* s) {
         return std::vector<std::pair<bool, at::Tensor>>{
             {true, static_cast<o::AdagradParamState*>(s)->sum()}};
       }},
      {"adam amsgrad",
       [](auto p) { return std::make_unique<o::Adam>(p, o::AdamOptions(0).amsgrad(true)); },
       [](auto* s) {
         auto* a = static_cast<o::AdamParamState*>(s);
         return std::vector<std::pair<bool, at::Tensor>>{
             {false, a->exp_avg()}, {true, a->exp_avg_sq()}, {true, a->max_exp_avg_sq()}};
       }},
      {"adamw", [](auto p) { return std::make_unique<o::AdamW>(p, o::AdamWOptions(0)); },
       [](auto* s) {
         auto* a = static_cast<o::AdamWParamState*>(s);
         return std::vector<std::pair<bool, at::Tensor>>{{false, a->exp_avg()},
                                                         {true, a->exp_avg_sq()}};
       }},
      {"rmsprop centered",
       [](auto p) {
         return std::make_unique<o::RMSprop>(p, o::RMSpropOptions(0).centered(true).momentum(0.5));
       },
       [](auto* s) {
         auto* r = static_cast<o::RMSpropParamState*>(s);
         return std::vector<std::pair<bool, at::Tensor>>{{false, r->grad_avg()},
                                                         {true, r->square_avg()}};
       }},
  };
  for (Act act : {Act::kReLU, Act::kIdentity}) {
    for (const auto& [name, make, get] : cases) {
      auto m = make_mlp({6, 8, 7, 3}, act, true, f64(), 2);
      const auto params = m->parameters();
      // The buffers' invariants (or, under GL, the buffers) just before the teleport.
      std::vector<std::vector<std::pair<bool, at::Tensor>>> before;
      bool checked = false;
      TeleportOptimizer opt(
          m, make(params),
          teleports().every(0).at({3}).lr(0.5).on_report([&](const TeleportReport& r) {
            ASSERT_FALSE(r.rolled_back) << name << ": " << r.reason;
            checked = true;
            const bool gl = act == Act::kIdentity;
            bool squared_buffers = false;
            for (const auto& b : before[0]) squared_buffers = squared_buffers || b.first;
            EXPECT_EQ(r.state_kept, gl && squared_buffers) << name;
            EXPECT_EQ(r.state_note.empty(), !r.state_kept) << name;
            for (size_t i = 0; i < params.size(); ++i) {
              const auto now = get(detail::find_state(opt.inner(), params[i]));
              for (size_t j = 0; j < now.size(); ++j) {
                const auto& [squared, buffer] = now[j];
                const auto& old = before[i][j].second;
                if (!gl) {
                  const at::Tensor p2 = squared ? params[i].detach().square() : params[i].detach();
                  EXPECT_TRUE(torch::allclose(p2 * buffer, old, 1e-10, 1e-14))  // elementwise
                      << name << " parameter " << i << " buffer " << j;
                } else if (squared || squared_buffers) {
                  // Under GL an adaptive optimizer's moments are kept as a unit.
                  EXPECT_TRUE(torch::equal(buffer, old))
                      << name << " parameter " << i << " buffer " << j;
                }
              }
            }
            if (gl && !squared_buffers) {
              // Gradient-like: W0 rows by g0^{-T}; W1 rows by g1^{-T} and columns by g0ᵀ.
              const auto &e0 = r.elements[0], &e1 = r.elements[1];
              const auto m0 = get(detail::find_state(opt.inner(), params[0]))[0].second;
              EXPECT_LE(rel_diff(m0, torch::mm(e0.g_inv.t(), before[0][0].second)), 1e-10) << name;
              const auto m1 = get(detail::find_state(opt.inner(), params[2]))[0].second;
              EXPECT_LE(
                  rel_diff(m1, torch::mm(torch::mm(e1.g_inv.t(), before[2][0].second), e0.g.t())),
                  1e-10)
                  << name;
            }
          }));
      for (int64_t t = 0; t < 4; ++t) {
        if (t == 3) {
          before.clear();
          for (const auto& p : params) {
            auto buffers = get(detail::find_state(opt.inner(), p));
            for (auto& [squared, buffer] : buffers) {
              if (act == Act::kReLU) buffer = (squared ? p.detach().square() : p.detach()) * buffer;
              buffer = buffer.clone();
            }
            before.push_back(buffers);
          }
        }
        opt.step(closure(opt, m, t));
      }
      EXPECT_TRUE(checked) << name;
    }
  }
}

// A user-defined optimizer with a state of its own: it trains inside, its
// state is kept at teleports, and notes() says so once.
struct NudgeState : torch::optim::OptimizerCloneableParamState<NudgeState> {
  TORCH_ARG(at::Tensor, last);
};
struct NudgeOptions : torch::optim::OptimizerCloneableOptions<NudgeOptions> {
  explicit NudgeOptions(double lr) : lr_(lr) {}
  TORCH_ARG(double, lr);
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};
class Nudge : public torch::optim::Optimizer {
 public:
  Nudge(std::vector<at::Tensor> params, double lr)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))},
                  std::make_unique<NudgeOptions>(lr)) {}
  at::Tensor step(LossClosure closure = nullptr) override {
    at::Tensor loss;
    if (closure) loss = closure();
    torch::NoGradGuard no_grad;
    for (auto& group : param_groups_) {
      const double lr = static_cast<NudgeOptions&>(group.options()).lr();
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        auto* s = detail::find_state(*this, p);
        if (s == nullptr) {
          auto fresh = std::make_unique<NudgeState>();
          fresh->last(p.grad().clone());
          state_[detail::state_key(state_, p)] = std::move(fresh);
        } else {
          static_cast<NudgeState*>(s)->last(p.grad().clone());
        }
        p.sub_(p.grad() * lr);
      }
    }
    return loss;
  }
};

TEST_P(OptimizerTest, UserDefinedOptimizerKeepsItsStateAndIsNoted) {
  auto m = model();
  const auto params = m->parameters();
  std::vector<at::Tensor> before;
  int64_t checked = 0;
  TeleportOptimizer* self = nullptr;
  TeleportOptimizer opt(
      m, std::make_unique<Nudge>(params, 0.05), teleports().on_report([&](const TeleportReport& r) {
        if (before.empty()) return;
        ASSERT_FALSE(r.rolled_back) << r.reason;
        for (size_t i = 0; i < params.size(); ++i) {
          EXPECT_TRUE(torch::equal(
              static_cast<NudgeState*>(detail::find_state(self->inner(), params[i]))->last(),
              before[i]));
        }
        ++checked;
      }));
  self = &opt;
  for (int64_t t = 0; t < 7; ++t) {
    before.clear();
    for (const auto& p : params) {
      auto* s = detail::find_state(opt.inner(), p);
      if (s != nullptr) before.push_back(static_cast<NudgeState*>(s)->last().clone());
    }
    opt.step(closure(opt, m, t));
  }
  EXPECT_GT(checked, 0);
  int64_t notes = 0;
  for (const auto& n : opt.notes()) notes += n.find("does not know") != std::string::npos;
  EXPECT_EQ(notes, 1);
}

// The classic MNIST network of the LibTorch examples, smaller: a custom Module
// that declares its symmetries, one line per pair of layers.
struct SmallCnnImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(1, 4, 3)};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(4, 6, 3)};
  torch::nn::Linear fc1{6 * 2 * 2, 8}, fc2{8, 3};
  SmallCnnImpl() {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }
  at::Tensor forward(at::Tensor x) {
    // 14 x 14 in: conv 12, pool 6, conv 4, pool 2.
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(torch::dropout(conv2->forward(x), 0.3, is_training()), 2));
    x = torch::relu(fc1->forward(x.flatten(1)));
    return fc2->forward(torch::dropout(x, 0.3, is_training()));
  }
  SymmetryList symmetries() {
    return {teleport::scaling(conv1, conv2), teleport::scaling(conv2, fc1),
            teleport::scaling(fc1, fc2)};
  }
};
TORCH_MODULE(SmallCnn);

TEST_P(OptimizerTest, CustomModuleTeleportsItsDeclaredSymmetries) {
  torch::manual_seed(7);
  SmallCnn net;
  net->to(device(), torch::kDouble);
  torch::manual_seed(8);
  const at::Tensor x = torch::randn({16, 1, 14, 14}, f64());
  const at::Tensor y =
      torch::randint(0, 3, {16}, torch::TensorOptions(device()).dtype(torch::kLong));
  std::vector<TeleportReport> reports;
  TeleportOptimizer opt(
      net->symmetries(), std::make_unique<SGD>(net->parameters(), SGDOptions(0.05).momentum(0.9)),
      teleports().every(2).on_report([&](const TeleportReport& r) { reports.push_back(r); }));
  auto closure = [&] {
    opt.zero_grad();
    auto loss = torch::nll_loss(torch::log_softmax(net->forward(x), 1), y);
    loss.backward();
    return loss;
  };
  for (int64_t t = 0; t < 8; ++t) opt.step(closure);
  ASSERT_EQ(reports.size(), 4u);
  for (const auto& r : reports) {
    EXPECT_FALSE(r.rolled_back) << r.reason;
    EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
    EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
  }
  // A wrong declaration (GL across ReLU and max-pooling) changes the loss:
  // rolled back, and the step is the bare optimizer's, bit for bit.
  torch::manual_seed(7);
  SmallCnn fresh_a;
  torch::manual_seed(7);
  SmallCnn fresh_b;
  fresh_a->to(device(), torch::kDouble);
  fresh_b->to(device(), torch::kDouble);
  SGD bare(fresh_a->parameters(), SGDOptions(0.05));
  TeleportOptimizer wrong({teleport::gl(fresh_b->conv1, fresh_b->conv2)},
                          std::make_unique<SGD>(fresh_b->parameters(), SGDOptions(0.05)),
                          teleports().every(1).lr(1.0).verify(false));  // the rollback itself
  fresh_a->eval();
  fresh_b->eval();
  const auto step = [&](torch::optim::Optimizer& o, SmallCnn& m) {
    o.step([&] {
      o.zero_grad();
      auto loss = torch::nll_loss(torch::log_softmax(m->forward(x), 1), y);
      loss.backward();
      return loss;
    });
  };
  step(bare, fresh_a);
  step(wrong, fresh_b);
  ASSERT_NE(wrong.last_report(), nullptr);
  EXPECT_TRUE(wrong.last_report()->rolled_back);
  EXPECT_NE(wrong.last_report()->reason.find("beyond the tolerance"), std::string::npos)
      << wrong.last_report()->reason;
  EXPECT_TRUE(bitwise_equal(fresh_a->parameters(), fresh_b->parameters()));
}

// A Sequential CNN: discover() finds its symmetries, and step() teleports
// from .grad keeping the loss.
TEST_P(OptimizerTest, SequentialCnnTeleportsFromGrad) {
  namespace nn = torch::nn;
  torch::manual_seed(9);
  nn::Sequential cnn(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::MaxPool2d(2), nn::ReLU(),
                     nn::Conv2d(nn::Conv2dOptions(4, 6, 3)), nn::ReLU(), nn::Flatten(),
                     nn::Linear(6 * 3 * 3, 3));
  cnn->to(device(), torch::kDouble);
  const at::Tensor x = torch::randn({8, 1, 12, 12}, f64()), y = torch::randn({8, 3}, f64());
  TeleportOptimizer opt(cnn, std::make_unique<SGD>(cnn->parameters(), SGDOptions(0.01)),
                        teleports().every(1));
  ASSERT_EQ(opt.symmetries().size(), 2u);
  for (int64_t t = 0; t < 3; ++t) {
    opt.zero_grad();
    const auto loss = mse()(cnn->forward(x), y);
    loss.backward();
    opt.step();
    ASSERT_FALSE(opt.last_report()->rolled_back) << opt.last_report()->reason;
  }
  EXPECT_EQ(opt.teleport_count(), 3);
}

// kPreconditioned with Adagrad and Adam inside: every kept teleport raises
// Σ g²/(√v̂ + eps), recomputed here from the transported inner state and
// gradient as the next step will use them, and keeps the loss; with SGD it is
// kGradNorm's teleport, bit for bit.
TEST_P(OptimizerTest, PreconditionedObjectiveRisesWithTheInnerStateAndIsGradNormForSgd) {
  namespace o = torch::optim;
  for (bool adam : {false, true}) {
    auto m = model();
    const auto params = m->parameters();
    std::unique_ptr<o::Optimizer> inner;
    if (adam) {
      inner = std::make_unique<o::Adam>(params, o::AdamOptions(0.01));
    } else {
      inner = std::make_unique<o::Adagrad>(params, o::AdagradOptions(0.05));
    }
    int64_t checked = 0;
    TeleportOptimizer* self = nullptr;
    auto objective_now = [&] {  // from the inner state, as its next step will use it
      double f = 0;
      for (const auto& p : detail::distinct_parameters(self->symmetries())) {
        const at::Tensor g = p.grad();
        at::Tensor v;
        double eps = 0;
        if (adam) {
          auto* st = dynamic_cast<o::AdamParamState*>(detail::find_state(self->inner(), p));
          const int64_t step = st ? st->step() : 0;
          v = (st ? st->exp_avg_sq() * 0.999 : torch::zeros_like(g)) + g.square() * 0.001;
          v = v / (1 - std::pow(0.999, double(step + 1)));
          eps = 1e-8;
        } else {
          auto* st = dynamic_cast<o::AdagradParamState*>(detail::find_state(self->inner(), p));
          v = st->sum() + g.square();
          eps = 1e-10;
        }
        f += (g.square() / (v.sqrt() + eps)).sum().item<double>();
      }
      return f;
    };
    double before = 0;
    TeleportOptimizer opt(m, std::move(inner),
                          teleports()
                              .objective(Objective::kPreconditioned)
                              .lr(0.5)
                              .on_report([&](const TeleportReport& r) {
                                ASSERT_FALSE(r.rolled_back) << r.reason;
                                const double after = objective_now();
                                EXPECT_NEAR(r.objective_before, before, 1e-9 * before);
                                EXPECT_NEAR(r.objective_after, after, 1e-9 * after);
                                EXPECT_GT(after, before);
                                EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
                                ++checked;
                              }));
    self = &opt;
    for (int64_t t = 0; t < 7; ++t) {
      auto c = closure(opt, m, t);
      bool first = true;  // later calls measure the teleported point
      opt.step([&] {
        auto loss = c();
        if (first) before = objective_now();
        first = false;
        return loss;
      });
    }
    EXPECT_EQ(checked, 3) << (adam ? "adam" : "adagrad");
  }
  // SGD has no second moment: the same teleport as kGradNorm.
  auto a = model(), b = model();
  TeleportOptimizer grad_norm(a, sgd(a), teleports());
  TeleportOptimizer preconditioned(b, sgd(b), teleports().objective(Objective::kPreconditioned));
  for (int64_t t = 0; t < 4; ++t) {
    train_step(grad_norm, a, t);
    train_step(preconditioned, b, t);
  }
  EXPECT_EQ(preconditioned.teleport_count(), 2);
  EXPECT_TRUE(bitwise_equal(a->parameters(), b->parameters()));
}

// kLookAhead: from a kept teleport, the inner optimizer's actual next step on
// the teleport batch ends at a loss no higher than the same step from the
// original point (a twin that never teleports), and the objective the
// teleport reports is that loss: the model of the step is the step.
TEST_P(OptimizerTest, LookAheadTeleportNeverRaisesTheLossAfterTheNextStep) {
  namespace o = torch::optim;
  // Every optimizer NextStep models: amsgrad, LBFGS and RMSprop with momentum
  // or centering are refused, so plain RMSprop stands in for the last.
  std::vector<std::pair<std::string, MakeInner>> inners;
  for (auto& [name, make] : every_optimizer()) {
    if (name != "adam amsgrad" && name != "lbfgs" && name != "rmsprop")
      inners.emplace_back(name, make);
  }
  inners.emplace_back("rmsprop", [](auto& m) {
    return std::make_unique<o::RMSprop>(m->parameters(), o::RMSpropOptions(0.01));
  });
  const Batch tb = batch(99);  // the teleport batch, and the batch of the step after it
  for (const auto& [name, make] : inners) {
    for (auto policy : {StatePolicy::kTransport, StatePolicy::kKeep, StatePolicy::kReset}) {
      auto a = model(), b = model();
      std::vector<TeleportReport> reports;
      TeleportOptimizer opt(a, make(a),
                            TeleportOptions()
                                .at({4})
                                .steps(6)
                                .lr(0.5)
                                .state_policy(policy)
                                .objective(Objective::kLookAhead)
                                .on_report([&](const TeleportReport& r) { reports.push_back(r); }));
      opt.set_teleport_batch([&] { return std::make_pair(tb.input, tb.target); }, mse());
      auto twin = make(b);
      for (int64_t t = 0; t < 4; ++t) {
        train_step(opt, a, t);
        train_step(*twin, b, t);
      }
      // Step 4 on the teleport batch: a teleports first, b does not.
      auto step_on = [&](torch::optim::Optimizer& opt_, torch::nn::Sequential& m) {
        opt_.zero_grad();
        mse()(m->forward(tb.input), tb.target).backward();
        opt_.step();
      };
      step_on(opt, a);
      step_on(*twin, b);
      ASSERT_EQ(reports.size(), 1u) << name;
      const TeleportReport& r = reports.front();
      const double with = mse()(a->forward(tb.input), tb.target).item<double>();
      const double without = mse()(b->forward(tb.input), tb.target).item<double>();
      EXPECT_FALSE(r.rolled_back) << name << ": " << r.reason;
      if (r.rolled_back) continue;
      EXPECT_LT(r.objective_after, r.objective_before) << name;
      EXPECT_NEAR(r.objective_after, with, 1e-9 * with) << name << " policy " << int(policy);
      if (policy != StatePolicy::kReset) {  // (a reset changes the step even without a teleport)
        EXPECT_NEAR(r.objective_before, without, 1e-9 * without)
            << name << " policy " << int(policy);
        EXPECT_LE(with, without) << name;
      }
      EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before) << name;
    }
  }
  // Without a teleport batch there is no loss to look ahead on.
  auto m = model();
  TeleportOptimizer opt(m, sgd(m), TeleportOptions().every(1).objective(Objective::kLookAhead));
  EXPECT_NE(error_of([&] { train_step(opt, m, 0); }).find("call set_teleport_batch first"),
            std::string::npos);
}

TEST_P(OptimizerTest, TransportMapsMomentumAndAdagradSums) {
  for (bool use_adagrad : {false, true}) {
    auto m = make_mlp({6, 8, 3}, Act::kReLU, false, f64());
    const auto w_in = m->parameters()[0], w_out = m->parameters()[1];
    std::unique_ptr<torch::optim::Optimizer> inner =
        use_adagrad ? std::unique_ptr<torch::optim::Optimizer>(adagrad(m)) : sgd(m);
    auto get = [&](torch::optim::Optimizer& o, const at::Tensor& p) {
      return use_adagrad
                 ? state_of<torch::optim::AdagradParamState>(o, p, [](auto& s) { return s.sum(); })
                 : state_of<torch::optim::SGDParamState>(
                       o, p, [](auto& s) { return s.momentum_buffer(); });
    };
    at::Tensor in_before, out_before, in_after, out_after;
    TeleportReport report;
    TeleportOptimizer* self = nullptr;
    TeleportOptimizer opt(m, std::move(inner),
                          teleports().every(0).at({1}).on_report([&](const TeleportReport& r) {
                            report = r;
                            in_after = get(self->inner(), w_in).clone();
                            out_after = get(self->inner(), w_out).clone();
                          }));
    self = &opt;
    train_step(opt, m, 0);
    in_before = get(opt.inner(), w_in).clone();
    out_before = get(opt.inner(), w_out).clone();
    train_step(opt, m, 1);
    ASSERT_FALSE(report.rolled_back) << report.reason;
    ASSERT_EQ(report.elements.size(), 1u);
    const auto& e = report.elements[0];
    const int power = use_adagrad ? 2 : 1;  // sums of squares scale by the square
    EXPECT_LE(rel_diff(in_after, in_before * e.g_inv.pow(power).unsqueeze(1)), 1e-13);
    EXPECT_LE(rel_diff(out_after, out_before * e.g.pow(power).unsqueeze(0)), 1e-13);
    EXPECT_GT(rel_diff(in_after, in_before), 1e-6);
  }
}

// kReset starts the inner state afresh at a kept teleport, whether it moved
// the weights (kGradNorm) or not (kStateOnly: the weights stay as they were).
TEST_P(OptimizerTest, ResetStartsTheStateAfresh) {
  for (Objective objective : {Objective::kGradNorm, Objective::kStateOnly}) {
    SCOPED_TRACE(objective == Objective::kGradNorm ? "grad_norm" : "state_only");
    auto m = make_mlp({6, 8, 3}, Act::kReLU, false, f64());
    at::Tensor sum_after;
    std::vector<at::Tensor> weights_before, weights_after;
    TeleportOptimizer* self = nullptr;
    TeleportOptimizer opt(m, adagrad(m),
                          teleports()
                              .every(0)
                              .at({1})
                              .objective(objective)
                              .state_policy(StatePolicy::kReset)
                              .on_report([&](const TeleportReport& r) {
                                EXPECT_FALSE(r.rolled_back) << r.reason;
                                weights_after = clone_all(m->parameters());
                                sum_after = state_of<torch::optim::AdagradParamState>(
                                                self->inner(), m->parameters()[0],
                                                [](auto& s) { return s.sum(); })
                                                .clone();
                              }));
    self = &opt;
    train_step(opt, m, 0);
    weights_before = clone_all(m->parameters());
    train_step(opt, m, 1);
    ASSERT_TRUE(sum_after.defined());
    EXPECT_EQ(sum_after.abs().max().item<double>(), 0.0);
    EXPECT_EQ(bitwise_equal(weights_before, weights_after), objective == Objective::kStateOnly);
  }
}

// kStateOnly, the state-policy control: its teleports are kept and move
// nothing, so with the state kept or transported (by the identity) every
// optimizer follows the bare one bit for bit (kReset: ResetStartsTheStateAfresh).
TEST_P(OptimizerTest, StateOnlyTeleportsMoveNothingButTheState) {
  for (const auto& [name, make] : every_optimizer()) {
    if (name == "lbfgs") continue;  // its own tests cover its history
    for (auto policy : {StatePolicy::kKeep, StatePolicy::kTransport}) {
      SCOPED_TRACE(name + (policy == StatePolicy::kKeep ? " keep" : " transport"));
      auto bare_model = model(), wrapped_model = model();
      auto bare = make(bare_model);
      TeleportOptimizer wrapped(wrapped_model, make(wrapped_model),
                                teleports().objective(Objective::kStateOnly).state_policy(policy));
      for (int64_t t = 0; t < 10; ++t) {
        train_step(*bare, bare_model, t);
        train_step(wrapped, wrapped_model, t);
      }
      EXPECT_EQ(wrapped.teleport_count(), 4);  // steps 0, 3, 6, 9
      ASSERT_NE(wrapped.last_report(), nullptr);
      EXPECT_FALSE(wrapped.last_report()->rolled_back) << wrapped.last_report()->reason;
      EXPECT_EQ(wrapped.last_report()->steps, 0);
      EXPECT_TRUE(bitwise_equal(bare_model->parameters(), wrapped_model->parameters()));
    }
  }
}

TEST_P(OptimizerTest, TeleportBatchDrivesTheTeleportAndMapsTheGradient) {
  for (Method method : {Method::kClosedForm, Method::kAutograd}) {
    auto m = model();
    const auto params = m->parameters();
    const Batch teleport_batch = random_batch(32, 6, 3, f64(), 7);
    const Batch b = batch(0);
    const BatchLoss minibatch(m, b.input, b.target, mse());
    TeleportReport report;
    std::vector<double> errors;
    TeleportOptimizer opt(
        m, sgd(m),
        teleports().every(0).at({0}).method(method).on_report([&](const TeleportReport& r) {
          report = r;
          // .grad must be the minibatch gradient at the new weights.
          const auto exact = torch::autograd::grad({minibatch.loss()}, params);
          for (size_t i = 0; i < params.size(); ++i) {
            errors.push_back(rel_diff(params[i].grad(), exact[i]));
          }
        }));
    opt.set_teleport_batch(
        [&] { return std::make_pair(teleport_batch.input, teleport_batch.target); }, mse());
    backward(minibatch, m);
    opt.step();
    ASSERT_FALSE(report.rolled_back) << report.reason;
    EXPECT_EQ(report.steps, 4);
    EXPECT_FALSE(std::isnan(report.loss_before));
    EXPECT_NEAR(report.loss_after, report.loss_before, 1e-10 * report.loss_before);
    EXPECT_GT(report.grad_norm_sq_after, report.grad_norm_sq_before);
    ASSERT_EQ(errors.size(), params.size());
    for (double e : errors) EXPECT_LE(e, 1e-9);
  }
}

TEST_P(OptimizerTest, BadInputGetsClearErrors) {
  auto m = model();
  TeleportOptimizer opt(m, sgd(m), teleports());
  EXPECT_NE(error_of([&] { opt.step(); }).find("call loss.backward() before step()"),
            std::string::npos);
  EXPECT_NE(error_of([&] { TeleportOptimizer(m, nullptr); }).find("expected an inner optimizer"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              TeleportOptimizer(m, sgd(m), TeleportOptions().every(-2));
            }).find("expected every >= 0, got -2"),
            std::string::npos);
  auto other = model(5);
  EXPECT_NE(error_of([&] {
              TeleportOptimizer(m, sgd(other));
            }).find("acts on a parameter the inner optimizer does not hold"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              opt.set_teleport_batch(nullptr, mse());
            }).find("expected a batch source and a loss function"),
            std::string::npos);
}

TEST_P(OptimizerTest, ReplacedParametersAreReported) {
  auto m = model();
  TeleportOptimizer opt(m, sgd(m), teleports());
  auto* first = m->ptr(0)->as<torch::nn::Linear>();
  first->weight =
      first->weight.detach().clone().requires_grad_(true);  // forward now reads this one
  const Batch b = batch(0);
  mse()(m->forward(b.input), b.target).backward();
  EXPECT_NE(error_of([&] { opt.step(); }).find("a parameter the model no longer holds"),
            std::string::npos);
}

// Fine-tuning: a frozen layer is never moved, discover() leaves its pair out
// with a note, and every other pair teleports, whichever parameters the inner
// optimizer was built from.
TEST_P(OptimizerTest, FrozenLayersAreNeverMovedAndTheRestTeleports) {
  for (bool trainable_only : {false, true}) {
    SCOPED_TRACE(trainable_only ? "inner built from trainable parameters" : "from all");
    auto m = make_mlp({6, 8, 7, 5, 3}, Act::kReLU, true, f64());
    auto* first = m->ptr(0)->as<torch::nn::Linear>();
    first->weight.requires_grad_(false);
    first->bias.requires_grad_(false);
    const auto frozen = clone_all({first->weight, first->bias});
    std::vector<at::Tensor> params;
    for (const auto& p : m->parameters()) {
      if (!trainable_only || p.requires_grad()) params.push_back(p);
    }
    std::vector<TeleportReport> reports;
    TeleportOptimizer opt(
        m, std::make_unique<SGD>(params, SGDOptions(0.05).momentum(0.9)),
        teleports().every(2).on_report([&](const TeleportReport& r) { reports.push_back(r); }));
    ASSERT_EQ(opt.symmetries().size(), 2u);
    bool noted = false;
    for (const auto& n : opt.notes()) noted = noted || n.find("frozen") != std::string::npos;
    EXPECT_TRUE(noted);
    for (int64_t t = 0; t < 6; ++t) train_step(opt, m, t);
    for (int64_t t = 6; t < 10; ++t) opt.step(closure(opt, m, t));
    ASSERT_EQ(reports.size(), 5u);
    for (const auto& r : reports) {
      EXPECT_FALSE(r.rolled_back) << r.reason;
      EXPECT_EQ(r.elements.size(), 2u);
      EXPECT_TRUE(r.skipped.empty());
    }
    EXPECT_TRUE(bitwise_equal(frozen, {first->weight, first->bias}));
  }
  // Declared on a frozen layer: refused, saying so.
  auto m = make_mlp({6, 8, 3}, Act::kReLU, true, f64());
  m->ptr(0)->as<torch::nn::Linear>()->weight.requires_grad_(false);
  const auto p = m->parameters();
  SymmetryList syms = {std::make_shared<LayerSymmetry>(SymmetryKind::kScaling, p[0], p[1], p[2])};
  EXPECT_NE(error_of([&] { TeleportOptimizer(syms, sgd(m), teleports()); }).find("frozen"),
            std::string::npos);
}

// A layer this forward pass did not use has no gradient: its symmetry sits
// this teleport out (named in the report), the others teleport.
TEST_P(OptimizerTest, UnusedLayersSitOutAndTheRestTeleport) {
  auto m = model();
  auto unused = make_mlp({6, 5, 3}, Act::kReLU, true, f64(), /*seed=*/3);
  SymmetryList syms = discover(m).symmetries;
  syms.push_back(discover(unused).symmetries.at(0));
  auto params = m->parameters();
  for (const auto& p : unused->parameters()) params.push_back(p);
  const auto untouched = clone_all(unused->parameters());
  TeleportOptimizer opt(syms, std::make_unique<SGD>(params, SGDOptions(0.05)), teleports());
  for (int64_t t = 0; t < 4; ++t) train_step(opt, m, t);
  ASSERT_NE(opt.last_report(), nullptr);
  const TeleportReport& r = *opt.last_report();
  EXPECT_FALSE(r.rolled_back) << r.reason;
  ASSERT_EQ(r.skipped.size(), 1u);
  EXPECT_NE(r.skipped[0].find("no gradient"), std::string::npos) << r.skipped[0];
  ASSERT_EQ(r.elements.size(), 3u);
  EXPECT_TRUE(r.elements[0].g.defined() && r.elements[1].g.defined());
  EXPECT_FALSE(r.elements[2].g.defined());
  EXPECT_TRUE(bitwise_equal(untouched, unused->parameters()));
}

// BatchNorm's running statistics: after step(closure) they are as one call of
// the closure leaves them, teleport kept or rolled back; the teleport batch's
// evaluations never touch them.
TEST_P(OptimizerTest, ModuleBuffersSeeOneClosureCallPerStep) {
  namespace nn = torch::nn;
  auto make = [&] {
    torch::manual_seed(5);
    nn::Sequential m(nn::Linear(6, 8), nn::ReLU(), nn::Linear(8, 7), nn::BatchNorm1d(7), nn::ReLU(),
                     nn::Linear(7, 3));
    m->to(device(), torch::kDouble);
    return m;
  };
  auto run_closure = [&](nn::Sequential& net, int64_t t) {
    const Batch b = batch(t);
    for (auto& p : net->parameters()) p.mutable_grad() = at::Tensor();
    auto loss = mse()(net->forward(b.input), b.target);
    loss.backward();
    return loss;
  };
  for (bool wrong : {false, true}) {
    SCOPED_TRACE(wrong ? "a declaration that is no symmetry (rolled back)" : "discovered");
    auto m = make();
    const auto p = m->parameters();
    SymmetryList syms = wrong ? SymmetryList{std::make_shared<LayerSymmetry>(
                                    SymmetryKind::kLinearGL, p[0], p[1], p[2])}
                              : discover(m).symmetries;
    ASSERT_EQ(syms.size(), wrong ? 1u : 2u);  // discovered: GL(8), and the BatchNorm's scaling
    TeleportOptimizer opt(m, syms, sgd(m),
                          teleports().every(1).lr(wrong ? 1.0 : 0.05).verify(!wrong));
    for (int64_t t = 0; t < 3; ++t) {
      auto twin = std::dynamic_pointer_cast<nn::SequentialImpl>(m->clone());
      nn::Sequential twin_holder(twin);
      run_closure(twin_holder, t);  // one call, as a plain step would make
      opt.step([&] {
        opt.zero_grad();
        return run_closure(m, t);
      });
      ASSERT_NE(opt.last_report(), nullptr);
      EXPECT_EQ(opt.last_report()->rolled_back, wrong) << opt.last_report()->reason;
      EXPECT_TRUE(bitwise_equal(twin->buffers(), m->buffers()));
    }
  }
  // The teleport batch: evaluations for the teleport leave the buffers alone.
  auto m = make();
  TeleportOptimizer opt(m, sgd(m), teleports().every(1).method(Method::kAutograd));
  opt.set_teleport_batch(
      [&] {
        const Batch b = batch(50);
        return std::make_pair(b.input, b.target);
      },
      mse());
  run_closure(m, 0);
  const auto buffers = clone_all(m->buffers());
  opt.step();
  ASSERT_NE(opt.last_report(), nullptr);
  EXPECT_FALSE(opt.last_report()->rolled_back) << opt.last_report()->reason;
  EXPECT_TRUE(bitwise_equal(buffers, m->buffers()));
}

// Under a non-diagonal element the adaptive optimizers' moments are kept as a
// unit: centered RMSprop's square_avg − grad_avg² stays ≥ 0, Adam's
// exp_avg² ≤ exp_avg_sq / (1 − β₁)² ... stays as the optimizer left it.
TEST_P(OptimizerTest, AdaptiveMomentsStayAUnitUnderGL) {
  namespace o = torch::optim;
  torch::manual_seed(2);
  torch::nn::Sequential m(torch::nn::Linear(10, 16), torch::nn::Linear(16, 16), torch::nn::ReLU(),
                          torch::nn::Linear(16, 3));
  m->to(device(), torch::kDouble);
  TeleportOptimizer opt(
      m, std::make_unique<o::RMSprop>(m->parameters(), o::RMSpropOptions(1e-3).centered(true)),
      teleports().every(5).lr(1.0).max_growth(100));
  ASSERT_FALSE(opt.symmetries().at(0)->diagonal());
  int64_t kept = 0;
  for (int64_t t = 0; t < 30; ++t) {
    const Batch b = random_batch(16, 10, 3, f64(), 500 + t);
    opt.zero_grad();
    mse()(m->forward(b.input), b.target).backward();
    opt.step();
    if (t % 5 == 0 && t > 0 && !opt.last_report()->rolled_back) {  // state exists from step 1
      ++kept;
      EXPECT_TRUE(opt.last_report()->state_kept);
    }
    for (const auto& p : m->parameters()) {
      auto* s = dynamic_cast<o::RMSpropParamState*>(detail::find_state(opt.inner(), p));
      ASSERT_NE(s, nullptr);
      EXPECT_GE((s->square_avg() - s->grad_avg().square()).min().item<double>(), -1e-18) << t;
      EXPECT_TRUE(p.isfinite().all().item<bool>());
    }
  }
  EXPECT_GT(kept, 0);
}

// Decided by the element applied: kPreconditioned applies diagonal elements
// to a GL symmetry, and then Adagrad's sums (above their initial value) move exactly:
// w² · (sum − initial) is unchanged entry by entry. kReset starts them at the
// group's own initial value.
TEST_P(OptimizerTest, DiagonalElementsOnGLCarrySquaredStateExactly) {
  namespace o = torch::optim;
  for (double initial : {0.0, 0.3}) {
    SCOPED_TRACE(initial);
    auto m = make_mlp({6, 8, 3}, Act::kIdentity, false, f64());
    const auto w = m->parameters();
    auto sum_of = [](o::Optimizer& opt, const at::Tensor& p) {
      return state_of<o::AdagradParamState>(opt, p, [](auto& s) { return s.sum(); });
    };
    at::Tensor before, after;
    TeleportOptimizer* self = nullptr;
    auto inner =
        std::make_unique<o::Adagrad>(w, o::AdagradOptions(0.05).initial_accumulator_value(initial));
    TeleportOptimizer opt(
        m, std::move(inner),
        teleports()
            .every(0)
            .at({2})
            .objective(Objective::kPreconditioned)
            .on_report([&](const TeleportReport&) {
              after = (w[0].detach().square() * (sum_of(self->inner(), w[0]) - initial));
            }));
    self = &opt;
    ASSERT_FALSE(opt.symmetries().at(0)->diagonal());
    train_step(opt, m, 0);
    train_step(opt, m, 1);
    before = w[0].detach().square() * (sum_of(opt.inner(), w[0]) - initial);
    train_step(opt, m, 2);
    ASSERT_FALSE(opt.last_report()->rolled_back) << opt.last_report()->reason;
    ASSERT_TRUE(opt.last_report()->elements.at(0).diagonal);
    EXPECT_FALSE(opt.last_report()->state_kept);
    EXPECT_LE(rel_diff(after, before), 1e-12);
  }
  // kReset: the group's initial accumulator value, not the defaults'.
  auto m = make_mlp({6, 8, 3}, Act::kReLU, false, f64());
  std::vector<o::OptimizerParamGroup> groups;
  groups.emplace_back(m->parameters(), std::make_unique<o::AdagradOptions>(
                                           o::AdagradOptions(0.05).initial_accumulator_value(0.3)));
  at::Tensor reset;
  TeleportOptimizer* self = nullptr;
  TeleportOptimizer opt(
      m, std::make_unique<o::Adagrad>(std::move(groups), o::AdagradOptions(0.05)),
      teleports()
          .every(0)
          .at({1})
          .state_policy(StatePolicy::kReset)
          .on_report([&](const TeleportReport&) {
            reset = state_of<o::AdagradParamState>(self->inner(), m->parameters()[0], [](auto& s) {
                      return s.sum();
                    }).clone();
          }));
  self = &opt;
  train_step(opt, m, 0);
  train_step(opt, m, 1);
  ASSERT_TRUE(reset.defined());
  EXPECT_EQ((reset - 0.3).abs().max().item<double>(), 0.0);
}

// A layer used twice (tied weights) gets no symmetry from discover(); a
// symmetry declared twice is refused at construction.
TEST_P(OptimizerTest, TiedLayersAndDuplicateDeclarationsAreRefused) {
  namespace nn = torch::nn;
  torch::manual_seed(0);
  nn::Linear tied(8, 8);
  nn::Sequential m(nn::Linear(6, 8), nn::ReLU(), tied, nn::ReLU(), tied, nn::ReLU(),
                   nn::Linear(8, 3));
  m->to(device(), torch::kDouble);
  const Discovery found = discover(m);
  EXPECT_TRUE(found.symmetries.empty());
  bool noted = false;
  for (const auto& n : found.notes) noted = noted || n.find("tied weights") != std::string::npos;
  EXPECT_TRUE(noted);

  auto mlp = make_mlp({6, 8, 8, 3}, Act::kReLU, true, f64());
  const auto s = discover(mlp).symmetries.at(0);
  EXPECT_NE(error_of([&] {
              TeleportOptimizer({s, s}, sgd(mlp), teleports());
            }).find("at most once per side"),
            std::string::npos);
  const auto p = mlp->parameters();
  SymmetryList self_pair = {
      std::make_shared<LayerSymmetry>(SymmetryKind::kScaling, p[2], p[3], p[2])};
  EXPECT_NE(error_of([&] {
              TeleportOptimizer(self_pair, sgd(mlp), teleports());
            }).find("acts twice on one tensor"),
            std::string::npos);
}

// half and bfloat16 parameters are refused where the optimizer is built.
TEST_P(OptimizerTest, HalfPrecisionIsRefusedAtConstruction) {
  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    auto m = make_mlp({6, 8, 3}, Act::kReLU, true, torch::TensorOptions(device()).dtype(dtype));
    const std::string error = error_of([&] { TeleportOptimizer(m, sgd(m), teleports()); });
    EXPECT_NE(error.find("expected float32 or float64 parameters"), std::string::npos) << error;
  }
}

// A closure that throws on its second call (the loss after the teleport)
// leaves weights and gradients as the first call left them.
TEST_P(OptimizerTest, ThrowingClosureLeavesThePointAsItWas) {
  // Call 2 is the loss after the teleport; with verification on, call 3 is
  // the loss under the check's random element.
  for (bool verify : {false, true}) {
    SCOPED_TRACE(verify ? "throws in the check" : "throws after the teleport");
    auto m = model();
    TeleportOptimizer opt(m, sgd(m), teleports().every(1).verify(verify));
    int calls = 0;
    const int throwing = verify ? 3 : 2;
    std::vector<at::Tensor> weights, grads;
    const std::string error = error_of([&] {
      opt.step([&] {
        if (++calls == throwing) {
          weights = clone_all(m->parameters());
          TORCH_CHECK(false, "closure failed on purpose");
        }
        const Batch b = batch(0);
        opt.zero_grad();
        auto loss = mse()(m->forward(b.input), b.target);
        loss.backward();
        grads.clear();
        return loss;
      });
    });
    EXPECT_NE(error.find("closure failed on purpose"), std::string::npos) << error;
    ASSERT_EQ(calls, throwing);
    auto fresh = model();
    const Batch b = batch(0);
    mse()(fresh->forward(b.input), b.target).backward();
    EXPECT_TRUE(bitwise_equal(fresh->parameters(), m->parameters()));
    EXPECT_FALSE(bitwise_equal(weights, m->parameters()));  // the teleport had moved them
    std::vector<at::Tensor> expected, got;
    for (const auto& p : fresh->parameters()) expected.push_back(p.grad());
    for (const auto& p : m->parameters()) got.push_back(p.grad());
    EXPECT_TRUE(bitwise_equal(expected, got));
  }
}

// A checkpoint of another architecture, or of a plain optimizer, is refused
// at load with what was expected and what came.
TEST_P(OptimizerTest, CheckpointOfAnotherModelIsRefusedAtLoad) {
  auto m = model();
  TeleportOptimizer opt(m, sgd(m), teleports());
  for (int64_t t = 0; t < 4; ++t) train_step(opt, m, t);
  std::stringstream stream;
  torch::save(opt, stream);
  auto other = make_mlp({6, 9, 7, 3}, Act::kReLU, true, f64());
  TeleportOptimizer wrong(other, sgd(other), teleports());
  const std::string shape_error = error_of([&] { torch::load(wrong, stream); });
  EXPECT_NE(shape_error.find("expected parameter 0 of shape [9, 6], got [8, 6]"), std::string::npos)
      << shape_error;
  auto bare = sgd(m);
  train_step(*bare, m, 0);
  std::stringstream plain;
  torch::save(*bare, plain);
  const std::string plain_error = error_of([&] { torch::load(opt, plain); });
  EXPECT_NE(plain_error.find("without teleport/version"), std::string::npos) << plain_error;
}

// A declaration that is no symmetry is refused before its first teleport,
// whatever the ascent's step size (it used to pass the loss check at the
// default lr, each teleport moving too little to show it); the step is then
// the bare optimizer's, bit for bit. check_symmetry() tells it to users.
TEST_P(OptimizerTest, DeclaredNonSymmetriesAreRefusedBeforeTheirFirstTeleport) {
  namespace nn = torch::nn;
  for (auto options : {f64(), f32()}) {
    SCOPED_TRACE(options.dtype());
    auto make = [&] {
      torch::manual_seed(4);
      nn::Sequential m(nn::Linear(6, 8), nn::ReLU(), nn::Linear(8, 7), nn::BatchNorm1d(7),
                       nn::ReLU(), nn::Linear(7, 3));
      m->to(device(), options.dtype().toScalarType());
      return m;
    };
    const Batch b = random_batch(10, 6, 3, options, 7);
    auto closure = [&](nn::Sequential& net, torch::optim::Optimizer& o) {
      return [&] {
        o.zero_grad();
        auto loss = mse()(net->forward(b.input), b.target);
        loss.backward();
        return loss;
      };
    };
    // GL(n) across a ReLU, a scaling across a train-mode BatchNorm (which
    // renormalises: invariant, not equivariant), and the true scaling.
    auto wrong_of = [](const nn::Sequential& net) {
      const auto p = net->parameters();
      return SymmetryList{std::make_shared<LayerSymmetry>(SymmetryKind::kLinearGL, p[0], p[1], p[2],
                                                          "gl across relu"),
                          std::make_shared<LayerSymmetry>(SymmetryKind::kScaling, p[2], p[3], p[6],
                                                          "scaling across bn")};
    };
    auto probe = make();
    const auto train_loss = [&] { return mse()(probe->forward(b.input), b.target); };
    for (const auto& s : wrong_of(probe)) {
      const SymmetryCheck c = check_symmetry(*s, train_loss);
      EXPECT_FALSE(c.holds) << s->name() << " drift " << c.drift;
      EXPECT_GT(c.drift, c.bound) << s->name();
    }
    const SymmetryCheck c = check_symmetry(*discover(probe).symmetries.at(0), train_loss);
    EXPECT_TRUE(c.holds) << "drift " << c.drift;

    auto bare_model = make(), m = make();
    const SymmetryList wrong = wrong_of(m);

    SGD bare(bare_model->parameters(), SGDOptions(0.05));
    TeleportOptimizer opt(m, wrong, std::make_unique<SGD>(m->parameters(), SGDOptions(0.05)),
                          TeleportOptions().every(1));
    bare.step(closure(bare_model, bare));
    opt.step(closure(m, opt));
    ASSERT_NE(opt.last_report(), nullptr);
    EXPECT_EQ(opt.last_report()->skipped.size(), 2u);
    EXPECT_TRUE(opt.symmetries().empty());
    size_t noted = 0;
    for (const auto& n : opt.notes()) noted += n.find("not a symmetry") != std::string::npos;
    EXPECT_EQ(noted, 2u);
    EXPECT_TRUE(bitwise_equal(bare_model->parameters(), m->parameters()));
    EXPECT_TRUE(bitwise_equal(bare_model->buffers(), m->buffers()));
  }
}

// Near a perfect fit (a float32 loss of ~1e-10) an exact teleport changes
// the loss by float32's rounding of its order-one terms, far more than 1e-4 of
// it: the tolerance has a floor there (64 ε), and reasons print such losses.
TEST_P(OptimizerTest, TinyLossesAreNotRolledBackByRounding) {
  auto m = make_mlp({6, 8, 7, 3}, Act::kReLU, true, f32(), 3);
  const Batch b = random_batch(16, 6, 3, f32(), 4);
  at::Tensor target;
  {
    torch::NoGradGuard no_grad;
    target = m->forward(b.input) + 1e-5 * torch::randn({16, 3}, f32());
  }
  auto closure = [&](torch::optim::Optimizer& o) {
    return [&] {
      o.zero_grad();
      auto loss = mse()(m->forward(b.input), target);
      loss.backward();
      return loss;
    };
  };
  TeleportOptimizer opt(m, std::make_unique<SGD>(m->parameters(), SGDOptions(0)),
                        TeleportOptions().every(1).lr(1e9).max_growth(1e6));
  const at::Tensor loss = opt.step(closure(opt));
  ASSERT_LT(loss.item<double>(), 1e-8);
  ASSERT_NE(opt.last_report(), nullptr);
  const TeleportReport& r = *opt.last_report();
  EXPECT_FALSE(r.rolled_back) << r.reason;
  EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
  // A rolled-back teleport at that scale names its losses readably.
  auto wrong = make_mlp({6, 8, 7, 3}, Act::kReLU, true, f32(), 3);
  const auto p = wrong->parameters();
  SymmetryList gl = {std::make_shared<LayerSymmetry>(SymmetryKind::kLinearGL, p[0], p[1], p[2])};
  TeleportOptimizer rolled(wrong, gl, std::make_unique<SGD>(p, SGDOptions(0)),
                           TeleportOptions().every(1).lr(1e9).max_growth(1e6).verify(false));
  rolled.step([&] {
    rolled.zero_grad();
    auto l = 1e-9 * mse()(wrong->forward(b.input), torch::zeros_like(target));
    l.backward();
    return l;
  });
  ASSERT_NE(rolled.last_report(), nullptr);
  if (rolled.last_report()->rolled_back) {
    EXPECT_EQ(rolled.last_report()->reason.find("0.000000"), std::string::npos)
        << rolled.last_report()->reason;
  }
}

// kReset empties LBFGS's history even when the optimizer's first parameter
// (whose key holds LBFGS's one state) is not acted on.
TEST_P(OptimizerTest, ResetClearsLbfgsHistoryWhateverItsFirstParameter) {
  namespace o = torch::optim;
  auto m = make_mlp({6, 8, 7, 3}, Act::kReLU, true, f64());
  auto params = m->parameters();
  // The last layer's bias first: no symmetry acts on it.
  std::rotate(params.begin(), params.end() - 1, params.end());
  bool reset_seen = false;
  TeleportOptimizer* self = nullptr;
  TeleportOptimizer opt(m, std::make_unique<o::LBFGS>(params, o::LBFGSOptions(0.5).max_iter(3)),
                        teleports()
                            .every(0)
                            .at({2})
                            .state_policy(StatePolicy::kReset)
                            .on_report([&](const TeleportReport& r) {
                              if (r.rolled_back) return;
                              reset_seen =
                                  detail::find_state(self->inner(), params.front()) == nullptr;
                            }));
  self = &opt;
  for (int64_t t = 0; t < 3; ++t) opt.step(closure(opt, m, t));
  ASSERT_NE(opt.last_report(), nullptr);
  ASSERT_FALSE(opt.last_report()->rolled_back) << opt.last_report()->reason;
  EXPECT_TRUE(reset_seen);
}

// A user-defined symmetry (here a LayerSymmetry whose apply_ fails on its
// k-th call): a teleport that throws half-way leaves weights and gradients
// bitwise as they were, on every path that applies it.
class FailingScaling : public LayerSymmetry {
 public:
  FailingScaling(at::Tensor w_in, at::Tensor b_in, at::Tensor w_out, int fail_at)
      : LayerSymmetry(SymmetryKind::kScaling, std::move(w_in), std::move(b_in), std::move(w_out),
                      "failing scaling"),
        fail_at_(fail_at) {}
  void apply_(const GroupElement& e, const BatchLoss* batch, Mode mode) const override {
    TORCH_CHECK(++calls_ != fail_at_, "apply_ failed on purpose");
    LayerSymmetry::apply_(e, batch, mode);
  }
  // The gradient map fails on its `n`-th call (0: never).
  void fail_transport_at(int n) { fail_transport_at_ = n; }
  void transport_gradients_(const GroupElement& e,
                            const std::vector<at::Tensor>& g) const override {
    TORCH_CHECK(++transports_ != fail_transport_at_, "transport failed on purpose");
    LayerSymmetry::transport_gradients_(e, g);
  }

 private:
  int fail_at_;
  int fail_transport_at_ = 0;
  mutable int calls_ = 0, transports_ = 0;
};

TEST_P(OptimizerTest, SymmetryThatThrowsHalfWayLeavesThePointAsItWas) {
  for (Method method : {Method::kClosedForm, Method::kAutograd}) {
    SCOPED_TRACE(method == Method::kClosedForm ? "closed form" : "autograd");
    auto m = model();
    const auto p = m->parameters();
    // The first symmetry applies fine; the second fails on its first apply.
    SymmetryList syms = {std::make_shared<FailingScaling>(p[0], p[1], p[2], 1000),
                         std::make_shared<FailingScaling>(p[2], p[3], p[4], 1)};
    const Batch b = batch(0);
    const BatchLoss objective(m, b.input, b.target, mse());
    backward(objective, m);
    const auto weights = clone_all(p);
    std::vector<at::Tensor> grads;
    for (const auto& t : p) grads.push_back(t.grad().clone());
    const std::string error = error_of([&] {
      teleport(syms, TeleportOptions().method(method).steps(3),
               method == Method::kAutograd ? &objective : nullptr);
    });
    EXPECT_NE(error.find("apply_ failed on purpose"), std::string::npos) << error;
    EXPECT_TRUE(bitwise_equal(weights, m->parameters()));
    std::vector<at::Tensor> now;
    for (const auto& t : p) now.push_back(t.grad());
    EXPECT_TRUE(bitwise_equal(grads, now));
  }
}

// The state transport fails half-way (the second symmetry's map of the
// momentum, after the first's went through): step() throws and leaves
// weights, .grad and the momentum buffers as they were before it.
TEST_P(OptimizerTest, StateTransportThatThrowsLeavesEverythingAsItWas) {
  auto m = model();
  const auto p = m->parameters();
  auto second = std::make_shared<FailingScaling>(p[2], p[3], p[4], 1000);
  SymmetryList syms = {std::make_shared<FailingScaling>(p[0], p[1], p[2], 1000), second};
  TeleportOptimizer opt(m, syms, sgd(m), teleports().every(0).at({2}));
  train_step(opt, m, 0);
  train_step(opt, m, 1);
  second->fail_transport_at(2);  // 1: .grad in the ascent; 2: the momentum
  const Batch b = batch(2);
  opt.zero_grad();
  mse()(m->forward(b.input), b.target).backward();
  auto momentum = [&] {
    std::vector<at::Tensor> out;
    for (const auto& t : p) {
      out.push_back(state_of<torch::optim::SGDParamState>(opt.inner(), t, [](auto& s) {
                      return s.momentum_buffer();
                    }).clone());
    }
    return out;
  };
  const auto weights = clone_all(p), buffers = momentum();
  std::vector<at::Tensor> grads;
  for (const auto& t : p) grads.push_back(t.grad().clone());
  const std::string error = error_of([&] { opt.step(); });
  EXPECT_NE(error.find("transport failed on purpose"), std::string::npos) << error;
  EXPECT_TRUE(bitwise_equal(weights, m->parameters()));
  std::vector<at::Tensor> now;
  for (const auto& t : p) now.push_back(t.grad());
  EXPECT_TRUE(bitwise_equal(grads, now));
  EXPECT_TRUE(bitwise_equal(buffers, momentum()));
}

TEST_P(OptimizerTest, ModelWithoutSymmetriesTeleportsNothing) {
  torch::nn::Sequential m(torch::nn::Linear(6, 5), torch::nn::Tanh(), torch::nn::Linear(5, 3));
  m->to(device(), torch::kDouble);
  TeleportOptimizer opt(m, sgd(m), teleports());
  EXPECT_TRUE(opt.symmetries().empty());
  EXPECT_FALSE(opt.notes().empty());
  train_step(opt, m, 0);
  ASSERT_NE(opt.last_report(), nullptr);
  EXPECT_NE(opt.last_report()->reason.find("no symmetries"), std::string::npos);
}

}  // namespace
}  // namespace teleport::testing
