// teleport-bench: the cost of a teleport against a training step, and the
// overhead of TeleportOptimizer when teleport is off. Prints JSON.
#include <common/cli.h>
#include <common/models.h>
#include <teleport/internal/parameters.h>
#include <teleport/teleport.h>

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>
#include <torch/optim/sgd.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <functional>

namespace {

using teleport::examples::parse_list;

// The median of `v` (the upper one of an even count), as every timing here reports.
double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

struct Case {
  std::vector<int64_t> widths;  // input, hidden..., output
  int64_t batch;
};

enum class Activation { kReLU, kLeakyReLU };

torch::nn::Sequential mlp(const std::vector<int64_t>& w, Activation act, torch::Device device) {
  torch::nn::Sequential m;
  for (size_t i = 0; i + 1 < w.size(); ++i) {
    m->push_back(torch::nn::Linear(w[i], w[i + 1]));
    if (i + 2 < w.size()) {
      if (act == Activation::kReLU) {
        m->push_back(torch::nn::ReLU());
      } else {
        m->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
      }
    }
  }
  m->to(device);
  return m;
}

std::string run_case(const Case& c, int reps, int teleport_steps, torch::Device device) {
  torch::manual_seed(0);
  auto model = mlp(c.widths, Activation::kReLU, device);
  const auto x = torch::randn({c.batch, c.widths.front()}, torch::TensorOptions(device));
  const auto y = torch::randint(0, c.widths.back(), {c.batch},
                                torch::TensorOptions(device).dtype(torch::kLong));
  auto loss_fn = [](const at::Tensor& out, const at::Tensor& target) {
    return torch::nn::functional::cross_entropy(out, target);
  };
  auto train_step = [&](torch::optim::Optimizer& opt) {
    opt.zero_grad();
    loss_fn(model->forward(x), y).backward();
    opt.step();
  };

  // A training step, bare and wrapped with teleport off, interleaved so that
  // both see the same machine load.
  torch::optim::SGD bare(model->parameters(), torch::optim::SGDOptions(1e-6));
  teleport::TeleportOptimizer wrapped(
      model,
      std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(1e-6)));
  // Bare and wrapped steps alternate, one each, in alternating order; the
  // overhead is the median of the pairs' ratios, so that load that changes
  // over time cancels out.
  auto seconds_of = [&](torch::optim::Optimizer& opt) {
    const auto start = std::chrono::steady_clock::now();
    train_step(opt);
    if (device.is_cuda()) torch::cuda::synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  train_step(bare);
  train_step(wrapped);
  std::vector<double> bare_t, ratios;
  for (int i = 0; i < 11 * reps; ++i) {
    const bool bare_first = i % 2 == 0;
    const double first =
        seconds_of(bare_first ? static_cast<torch::optim::Optimizer&>(bare) : wrapped);
    const double second =
        seconds_of(bare_first ? static_cast<torch::optim::Optimizer&>(wrapped) : bare);
    bare_t.push_back(bare_first ? first : second);
    ratios.push_back(bare_first ? second / first : first / second);
  }
  const double step_s = median(bare_t);
  const double off_overhead = median(ratios) - 1;

  // One full teleport: all hidden layers, `teleport_steps` ascent steps, each
  // timed right after a training step so that their ratio sees one machine
  // load. Weights and gradients are restored after each, outside the timing.
  auto options = teleport::TeleportOptions().steps(teleport_steps).lr(1e-3).max_growth(1e12);
  struct Timing {
    double seconds, in_steps;
  };
  // `net` holds the symmetries' weights; `timed` teleports after a warm-up.
  auto time_teleport = [&](const teleport::SymmetryList& syms, teleport::Method method,
                           torch::nn::Sequential net, int timed) {
    const teleport::BatchLoss objective(net, x, y, loss_fn);
    const auto opts = teleport::TeleportOptions(options).method(method);
    std::vector<double> seconds, ratios;
    for (int r = 0; r <= timed; ++r) {
      const double step = seconds_of(bare);  // leaves a fresh gradient in .grad
      teleport::detail::Snapshot snapshot(net->parameters());
      const auto start = std::chrono::steady_clock::now();
      teleport::teleport(syms, opts, method == teleport::Method::kAutograd ? &objective : nullptr);
      if (device.is_cuda()) torch::cuda::synchronize();
      const double t =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      snapshot.restore();
      if (r == 0) continue;  // warm-up
      seconds.push_back(t);
      ratios.push_back(t / step);
    }
    return Timing{median(seconds), median(ratios)};
  };
  const auto scaling = teleport::discover(model).symmetries;
  // GL(n) on the same weights: the cost is the same whatever the activation.
  teleport::SymmetryList gl;
  for (const auto& s : scaling) {
    const auto p = s->parameters();
    gl.push_back(std::make_shared<teleport::LayerSymmetry>(teleport::SymmetryKind::kLinearGL, p[0],
                                                           p[1], p[2]));
  }
  // Every path runs before any is timed: a process's first teleports pay for
  // allocations and thread start-up that later ones do not, and one warm-up
  // per path left the first case measured cold.
  for (int warm = 0; warm < 2; ++warm) {
    time_teleport(scaling, teleport::Method::kClosedForm, model, 1);
    time_teleport(gl, teleport::Method::kClosedForm, model, 1);
    time_teleport(gl, teleport::Method::kAutograd, model, 1);
  }
  const int timed = std::max(3, reps / 2);
  const Timing scaling_t = time_teleport(scaling, teleport::Method::kClosedForm, model, timed);
  const Timing gl_t = time_teleport(gl, teleport::Method::kClosedForm, model, timed);
  const Timing autograd_t = time_teleport(gl, teleport::Method::kAutograd, model, timed);
  // The paper's data-dependent GL(n) on the same widths across LeakyReLU, on
  // the case's batch (autograd; exact while the batch is no larger than each
  // layer's inputs); three timings, it is slow.
  torch::manual_seed(0);
  const auto leaky = mlp(c.widths, Activation::kLeakyReLU, device);
  const Timing data_dependent_t = time_teleport(
      teleport::discover(leaky, teleport::DiscoverOptions().data_dependent(true)).symmetries,
      teleport::Method::kAutograd, leaky, 3);

  std::string name;
  for (size_t i = 0; i < c.widths.size(); ++i) name += (i ? "-" : "") + std::to_string(c.widths[i]);
  return fmt::format(
      R"({{"name": "{}", "width": {}, "batch": {}, "device": "{}", "teleport_steps": {}, )"
      R"("step_ms": {:.4f}, "teleport_ms": {{"closed_form_scaling": {:.4f}, "closed_form_gl": {:.4f}, "autograd": {:.4f}, "data_dependent_gl": {:.4f}}}, )"
      R"("teleport_in_steps": {{"closed_form_scaling": {:.3f}, "closed_form_gl": {:.3f}, "autograd": {:.3f}, "data_dependent_gl": {:.3f}}}, )"
      R"("autograd_over_closed_form_gl": {:.3f}, "off_overhead": {:.4f}}})",
      name, c.widths[1], c.batch, device.str(), teleport_steps, step_s * 1e3,
      scaling_t.seconds * 1e3, gl_t.seconds * 1e3, autograd_t.seconds * 1e3,
      data_dependent_t.seconds * 1e3, scaling_t.in_steps, gl_t.in_steps, autograd_t.in_steps,
      data_dependent_t.in_steps, autograd_t.seconds / gl_t.seconds, off_overhead);
}

// A training step of one of the example's networks (examples/common/models.h)
// at `batch`, against a closed-form teleport of all the symmetries it declares
// from .grad, each teleport timed right after a step; `key` names the timing
// (closed_form_scaling, or closed_form_gl where some group is GL).
template <typename Net>
std::string run_module_case(const std::string& name, const std::string& key, Net model, bool train,
                            int64_t batch, int reps, int teleport_steps, torch::Device device) {
  model->to(device);
  model->train(train);
  const auto x = torch::randn({batch, 1, 28, 28}, torch::TensorOptions(device));
  const auto y = torch::randint(0, 10, {batch}, torch::TensorOptions(device).dtype(torch::kLong));
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(1e-6));
  auto step_seconds = [&] {
    const auto start = std::chrono::steady_clock::now();
    sgd.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    sgd.step();
    if (device.is_cuda()) torch::cuda::synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const auto syms = model->symmetries();
  const auto options = teleport::TeleportOptions().steps(teleport_steps).lr(1e-3).max_growth(1e12);
  std::vector<double> steps, seconds, ratios;
  for (int r = 0; r <= std::max(3, reps); ++r) {
    const double step = step_seconds();
    teleport::detail::Snapshot snapshot(model->parameters());
    const auto start = std::chrono::steady_clock::now();
    teleport::teleport(syms, options);
    if (device.is_cuda()) torch::cuda::synchronize();
    const double t =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    snapshot.restore();
    if (r == 0) continue;  // warm-up
    steps.push_back(step);
    seconds.push_back(t);
    ratios.push_back(t / step);
  }
  return fmt::format(
      R"({{"name": "{}", "batch": {}, "device": "{}", "symmetries": {}, "teleport_steps": {}, )"
      R"("step_ms": {:.4f}, "teleport_ms": {{"{}": {:.4f}}}, )"
      R"("teleport_in_steps": {{"{}": {:.3f}}}}})",
      name, batch, device.str(), syms.size(), teleport_steps, median(steps) * 1e3, key,
      median(seconds) * 1e3, key, median(ratios));
}

// The LibTorch MNIST example's CNN in eval mode (dropout off: it does not
// change the cost), and the example's ResNet in train mode (BatchNorm on the
// batch, as in training).
std::string run_cnn_case(int64_t batch, int reps, int teleport_steps, torch::Device device) {
  torch::manual_seed(0);
  return run_module_case("mnist-cnn", "closed_form_scaling", teleport::examples::Net(),
                         /*train=*/false, batch, reps, teleport_steps, device);
}

std::string run_resnet_case(int64_t batch, int reps, int teleport_steps, torch::Device device) {
  torch::manual_seed(0);
  return run_module_case("mnist-resnet", "closed_form_scaling", teleport::examples::ResNet(),
                         /*train=*/true, batch, reps, teleport_steps, device);
}

// The example's ViT: every attention's query–key and value–output GL(d) per
// head, the feed-forward and the head's scalings.
std::string run_vit_case(int64_t batch, int reps, int teleport_steps, torch::Device device) {
  torch::manual_seed(0);
  return run_module_case("mnist-vit", "closed_form_gl", teleport::examples::ViT(), /*train=*/true,
                         batch, reps, teleport_steps, device);
}

// The published ICLR 2024 code's MNIST teleport setting (side by side with
// bench/published_teleport.py, docs/performance.md): a 784-16-10-10 MLP
// without biases, LeakyReLU(0.1), the data-dependent GL(n) on a 200-image
// batch (uniform in [0, 1]), 10 ascent steps at lr 1e-4; the median teleport.
std::string run_published_case(int reps, torch::Device device) {
  namespace nn = torch::nn;
  torch::manual_seed(0);
  const auto x = torch::rand({200, 784}, torch::TensorOptions(device));
  const auto y = torch::randint(0, 10, {200}, torch::TensorOptions(device).dtype(torch::kLong));
  auto loss_fn = [](const at::Tensor& out, const at::Tensor& target) {
    return torch::nn::functional::cross_entropy(out, target);
  };
  std::vector<double> seconds;
  for (int r = 0; r <= reps; ++r) {
    torch::manual_seed(54321 + r);
    nn::Sequential m(nn::Linear(nn::LinearOptions(784, 16).bias(false)),
                     nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.1)),
                     nn::Linear(nn::LinearOptions(16, 10).bias(false)),
                     nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.1)),
                     nn::Linear(nn::LinearOptions(10, 10).bias(false)));
    m->to(device);
    const teleport::BatchLoss batch(m, x, y, loss_fn);
    const auto syms =
        teleport::discover(m, teleport::DiscoverOptions().data_dependent(true)).symmetries;
    const auto start = std::chrono::steady_clock::now();
    teleport::teleport(syms, teleport::TeleportOptions().steps(10).lr(1e-4), &batch);
    if (device.is_cuda()) torch::cuda::synchronize();
    if (r > 0) {  // the first is a warm-up
      seconds.push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  return fmt::format(
      R"({{"name": "published-mnist-setting", "widths": "784-16-10-10", "batch": 200, "device": "{}", )"
      R"("teleport_steps": 10, "teleport_ms": {{"data_dependent_gl": {:.4f}}}}})",
      device.str(), median(seconds) * 1e3);
}

