// teleport-regression: the paper's multi-layer regression, full batch, with
// and without teleport, in exact or reference (published) arithmetic.
#include <common/cli.h>
#include <common/report.h>
#include <teleport/teleport.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/sgd.h>

#include <chrono>
#include <cmath>

namespace {

using namespace teleport::examples;

struct Config {
  std::string dims = "4,5,6,7,8", activation = "leaky_relu", optimizer = "sgd", mode = "exact";
  std::string symmetry = "auto", teleport_at = "5", seeds = "0,12345,49380,111105,197520";
  std::string state_policy = "keep";
  bool bias = false;
  // Exact mode keeps the library's safeguards (the paper's uncapped ascent,
  // exact, blows GD up: docs/reproduction.md); reference mode applies no cap.
  double lr = 0, teleport_lr = 1e-7, max_step = 0.5, max_growth = 10, tolerance = 1e-4;
  int64_t steps = 300, teleport_steps = 8;
  std::string json, csv, plot;
};

struct Problem {
  torch::nn::Sequential model;
  at::Tensor x, y;  // batch × features, batch × outputs
};

// Weights, then X, then Y (then biases, with --bias) drawn by torch::rand
// after manual_seed(seed), in the paper's shapes: W_i is dims[i+2] × dims[i+1],
// X is dims[1] × dims[0], Y is dims.back() × dims[0].
Problem make_problem(const std::vector<int64_t>& dims, const Config& c, int64_t seed) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> weights;
  for (size_t i = 0; i + 2 < dims.size(); ++i)
    weights.push_back(torch::rand({dims[i + 2], dims[i + 1]}));
  const at::Tensor x = torch::rand({dims[1], dims[0]});
  const at::Tensor y = torch::rand({dims.back(), dims[0]});
  Problem p{torch::nn::Sequential(), x.t().contiguous(), y.t().contiguous()};
  for (size_t i = 0; i < weights.size(); ++i) {
    auto linear =
        torch::nn::Linear(torch::nn::LinearOptions(dims[i + 1], dims[i + 2]).bias(c.bias));
    torch::NoGradGuard no_grad;
    linear->weight.copy_(weights[i]);
    if (c.bias) linear->bias.copy_(torch::rand({dims[i + 2]}));
    p.model->push_back(linear);
    if (i + 1 < weights.size()) {
      if (c.activation == "leaky_relu") {
        p.model->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
      } else {
        p.model->push_back(torch::nn::Identity());
      }
    }
  }
  return p;
}

at::Tensor half_sse(const at::Tensor& out, const at::Tensor& target) {
  return 0.5 * (target - out).square().sum();
}

double grad_norm_sq(const torch::nn::Sequential& model) {
  double total = 0;
  for (const auto& p : model->parameters()) {
    if (p.grad().defined()) total += p.grad().square().sum().item<double>();
  }
  return total;
}

