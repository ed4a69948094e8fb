// The command-line contract: JSON shape, exit codes, one-line errors,
// determinism, and baseline and teleport runs from the same start.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Result {
  int code;
  std::string output;  // stdout and stderr
};

// A folder of this process's own, so that parallel runs of the suite never
// write over each other's files.
// It is removed when the process ends.
const std::string& scratch() {
  struct Dir {
    std::string path;
    Dir() : path(::testing::TempDir() + "teleport_cli_XXXXXX") {
      if (mkdtemp(path.data()) == nullptr) std::abort();
      path += "/";
    }
    ~Dir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static const Dir dir;
  return dir.path;
}

Result run(const std::string& command) {
  const std::string out = scratch() + "output";
  const int status = std::system((command + " >" + out + " 2>&1").c_str());
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text.str()};
}

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

size_t lines(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// The `"key": [...]` arrays of a JSON text, in order.
std::vector<std::string> arrays(const std::string& json, const std::string& key) {
  std::vector<std::string> out;
  const std::string tag = "\"" + key + "\": [";
  for (size_t at = json.find(tag); at != std::string::npos; at = json.find(tag, at + 1)) {
    out.push_back(json.substr(at + tag.size(), json.find(']', at) - at - tag.size()));
  }
  return out;
}

void expect_run_shape(const std::string& json, const std::vector<std::string>& labels) {
  EXPECT_EQ(json.rfind("{\"config\": {", 0), 0u) << json.substr(0, 80);
  EXPECT_NE(json.find("\"runs\": ["), std::string::npos);
  for (const auto& l : labels) {
    EXPECT_NE(json.find("\"label\": \"" + l + "\""), std::string::npos) << l;
  }
  for (const char* key : {"\"seed\": ", "\"loss\": [", "\"grad_norm_sq\": [", "\"seconds\": [",
                          "\"teleports\": [{\"step\": ", "\"loss_before\": ", "\"loss_after\": ",
                          "\"grad_norm_sq_before\": ", "\"grad_norm_sq_after\": ",
                          "\"rolled_back\": false", "\"exact\": "}) {
    EXPECT_NE(json.find(key), std::string::npos) << key;
  }
}

const std::string kTmp = scratch();

TEST(CliTest, RegressionWritesTheDocumentedJson) {
  // A step cap: the paper's uncapped exact ascent can outrun float32 (docs/reproduction.md).
  const auto r = run(std::string(TELEPORT_REGRESSION) + " --steps 12 --seeds 0 --max-step 0.5 --json " +
                     kTmp + "r.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "r.json");
  expect_run_shape(json, {"sgd", "sgd+teleport"});
  EXPECT_EQ(arrays(json, "loss").size(), 2u);
}

TEST(CliTest, TestFunctionsWriteTheDocumentedJson) {
  const auto r = run(std::string(TELEPORT_TEST_FUNCTIONS) + " --function rosenbrock --start=-1,-1 "
                     "--lr 1e-3 --steps 20 --teleport-at 10 --teleport-lr 0.1 --json " + kTmp + "t.json");
  ASSERT_EQ(r.code, 0) << r.output;
  expect_run_shape(read(kTmp + "t.json"), {"gd", "gd+teleport"});
}

// Tiny IDX files shaped like MNIST, written by the test.
std::string tiny_mnist() {
  const std::string dir = kTmp + "tiny_mnist";
  std::system(("mkdir -p " + dir).c_str());
  std::mt19937 rng(0);
  auto write = [&](const std::string& name, std::vector<uint32_t> shape, bool labels) {
    std::vector<uint8_t> bytes = {0, 0, 0x08, static_cast<uint8_t>(shape.size())};
    size_t count = 1;
    for (uint32_t s : shape) {
      count *= s;
      for (int k = 3; k >= 0; --k) bytes.push_back(static_cast<uint8_t>(s >> (8 * k)));
    }
    for (size_t i = 0; i < count; ++i) bytes.push_back(static_cast<uint8_t>(labels ? rng() % 10 : rng() % 256));
    std::ofstream(dir + "/" + name, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  };
  write("train-images-idx3-ubyte", {96, 28, 28}, false);
  write("train-labels-idx1-ubyte", {96}, true);
  write("t10k-images-idx3-ubyte", {32, 28, 28}, false);
  write("t10k-labels-idx1-ubyte", {32}, true);
  return dir;
}

std::string mnist_command(const std::string& json) {
  return std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
         " --optimizer sgd,adagrad --hidden 16,12 --batch-size 16 --epochs 2 --eval-every 3 "
         "--eval-subset 32 --teleport-every 4 --teleport-lr 1 --max-growth 100 --quiet --json " + json;
}

TEST(CliTest, MnistJsonHasTheSharedShapeAndTestFields) {
  const auto r = run(mnist_command(kTmp + "m1.json"));
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "m1.json");
  expect_run_shape(json, {"sgd", "sgd+teleport", "adagrad", "adagrad+teleport"});
  EXPECT_NE(json.find("\"test_loss\": "), std::string::npos);
  EXPECT_NE(json.find("\"test_accuracy\": "), std::string::npos);
}

// Every optimizer --optimizer names runs, with and without teleport, and its
// teleports are kept (their state carried, not refused).
TEST(CliTest, MnistRunsEveryOptimizer) {
  const std::string all = "sgd,momentum,nesterov,adagrad,rmsprop,adam,adamw";
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() + " --optimizer " + all +
                     " --hidden 16,12 --batch-size 16 --epochs 1 --eval-every 3 --eval-subset 32"
                     " --teleport-every 4 --teleport-lr 1 --max-growth 100 --quiet --json " +
                     kTmp + "all.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "all.json");
  std::vector<std::string> labels;
  std::stringstream names(all);
  for (std::string name; std::getline(names, name, ',');) {
    labels.push_back(name);
    labels.push_back(name + "+teleport");
  }
  expect_run_shape(json, labels);
}

// The CNN of the LibTorch example runs with and without teleport, its
// teleports kept; its config names the model; teleport batches need the MLP.
TEST(CliTest, MnistRunsTheCnn) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                     " --model cnn --optimizer sgd --batch-size 16 --epochs 1 --eval-every 3"
                     " --eval-subset 32 --teleport-every 2 --teleport-lr 1 --quiet --json " +
                     kTmp + "cnn.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "cnn.json");
  expect_run_shape(json, {"sgd", "sgd+teleport"});
  EXPECT_NE(json.find("\"model\": \"cnn\""), std::string::npos);
  const auto usage = run(std::string(TELEPORT_MNIST) + " --model cnn --teleport-batch 64");
  EXPECT_EQ(usage.code, 2) << usage.output;
  EXPECT_EQ(lines(usage.output), 1u) << usage.output;
}

// --objective balance and the on-demand schedule run, and the config says so.
TEST(CliTest, MnistBalanceObjectiveAndOnDemandSchedule) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                     " --optimizer sgd --hidden 16,12 --batch-size 16 --epochs 2 --eval-every 3"
                     " --eval-subset 32 --teleport-every 4 --objective balance --stall-fraction 0.5"
                     " --stall-cooldown 2 --quiet --json " + kTmp + "balance.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "balance.json");
  expect_run_shape(json, {"sgd", "sgd+teleport"});
  EXPECT_NE(json.find("\"objective\": \"balance\""), std::string::npos);
  EXPECT_NE(json.find("\"stall_fraction\": 0.5"), std::string::npos);
  const auto pre = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                       " --optimizer adagrad,adam --hidden 16,12 --batch-size 16 --epochs 1 --eval-every 3"
                       " --eval-subset 32 --teleport-every 2 --objective preconditioned --quiet --json " +
                       kTmp + "pre.json");
  ASSERT_EQ(pre.code, 0) << pre.output;
  EXPECT_NE(read(kTmp + "pre.json").find("\"objective\": \"preconditioned\""), std::string::npos);
}