// The published NeurIPS 2022 code's multi-layer regression, as
// examples/regression.cpp sets it up and teleports it: dims 4,5,6,7,8 (a batch
// of 4, Linear layers without bias, LeakyReLU 0.1), each of the seeds
// n·n·12345 (n < 5), 5 steps of gradient descent at lr 1e-4 on ½||Y − f(X)||²,
// then the teleport (8 ascent steps at lr 1e-7, the example's caps). The
// median over `reps` rounds of the five teleports, as bench/published_teleport.py
// --regression takes it for the published code.
std::string run_regression_case(int reps) {
  namespace nn = torch::nn;
  const std::vector<int64_t> dims = {4, 5, 6, 7, 8};
  auto half_sse = [](const at::Tensor& out, const at::Tensor& target) {
    return 0.5 * (target - out).square().sum();
  };
  const auto options =
      teleport::TeleportOptions().steps(8).lr(1e-7).max_step(1e12).max_growth(1e12).tolerance(1e-4);
  std::vector<double> seconds;
  for (int r = 0; r <= reps; ++r) {
    for (int64_t n = 0; n < 5; ++n) {
      torch::manual_seed(n * n * 12345);
      std::vector<at::Tensor> weights;
      for (size_t i = 0; i + 2 < dims.size(); ++i)
        weights.push_back(torch::rand({dims[i + 2], dims[i + 1]}));
      const at::Tensor x = torch::rand({dims[1], dims[0]}).t().contiguous();
      const at::Tensor y = torch::rand({dims.back(), dims[0]}).t().contiguous();
      nn::Sequential m;
      for (size_t i = 0; i < weights.size(); ++i) {
        auto linear = nn::Linear(nn::LinearOptions(dims[i + 1], dims[i + 2]).bias(false));
        torch::NoGradGuard no_grad;
        linear->weight.copy_(weights[i]);
        m->push_back(linear);
        if (i + 1 < weights.size())
          m->push_back(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.1)));
      }
      torch::optim::SGD sgd(m->parameters(), torch::optim::SGDOptions(1e-4));
      for (int step = 0; step < 5; ++step) {
        sgd.zero_grad();
        half_sse(m->forward(x), y).backward();
        sgd.step();
      }
      const teleport::BatchLoss batch(m, x, y, half_sse);
      const auto syms =
          teleport::discover(m, teleport::DiscoverOptions().linear_gl(true).data_dependent(true))
              .symmetries;
      const auto start = std::chrono::steady_clock::now();
      teleport::teleport(syms, options, &batch);
      if (r > 0) {  // the first round is a warm-up
        seconds.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    }
  }
  return fmt::format(
      R"({{"name": "published-regression-setting", "dims": "4,5,6,7,8", "device": "cpu", )"
      R"("teleport_steps": 8, "teleport_ms": {{"data_dependent_gl": {:.4f}}}}})",
      median(seconds) * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Cost of a teleport against a training step; prints JSON", "teleport-bench"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  std::string device_name = "cpu", widths = "512,1024";
  int64_t batch = 128, cnn_batch = 64, resnet_batch = 128, vit_batch = 128;
  int reps = 20, teleport_steps = 10;
  app.add_option("--device", device_name, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--widths", widths, "hidden widths, one case each (784-W-W-10)");
  app.add_option("--batch", batch, "batch size")->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "repetitions per timing (median)")->check(CLI::PositiveNumber);
  app.add_option("--teleport-steps", teleport_steps, "ascent steps per teleport")
      ->check(CLI::PositiveNumber);
  app.add_option("--cnn-batch", cnn_batch, "batch of the MNIST CNN case (0 = skip it)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--resnet-batch", resnet_batch, "batch of the MNIST ResNet case (0 = skip it)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--vit-batch", vit_batch, "batch of the MNIST ViT case (0 = skip it)")
      ->check(CLI::NonNegativeNumber);
  bool published = true;
  int threads = 0;
  app.add_option("--published", published,
                 "also time the published code's settings: the ICLR 2024 MNIST teleport and the "
                 "NeurIPS 2022 regression (CPU only) (true/false)");
  app.add_option("--threads", threads, "intra-op threads, OpenBLAS's too (0 = LibTorch's default)")
      ->check(CLI::NonNegativeNumber);
  return teleport::examples::run_cli(app, argc, argv, [&] {
    if (device_name == "cuda" && !torch::cuda::is_available()) {
      throw teleport::examples::UsageError("--device cuda: CUDA is not available here");
    }
    const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    if (threads > 0) {
      at::set_num_threads(threads);
      // OpenBLAS (Debian's LibTorch) keeps its own thread pool, sized from
      // OMP_NUM_THREADS at load, which set_num_threads() does not reach.
      using SetThreads = void (*)(int);
      if (auto set =
              reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
        set(threads);
      }
    }
    std::vector<std::string> cases;
    for (int64_t w : parse_list<int64_t>(widths, "--widths")) {
      cases.push_back(run_case({{784, w, w, 10}, batch}, reps, teleport_steps, device));
    }
    if (cnn_batch > 0) cases.push_back(run_cnn_case(cnn_batch, reps, teleport_steps, device));
    if (resnet_batch > 0) {
      cases.push_back(run_resnet_case(resnet_batch, reps, teleport_steps, device));
    }
    if (vit_batch > 0) cases.push_back(run_vit_case(vit_batch, reps, teleport_steps, device));
    if (published) {
      cases.push_back(run_published_case(reps, device));
      if (device.is_cpu()) cases.push_back(run_regression_case(reps));
    }
    fmt::print("{{\"cases\": [\n  {}\n]}}\n", fmt::join(cases, ",\n  "));
    return 0;
  });
}
