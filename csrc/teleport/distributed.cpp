#include <teleport/distributed.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(TELEPORT_WITH_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>

extern char** environ;

namespace teleport {
namespace distributed {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

int64_t env_int(const char* name, int64_t low, int64_t high) {
  const char* v = env(name);
  TORCH_CHECK(v != nullptr, "distributed: expected the environment variable ", name,
              " to be set, got nothing");
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  TORCH_CHECK(errno == 0 && end != v && *end == '\0' && x >= low && x <= high,
              "distributed: expected ", name, " to be an integer in [", low, ", ", high, "], got '",
              v, "'");
  return x;
}

// The buckets of all_reduce_sum: runs of tensors of one dtype and device
// holding at most `limit` bytes (a larger tensor is a bucket of its own).
std::vector<std::vector<size_t>> buckets(const std::vector<at::Tensor>& tensors, int64_t limit) {
  std::vector<std::vector<size_t>> out;
  int64_t bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t n = static_cast<int64_t>(t.numel() * t.element_size());
    const bool fits = !out.empty() && bytes + n <= limit &&
                      tensors[out.back().front()].scalar_type() == t.scalar_type() &&
                      tensors[out.back().front()].device() == t.device();
    if (!fits) {
      out.emplace_back();
      bytes = 0;
    }
    out.back().push_back(i);
    bytes += n;
  }
  return out;
}

}  // namespace

std::optional<Rendezvous> Rendezvous::from_env() {
  if (env("RANK") == nullptr && env("WORLD_SIZE") == nullptr) return std::nullopt;
  Rendezvous r;
  r.world_size = env_int("WORLD_SIZE", 1, 1 << 20);
  TORCH_CHECK(env("RANK") != nullptr,
              "distributed: WORLD_SIZE is set but RANK is not; set both (torchrun does)");
  r.rank = env_int("RANK", 0, std::numeric_limits<int32_t>::max());
  TORCH_CHECK(r.rank < r.world_size, "distributed: expected RANK in [0, ", r.world_size,
              ") for WORLD_SIZE=", r.world_size, ", got ", r.rank);
  r.local_rank = env("LOCAL_RANK") != nullptr ? env_int("LOCAL_RANK", 0, r.world_size - 1) : r.rank;
  if (const char* addr = env("MASTER_ADDR")) r.master_addr = addr;
  if (env("MASTER_PORT") != nullptr) r.master_port = env_int("MASTER_PORT", 1, 65535);
  if (const char* agent = env("TORCHELASTIC_USE_AGENT_STORE")) {
    r.store_by_launcher = std::string(agent) == "True" || std::string(agent) == "1";
  }
  if (const char* restarts = env("TORCHELASTIC_RESTART_COUNT")) {
    r.prefix += std::string("/") + restarts;
  }
  return r;
}

void ProcessGroup::set_bucket_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "ProcessGroup: expected a positive bucket size, got ", bytes);
  bucket_bytes_ = bytes;
}

void ProcessGroup::all_reduce(std::vector<at::Tensor>& flat, c10d::ReduceOp op) {
  for (const auto& t : flat) bytes_ += static_cast<int64_t>(t.numel() * t.element_size());
  all_reduce_(flat, op);
}

void ProcessGroup::all_reduce_sum(std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return;
  for (const auto& bucket : buckets(tensors, bucket_bytes_)) {
    std::vector<at::Tensor> parts;
    for (size_t i : bucket) parts.push_back(tensors[i].reshape({-1}));
    std::vector<at::Tensor> flat = {parts.size() == 1 ? parts.front().contiguous().clone()
                                                      : at::cat(parts)};
    all_reduce(flat, c10d::ReduceOp::SUM);
    int64_t offset = 0;
    for (size_t i : bucket) {
      at::Tensor& t = tensors[i];
      const int64_t n = t.numel();
      const at::Tensor summed = flat.front().narrow(0, offset, n).view(t.sizes());
      if (t.requires_grad()) {
        t = summed.clone();  // a leaf of autograd cannot be written in place
      } else {
        t.copy_(summed);
      }
      offset += n;
    }
  }
}

void ProcessGroup::all_reduce_max(at::Tensor& tensor) {
  std::vector<at::Tensor> one = {tensor.contiguous()};
  all_reduce(one, c10d::ReduceOp::MAX);
  if (!one.front().is_same(tensor)) tensor.copy_(one.front());
}