TEST(CliTest, SameSeedGivesBitIdenticalRunsAndBaselineAndTeleportStartAlike) {
  ASSERT_EQ(run(mnist_command(kTmp + "m2.json")).code, 0);
  ASSERT_EQ(run(mnist_command(kTmp + "m3.json")).code, 0);
  const auto a = arrays(read(kTmp + "m2.json"), "loss");
  const auto b = arrays(read(kTmp + "m3.json"), "loss");
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a, b);
  // The first loss of each pair (same weights, same first batch) is the same.
  for (size_t i = 0; i < a.size(); i += 2) {
    EXPECT_EQ(a[i].substr(0, a[i].find(',')), a[i + 1].substr(0, a[i + 1].find(',')));
  }
  EXPECT_NE(a[0], a[1]);  // and the teleports made a difference after that
}

TEST(CliTest, UsageErrorsExitWithTwoAndOneLine) {
  for (const std::string args : {std::string(TELEPORT_REGRESSION) + " --no-such-flag",
                                 std::string(TELEPORT_REGRESSION) + " --dims 4,x,6",
                                 std::string(TELEPORT_REGRESSION) + " --lr abc",
                                 std::string(TELEPORT_REGRESSION) + " --activation tanh",
                                 std::string(TELEPORT_TEST_FUNCTIONS) + " --start 1,2,3",
                                 std::string(TELEPORT_MNIST) + " --seeds 0,,1",
                                 std::string(TELEPORT_MNIST) + " --optimizer adamax",
                                 std::string(TELEPORT_REGRESSION) + " --max-step inf",
                                 std::string(TELEPORT_REGRESSION) + " --tolerance nan",
                                 std::string(TELEPORT_MNIST) + " --max-growth 1e400",
                                 std::string(TELEPORT_TEST_FUNCTIONS) + " --teleport-lr -1",
                                 std::string(TELEPORT_MNIST) + " --objective flatness",
                                 std::string(TELEPORT_MNIST) + " --objective sharpest"}) {
    const auto r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_EQ(lines(r.output), 1u) << args << "\n" << r.output;
  }
}

