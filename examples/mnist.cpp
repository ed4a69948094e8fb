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
  std::vector<double> eval_validation;                      // with --validation
  Eval train_final{}, test_final{}, validation_final{NAN, NAN};
  double train_seconds = 0, teleport_seconds = 0;
  int64_t diverged_at = -1;  // the step whose loss was not finite, or -1
  int64_t stopped_at = -1;   // the step early stopping ended the run at, or -1
};

// One step's minibatch: this rank's slice of the global batch, and its share.
struct Batch {
  at::Tensor x, y;
  double share = 1;
};

// The optimizer of one run: the bare one, or TeleportOptimizer around it with
// `on_report` called at every teleport; `teleporter` points at the latter.
std::unique_ptr<torch::optim::Optimizer> build_optimizer(
    const Config& c, const Data& data, Model& model, const std::string& optimizer, double lr,
    int64_t seed, bool teleporting, torch::Device device, const Cluster& cl, const Batch& batch,
    std::function<void(const teleport::TeleportReport&)> on_report,
    teleport::TeleportOptimizer*& teleporter) {
  std::vector<at::Tensor> trainable;  // not --model lora's frozen base
  for (const auto& p : model.module->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  auto inner = make_optimizer(optimizer, trainable, lr, c.momentum);
  teleporter = nullptr;
  if (!teleporting) return inner;
  // kRandom draws from a generator of its own: the training's draws (the
  // CNN's dropout) stay those of the baseline. Every rank draws alike.
  const auto options = teleport_options(c)
                           .on_report(std::move(on_report))
                           .generator(at::detail::createCPUGenerator(seed + 104729));
  // The MLP's symmetries are discovered (gl: the paper's data-dependent GL(n)
  // across each LeakyReLU); the CNN declares its own.
  auto t =
      model.mlp.is_empty()
          ? std::make_unique<teleport::TeleportOptimizer>(model.declared, std::move(inner), options)
          : std::make_unique<teleport::TeleportOptimizer>(
                model.mlp, std::move(inner), options,
                teleport::DiscoverOptions().data_dependent(c.symmetry == "gl"));
  if (model.mlp.is_empty()) t->set_buffers(model.module->buffers());  // BatchNorm's statistics
  if (c.symmetry == "gl" && c.teleport_batch == 0) {                  // the minibatch
    t->set_teleport_batch([&batch] { return std::make_pair(batch.x, batch.y); }, cross_entropy);
  }
  if (c.teleport_batch > 0) {
    const auto [first, count] = cl.slice(c.teleport_batch);
    if (cl.group) t->set_process_group(cl.group, double(count) / c.teleport_batch);
    t->set_teleport_batch(random_batches(data.train, c.teleport_batch, seed + 7919, cl, device),
                          cross_entropy);
  }
  teleporter = t.get();
  return t;
}

// Rows `b` of the global batch order `perm`, this rank's slice of them.
Batch minibatch(const Data& data, const at::Tensor& perm, int64_t b, int64_t batch_size,
                const Cluster& cl, torch::Device device) {
  const int64_t n = perm.size(0);
  const auto global = perm.slice(0, b * batch_size, std::min(n, (b + 1) * batch_size));
  const auto [first, count] = cl.slice(global.size(0));
  const auto idx = global.slice(0, first, first + count);
  return {data.train.images.index_select(0, idx).to(device, cl.dtype),
          data.train.labels.index_select(0, idx).to(device), double(count) / global.size(0)};
}

// One optimizer step: `loss` becomes the global minibatch loss (before the
// step, where a report from .grad reads it); returns ||∇L||² of the gradient
// the update used. The closure runs where a teleport needs it: the
// data-dependent action leaves the gradient stale, and the CNN's dropout masks
// must be the same when the loss is measured before and after a teleport.
double train_step(torch::optim::Optimizer& opt, Model& model, const Batch& b, const Cluster& cl,
                  bool closure, const double& teleport_norm, double& loss) {
  auto loss_of = [&] {
    opt.zero_grad();
    auto loss = cross_entropy(model.forward(b.x), b.y);
    loss.backward();
    cl.average_gradients(model.module->parameters(), b.share);
    return loss;
  };
  if (closure) {
    loss = cl.global(opt.step(loss_of), b.share);
    return grad_norm_sq(model);
  }
  loss = cl.global(loss_of(), b.share);
  const double norm = grad_norm_sq(model);
  opt.step();
  return teleport_norm >= 0 ? teleport_norm : norm;  // after a teleport, its gradient
}

Outcome train(const Config& c, const Data& data, const std::string& optimizer, double lr,
              int64_t seed, bool teleporting, torch::Device device, const Cluster& cl,
              Progress& progress) {
  torch::manual_seed(seed);
  Model model = c.model == "lora" ? build_lora(data.pretrained, c.lora_rank)
                                  : build_model(c.model, parse_list<int64_t>(c.hidden, "--hidden"),
                                                c.activation, device, cl.dtype);
  Outcome o;
  o.run.label = optimizer + (teleporting ? "+teleport" : "");
  o.run.seed = seed;
  Batch batch;
  double loss_value = NAN, teleport_norm = -1;
  auto on_report = [&](const teleport::TeleportReport& r) {
    o.run.teleports.push_back(r);
    o.teleport_seconds += r.seconds;
    teleport_norm = grad_norm_sq(model);  // after the teleport
    if (!std::isfinite(r.loss_before)) {  // from .grad: measure the loss on the minibatch
      torch::NoGradGuard no_grad;
      o.run.teleports.back().loss_before = loss_value;
      o.run.teleports.back().loss_after =
          cl.global(cross_entropy(model.forward(batch.x), batch.y), batch.share);
    }
  };
  teleport::TeleportOptimizer* teleporter = nullptr;
  auto opt = build_optimizer(c, data, model, optimizer, lr, seed, teleporting, device, cl, batch,
                             on_report, teleporter);
  // The CNN's dropout and the ResNet's BatchNorm statistics: the closure
  // measures the loss before and after a teleport on the same masks and batch.
  const bool closure = (c.symmetry == "gl" && teleporting) || c.model != "mlp";

  // Same batch order for both runs of a seed: a generator of its own.
  at::Generator order = at::detail::createCPUGenerator(seed);
  const int64_t n = data.train.images.size(0);
  const int64_t per_epoch = (n + c.batch_size - 1) / c.batch_size;
  const int64_t total =
      c.max_steps > 0 ? std::min(per_epoch * c.epochs, c.max_steps) : per_epoch * c.epochs;
  const auto subset_x = data.train.images.slice(0, 0, c.eval_subset).to(device);
  const auto subset_y = data.train.labels.slice(0, 0, c.eval_subset).to(device);
  const bool validating = data.validation.images.defined();
  const auto val_x = validating ? data.validation.images.to(device) : at::Tensor();
  const auto val_y = validating ? data.validation.labels.to(device) : at::Tensor();
  double best_validation = INFINITY;
  int64_t since_best = 0;
  auto record_eval = [&](int64_t step) {
    o.eval_steps.push_back(step);
    o.eval_seconds.push_back(o.train_seconds);
    o.eval_loss.push_back(evaluate(model, subset_x, subset_y, cl).loss);
    if (!validating) return;
    const double v = evaluate(model, val_x, val_y, cl).loss;
    o.eval_validation.push_back(v);
    since_best = v < best_validation ? 0 : since_best + 1;
    best_validation = std::min(best_validation, v);
    if (c.patience > 0 && since_best >= c.patience) o.stopped_at = step;
  };
  record_eval(0);

  at::Tensor perm;
  for (int64_t step = 0; step < total && o.diverged_at < 0 && o.stopped_at < 0; ++step) {
    if (step % per_epoch == 0) perm = torch::randperm(n, order, torch::dtype(torch::kLong));
    for (auto& group : opt->param_groups()) {
      group.options().set_lr(scheduled_lr(lr, step, total, c.lr_schedule, c.warmup));
    }
    const auto start = Clock::now();
    batch = minibatch(data, perm, step % per_epoch, c.batch_size, cl, device);
    if (teleporter != nullptr && cl.group && c.teleport_batch == 0) {
      teleporter->set_process_group(cl.group, batch.share);  // the minibatch is the teleport batch
    }
    const size_t teleports_before = o.run.teleports.size();
    teleport_norm = -1;
    const double norm = train_step(*opt, model, batch, cl, closure, teleport_norm, loss_value);
    if (o.run.teleports.size() > teleports_before) {
      // loss[t] is after the teleport at t: where the teleport measured it
      // (the global batch's, through the closure), that value.
      const auto& r = o.run.teleports.back();
      if (!r.rolled_back && std::isfinite(r.loss_after)) loss_value = r.loss_after;
    }
    o.train_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    o.run.loss.push_back(loss_value);
    o.run.grad_norm_sq.push_back(norm);
    o.run.seconds.push_back(o.train_seconds);
    if ((step + 1) % c.eval_every == 0 || step + 1 == total) record_eval(step + 1);
    const std::string what = fmt::format("{} seed {}", o.run.label, seed);
    progress.update(what, step + 1, total, double(step + 1) / per_epoch, o.eval_loss.back(),
                    o.train_seconds, step + 1 == total);
    if (!std::isfinite(loss_value)) {  // diverged: stop this run, report it, go on
      o.diverged_at = step;
      progress.update(what + " diverged", step + 1, total, double(step + 1) / per_epoch, loss_value,
                      o.train_seconds, true);
    }
  }
  o.train_final = evaluate(model, data.train.images.to(device), data.train.labels.to(device), cl);
  o.test_final = evaluate(model, data.test.images.to(device), data.test.labels.to(device), cl);
  if (validating) o.validation_final = evaluate(model, val_x, val_y, cl);
  return o;
}

// --model lora's frozen base, the same for every run: the MLP of --hidden and
// --activation trained on MNIST for --pretrain-steps steps (Adam, rate 1e-3,
// batch 64, seed 0). Prints its MNIST test accuracy.
torch::nn::Sequential pretrain(const Config& c, torch::Device device, const Cluster& cl) {
  const Data mnist = load("mnist", c.dataset == "mnist" ? c.data_dir : "");
  torch::manual_seed(0);
  auto mlp = build_mlp(parse_list<int64_t>(c.hidden, "--hidden"), c.activation, device);
  mlp->to(cl.dtype);
  torch::optim::Adam opt(mlp->parameters(), torch::optim::AdamOptions(1e-3));
  at::Generator order = at::detail::createCPUGenerator(0);
  constexpr int64_t kBatch = 64;
  const int64_t n = mnist.train.images.size(0), per_epoch = (n + kBatch - 1) / kBatch;
  at::Tensor perm;
  for (int64_t step = 0; step < c.pretrain_steps; ++step) {
    if (step % per_epoch == 0) perm = torch::randperm(n, order, torch::dtype(torch::kLong));
    const int64_t b = step % per_epoch;
    const auto idx = perm.slice(0, b * kBatch, std::min(n, (b + 1) * kBatch));
    opt.zero_grad();
    cross_entropy(mlp->forward(mnist.train.images.index_select(0, idx).to(device, cl.dtype)),
                  mnist.train.labels.index_select(0, idx).to(device))
        .backward();
    opt.step();
  }
  Model base{mlp.ptr(), [mlp](const at::Tensor& x) mutable { return mlp->forward(x); }, mlp, {}};
  const Eval test = evaluate(base, mnist.test.images.to(device), mnist.test.labels.to(device), cl);
  if (cl.lead() && !c.quiet) {
    fmt::print("base: MLP {} ({}) trained on MNIST for {} steps: MNIST test accuracy {:.2f}%\n",
               c.hidden, c.activation, c.pretrain_steps, 100 * test.accuracy);
  }
  return mlp;
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
  Data data = load(c.dataset, c.data_dir);
  if (c.validation > 0) {
    const int64_t n = data.train.images.size(0);
    if (c.validation >= n) {
      throw std::runtime_error(
          fmt::format("--validation {}: expected fewer images than the {} of the training set",
                      c.validation, n));
    }
    data.validation = {data.train.images.slice(0, n - c.validation),
                       data.train.labels.slice(0, n - c.validation)};
    data.train = {data.train.images.slice(0, 0, n - c.validation),
                  data.train.labels.slice(0, 0, n - c.validation)};
  }
  if (c.model == "lora") data.pretrained = pretrain(c, device, cl);
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
        const auto [kept, drift] = kept_and_drift(o.run.teleports);
        const double share = o.teleport_seconds / std::max(o.train_seconds, 1e-12);
        o.run.extra = {{"lr", json_number(lr)},
                       {"train_loss", json_number(o.train_final.loss)},
                       {"test_loss", json_number(o.test_final.loss)},
                       {"test_accuracy", json_number(o.test_final.accuracy)},
                       {"train_seconds", json_number(o.train_seconds)},
                       {"teleport_seconds", json_number(o.teleport_seconds)},
                       {"target_loss", json_number(target)},
                       {"diverged_at", std::to_string(o.diverged_at)},
                       {"validation_loss", json_number(o.validation_final.loss)},
                       {"validation_accuracy", json_number(o.validation_final.accuracy)},
                       {"stopped_at", std::to_string(o.stopped_at)},
                       {"steps", std::to_string(o.run.loss.size())},
                       {"steps_to_target", json_number(steps)},
                       {"seconds_to_target", json_number(seconds)},
                       {"eval", json_object({{"step", json_array(o.eval_steps)},
                                             {"seconds", json_array(o.eval_seconds)},
                                             {"train_subset_loss", json_array(o.eval_loss)},
                                             {"validation_loss", json_array(o.eval_validation)}})}};
        rows.push_back(fmt::format(
            "{:<18} {:>5} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>9}",
            o.run.label, seed, cell(lr, "{:g}"), cell(o.train_final.loss), cell(o.test_final.loss),
            cell(100 * o.test_final.accuracy, "{:.2f}"), cell(o.train_seconds, "{:.1f}"),
            cell(steps, "{:.0f}"), cell(seconds, "{:.1f}"), cell(100 * share, "{:.1f}%"),
            o.run.teleports.empty() ? "-" : fmt::format("{}/{}", kept, o.run.teleports.size()),
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
    if (!step_ratio.empty()) {  // NaN where a run never reached the target
      rows.push_back(fmt::format(
          "  {}: teleport/baseline to reach the baseline's final loss: "
          "steps {}, seconds {} (mean over seeds; - = not reached)",
          optimizer, cell(mean_of(step_ratio), "{:.3f}x"), cell(mean_of(second_ratio), "{:.3f}x")));
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
    fmt::print("{}\n", plot(c.plot,
                            c.model == "mlp"
                                ? fmt::format("{} MLP {} ({})", c.dataset, c.hidden, c.activation)
                                : fmt::format("{} {}", c.dataset, c.model),
                            "train loss (subset)", curves));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"An MLP, a CNN or a ResNet on MNIST with and without symmetry teleportation",
               "teleport-mnist"};
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
