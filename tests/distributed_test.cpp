// Data-parallel teleports on c10d (docs/design.md §10). Each test launches this
// executable as worker processes (launch_local, Gloo on the loopback
// interface), which train and write what they saw into a folder; the test
// compares. The workers' training loop is the one a user writes.

#include "test_util.h"

#include <teleport/distributed.h>

#include <torch/optim/sgd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include <stdlib.h>
#include <unistd.h>

namespace teleport::testing {
namespace {

namespace dist = teleport::distributed;

// What a worker runs, from TELEPORT_TEST_WORKER=name:path:dtype:die_at.
struct Scenario {
  // "grad", "batch" (closed form), "data_dependent", "look_ahead" or "flatness"
  std::string path;
  torch::Dtype dtype = torch::kFloat;
  int64_t die_at = -1;  // rank 1 exits there
  int64_t steps = 200;
};

constexpr int64_t kGlobalBatch = 24;
constexpr int64_t kTeleportBatch = 8;  // within the data-dependent rank condition

struct Trajectory {
  std::vector<double> losses;  // the global batch's loss before each step
  std::vector<at::Tensor> parameters;
  int64_t kept = 0;  // teleports kept
};

// Trains on rows [first, first + count) of every global batch of a fixed
// data set, teleporting every 20 steps; `group` null: one process.
Trajectory train(const Scenario& s, const std::shared_ptr<dist::ProcessGroup>& group) {
  const auto opts = torch::TensorOptions().dtype(s.dtype);
  const int64_t rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
  const bool leaky = s.path == "data_dependent";
  auto model = make_mlp({10, 16, 12, 3}, leaky ? Act::kLeakyReLU : Act::kReLU, true, opts, 3);
  torch::manual_seed(4);
  const at::Tensor x = torch::randn({240, 10}, opts), y = torch::randn({240, 3}, opts);
  // This rank's rows of a global batch of n starting at `start`.
  auto slice = [&](int64_t start, int64_t n) {
    const int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
    return std::make_pair(start + lo, hi - lo);
  };
  TeleportOptimizer opt(
      model,
      std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05)),
      TeleportOptions()
          .every(20)
          .steps(4)
          .lr(leaky ? 1e-3 : 0.05)
          .objective(s.path == "look_ahead" ? Objective::kLookAhead
                     : s.path == "flatness" ? Objective::kFlatness
                                            : Objective::kGradNorm)
          .flatness_radius(0.3),
      DiscoverOptions().data_dependent(leaky));
  int64_t tstep = 0;
  if (s.path == "unaveraged") {
    if (group) opt.set_process_group(group);
  } else if (s.path != "grad") {
    const auto [first, count] = slice(0, kTeleportBatch);
    if (group) opt.set_process_group(group, static_cast<double>(count) / kTeleportBatch);
    opt.set_teleport_batch(
        [&, first = first, count = count] {
          const int64_t at = (tstep++ * kTeleportBatch) % 200 + first;
          return std::make_pair(x.narrow(0, at, count), y.narrow(0, at, count));
        },
        mse());
  }
  Trajectory run;
  for (int64_t step = 0; step < s.steps; ++step) {
    if (step == s.die_at && rank == 1) std::_Exit(3);
    const auto [first, count] = slice((step * kGlobalBatch) % 240, kGlobalBatch);
    const double share = static_cast<double>(count) / kGlobalBatch;
    auto closure = [&] {
      opt.zero_grad();
      at::Tensor loss = mse()(model->forward(x.narrow(0, first, count)), y.narrow(0, first, count));
      loss.backward();
      if (group && s.path != "unaveraged")
        dist::average_gradients(model->parameters(), *group, share);
      return loss;
    };
    at::Tensor loss = opt.step(closure);
    std::vector<at::Tensor> global = {loss.detach() * share};
    if (group) group->all_reduce_sum(global);
    run.losses.push_back(global[0].item<double>());
    if (opt.last_report() != nullptr && opt.last_report()->step == step &&
        !opt.last_report()->rolled_back) {
      ++run.kept;
    }
  }
  run.parameters = clone_all(model->parameters());
  return run;
}

