// teleport-bench-distributed: data-parallel training with teleports on 1 and N
// local processes (Gloo): steps per second, teleport seconds, and the bytes a
// teleport sends on each path. Prints JSON (docs/performance.md).
#include <common/cli.h>
#include <teleport/distributed.h>
#include <teleport/teleport.h>

#include <fmt/format.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace {

namespace dist = teleport::distributed;
using teleport::examples::parse_list;
using Clock = std::chrono::steady_clock;

struct Config {
  std::string widths = "784,512,512,10";
  int64_t batch = 128, teleport_batch = 16, steps = 200, every = 20, teleport_steps = 10;
  std::string nprocs = "1,2";
  double timeout = 60;
};

struct Path {
  const char* name;
  bool leaky;  // LeakyReLU and the data-dependent GL(n); ReLU and scalings otherwise
  bool batch;  // a teleport batch (spread over the ranks); .grad otherwise
};
constexpr Path kPaths[] = {
    {"grad", false, false}, {"batch", false, true}, {"data_dependent", true, true}};

torch::nn::Sequential mlp(const std::vector<int64_t>& w, bool leaky) {
  torch::nn::Sequential m;
  for (size_t i = 0; i + 1 < w.size(); ++i) {
    m->push_back(torch::nn::Linear(w[i], w[i + 1]));
    if (i + 2 < w.size()) {
      if (leaky) {
        m->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
      } else {
        m->push_back(torch::nn::ReLU());
      }
    }
  }
  return m;
}