Run train(const Config& c, const std::vector<int64_t>& dims, int64_t seed, bool teleporting) {
  Problem p = make_problem(dims, c, seed);
  const double lr = c.lr > 0 ? c.lr : (c.optimizer == "sgd" ? 1e-4 : 0.1);
  std::unique_ptr<torch::optim::Optimizer> inner;
  if (c.optimizer == "sgd") {
    inner =
        std::make_unique<torch::optim::SGD>(p.model->parameters(), torch::optim::SGDOptions(lr));
  } else {
    inner = std::make_unique<torch::optim::Adagrad>(
        p.model->parameters(),
        torch::optim::AdagradOptions(lr).eps(1e-10).initial_accumulator_value(0));
  }
  Run run;
  run.label = c.optimizer + (teleporting ? "+teleport" : "");
  run.seed = seed;
  double loss_now = 0, norm_now = 0;  // at the point the update starts from
  auto discover = teleport::DiscoverOptions()
                      .linear_gl(c.symmetry != "scaling")
                      .data_dependent(c.symmetry != "scaling" && c.activation == "leaky_relu");
  const std::map<std::string, teleport::StatePolicy> policies = {
      {"keep", teleport::StatePolicy::kKeep},
      {"reset", teleport::StatePolicy::kReset},
      {"transport", teleport::StatePolicy::kTransport}};
  auto options =
      teleport::TeleportOptions()
          .at(teleporting ? parse_list<int64_t>(c.teleport_at, "--teleport-at")
                          : std::vector<int64_t>{})
          .steps(c.teleport_steps)
          .lr(c.teleport_lr)
          .max_step(c.max_step)
          .max_growth(c.max_growth)
          .tolerance(c.tolerance)
          .state_policy(policies.at(c.state_policy))
          .mode(c.mode == "reference" ? teleport::Mode::kReference : teleport::Mode::kExact)
          .on_report([&](const teleport::TeleportReport& r) {
            run.teleports.push_back(r);
            if (!r.rolled_back) {
              loss_now = r.loss_after;
              norm_now = grad_norm_sq(p.model);
            }
          });
  teleport::TeleportOptimizer opt(p.model, std::move(inner), options, discover);
  opt.set_teleport_batch([&] { return std::make_pair(p.x, p.y); }, half_sse);
  auto closure = [&] {
    opt.zero_grad();
    auto loss = half_sse(p.model->forward(p.x), p.y);
    loss.backward();
    loss_now = loss.item<double>();
    norm_now = grad_norm_sq(p.model);
    return loss;
  };
  const auto t0 = std::chrono::steady_clock::now();
  int64_t diverged_at = -1;  // the step whose loss was not finite, or -1
  for (int64_t t = 0; t < c.steps; ++t) {
    opt.step(closure);
    run.loss.push_back(loss_now);
    run.grad_norm_sq.push_back(norm_now);
    run.seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (!std::isfinite(loss_now)) {  // diverged: stop this run and report it
      diverged_at = t;
      break;
    }
  }
  run.extra = {{"lr", json_number(lr)}, {"diverged_at", std::to_string(diverged_at)}};
  return run;
}