Scenario parse(const std::string& spec) {
  Scenario s;
  std::stringstream in(spec);
  std::string dtype, die_at, steps;
  std::getline(in, s.path, ':');
  std::getline(in, dtype, ':');
  std::getline(in, die_at, ':');
  std::getline(in, steps, ':');
  s.dtype = dtype == "float64" ? torch::kDouble : torch::kFloat;
  s.die_at = std::stoll(die_at);
  s.steps = std::stoll(steps);
  return s;
}

// The worker: trains and writes out/rank<r>.bin (parameters' bytes) and
// out/rank<r>.txt (losses, then the number of kept teleports).
int worker(const std::string& spec, const std::string& out) {
  try {
    const auto where = dist::Rendezvous::from_env();
    TORCH_CHECK(where.has_value(), "worker: expected RANK and WORLD_SIZE");
    auto group = dist::init_process_group(*where, c10::DeviceType::CPU, std::chrono::seconds(10));
    const Trajectory run = train(parse(spec), group);
    const std::string base = out + "/rank" + std::to_string(where->rank);
    std::ofstream bin(base + ".bin", std::ios::binary), txt(base + ".txt");
    for (const auto& p : run.parameters) {
      const at::Tensor c = p.contiguous();
      bin.write(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
    }
    txt.precision(17);
    for (double l : run.losses) txt << l << "\n";
    txt << run.kept << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::ofstream(out + "/error.txt", std::ios::app) << e.what() << "\n";
    return 1;
  }
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<double> numbers(const std::string& path) {
  std::ifstream in(path);
  std::vector<double> out;
  for (double v; in >> v;) out.push_back(v);
  return out;
}

std::string self_path() {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), n) : std::string();
}

struct Launched {
  int code;
  double seconds;
  std::string dir;
};

// Runs `spec` on `nproc` worker processes, killed after 60 s; after one
// failed, the others get `grace` to end by themselves.
Launched launch(const std::string& spec, int64_t nproc,
                std::chrono::seconds grace = std::chrono::seconds(2)) {
  char tmpl[] = "/tmp/teleport-dist-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  EXPECT_NE(dir, nullptr);
  const auto start = std::chrono::steady_clock::now();
  const int code = dist::launch_local(
      nproc, {self_path()},
      dist::LaunchOptions()
          .deadline(std::chrono::seconds(60))
          .grace(grace)
          .env({"TELEPORT_TEST_WORKER=" + spec, std::string("TELEPORT_TEST_OUT=") + dir}));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {code, seconds, dir};
}

void remove_dir(const std::string& dir) {
  for (const char* f : {"rank0.bin", "rank1.bin", "rank0.txt", "rank1.txt", "error.txt"}) {
    std::remove((dir + "/" + f).c_str());
  }
  ::rmdir(dir.c_str());
}

// Replicas stay bitwise identical: `.grad` averaged, every teleport the same.
void expect_identical_replicas(const std::string& path) {
  const Launched l = launch(path + ":float32:-1:200", 2);
  ASSERT_EQ(l.code, 0) << slurp(l.dir + "/error.txt");
  const std::string a = slurp(l.dir + "/rank0.bin"), b = slurp(l.dir + "/rank1.bin");
  EXPECT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the replicas' parameters differ after 200 steps";
  const auto losses = numbers(l.dir + "/rank0.txt");
  ASSERT_EQ(losses.size(), 201u);
  EXPECT_GT(losses.back(), 0) << "no teleport was kept: the test would prove nothing";
  remove_dir(l.dir);
}

TEST(Distributed, ReplicasStayBitwiseIdenticalTeleportingFromAveragedGrad) {
  expect_identical_replicas("grad");
}

TEST(Distributed, ReplicasStayBitwiseIdenticalTeleportingFromASpreadBatch) {
  expect_identical_replicas("batch");
}

TEST(Distributed, ReplicasStayBitwiseIdenticalWithDataDependentTeleports) {
  expect_identical_replicas("data_dependent");
}

TEST(Distributed, ReplicasStayBitwiseIdenticalWithLookAheadAndFlatnessTeleports) {
  expect_identical_replicas("look_ahead");
  expect_identical_replicas("flatness");
}