// One path's training on this rank's slices; JSON fields.
std::string train(const Config& c, const Path& path,
                  const std::shared_ptr<dist::ProcessGroup>& group) {
  const auto w = parse_list<int64_t>(c.widths, "--widths");
  const int64_t rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
  auto slice = [&](int64_t n) {
    const int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
    return std::make_pair(lo, hi - lo);
  };
  torch::manual_seed(0);
  auto model = mlp(w, path.leaky);
  const at::Tensor x = torch::randn({c.batch, w.front()});
  const at::Tensor y =
      torch::randint(0, w.back(), {c.batch}, torch::TensorOptions().dtype(torch::kLong));
  const at::Tensor tx = torch::randn({c.teleport_batch, w.front()});
  const at::Tensor ty =
      torch::randint(0, w.back(), {c.teleport_batch}, torch::TensorOptions().dtype(torch::kLong));
  const auto [first, count] = slice(c.batch);
  const auto [tfirst, tcount] = slice(c.teleport_batch);
  const double share = double(count) / c.batch;
  auto loss_fn = [](const at::Tensor& out, const at::Tensor& target) {
    return torch::nn::functional::cross_entropy(out, target);
  };
  double teleport_seconds = 0;
  int64_t teleports = 0, kept = 0;
  teleport::TeleportOptimizer opt(
      model,
      std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.01)),
      teleport::TeleportOptions()
          .every(c.every)
          .steps(c.teleport_steps)
          .lr(path.leaky ? 1e-4 : 1e-2)
          .on_report([&](const teleport::TeleportReport& r) {
            teleport_seconds += r.seconds;
            ++teleports;
            kept += !r.rolled_back;
          }),
      teleport::DiscoverOptions().data_dependent(path.leaky));
  if (path.batch) {
    if (group) opt.set_process_group(group, double(tcount) / c.teleport_batch);
    opt.set_teleport_batch(
        [&, tfirst = tfirst, tcount = tcount] {
          return std::make_pair(tx.narrow(0, tfirst, tcount), ty.narrow(0, tfirst, tcount));
        },
        loss_fn);
  }
  // Bytes: the teleport's own, without the gradient averaging of the loop.
  int64_t averaging_bytes = 0, teleport_bytes = 0;
  auto backward = [&] {
    opt.zero_grad();
    at::Tensor loss = loss_fn(model->forward(x.narrow(0, first, count)), y.narrow(0, first, count));
    loss.backward();
    if (group) {
      const int64_t before = group->bytes();
      dist::average_gradients(model->parameters(), *group, share);
      averaging_bytes += group->bytes() - before;
    }
    return loss;
  };
  const auto start = Clock::now();
  for (int64_t step = 0; step < c.steps; ++step) {
    const int64_t teleports_before = teleports;
    if (!path.leaky) backward();
    averaging_bytes = 0;
    const int64_t before = group ? group->bytes() : 0;
    if (path.leaky) {
      opt.step(backward);  // the data-dependent action needs the closure to refresh .grad
    } else {
      opt.step();
    }
    if (group && teleports > teleports_before) {
      teleport_bytes += group->bytes() - before - averaging_bytes;
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return fmt::format(
      R"({{"path": "{}", "world_size": {}, "steps_per_second": {:.2f}, "teleports": {}, "kept": {}, )"
      R"("teleport_seconds": {:.4f}, "teleport_share": {:.4f}, "bytes_per_teleport": {}}})",
      path.name, world, c.steps / seconds, teleports, kept, teleport_seconds,
      teleport_seconds / seconds, teleports > 0 ? teleport_bytes / teleports : 0);
}

std::string self_path(const char* fallback) {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), n) : std::string(fallback);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Data-parallel training with teleports on 1 and N processes",
               "teleport-bench-distributed"};
  app.option_defaults()->always_capture_default();  // --help shows every default
  Config c;
  std::string worker_out;
  app.add_option("--widths", c.widths, "MLP widths, input first");
  app.add_option("--batch", c.batch, "global batch")->check(CLI::PositiveNumber);
  app.add_option("--teleport-batch", c.teleport_batch, "global teleport batch")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps", c.steps, "training steps per run")->check(CLI::PositiveNumber);
  app.add_option("--every", c.every, "teleport every K steps")->check(CLI::PositiveNumber);
  app.add_option("--teleport-steps", c.teleport_steps, "ascent steps per teleport")
      ->check(CLI::PositiveNumber);
  app.add_option("--nproc", c.nprocs, "process counts, e.g. 1,2");
  app.add_option("--worker-out", worker_out, "(internal) where rank 0 of a launched run writes")
      ->group("");
  return teleport::examples::run_cli(app, argc, argv, [&] {
    parse_list<int64_t>(c.widths, "--widths");
    if (!worker_out.empty()) {  // one rank of a launched run
      const auto where = dist::Rendezvous::from_env();
      if (!where)
        throw teleport::examples::UsageError("--worker-out: expected torchrun's environment");
      auto group = dist::init_process_group(*where, c10::DeviceType::CPU,
                                            std::chrono::milliseconds(int64_t(c.timeout * 1000)));
      std::vector<std::string> rows;
      for (const auto& p : kPaths) rows.push_back(train(c, p, group));
      if (group->rank() == 0)
        std::ofstream(worker_out) << fmt::format("{}", fmt::join(rows, ",\n  "));
      std::fflush(nullptr);
      std::_Exit(0);
    }
    std::vector<std::string> rows;
    for (int64_t n : parse_list<int64_t>(c.nprocs, "--nproc")) {
      if (n == 1) {  // one process, no group: what a user without c10d runs
        for (const auto& p : kPaths) rows.push_back(train(c, p, nullptr));
        continue;
      }
      char tmpl[] = "/tmp/teleport-bench-XXXXXX";
      const int fd = ::mkstemp(tmpl);
      if (fd >= 0) ::close(fd);
      std::vector<std::string> args(argv, argv + argc);
      args[0] = self_path(argv[0]);
      args.push_back("--worker-out");
      args.push_back(tmpl);
      const int code = dist::launch_local(n, args);
      if (code != 0)
        throw std::runtime_error(fmt::format("the {} processes failed (exit code {})", n, code));
      rows.push_back(slurp(tmpl));
      std::remove(tmpl);
    }
    fmt::print(R"({{"widths": "{}", "batch": {}, "teleport_batch": {}, "steps": {}, "every": {}, )"
               R"("teleport_steps": {}, "runs": [
  {}
]}})"
               "\n",
               c.widths, c.batch, c.teleport_batch, c.steps, c.every, c.teleport_steps,
               fmt::join(rows, ",\n  "));
    return 0;
  });
}
