#pragma once
// teleport-mnist on several processes: joining the run torchrun (or any
// launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describes, or
// launching --nproc copies of itself (docs/design.md §10).

#include <common/cli.h>
#include <common/mnist_config.h>
#include <common/training.h>
#if defined(TELEPORT_HAVE_DISTRIBUTED)
#include <teleport/distributed.h>
#endif

#include <fmt/format.h>
#include <torch/cuda.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace teleport::examples {

#if defined(TELEPORT_HAVE_DISTRIBUTED)
// Every rank must run the same command: a hash of the config, compared by an
// all-reduce of (h, -h) under max, which leaves both unchanged only when every
// rank has h.
inline void check_same_config(teleport::distributed::ProcessGroup& group, const Config& c,
                              torch::Device device) {
  const std::string text = json_object(config_fields(c, "", group.world_size()));
  const int64_t h = static_cast<int64_t>(std::hash<std::string>{}(text) >> 1);
  at::Tensor t = torch::tensor({h, -h}, torch::TensorOptions().dtype(torch::kLong)).to(device);
  group.all_reduce_max(t);
  const at::Tensor host = t.cpu();
  if (host[0].item<int64_t>() != h || host[1].item<int64_t>() != -h) {
    throw UsageError(
        "the ranks were started with different options; every rank must run the "
        "same command");
  }
}

inline std::string self_path(const char* fallback) {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), n) : std::string(fallback);
}
#endif

// A rank's runtime error may be the echo of a peer killed by a signal (its
// collective failed). Under the --nproc launcher, which names such a peer and
// stops the others at once, a rank waits a moment before speaking, so that
// the launcher's line is the only one.
inline void pause_under_launcher() {
  if (std::getenv("TELEPORT_LAUNCHER_PID") != nullptr) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

// Joins the data-parallel run the environment (torchrun) describes, or starts
// --nproc processes of this command and waits for them (launched = true), or
// does neither. Returns the launched processes' exit code when it launched.
inline int join_or_launch(const Config& c, int argc, char** argv, Cluster& cl,
                          torch::Device& device, bool& launched) {
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
    const int code =
        dist::launch_local(c.nproc, args, dist::LaunchOptions().log([](const std::string& line) {
          fmt::print(stderr, "teleport-mnist: {}\n", line);
        }));
    return code == 0 || code == 2 ? code : 1;
  }
  if (c.nproc > 0 && c.nproc != where->world_size) {
    throw UsageError(
        fmt::format("--nproc {} disagrees with WORLD_SIZE={} (launched by torchrun, "
                    "leave --nproc out)",
                    c.nproc, where->world_size));
  }
  if (device.is_cuda()) {
    const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
    if (where->world_size > gpus) {  // NCCL refuses two ranks on one GPU
      throw UsageError(
          fmt::format("--device cuda: NCCL needs a GPU per rank; {} ranks, {} GPU(s) "
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
    throw UsageError(
        "this build of teleport has no c10d (configure with TELEPORT_DISTRIBUTED=ON "
        "where LibTorch ships it and Gloo's headers are installed)");
  }
#endif
  (void)cl;
  return 0;
}

}  // namespace teleport::examples
