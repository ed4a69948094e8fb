#pragma once
// teleport-mnist's command line: its flags, their checks (a usage error is
// one line and exit code 2, before any data is read), the config the JSON
// records, and the TeleportOptions the flags give.

#include <common/cli.h>
#include <common/optimizers.h>
#include <common/report.h>
#include <teleport/options.h>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace teleport::examples {

struct Config {
  std::string dataset = "mnist", data_dir, device = "auto";
  std::string model = "mlp", hidden = "128,128", activation = "relu", optimizers = "sgd,adagrad";
  std::string seeds = "0", symmetry = "scaling", state_policy = "transport";
  double lr = 0, momentum = 0;
  // "" = the model's tuned schedule: cosine for the ResNet and the ViT,
  // constant otherwise.
  std::string lr_schedule;
  int64_t warmup = -1;  // -1 = the model's: 200 steps for the ViT's cosine, 0 otherwise
  // --model lora: the adapters' rank, and the base's MNIST training steps
  // (938: one epoch at batch 64).
  int64_t lora_rank = 4, pretrain_steps = 938;
  // The last `validation` training images held out; early stopping after
  // `patience` evaluations without a lower validation loss (0 = never).
  int64_t validation = 0, patience = 0;
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

// left out of the comparison (each rank has its own GPU).
inline JsonFields config_fields(const Config& c, const std::string& device, int64_t world) {
  return {
      {"example", json_string("mnist")},
      {"dataset", json_string(c.dataset)},
      {"model", json_string(c.model)},
      {"hidden", json_string(c.hidden)},
      {"activation", json_string(c.activation)},
      {"optimizers", json_string(c.optimizers)},
      {"lr", json_number(c.lr)},
      {"momentum", json_number(c.momentum)},
      {"lr_schedule", json_string(c.lr_schedule)},
      {"warmup", std::to_string(c.warmup)},
      {"lora_rank", std::to_string(c.lora_rank)},
      {"pretrain_steps", std::to_string(c.pretrain_steps)},
      {"validation", std::to_string(c.validation)},
      {"patience", std::to_string(c.patience)},
      {"seeds", json_string(c.seeds)},
      {"batch_size", std::to_string(c.batch_size)},
      {"epochs", std::to_string(c.epochs)},
      {"max_steps", std::to_string(c.max_steps)},
      {"device", json_string(device)},
      {"dtype", json_string(c.dtype)},
      {"world_size", std::to_string(world)},
      {"symmetry", json_string(c.symmetry)},
      {"teleport_every", std::to_string(c.teleport_every)},
      {"teleport_at", json_array(std::vector<double>(c.teleport_at.begin(), c.teleport_at.end()))},
      {"teleport_first", std::to_string(c.teleport_first)},
      {"max_teleports", std::to_string(c.max_teleports)},
      {"teleport_steps", std::to_string(c.teleport_steps)},
      {"teleport_lr", json_number(c.teleport_lr)},
      {"teleport_batch", std::to_string(c.teleport_batch)},
      {"max_growth", json_number(c.max_growth)},
      {"max_step", json_number(c.max_step)},
      {"tolerance", json_number(c.tolerance)},
      {"state_policy", json_string(c.state_policy)},
      {"objective", json_string(c.objective)},
      {"flatness_radius", json_number(c.flatness_radius)},
      {"flatness_samples", std::to_string(c.flatness_samples)},
      {"stall_fraction", json_number(c.stall_fraction)},
      {"stall_decay", json_number(c.stall_decay)},
      {"stall_cooldown", std::to_string(c.stall_cooldown)},
      {"no_baseline", c.no_baseline ? "true" : "false"},
      {"no_teleport", c.no_teleport ? "true" : "false"},
      {"eval_every", std::to_string(c.eval_every)},
      {"eval_subset", std::to_string(c.eval_subset)}};
}

// --optimizer's names, each one known.
inline std::vector<std::string> optimizer_names(const Config& c) {
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
inline std::vector<int64_t> seed_list(const Config& c) {
  const auto seeds = parse_list<int64_t>(c.seeds, "--seeds");
  for (const int64_t s : seeds) {
    if (s < 0 || s > int64_t{0xFFFFFFFF}) {
      throw UsageError(
          fmt::format("--seeds: expected seeds in 0..4294967295 (LibTorch's "
                      "generators take 32 bits), got {}",
                      c.seeds));
    }
  }
  return seeds;
}

// Every flag checked against the others before any data is read: a usage
// error is one line and exit code 2, never a failure after a baseline.
inline void check_usage(const Config& c) {
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
    throw UsageError(
        fmt::format("--teleport-batch: expected at most the {} training images, got {}",
                    kTrainImages, c.teleport_batch));
  }
  if (c.nproc > 1 && c.batch_size < c.nproc) {
    throw UsageError(
        fmt::format("--batch-size {} gives some of the --nproc {} ranks no rows: "
                    "expected a batch size >= the number of processes",
                    c.batch_size, c.nproc));
  }
  if (c.nproc > 1 && c.teleport_batch > 0 && c.teleport_batch < c.nproc) {
    throw UsageError(
        fmt::format("--teleport-batch {} gives some of the --nproc {} ranks no rows: "
                    "expected a teleport batch >= the number of processes",
                    c.teleport_batch, c.nproc));
  }
}

// A flag given on the command line that the chosen model, optimizers,
// objective or runs would ignore is a usage error, not a silent no-op.
inline void check_applies(const CLI::App& app, const Config& c) {
  const auto given = [&](const char* flag) { return app.count(flag) > 0; };
  auto refuse = [](const char* flag, const std::string& why) {
    throw UsageError(fmt::format("{} does not apply {}", flag, why));
  };
  const auto names = optimizer_names(c);
  if (given("--momentum") && std::find(names.begin(), names.end(), "sgd") == names.end()) {
    refuse("--momentum", "(it sets plain sgd's momentum; --optimizer has no sgd)");
  }
  for (const char* flag : {"--hidden", "--activation"}) {
    if (given(flag) && c.model != "mlp" && c.model != "lora") refuse(flag, "to --model " + c.model);
  }
  if (given("--patience") && c.validation == 0) refuse("--patience", "without --validation N");
  for (const char* flag : {"--lora-rank", "--pretrain-steps"}) {
    if (given(flag) && c.model != "lora") refuse(flag, "to --model " + c.model);
  }
  for (const char* flag : {"--flatness-radius", "--flatness-samples"}) {
    if (given(flag) && c.objective != "flatness") refuse(flag, "without --objective flatness");
  }
  for (const char* flag : {"--stall-decay", "--stall-cooldown"}) {
    if (given(flag) && c.stall_fraction == 0) refuse(flag, "without --stall-fraction");
  }
  if (c.no_teleport) {
    for (const char* flag :
         {"--teleport-every", "--teleport-at", "--teleport-first", "--max-teleports",
          "--teleport-steps", "--teleport-lr", "--teleport-batch", "--max-growth", "--max-step",
          "--tolerance", "--objective", "--symmetry", "--state-policy", "--stall-fraction"}) {
      if (given(flag)) refuse(flag, "with --no-teleport");
    }
  }
}

// Every flag, with its help and its check; `at` takes --teleport-at's list.
inline void add_options(CLI::App& app, Config& c, std::string& at) {
  app.add_option("--dataset", c.dataset, "mnist or fashion (default: fashion for --model lora)")
      ->check(CLI::IsMember({"mnist", "fashion"}));
  app.add_option("--data", c.data_dir, "directory with the IDX files");
  app.add_option("--hidden", c.hidden, "hidden widths, e.g. 128,128");
  app.add_option("--model", c.model,
                 "mlp (Linear layers of --hidden, --activation), cnn (the LibTorch MNIST "
                 "example's network: two convolutions, max-pooling, dropout, two Linear layers) "
                 "resnet (a stem, three stages of BatchNorm basic blocks at 16/32/64 "
                 "channels, global average pooling, a Linear), vit (7x7 patches, two "
                 "transformer encoder layers of width 64 and 4 heads, a LayerNorm, a Linear) "
                 "or lora (the MLP of --hidden and --activation trained on MNIST for "
                 "--pretrain-steps steps, frozen, and fine-tuned on --dataset through rank "
                 "--lora-rank adapters on each of its Linear layers, one GL(rank) symmetry each)")
      ->check(CLI::IsMember({"mlp", "cnn", "resnet", "vit", "lora"}));
  app.add_option("--lora-rank", c.lora_rank, "--model lora: the adapters' rank")
      ->check(CLI::PositiveNumber);
  app.add_option("--pretrain-steps", c.pretrain_steps,
                 "--model lora: Adam steps (rate 1e-3, batch 64, seed 0) of the base on MNIST")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--activation", c.activation, "relu or leaky_relu")
      ->check(CLI::IsMember({"relu", "leaky_relu"}));
  app.add_option("--optimizer", c.optimizers,
                 "comma-separated: sgd, momentum (SGD, momentum 0.9), nesterov, adagrad, rmsprop, "
                 "adam, adamw");
  app.add_option("--lr", c.lr,
                 "learning rate (default: each optimizer's tuned one, docs/results.md)")
      ->check(finite_above(0));
  app.add_option("--lr-schedule", c.lr_schedule,
                 "constant, or cosine (the rate decays to 0 over the run along a half cosine, "
                 "after --warmup steps rising linearly); default: cosine for --model resnet and "
                 "vit, constant otherwise (docs/results.md)")
      ->check(CLI::IsMember({"constant", "cosine"}));
  app.add_option("--warmup", c.warmup,
                 "steps over which the rate rises linearly to --lr (default: 200 for --model vit, "
                 "0 otherwise)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--validation", c.validation,
                 "hold the last N training images out as a validation split (not trained on; "
                 "its loss and accuracy are evaluated with the train subset's)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--patience", c.patience,
                 "early stopping: end a run after this many evaluations (--eval-every) without "
                 "a lower validation loss; --epochs is then the most it trains (0 = never)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--momentum", c.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0));
  app.add_option("--batch-size", c.batch_size, "minibatch size")->check(CLI::PositiveNumber);
  app.add_option("--epochs", c.epochs, "epochs")->check(CLI::PositiveNumber);
  app.add_option("--max-steps", c.max_steps, "stop after this many steps (0 = no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--device", c.device, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--seeds", c.seeds, "seeds, e.g. 0,1,2");
  app.add_option(
         "--symmetry", c.symmetry,
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
  app.add_option(
         "--teleport-batch", c.teleport_batch,
         "0 = teleport on the minibatch gradient (closed form); M > 0 = on M training images")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-growth", c.max_growth, "cap on |grad|^2 after/before per teleport")
      ->check(finite_above(1.0, true));
  app.add_option("--max-step", c.max_step, "cap on each ascent step's norm")
      ->check(finite_above(0));
  app.add_option("--tolerance", c.tolerance, "relative loss change that rolls a teleport back")
      ->check(finite_above(0));
  app.add_option("--objective", c.objective,
                 "what a teleport optimizes: grad_norm (the paper: raise |grad|^2), preconditioned "
                 "(raise sum g^2/(sqrt(v)+eps), the decrease of a step preconditioned as the inner "
                 "optimizer's; grad_norm for "
                 "SGD), balance (lower the sum of squared weights, each unit's in and out norms "
                 "equal), look_ahead (lower the teleport batch's loss after the next step), "
                 "flatness (lower its rise under random perturbations); the last two need "
                 "--teleport-batch), random (a random element as far from the identity as the "
                 "grad_norm ascent goes: a control) or state_only (no element: the schedule and "
                 "the state policy alone, the other control); default: balance, or grad_norm with "
                 "--symmetry gl, "
                 "--teleport-batch or --model vit (docs/results.md)")
      ->check(CLI::IsMember({"grad_norm", "preconditioned", "look_ahead", "flatness", "balance",
                             "random", "state_only"}));
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
}

// The checks that need several flags at once, and the defaults that depend on
// others (--objective); run after parsing.
inline void finish_config(Config& c, const std::string& at, const CLI::App& app) {
  if (!at.empty()) c.teleport_at = parse_list<int64_t>(at, "--teleport-at");
  check_usage(c);
  check_applies(app, c);
  if (c.model == "lora" && app.count("--dataset") == 0) c.dataset = "fashion";
  if (c.lr_schedule.empty()) {
    c.lr_schedule = c.model == "vit" || c.model == "resnet" ? "cosine" : "constant";
  }
  if (c.warmup < 0) c.warmup = c.model == "vit" ? 200 : 0;
  if (c.objective.empty()) {
    c.objective =
        c.symmetry == "gl" || c.teleport_batch > 0 || c.model == "vit" ? "grad_norm" : "balance";
  }
  if (c.model == "vit" && (c.objective == "balance" || c.objective == "preconditioned")) {
    throw UsageError("--objective " + c.objective +
                     " acts by positive scalings; the ViT's attention groups are GL(d) per "
                     "head: use --objective grad_norm with --model vit");
  }
  if (c.no_baseline && c.no_teleport)
    throw UsageError("--no-baseline and --no-teleport leave nothing to run");
  if (c.symmetry == "gl" && c.activation != "leaky_relu") {
    throw UsageError("--symmetry gl: the data-dependent action needs --activation leaky_relu");
  }
  const bool on_batch = c.objective == "look_ahead" || c.objective == "flatness";
  if (on_batch && (c.teleport_batch == 0 || c.symmetry == "gl" || c.model != "mlp")) {
    throw UsageError("--objective " + c.objective +
                     " evaluates losses on a teleport batch of its own: it needs --teleport-batch "
                     "M, --symmetry scaling and --model mlp");
  }
  const bool any_group =
      c.objective == "grad_norm" || c.objective == "random" || c.objective == "state_only";
  if (!on_batch && !any_group && (c.symmetry == "gl" || c.teleport_batch > 0)) {
    throw UsageError("--objective " + c.objective +
                     " acts by positive scalings from the minibatch gradient: it needs "
                     "--symmetry scaling and no --teleport-batch");
  }
  if (c.model != "mlp" && (c.symmetry == "gl" || c.teleport_batch > 0)) {
    throw UsageError("--model " + c.model +
                     " teleports by the scalings it declares, from the minibatch: "
                     "--symmetry gl and --teleport-batch need --model mlp");
  }
}

// The library's options for the teleport runs (on_report is the caller's).
inline teleport::TeleportOptions teleport_options(const Config& c) {
  const std::map<std::string, teleport::StatePolicy> policies = {
      {"keep", teleport::StatePolicy::kKeep},
      {"reset", teleport::StatePolicy::kReset},
      {"transport", teleport::StatePolicy::kTransport}};
  return teleport::TeleportOptions()
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
                 : c.objective == "random"         ? teleport::Objective::kRandom
                 : c.objective == "state_only"     ? teleport::Objective::kStateOnly
                                                   : teleport::Objective::kGradNorm)
      .flatness_radius(c.flatness_radius)
      .flatness_samples(c.flatness_samples)
      .stall_fraction(c.stall_fraction)
      .stall_decay(c.stall_decay)
      .stall_cooldown(c.stall_cooldown)
      .state_policy(policies.at(c.state_policy));
}

}  // namespace teleport::examples