int run(Config c) {
  const auto dims = parse_list<int64_t>(c.dims, "--dims");
  if (dims.size() < 4)
    throw UsageError("--dims: expected the batch size and at least three widths");
  for (int64_t d : dims) {
    if (d <= 0) throw UsageError(fmt::format("--dims: expected positive sizes, got {}", d));
  }
  const auto seeds = parse_list<int64_t>(c.seeds, "--seeds");
  parse_list<int64_t>(c.teleport_at, "--teleport-at");
  for (const auto* path : {&c.json, &c.csv, &c.plot}) {
    if (!path->empty()) check_writable(*path);
  }
  std::vector<Run> runs;
  for (int64_t seed : seeds) {
    runs.push_back(train(c, dims, seed, false));
    runs.push_back(train(c, dims, seed, true));
  }
  // Means over seeds, at a few steps; a run that diverged counts as NaN after.
  auto mean_over = [&](bool teleporting, size_t t, const std::vector<double> Run::*values) {
    double s = 0;
    int n = 0;
    for (size_t i = teleporting ? 1 : 0; i < runs.size(); i += 2, ++n) {
      s += t < (runs[i].*values).size() ? (runs[i].*values)[t] : NAN;
    }
    return s / n;
  };
  auto mean_at = [&](bool teleporting, size_t t) { return mean_over(teleporting, t, &Run::loss); };
  fmt::print("mean loss over {} seeds ({}, {} mode)\n{:>6} {:>14} {:>14}\n", seeds.size(),
             c.optimizer, c.mode, "step", c.optimizer, c.optimizer + "+teleport");
  for (size_t t : {size_t(0), size_t(5), size_t(10), size_t(20), size_t(50), size_t(100),
                   size_t(200), size_t(c.steps - 1)}) {
    if (t < size_t(c.steps))
      fmt::print("{:>6} {:>14.6g} {:>14.6g}\n", t, mean_at(false, t), mean_at(true, t));
  }
  for (const auto& r : runs) {
    if (r.loss.size() < size_t(c.steps)) {
      fmt::print("{} seed {} diverged: its loss was not finite at step {}\n", r.label, r.seed,
                 r.loss.size() - 1);
    }
    for (const auto& tp : r.teleports) {
      fmt::print(
          "seed {:>6} teleport at {}: loss {:.6g} -> {:.6g} ({:+.2e} relative), |grad|^2 {:.6g} "
          "-> {:.6g}{}{}\n",
          r.seed, tp.step, tp.loss_before, tp.loss_after,
          (tp.loss_after - tp.loss_before) / tp.loss_before, tp.grad_norm_sq_before,
          tp.grad_norm_sq_after, tp.exact ? "" : ", inexact",
          tp.rolled_back ? ", rolled back: " + tp.reason : "");
    }
  }
  const JsonFields config = {{"example", json_string("regression")},
                             {"dims", json_string(c.dims)},
                             {"activation", json_string(c.activation)},
                             {"bias", c.bias ? "true" : "false"},
                             {"optimizer", json_string(c.optimizer)},
                             {"steps", std::to_string(c.steps)},
                             {"teleport_at", json_string(c.teleport_at)},
                             {"teleport_steps", std::to_string(c.teleport_steps)},
                             {"teleport_lr", json_number(c.teleport_lr)},
                             {"mode", json_string(c.mode)},
                             {"symmetry", json_string(c.symmetry)},
                             {"state_policy", json_string(c.state_policy)},
                             {"seeds", json_string(c.seeds)}};
  if (!c.json.empty()) write_json(c.json, config, runs);
  if (!c.csv.empty()) write_csv(c.csv, runs);
  if (!c.plot.empty()) {
    std::vector<Curve> curves;
    for (bool teleporting : {false, true}) {
      Curve curve{c.optimizer + (teleporting ? "+teleport" : "") + " (mean)", {}, {}, {}};
      for (int64_t t = 0; t < c.steps; ++t) {
        curve.steps.push_back(double(t));
        curve.seconds.push_back(mean_over(teleporting, t, &Run::seconds));
        curve.values.push_back(mean_at(teleporting, t));
      }
      curves.push_back(curve);
    }
    fmt::print(
        "{}\n",
        plot(c.plot, fmt::format("regression {} ({}, {} mode)", c.dims, c.activation, c.mode),
             "loss", curves));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The paper's multi-layer regression with and without teleport",
               "teleport-regression"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  Config c;
  app.add_option("--dims", c.dims,
                 "batch size, then widths: 4,5,6,7,8 = X 5x4, W0 6x5, W1 7x6, W2 8x7");
  app.add_option("--activation", c.activation, "leaky_relu (slope 0.1) or identity")
      ->check(CLI::IsMember({"leaky_relu", "identity"}));
  app.add_flag("--bias", c.bias, "give the layers biases (the paper has none)");
  app.add_option("--optimizer", c.optimizer, "sgd or adagrad")
      ->check(CLI::IsMember({"sgd", "adagrad"}));
  app.add_option("--lr", c.lr, "learning rate (default: sgd 1e-4, adagrad 0.1)")
      ->check(finite_above(0));
  app.add_option("--steps", c.steps, "optimizer steps")->check(CLI::PositiveNumber);
  app.add_option("--teleport-at", c.teleport_at, "teleport before these steps, e.g. 5");
  app.add_option("--teleport-steps", c.teleport_steps, "ascent steps per teleport")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--teleport-lr", c.teleport_lr, "ascent learning rate")->check(finite_above(0));
  app.add_option("--mode", c.mode, "exact or reference (the published arithmetic)")
      ->check(CLI::IsMember({"exact", "reference"}));
  app.add_option("--symmetry", c.symmetry,
                 "auto (data-dependent GL across leaky_relu, GL across identity) or scaling")
      ->check(CLI::IsMember({"auto", "scaling"}));
  app.add_option("--state-policy", c.state_policy, "keep (the paper), reset or transport")
      ->check(CLI::IsMember({"keep", "reset", "transport"}));
  app.add_option("--max-step", c.max_step,
                 "cap on each ascent step's norm (exact mode; reference mode applies none)")
      ->check(finite_above(0));
  app.add_option("--max-growth", c.max_growth,
                 "cap on |grad|^2 after/before (exact mode; reference mode applies none)")
      ->check(finite_above(1.0, true));
  app.add_option("--tolerance", c.tolerance, "relative loss change that rolls back (exact mode)")
      ->check(finite_above(0));
  app.add_option("--seeds", c.seeds, "seeds");
  app.add_option("--json", c.json, "write the runs as JSON");
  app.add_option("--csv", c.csv, "write the per-step losses as CSV");
  app.add_option("--plot", c.plot, "write the mean loss curves as PNG (gnuplot)");
  return run_cli(app, argc, argv, [&] { return run(c); });
}
