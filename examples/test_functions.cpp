// teleport-test-functions: gradient descent on Booth or Rosenbrock, with and
// without SO(2) teleports, as in the NeurIPS 2022 paper.
#include <common/cli.h>
#include <common/report.h>
#include <teleport/teleport.h>
#include <teleport/test_functions.h>

#include <torch/csrc/autograd/autograd.h>

#include <chrono>

namespace {

using namespace teleport::examples;

struct Config {
  std::string function = "booth", start = "5,-5", teleport_at = "4", mode = "exact";
  double lr = 0.08, teleport_lr = 1e-3, theta0 = 0, max_step = 1e12, max_growth = 1e12;
  int64_t steps = 10, teleport_steps = 10;
  std::string json, csv, plot;
};

Run descend(const Config& c, bool teleporting) {
  const auto start = parse_list<double>(c.start, "--start");
  if (start.size() != 2 || !std::isfinite(start[0]) || !std::isfinite(start[1])) {
    throw UsageError("--start: expected two finite numbers, x,y; got " + c.start);
  }
  const auto at = parse_list<int64_t>(c.teleport_at, "--teleport-at");
  at::Tensor xy = torch::tensor({start[0], start[1]}, torch::kFloat).requires_grad_(true);
  const bool booth = c.function == "booth";
  auto f = [booth](const at::Tensor& w) {
    return booth ? teleport::booth(w) : teleport::rosenbrock(w);
  };
  const teleport::SymmetryList syms = {booth ? teleport::booth_symmetry(xy)
                                             : teleport::rosenbrock_symmetry(xy)};
  const teleport::BatchLoss objective(
      [&](const teleport::ParameterOverrides& o) { return f(teleport::value_of(o, xy)); });
  const auto options =
      teleport::TeleportOptions()
          .steps(c.teleport_steps)
          .lr(c.teleport_lr)
          .method(teleport::Method::kAutograd)
          .max_step(c.max_step)
          .max_growth(c.max_growth)
          .mode(c.mode == "reference" ? teleport::Mode::kReference : teleport::Mode::kExact);
  Run run;
  run.label = teleporting ? "gd+teleport" : "gd";
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < c.steps; ++t) {
    if (teleporting && std::find(at.begin(), at.end(), t) != at.end()) {
      if (c.theta0 != 0) {  // the ascent's starting angle
        syms[0]->apply_(syms[0]->element(torch::full({1}, c.theta0, xy.options()),
                                         teleport::Parametrization::kExp));
      }
      run.teleports.push_back(teleport::teleport(syms, options, &objective));
      run.teleports.back().step = t;
    }
    const at::Tensor loss = f(xy);
    const at::Tensor grad = torch::autograd::grad({loss}, {xy})[0];
    run.loss.push_back(loss.item<double>());
    run.grad_norm_sq.push_back(grad.square().sum().item<double>());
    {
      torch::NoGradGuard no_grad;
      xy.sub_(grad * c.lr);
    }
    run.seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const auto flat = xy.detach().reshape({2});
  run.extra = {{"final_x", json_number(flat[0].item<double>())},
               {"final_y", json_number(flat[1].item<double>())}};
  return run;
}

int run(const Config& c) {
  for (const auto* path : {&c.json, &c.csv, &c.plot}) {
    if (!path->empty()) check_writable(*path);
  }
  const std::vector<Run> runs = {descend(c, false), descend(c, true)};
  fmt::print("{:>5} {:>14} {:>14} {:>14} {:>14}\n", "step", "loss gd", "loss teleport",
             "|grad|^2 gd", "|grad|^2 tel.");
  for (size_t t = 0; t < runs[0].loss.size(); ++t) {
    fmt::print("{:>5} {:>14.7g} {:>14.7g} {:>14.7g} {:>14.7g}\n", t, runs[0].loss[t],
               runs[1].loss[t], runs[0].grad_norm_sq[t], runs[1].grad_norm_sq[t]);
  }
  for (const auto& r : runs[1].teleports) {
    fmt::print(
        "teleport at step {}: loss {:.7g} -> {:.7g}, |grad|^2 {:.7g} -> {:.7g}, {} ascent "
        "steps{}{}\n",
        r.step, r.loss_before, r.loss_after, r.grad_norm_sq_before, r.grad_norm_sq_after, r.steps,
        r.rolled_back ? ", rolled back: " + r.reason : "",
        r.exact ? "" : " (reference arithmetic, inexact)");
  }
  const JsonFields config = {{"example", json_string("test_functions")},
                             {"function", json_string(c.function)},
                             {"start", json_string(c.start)},
                             {"lr", json_number(c.lr)},
                             {"steps", std::to_string(c.steps)},
                             {"teleport_at", json_string(c.teleport_at)},
                             {"teleport_steps", std::to_string(c.teleport_steps)},
                             {"teleport_lr", json_number(c.teleport_lr)},
                             {"theta0", json_number(c.theta0)},
                             {"mode", json_string(c.mode)}};
  if (!c.json.empty()) write_json(c.json, config, runs);
  if (!c.csv.empty()) write_csv(c.csv, runs);
  if (!c.plot.empty()) {
    std::vector<Curve> curves;
    for (const auto& r : runs) {
      std::vector<double> steps(r.loss.size());
      for (size_t i = 0; i < steps.size(); ++i) steps[i] = double(i);
      curves.push_back({r.label, steps, r.seconds, r.loss});
    }
    fmt::print("{}\n", plot(c.plot, c.function, "loss", curves));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Gradient descent on a 2-D test function with and without SO(2) teleports",
               "teleport-test-functions"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  Config c;
  app.add_option("--function", c.function, "booth or rosenbrock")
      ->check(CLI::IsMember({"booth", "rosenbrock"}));
  app.add_option("--start", c.start, "starting point x,y");
  app.add_option("--lr", c.lr, "gradient-descent learning rate")->check(finite_above(0));
  app.add_option("--steps", c.steps, "gradient-descent steps")->check(CLI::PositiveNumber);
  app.add_option("--teleport-at", c.teleport_at, "teleport before these steps, e.g. 4 or 99,199");
  app.add_option("--teleport-steps", c.teleport_steps, "ascent steps per teleport")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--teleport-lr", c.teleport_lr, "ascent learning rate on the angle")
      ->check(finite_above(0));
  app.add_option("--theta0", c.theta0, "angle the ascent starts from (radians)")->check(finite());
  app.add_option("--max-step", c.max_step, "cap on each ascent step (radians)")
      ->check(finite_above(0));
  app.add_option("--max-growth", c.max_growth, "cap on |grad|^2 after/before")
      ->check(finite_above(1.0, true));
  app.add_option("--mode", c.mode, "exact or reference")
      ->check(CLI::IsMember({"exact", "reference"}));
  app.add_option("--json", c.json, "write the runs as JSON");
  app.add_option("--csv", c.csv, "write the per-step losses as CSV");
  app.add_option("--plot", c.plot, "write the loss curves as PNG (gnuplot)");
  return run_cli(app, argc, argv, [&] { return run(c); });
}