at::Tensor ProcessGroup::all_gather_rows(const at::Tensor& rows, int64_t& first_row) {
  TORCH_CHECK(rows.dim() >= 1, "all_gather_rows: expected at least one dimension, got a scalar");
  // The row counts first (they may differ), then equal-sized, padded blocks.
  at::Tensor counts = at::zeros({size_}, rows.options().dtype(at::kLong));
  counts[rank_] = rows.size(0);
  std::vector<at::Tensor> c = {counts};
  all_reduce(c, c10d::ReduceOp::SUM);
  const at::Tensor host = c.front().cpu();
  const int64_t* n = host.data_ptr<int64_t>();
  int64_t most = 0;
  first_row = 0;
  for (int64_t r = 0; r < size_; ++r) {
    most = std::max(most, n[r]);
    if (r < rank_) first_row += n[r];
  }
  at::Tensor padded = rows.detach().contiguous();
  if (rows.size(0) < most) {
    std::vector<int64_t> shape = rows.sizes().vec();
    shape[0] = most - rows.size(0);
    padded = at::cat({padded, at::zeros(shape, rows.options())});
  }
  std::vector<at::Tensor> in = {padded};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < size_; ++r) out[0].push_back(at::empty_like(padded));
  bytes_ += static_cast<int64_t>(padded.numel() * padded.element_size());
  all_gather_(out, in);
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < size_; ++r) parts.push_back(out[0][r].narrow(0, 0, n[r]));
  return at::cat(parts);
}

namespace {
// LibTorch 2.x's TCPStoreOptions asks for the libuv backend by default, which
// builds without libuv (Debian's) refuse at the rendezvous; the classic
// backend is in every build. 1.x has no such field.
template <typename Options>
auto without_libuv(Options& o, int) -> decltype(o.useLibUV = false, void()) {
  o.useLibUV = false;
}
template <typename Options>
void without_libuv(Options&, long) {}

// A rank that launch_local started dies with its launcher, even one killed by
// SIGKILL that can forward nothing: a parent-death signal, and a check that
// the launcher was not gone before it was set.
void die_with_launcher() {
  const char* launcher = std::getenv("TELEPORT_LAUNCHER_PID");
  if (launcher == nullptr) return;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != static_cast<pid_t>(std::atol(launcher))) std::_Exit(1);
}

// The polite signals a launcher forwards to its ranks.
volatile std::sig_atomic_t launcher_signal = 0;
extern "C" void note_launcher_signal(int sig) { launcher_signal = sig; }

// Handlers for SIGTERM, SIGINT and SIGHUP for one launch, the old ones put back after.
class ForwardedSignals {
 public:
  ForwardedSignals() {
    launcher_signal = 0;
    struct sigaction action {};
    action.sa_handler = note_launcher_signal;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &action, &old_[i]);
  }
  ~ForwardedSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &old_[i], nullptr);
  }
  ForwardedSignals(const ForwardedSignals&) = delete;
  ForwardedSignals& operator=(const ForwardedSignals&) = delete;

 private:
  static constexpr std::array<int, 3> kSignals = {SIGTERM, SIGINT, SIGHUP};
  std::array<struct sigaction, 3> old_{};
};
}  // namespace

std::shared_ptr<ProcessGroup> init_process_group(const Rendezvous& where, c10::DeviceType device,
                                                 std::chrono::milliseconds timeout) {
  TORCH_CHECK(where.world_size >= 1 && where.rank >= 0 && where.rank < where.world_size,
              "init_process_group: expected 0 <= rank < world_size, got rank ", where.rank, " of ",
              where.world_size);
  die_with_launcher();
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(where.master_port);
  options.isServer = where.rank == 0 && !where.store_by_launcher;
  if (options.isServer) options.numWorkers = static_cast<std::size_t>(where.world_size);
  options.waitWorkers = false;
  options.timeout = timeout;
  without_libuv(options, 0);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(where.master_addr, options);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "init_process_group: rank ", where.rank, " could not reach the store at ",
                where.master_addr, ":", where.master_port, " within ", timeout.count(),
                " ms: ", e.what());
  }
  store = c10::make_intrusive<c10d::PrefixStore>(where.prefix, store);
  if (device == c10::DeviceType::CUDA) {
#if defined(TELEPORT_WITH_NCCL)
    auto nccl = c10d::ProcessGroupNCCL::Options::create();
    nccl->timeout = timeout;
    return std::make_shared<ProcessGroup>(c10::make_intrusive<c10d::ProcessGroupNCCL>(
        store, static_cast<int>(where.rank), static_cast<int>(where.world_size), nccl));
#else
    TORCH_CHECK(false,
                "init_process_group: this build of teleport has no NCCL (LibTorch without "
                "CUDA); run on the CPU with Gloo");
#endif
  }
  TORCH_CHECK(device == c10::DeviceType::CPU,
              "init_process_group: expected a CPU or CUDA device, got ", device);
  auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
  const bool local = where.master_addr == "127.0.0.1" || where.master_addr == "localhost";
  gloo->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                : c10d::ProcessGroupGloo::createDefaultDevice());
  return std::make_shared<ProcessGroup>(c10::make_intrusive<c10d::ProcessGroupGloo>(
      store, static_cast<int>(where.rank), static_cast<int>(where.world_size), gloo));
}