// Two processes follow one at the same global batch, teleports included.
// Ranks whose .grad differs (the user averaged nothing) are refused at the
// first teleport, on every rank, with a clear error: no hang, no silent
// divergence of the replicas.
TEST(Distributed, GradientsThatDifferBetweenRanksAreRefusedOnEveryRank) {
  const Launched l = launch("unaveraged:float32:-1:30", 2, std::chrono::seconds(20));
  EXPECT_NE(l.code, 0);
  EXPECT_LT(l.seconds, 30) << "the ranks hung";
  const std::string errors = slurp(l.dir + "/error.txt");
  size_t count = 0;
  for (size_t at = errors.find("expected the same .grad on every rank"); at != std::string::npos;
       at = errors.find("expected the same .grad on every rank", at + 1)) {
    ++count;
  }
  EXPECT_EQ(count, 2u) << errors;
  remove_dir(l.dir);
}

TEST(Distributed, TwoProcessesFollowOneInFloat64) {
  for (const std::string path : {"batch", "data_dependent", "look_ahead", "flatness"}) {
    Scenario s = parse(path + ":float64:-1:100");
    const Trajectory one = train(s, nullptr);
    ASSERT_GT(one.kept, 0) << path << ": no teleport was kept; the test would prove nothing";
    const Launched l = launch(path + ":float64:-1:100", 2);
    ASSERT_EQ(l.code, 0) << slurp(l.dir + "/error.txt");
    const auto two = numbers(l.dir + "/rank0.txt");
    ASSERT_EQ(two.size(), one.losses.size() + 1);
    EXPECT_EQ(static_cast<int64_t>(two.back()), one.kept) << path;
    double worst = 0;
    for (size_t i = 0; i < one.losses.size(); ++i) {
      worst = std::max(worst, std::abs(two[i] - one.losses[i]) / std::abs(one.losses[i]));
    }
    EXPECT_LT(worst, 1e-9) << path << ": largest relative loss difference over 100 steps";
    remove_dir(l.dir);
  }
}

// A rank that dies ends the others with an error of their own, within the
// timeout (10 s; the launcher would wait 40 s before killing them).
TEST(Distributed, ARankThatDiesEndsTheOthersWithinTheTimeout) {
  const Launched l = launch("data_dependent:float32:50:200", 2, std::chrono::seconds(40));
  EXPECT_EQ(l.code, 3);  // the first failure's exit code: rank 1's
  EXPECT_LT(l.seconds, 20);
  EXPECT_FALSE(slurp(l.dir + "/error.txt").empty()) << "rank 0 did not fail by itself";
  remove_dir(l.dir);
}

TEST(Distributed, RendezvousFromEnvRefusesInconsistentValues) {
  auto with_env = [](std::vector<std::pair<const char*, const char*>> vars) {
    for (const char* v : {"RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"}) ::unsetenv(v);
    for (const auto& kv : vars) ::setenv(kv.first, kv.second, 1);
    std::string error = error_of([] { dist::Rendezvous::from_env(); });
    for (const auto& kv : vars) ::unsetenv(kv.first);
    return error;
  };
  EXPECT_NE(with_env({{"RANK", "2"}, {"WORLD_SIZE", "2"}}).find("expected RANK in [0, 2)"),
            std::string::npos);
  EXPECT_NE(with_env({{"RANK", "0"}}).find("WORLD_SIZE"), std::string::npos);
  EXPECT_NE(with_env({{"RANK", "0"}, {"WORLD_SIZE", "two"}}).find("got 'two'"), std::string::npos);
  EXPECT_NE(
      with_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_PORT", "70000"}}).find("MASTER_PORT"),
      std::string::npos);
  EXPECT_EQ(with_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}}), "");
  EXPECT_FALSE(dist::Rendezvous::from_env().has_value());
}

}  // namespace
}  // namespace teleport::testing

int main(int argc, char** argv) {
  if (const char* spec = std::getenv("TELEPORT_TEST_WORKER")) {
    const char* out = std::getenv("TELEPORT_TEST_OUT");
    // Out without exit handlers: the process group's threads may still hold
    // memory the leak checker of a sanitizer build would report.
    const int code = teleport::testing::worker(spec, out != nullptr ? out : ".");
    std::fflush(nullptr);
    std::_Exit(code);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
