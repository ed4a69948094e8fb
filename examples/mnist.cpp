// teleport-mnist: an MLP or a CNN on MNIST (or Fashion-MNIST), trained with and
// without teleport from the same initial weights and the same batch order.
#include <common/cli.h>
#include <common/idx.h>
#include <common/launch.h>
#include <common/mnist_config.h>
#include <common/models.h>
#include <common/optimizers.h>
#include <common/report.h>
#include <common/training.h>
#include <teleport/teleport.h>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>

namespace {

using namespace teleport::examples;
using Clock = std::chrono::steady_clock;

struct Outcome {
  Run run;
  std::vector<double> eval_steps, eval_seconds, eval_loss;  // on the train subset
  Eval train_final{}, test_final{};
  double train_seconds = 0, teleport_seconds = 0;
  int64_t diverged_at = -1;  // the step whose loss was not finite, or -1
};

Outcome train(const Config& c, const Data& data, const std::string& optimizer, double lr,
              int64_t seed, bool teleporting, torch::Device device, const Cluster& cl,
              Progress& progress) {
  torch::manual_seed(seed);
  Model model = build_model(c.model, parse_list<int64_t>(c.hidden, "--hidden"), c.activation,
                            device, cl.dtype);
  std::unique_ptr<torch::optim::Optimizer> inner =
      make_optimizer(optimizer, model.module->parameters(), lr, c.momentum);
  Outcome o;
  o.run.label = optimizer + (teleporting ? "+teleport" : "");
  o.run.seed = seed;
  double teleport_norm = -1;
  at::Tensor x, y;   // this rank's slice of the current minibatch
  double share = 1;  // its fraction of the minibatch
  double loss_value = NAN;
  std::unique_ptr<torch::optim::Optimizer> opt;
  teleport::TeleportOptimizer* teleporter = nullptr;
  if (teleporting) {
    auto options = teleport_options(c).on_report([&](const teleport::TeleportReport& r) {
      o.run.teleports.push_back(r);
      teleport_norm = grad_norm_sq(model);  // after the teleport
      if (!std::isfinite(r.loss_before)) {
        // From .grad the loss is not measured: measure it on the minibatch.
        torch::NoGradGuard no_grad;
        o.run.teleports.back().loss_before = loss_value;
        o.run.teleports.back().loss_after = cl.global(cross_entropy(model.forward(x), y), share);
      }
    });
    // The MLP's symmetries are discovered (gl: the paper's data-dependent GL(n)
    // across each LeakyReLU); the CNN declares its own.
    auto t = model.mlp.is_empty()
                 ? std::make_unique<teleport::TeleportOptimizer>(model.declared, std::move(inner),
                                                                 options)
                 : std::make_unique<teleport::TeleportOptimizer>(
                       model.mlp, std::move(inner), options,
                       teleport::DiscoverOptions().data_dependent(c.symmetry == "gl"));
    if (c.symmetry == "gl" && c.teleport_batch == 0) {
      t->set_teleport_batch([&] { return std::make_pair(x, y); }, cross_entropy);  // the minibatch
    }
    if (c.teleport_batch > 0) {
      const auto [first, count] = cl.slice(c.teleport_batch);
      if (cl.group) t->set_process_group(cl.group, double(count) / c.teleport_batch);
      t->set_teleport_batch(random_batches(data.train, c.teleport_batch, seed + 7919, cl, device),
                            cross_entropy);
    }
    teleporter = t.get();
    opt = std::move(t);
  } else {
    opt = std::move(inner);
  }

  // Same batch order for both runs of a seed: a generator of its own.
  at::Generator order = at::detail::createCPUGenerator(seed);
  const int64_t n = data.train.images.size(0);
  const int64_t per_epoch = (n + c.batch_size - 1) / c.batch_size;
  int64_t total = per_epoch * c.epochs;
  if (c.max_steps > 0) total = std::min(total, c.max_steps);
  const auto subset_x = data.train.images.slice(0, 0, c.eval_subset).to(device);
  const auto subset_y = data.train.labels.slice(0, 0, c.eval_subset).to(device);
  auto record_eval = [&](int64_t step) {
    o.eval_steps.push_back(step);
    o.eval_seconds.push_back(o.train_seconds);
    o.eval_loss.push_back(evaluate(model, subset_x, subset_y, cl).loss);
  };
  record_eval(0);

  int64_t step = 0;
  for (int64_t epoch = 0; epoch < c.epochs && step < total; ++epoch) {
    const auto perm = torch::randperm(n, order, torch::TensorOptions().dtype(torch::kLong));
    for (int64_t b = 0; b < per_epoch && step < total; ++b, ++step) {
      const auto start = Clock::now();
      // The global batch, and this rank's slice of it.
      const auto batch = perm.slice(0, b * c.batch_size, std::min(n, (b + 1) * c.batch_size));
      const auto [first, count] = cl.slice(batch.size(0));
      share = double(count) / batch.size(0);
      const auto idx = batch.slice(0, first, first + count);
      x = data.train.images.index_select(0, idx).to(device, cl.dtype);
      y = data.train.labels.index_select(0, idx).to(device);
      if (teleporter != nullptr && cl.group && c.teleport_batch == 0) {
        teleporter->set_process_group(cl.group, share);  // the minibatch is the teleport batch
      }
      const size_t teleports_before = o.run.teleports.size();
      teleport_norm = -1;
      double norm = 0;
      if ((c.symmetry == "gl" && teleporting) || c.model == "cnn") {
        // The data-dependent action leaves the gradient stale: the optimizer
        // runs the closure again after a teleport. The CNN's dropout: the
        // closure lets the optimizer measure the loss with the same masks.
        loss_value = cl.global(opt->step([&] {
          opt->zero_grad();
          auto loss = cross_entropy(model.forward(x), y);
          loss.backward();
          cl.average_gradients(model.module->parameters(), share);
          return loss;
        }),
                               share);
        norm = grad_norm_sq(model);  // the gradient the update used
      } else {
        opt->zero_grad();
        const auto loss = cross_entropy(model.forward(x), y);
        loss.backward();
        cl.average_gradients(model.module->parameters(), share);
        loss_value = cl.global(loss, share);
        norm = grad_norm_sq(model);
        opt->step();
        if (teleport_norm >= 0) norm = teleport_norm;
      }
      if (o.run.teleports.size() > teleports_before) {
        const auto& r = o.run.teleports.back();
        o.teleport_seconds += r.seconds;
        // loss[t] is after the teleport at t: where the teleport measured it
        // (the global batch's, through the closure), that value.
        if (!r.rolled_back && std::isfinite(r.loss_after)) loss_value = r.loss_after;
      }
      o.train_seconds += std::chrono::duration<double>(Clock::now() - start).count();
      o.run.loss.push_back(loss_value);
      o.run.grad_norm_sq.push_back(norm);
      o.run.seconds.push_back(o.train_seconds);
      if ((step + 1) % c.eval_every == 0 || step + 1 == total) record_eval(step + 1);
      progress.update(fmt::format("{} seed {}", o.run.label, seed), step + 1, total,
                      double(step + 1) / per_epoch, o.eval_loss.back(), o.train_seconds,
                      step + 1 == total);
      if (!std::isfinite(loss_value)) {  // diverged: stop this run, report it, go on
        o.diverged_at = step;
        progress.update(fmt::format("{} seed {} diverged", o.run.label, seed), step + 1, total,
                        double(step + 1) / per_epoch, loss_value, o.train_seconds, true);
        break;
      }
    }
    if (o.diverged_at >= 0) break;
  }
  o.train_final = evaluate(model, data.train.images.to(device), data.train.labels.to(device), cl);
  o.test_final = evaluate(model, data.test.images.to(device), data.test.labels.to(device), cl);
  return o;
}

// The first evaluation at or below `target`: {step, seconds}, or NaNs.
std::pair<double, double> time_to(const Outcome& o, double target) {
  for (size_t i = 0; i < o.eval_loss.size(); ++i) {
    if (o.eval_loss[i] <= target) return {o.eval_steps[i], o.eval_seconds[i]};
  }
  return {NAN, NAN};
}

std::string cell(double v, const char* spec = "{:.4f}") {
  return std::isfinite(v) ? fmt::format(fmt::runtime(spec), v) : "-";
}

int run(const Config& c, const Cluster& cl, torch::Device device) {
  const auto optimizers = optimizer_names(c);
  const auto seeds = seed_list(c);
  // Check outputs before hours of training; only rank 0 writes them.
  for (const auto* path : {&c.json, &c.csv, &c.plot}) {
    if (!path->empty() && cl.lead()) check_writable(*path);
  }
  const Data data = load(c.dataset, c.data_dir);
  Progress progress(c.quiet || !cl.lead(), cl.lead() ? c.log : "");

  std::vector<Run> runs;
  std::vector<Curve> curves;
  std::vector<std::string> rows;
  for (const auto& optimizer : optimizers) {
    const double lr = c.lr > 0 ? c.lr : default_lr(c.model, optimizer);
    std::vector<double> step_ratio, second_ratio;
    for (int64_t seed : seeds) {
      std::vector<Outcome> pair;
      if (!c.no_baseline)
        pair.push_back(train(c, data, optimizer, lr, seed, false, device, cl, progress));
      if (!c.no_teleport)
        pair.push_back(train(c, data, optimizer, lr, seed, true, device, cl, progress));
      // Target: the baseline's final loss on the train subset.
      const double target = pair.front().eval_loss.back();
      std::vector<std::pair<double, double>> reach;
      for (auto& o : pair) {
        const auto [steps, seconds] = time_to(o, target);
        reach.emplace_back(steps, seconds);
        double drift = 0;
        int64_t rolled = 0;
        for (const auto& r : o.run.teleports) {
          rolled += r.rolled_back;
          if (std::isfinite(r.loss_before) && !r.rolled_back) {
            drift =
                std::max(drift, std::abs(r.loss_after - r.loss_before) / std::abs(r.loss_before));
          }
        }
        const double share = o.teleport_seconds / std::max(o.train_seconds, 1e-12);
        o.run.extra = {{"lr", json_number(lr)},
                       {"train_loss", json_number(o.train_final.loss)},
                       {"test_loss", json_number(o.test_final.loss)},
                       {"test_accuracy", json_number(o.test_final.accuracy)},
                       {"train_seconds", json_number(o.train_seconds)},
                       {"teleport_seconds", json_number(o.teleport_seconds)},
                       {"target_loss", json_number(target)},
                       {"diverged_at", std::to_string(o.diverged_at)},
                       {"steps_to_target", json_number(steps)},
                       {"seconds_to_target", json_number(seconds)},
                       {"eval", json_object({{"step", json_array(o.eval_steps)},
                                             {"seconds", json_array(o.eval_seconds)},
                                             {"train_subset_loss", json_array(o.eval_loss)}})}};
        rows.push_back(fmt::format(
            "{:<18} {:>5} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>9}",
            o.run.label, seed, cell(lr, "{:g}"), cell(o.train_final.loss), cell(o.test_final.loss),
            cell(100 * o.test_final.accuracy, "{:.2f}"), cell(o.train_seconds, "{:.1f}"),
            cell(steps, "{:.0f}"), cell(seconds, "{:.1f}"), cell(100 * share, "{:.1f}%"),
            o.run.teleports.empty()
                ? "-"
                : fmt::format("{}/{}", o.run.teleports.size() - rolled, o.run.teleports.size()),
            o.run.teleports.empty() ? "-" : cell(drift, "{:.1e}")));
        curves.push_back({fmt::format("{} seed {}", o.run.label, seed), o.eval_steps,
                          o.eval_seconds, o.eval_loss});
        runs.push_back(o.run);
      }
      if (pair.size() == 2) {
        step_ratio.push_back(reach[1].first / reach[0].first);
        second_ratio.push_back(reach[1].second / reach[0].second);
      }
    }
    if (!step_ratio.empty()) {
      auto mean = [](const std::vector<double>& v) {
        double s = 0;
        for (double x : v) s += x;
        return s / v.size();  // NaN when a run never reached the target
      };
      rows.push_back(fmt::format(
          "  {}: teleport/baseline to reach the baseline's final loss: "
          "steps {}, seconds {} (mean over seeds; - = not reached)",
          optimizer, cell(mean(step_ratio), "{:.3f}x"), cell(mean(second_ratio), "{:.3f}x")));
    }
  }

  if (!cl.lead()) return 0;
  fmt::print("\n{:<18} {:>5} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>9}\n",
             "run", "seed", "lr", "train_loss", "test_loss", "test_acc", "seconds", "steps_to",
             "secs_to", "tp_share", "teleports", "drift");
  for (const auto& r : rows) fmt::print("{}\n", r);
  for (const auto& r : runs) {
    for (const auto& [key, value] : r.extra) {
      if (key == "diverged_at" && value != "-1") {
        fmt::print("{} seed {} diverged: its loss was not finite at step {}\n", r.label, r.seed,
                   value);
      }
    }
  }
  fmt::print(
      "(train_loss on all {} training images; steps_to/secs_to: first evaluation on the first {} "
      "training images at or below the baseline's final one; drift: largest relative loss "
      "change at a measured teleport)\n",
      data.train.images.size(0), c.eval_subset);

  const JsonFields config = config_fields(c, device.str(), cl.world);
  if (!c.json.empty()) write_json(c.json, config, runs);
  if (!c.csv.empty()) write_csv(c.csv, runs);
  if (!c.plot.empty()) {
    fmt::print("{}\n",
               plot(c.plot, fmt::format("{} MLP {} ({})", c.dataset, c.hidden, c.activation),
                    "train loss (subset)", curves));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"MLP on MNIST with and without symmetry teleportation", "teleport-mnist"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  Config c;
  std::string at;
  add_options(app, c, at);
  bool distributed = false;
  const int code = run_cli(app, argc, argv, [&] {
    finish_config(c, at, app);
    if (c.device == "cuda" && !torch::cuda::is_available()) {
      throw UsageError("--device cuda: CUDA is not available here");
    }
    torch::Device device(c.device == "cuda" || (c.device == "auto" && torch::cuda::is_available())
                             ? torch::kCUDA
                             : torch::kCPU);
    Cluster cl;
    cl.dtype = c.dtype == "float64" ? torch::kDouble : torch::kFloat;
    bool launched = false;
    distributed = c.nproc > 1 || std::getenv("WORLD_SIZE") != nullptr;
    const int launch_code = join_or_launch(c, argc, argv, cl, device, launched);
    if (launched) return launch_code;
    if (cl.world == 1) return run(c, cl, device);
    try {
      return run(c, cl, device);
    } catch (const UsageError& e) {
      throw UsageError(fmt::format("rank {}: {}", cl.rank, e.what()));
    } catch (const c10::Error& e) {
      pause_under_launcher();
      const std::string what = e.what_without_backtrace();
      throw std::runtime_error(
          fmt::format("rank {}: {}", cl.rank, what.substr(0, what.find('\n'))));
    } catch (const std::exception& e) {
      pause_under_launcher();
      throw std::runtime_error(fmt::format("rank {}: {}", cl.rank, e.what()));
    }
  });
  if (distributed) {
    // A process group whose peer died may block in its destructor: leave now.
    std::fflush(nullptr);
    std::_Exit(code);
  }
  return code;
}