void average_gradients(const std::vector<at::Tensor>& parameters, Collectives& group,
                       double share) {
  if (share < 0) share = 1.0 / static_cast<double>(group.world_size());
  TORCH_CHECK(share <= 1,
              "average_gradients: expected this rank's share of the global batch in "
              "[0, 1], got ",
              share);
  std::vector<at::Tensor> grads;
  for (const auto& p : parameters) {
    TORCH_CHECK(p.grad().defined(),
                "average_gradients: expected every parameter to have a "
                "gradient, got none for one of shape ",
                p.sizes());
    grads.push_back(p.grad());
  }
  {
    at::NoGradGuard no_grad;
    for (auto& g : grads) g.mul_(share);
  }
  group.all_reduce_sum(grads);
}

namespace {

// The environment of one launched process: ours without the variables we set.
std::vector<std::string> environment_for(
    const std::vector<std::pair<std::string, std::string>>& set,
    const std::vector<std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    bool replaced = false;
    for (const auto& kv : set) replaced = replaced || entry.rfind(kv.first + "=", 0) == 0;
    if (!replaced) out.push_back(entry);
  }
  for (const auto& kv : set) out.push_back(kv.first + "=" + kv.second);
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

int launch_local(int64_t nproc, const std::vector<std::string>& argv,
                 const LaunchOptions& options) {
  using Clock = std::chrono::steady_clock;
  TORCH_CHECK(nproc >= 1, "launch_local: expected at least one process, got ", nproc);
  TORCH_CHECK(!argv.empty(), "launch_local: expected a program to run, got an empty argv");
  // The store the processes meet at, as torchrun's agent hosts it.
  c10d::TCPStoreOptions store_options;
  store_options.port = 0;  // any free port
  store_options.isServer = true;
  store_options.waitWorkers = false;
  without_libuv(store_options, 0);
  const auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", store_options);
  const std::string port = std::to_string(store->getPort());

  std::vector<pid_t> pids;
  auto signal_all = [&](int sig) {
    for (pid_t pid : pids) {
      if (pid > 0) ::kill(pid, sig);
    }
  };
  // As torchrun: one intra-op thread per process unless the user chose.
  std::vector<std::string> extra = options.env();
  if (std::getenv("OMP_NUM_THREADS") == nullptr && nproc > 1) {
    extra.insert(extra.begin(), "OMP_NUM_THREADS=1");
  }
  extra.push_back("TELEPORT_LAUNCHER_PID=" + std::to_string(::getpid()));
  const ForwardedSignals forwarding;
  for (int64_t rank = 0; rank < nproc; ++rank) {
    std::vector<std::string> env = environment_for({{"RANK", std::to_string(rank)},
                                                    {"LOCAL_RANK", std::to_string(rank)},
                                                    {"WORLD_SIZE", std::to_string(nproc)},
                                                    {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
                                                    {"MASTER_ADDR", "127.0.0.1"},
                                                    {"MASTER_PORT", port},
                                                    {"TORCHELASTIC_USE_AGENT_STORE", "True"}},
                                                   extra);
    std::vector<std::string> args = argv;
    auto c_args = c_strings(args);
    auto c_env = c_strings(env);
    pid_t pid = 0;
    const int err =
        posix_spawn(&pid, args[0].c_str(), nullptr, nullptr, c_args.data(), c_env.data());
    if (err != 0) {
      signal_all(SIGKILL);
      for (pid_t p : pids) ::waitpid(p, nullptr, 0);
      TORCH_CHECK(false, "launch_local: could not start ", args[0], ": ", std::strerror(err));
    }
    pids.push_back(pid);
  }

  const std::vector<pid_t> pid_of = pids;  // by rank (pids marks the reaped)
  int result = 0;
  int64_t running = nproc;
  const auto start = Clock::now();
  std::optional<Clock::time_point> kill_at;  // set once a process failed
  bool forwarded = false;                    // a polite signal passed on to every rank
  while (running > 0) {
    bool reaped = false;
    for (auto& p : pids) {
      int status = 0;
      if (p <= 0 || ::waitpid(p, &status, WNOHANG) != p) continue;
      p = -1;
      --running;
      reaped = true;
      const int code = exit_code(status);
      if (code != 0 && result == 0) {
        result = code;
        kill_at = Clock::now() + options.grace();
        if (WIFSIGNALED(status) && !forwarded) {  // a death no one here caused
          const int sig = WTERMSIG(status);
          if (options.log()) {
            options.log()(c10::str("rank ", &p - pids.data(), " (pid ", pid_of[&p - pids.data()],
                                   ") was killed by signal ", sig, " (", ::strsignal(sig), ")"));
          }
          signal_all(SIGTERM);
        }
      }
    }
    if (reaped) continue;
    const auto now = Clock::now();
    if (const int sig = launcher_signal; sig != 0 && !forwarded) {
      forwarded = true;
      signal_all(sig);
      if (result == 0) result = 128 + sig;
      if (!kill_at) kill_at = now + options.grace();
    }
    if (options.deadline().count() > 0 && now - start > options.deadline() && result != 124) {
      result = 124;
      signal_all(SIGKILL);
    }
    if (kill_at && now > *kill_at) signal_all(SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return result;
}

}  // namespace distributed
}  // namespace teleport