// A run whose loss stops being finite ends there and is reported, and a huge
// but finite cap is a valid input, never an overflow error.
TEST(CliTest, DivergingRegressionIsReportedNotAborted) {
  const auto r = run(std::string(TELEPORT_REGRESSION) +
                     " --dims 5,9,11,8,13,3 --lr 1e-4 --steps 20 --seeds 0 --max-step 1e300 --json " +
                     kTmp + "diverged.json");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("diverged: its loss was not finite at step"), std::string::npos) << r.output;
  EXPECT_NE(read(kTmp + "diverged.json").find("\"diverged_at\": "), std::string::npos);
  EXPECT_EQ(read(kTmp + "diverged.json").find("\"diverged_at\": -1"), std::string::npos);
}

TEST(CliTest, CudaWithoutCudaIsAUsageError) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --device cuda --data " + tiny_mnist() +
                     " --optimizer sgd --hidden 8 --max-steps 2 --eval-subset 16 --quiet");
  if (r.code == 0) GTEST_SKIP() << "CUDA is available here";
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--device cuda: CUDA is not available here"), std::string::npos) << r.output;
  EXPECT_EQ(lines(r.output), 1u) << r.output;
}

TEST(CliTest, RuntimeErrorsExitWithOneAndOneLine) {
  const std::string missing = ::testing::TempDir() + "no_such_dir";
  for (const std::string args :
       {std::string(TELEPORT_MNIST) + " --data " + missing + " --quiet",
        std::string(TELEPORT_REGRESSION) + " --steps 3 --json /no/such/dir/out.json"}) {
    const auto r = run(args);
    EXPECT_EQ(r.code, 1) << args << "\n" << r.output;
    EXPECT_EQ(lines(r.output), 1u) << args << "\n" << r.output;
  }
  // A truncated data file.
  const std::string dir = tiny_mnist();
  std::system(("truncate -s 1000 " + dir + "/t10k-images-idx3-ubyte").c_str());
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + dir + " --quiet --max-steps 2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("is truncated"), std::string::npos) << r.output;
}

}  // namespace
