// The command-line contract: JSON shape, exit codes, one-line errors,
// determinism, and baseline and teleport runs from the same start.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
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
  const auto r = run(std::string(TELEPORT_REGRESSION) +
                     " --steps 12 --seeds 0 --max-step 0.5 --json " + kTmp + "r.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "r.json");
  expect_run_shape(json, {"sgd", "sgd+teleport"});
  EXPECT_EQ(arrays(json, "loss").size(), 2u);
}

TEST(CliTest, TestFunctionsWriteTheDocumentedJson) {
  const auto r = run(std::string(TELEPORT_TEST_FUNCTIONS) +
                     " --function rosenbrock --start=-1,-1 "
                     "--lr 1e-3 --steps 20 --teleport-at 10 --teleport-lr 0.1 --json " +
                     kTmp + "t.json");
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
    for (size_t i = 0; i < count; ++i)
      bytes.push_back(static_cast<uint8_t>(labels ? rng() % 10 : rng() % 256));
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
         "--eval-subset 32 --teleport-every 4 --teleport-lr 1 --max-growth 100 --quiet --json " +
         json;
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
  const auto r =
      run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() + " --optimizer " + all +
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

// Every custom-Module model runs with and without teleport through
// step(closure) (the CNN's dropout masks, the ResNet's BatchNorm statistics,
// the ViT's attention groups), its teleports kept; its config names the model
// (and, for the ViT, its default objective grad_norm); the flags of the MLP
// and objectives the model's groups do not allow are refused.
TEST(CliTest, MnistRunsTheCustomModels) {
  struct Case {
    std::string model, flags, objective, schedule;
    std::vector<std::string> refused;
  };
  const std::vector<Case> cases = {
      {"cnn",
       " --optimizer sgd --teleport-lr 1",
       "balance",
       "\"lr_schedule\": \"constant\", \"warmup\": 0",
       {" --teleport-batch 64"}},
      {"resnet",
       " --optimizer momentum",
       "balance",
       "\"lr_schedule\": \"cosine\", \"warmup\": 0",
       {" --hidden 32", " --teleport-batch 64"}},
      {"vit",
       " --optimizer adam",
       "grad_norm",
       "\"lr_schedule\": \"cosine\", \"warmup\": 200",
       {" --hidden 32", " --objective balance", " --objective preconditioned"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.model);
    const std::string file = kTmp + c.model + ".json";
    const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() + " --model " +
                       c.model + c.flags +
                       " --batch-size 16 --epochs 1 --eval-every 3 --eval-subset 32"
                       " --teleport-every 2 --quiet --json " +
                       file);
    ASSERT_EQ(r.code, 0) << r.output;
    const auto json = read(file);
    const std::string optimizer = c.flags.substr(c.flags.find("--optimizer ") + 12);
    const std::string label = optimizer.substr(0, optimizer.find(' '));
    expect_run_shape(json, {label, label + "+teleport"});
    EXPECT_NE(json.find("\"model\": \"" + c.model + "\""), std::string::npos);
    EXPECT_NE(json.find("\"objective\": \"" + c.objective + "\""), std::string::npos);
    EXPECT_NE(json.find(c.schedule), std::string::npos) << c.schedule;
    EXPECT_NE(json.find("\"rolled_back\": false"), std::string::npos) << "no teleport was kept";
    // The controls run on every model's groups, their teleports kept.
    for (const std::string control : {"random", "state_only"}) {
      const std::string out = kTmp + c.model + "-" + control + ".json";
      const auto r2 = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() + " --model " +
                          c.model + c.flags +
                          " --batch-size 16 --epochs 1 --eval-every 3 --eval-subset 32"
                          " --teleport-every 2 --no-baseline --quiet --objective " +
                          control + " --json " + out);
      ASSERT_EQ(r2.code, 0) << control << "\n" << r2.output;
      const auto control_json = read(out);
      EXPECT_NE(control_json.find("\"objective\": \"" + control + "\""), std::string::npos);
      EXPECT_NE(control_json.find("\"rolled_back\": false"), std::string::npos)
          << "no " << control << " teleport was kept";
    }
    for (const auto& flag : c.refused) {
      const auto usage = run(std::string(TELEPORT_MNIST) + " --model " + c.model + flag);
      EXPECT_EQ(usage.code, 2) << flag << "\n" << usage.output;
      EXPECT_EQ(lines(usage.output), 1u) << usage.output;
    }
  }
}

// --model lora: a base trained for --pretrain-steps, frozen, fine-tuned
// through rank --lora-rank adapters with GL(rank) balance teleports. The
// teleport at step 0 finds B = 0 and leaves the adapters alone (rolled back,
// one side zero); later ones are kept. The model's own flags apply to it
// alone, and its data defaults to Fashion-MNIST.
TEST(CliTest, MnistFineTunesLoRAAdaptersWithGLBalance) {
  const std::string file = kTmp + "lora.json";
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                     " --dataset mnist --model lora --hidden 16,12 --lora-rank 3 "
                     "--pretrain-steps 4 --optimizer adam --batch-size 16 --epochs 1 "
                     "--eval-every 3 --eval-subset 32 --teleport-every 2 --json " +
                     file);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("trained on MNIST for 4 steps"), std::string::npos) << r.output;
  const auto json = read(file);
  expect_run_shape(json, {"adam", "adam+teleport"});
  for (const std::string field : {"\"model\": \"lora\"", "\"objective\": \"balance\"",
                                  "\"lora_rank\": 3", "\"pretrain_steps\": 4"}) {
    EXPECT_NE(json.find(field), std::string::npos) << field;
  }
  const size_t first = json.find("\"rolled_back\": ");
  ASSERT_NE(first, std::string::npos) << "no teleport";
  EXPECT_EQ(json.substr(first, 19), "\"rolled_back\": true")
      << "the step-0 teleport (B = 0) was kept";
  EXPECT_NE(json.find("one side of each pair is zero"), std::string::npos);
  EXPECT_NE(json.find("\"rolled_back\": false"), std::string::npos) << "no teleport was kept";
  for (const std::string flag :
       {" --model mlp --lora-rank 2", " --model cnn --pretrain-steps 9",
        " --model lora --symmetry gl --activation leaky_relu", " --model lora --teleport-batch 64",
        " --model lora --lora-rank 0"}) {
    const auto usage = run(std::string(TELEPORT_MNIST) + flag);
    EXPECT_EQ(usage.code, 2) << flag << "\n" << usage.output;
    EXPECT_EQ(lines(usage.output), 1u) << usage.output;
  }
  const auto fashion =
      run(std::string(TELEPORT_MNIST) + " --model lora --data " + kTmp + "no-such-dir --quiet");
  EXPECT_EQ(fashion.code, 1) << fashion.output;
  EXPECT_NE(fashion.output.find("dataset-fashion-mnist"), std::string::npos) << fashion.output;
}

// --validation N holds the last N training images out; --patience P stops a
// run once P evaluations in a row found no lower validation loss. On random
// labels the validation loss soon stops falling, so the baseline stops early,
// where the rule says, and trains on the other images only.
TEST(CliTest, MnistValidationSplitAndEarlyStopping) {
  const std::string file = kTmp + "early.json";
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                     " --hidden 16 --optimizer sgd --lr 0.5 --batch-size 16 --epochs 30 "
                     "--eval-every 1 --eval-subset 32 --validation 32 --patience 3 --no-teleport "
                     "--json " +
                     file);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("train_loss on all 64 training images"), std::string::npos) << r.output;
  const auto json = read(file);
  auto number = [&](const std::string& key) {
    const size_t at = json.find("\"" + key + "\": ");
    EXPECT_NE(at, std::string::npos) << key;
    return std::stod(json.substr(at + key.size() + 4));
  };
  const int64_t stopped = static_cast<int64_t>(number("stopped_at"));
  const int64_t steps = static_cast<int64_t>(number("steps"));
  ASSERT_GE(stopped, 0) << "no early stop in 30 epochs of random labels";
  EXPECT_EQ(steps, stopped);  // evaluated after step `stopped`, then ended
  EXPECT_LT(steps, 30 * 4);
  EXPECT_GT(number("validation_accuracy"), -1);
  std::vector<double> v;
  std::stringstream curve(arrays(json, "validation_loss").at(0));
  for (std::string x; std::getline(curve, x, ',');) v.push_back(std::stod(x));
  ASSERT_GE(v.size(), 4u);
  // The last three found nothing below the best before them; the one before did.
  const double best = *std::min_element(v.begin(), v.end() - 3);
  for (size_t i = v.size() - 3; i < v.size(); ++i) EXPECT_GE(v[i], best);
  EXPECT_EQ(*std::min_element(v.begin(), v.end()), best);

  const auto usage = run(std::string(TELEPORT_MNIST) + " --patience 2");
  EXPECT_EQ(usage.code, 2) << usage.output;
  const auto too_many =
      run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() + " --validation 96 --quiet");
  EXPECT_EQ(too_many.code, 1) << too_many.output;
  EXPECT_NE(too_many.output.find("expected fewer images than the 96"), std::string::npos)
      << too_many.output;
}

// The learning-rate schedule reaches the inner optimizer, with and without
// teleport: the default (constant) is the explicit constant bit for bit, a
// cosine schedule changes the run, and a warm-up longer than the run keeps
// the rate near zero: every step's loss is then that of a run at a rate of
// 1e-9, not that of the constant rate.
TEST(CliTest, MnistLearningRateScheduleReachesTheOptimizer) {
  auto losses = [](const std::string& flags, const std::string& name) {
    const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                       " --optimizer sgd,adam --hidden 16,12 --batch-size 16 --epochs 2"
                       " --eval-every 3 --eval-subset 32 --teleport-every 4 --quiet" +
                       flags + " --json " + kTmp + name);
    EXPECT_EQ(r.code, 0) << r.output;
    return arrays(read(kTmp + name), "loss");
  };
  const auto plain = losses("", "s0.json");
  ASSERT_EQ(plain.size(), 4u);
  EXPECT_EQ(losses(" --lr-schedule constant --warmup 0", "s1.json"), plain);
  EXPECT_NE(losses(" --lr-schedule cosine", "s2.json"), plain);
  const auto slow = losses(" --warmup 1000000", "s3.json");
  const auto still = losses(" --lr 1e-9", "s4.json");
  ASSERT_EQ(slow.size(), 4u);
  ASSERT_EQ(still.size(), 4u);
  auto numbers = [](const std::string& list) {
    std::vector<double> out;
    std::stringstream in(list);
    for (std::string item; std::getline(in, item, ',');) out.push_back(std::stod(item));
    return out;
  };
  for (size_t i = 0; i < plain.size(); ++i) {
    SCOPED_TRACE(i);
    const auto a = numbers(slow[i]), b = numbers(still[i]), c = numbers(plain[i]);
    ASSERT_EQ(a.size(), b.size());
    ASSERT_EQ(a.size(), c.size());
    double off_still = 0, off_plain = 0;
    for (size_t k = 0; k < a.size(); ++k) {
      off_still = std::max(off_still, std::abs(a[k] - b[k]) / b[k]);
      off_plain = std::max(off_plain, std::abs(a[k] - c[k]) / c[k]);
    }
    EXPECT_LT(off_still, 1e-4);
    EXPECT_GT(off_plain, 1e-2);
  }
}

// --objective balance and the on-demand schedule run, and the config says so.
TEST(CliTest, MnistBalanceObjectiveAndOnDemandSchedule) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
                     " --optimizer sgd --hidden 16,12 --batch-size 16 --epochs 2 --eval-every 3"
                     " --eval-subset 32 --teleport-every 4 --objective balance --stall-fraction 0.5"
                     " --stall-cooldown 2 --quiet --json " +
                     kTmp + "balance.json");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto json = read(kTmp + "balance.json");
  expect_run_shape(json, {"sgd", "sgd+teleport"});
  EXPECT_NE(json.find("\"objective\": \"balance\""), std::string::npos);
  EXPECT_NE(json.find("\"stall_fraction\": 0.5"), std::string::npos);
  const auto pre =
      run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
          " --optimizer adagrad,adam --hidden 16,12 --batch-size 16 --epochs 1 --eval-every 3"
          " --eval-subset 32 --teleport-every 2 --objective preconditioned --quiet --json " +
          kTmp + "pre.json");
  ASSERT_EQ(pre.code, 0) << pre.output;
  EXPECT_NE(read(kTmp + "pre.json").find("\"objective\": \"preconditioned\""), std::string::npos);
  // look_ahead and flatness evaluate losses on a teleport batch of their own.
  for (const std::string objective : {"look_ahead", "flatness"}) {
    const auto r2 =
        run(std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
            " --optimizer sgd,adam --hidden 16,12 --batch-size 16 --epochs 1 --eval-every 3"
            " --eval-subset 32 --teleport-every 2 --teleport-batch 8 --objective " +
            objective + (objective == "flatness" ? " --flatness-samples 2" : "") +
            " --quiet --json " + kTmp + "obj.json");
    ASSERT_EQ(r2.code, 0) << r2.output;
    const auto json = read(kTmp + "obj.json");
    expect_run_shape(json, {"sgd", "sgd+teleport", "adam", "adam+teleport"});
    EXPECT_NE(json.find("\"objective\": \"" + objective + "\""), std::string::npos);
    const auto usage = run(std::string(TELEPORT_MNIST) + " --objective " + objective);
    EXPECT_EQ(usage.code, 2) << usage.output;
    EXPECT_NE(usage.output.find("--teleport-batch"), std::string::npos) << usage.output;
  }
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
                                 std::string(TELEPORT_MNIST) + " --objective sharpest",
                                 std::string(TELEPORT_MNIST) + " --lr-schedule step",
                                 std::string(TELEPORT_MNIST) + " --warmup -5"}) {
    const auto r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_EQ(lines(r.output), 1u) << args << "\n" << r.output;
  }
}

// --help shows every default, the examples' own where they differ from the
// library's (ascent lr 10, growth cap 1.5).
TEST(CliTest, HelpShowsEveryDefault) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --help");
  EXPECT_EQ(r.code, 0) << r.output;
  // CLI11 writes a default as "=10" (2.1) or "[10]" (2.4) after the flag's type.
  for (const auto& [flag, value] :
       std::vector<std::pair<std::string, std::string>>{{"--teleport-lr", "10"},
                                                        {"--max-growth", "1.5"},
                                                        {"--max-step", "0.5"},
                                                        {"--optimizer", "sgd,adagrad"},
                                                        {"--hidden", "128,128"},
                                                        {"--state-policy", "transport"}}) {
    const size_t at = r.output.find(flag + " ");
    ASSERT_NE(at, std::string::npos) << flag;
    const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
    EXPECT_TRUE(line.find("=" + value) != std::string::npos ||
                line.find("[" + value + "]") != std::string::npos)
        << flag << ": " << line;
  }
}

// Every flag is checked before the data is read (a missing --data would
// otherwise be the error: exit 1) and before any training.
TEST(CliTest, UsageErrorsComeBeforeTheData) {
  const std::string mnist = std::string(TELEPORT_MNIST) + " --data /no/such/dir --quiet ";
  for (const std::string args :
       {mnist + "--teleport-at 5,-1", mnist + "--hidden 0", mnist + "--hidden 16,0",
        mnist + "--optimizer ''", mnist + "--seeds 0,4294967296",
        mnist + "--seeds 99999999999999999999", mnist + "--seeds=-1",
        mnist + "--teleport-batch 60001", mnist + "--nproc 3 --batch-size 2",
        mnist + "--nproc 2 --teleport-batch 1",
        std::string(TELEPORT_TEST_FUNCTIONS) + " --theta0 nan",
        mnist + "--optimizer adam --momentum 0.9", mnist + "--model cnn --hidden 32",
        mnist + "--flatness-radius 0.2", mnist + "--stall-decay 0.5",
        mnist + "--no-teleport --teleport-lr 1",
        std::string(TELEPORT_TEST_FUNCTIONS) + " --start 1,inf"}) {
    const auto r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_EQ(lines(r.output), 1u) << args << "\n" << r.output;
  }
}

// A run whose loss stops being finite ends there and is reported, and a huge
// but finite cap is a valid input, never an overflow error.
TEST(CliTest, DivergingRegressionIsReportedNotAborted) {
  const auto r =
      run(std::string(TELEPORT_REGRESSION) +
          " --dims 5,9,11,8,13,3 --lr 1e-4 --steps 20 --seeds 0 --max-step 1e300 --json " + kTmp +
          "diverged.json");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("diverged: its loss was not finite at step"), std::string::npos)
      << r.output;
  EXPECT_NE(read(kTmp + "diverged.json").find("\"diverged_at\": "), std::string::npos);
  EXPECT_EQ(read(kTmp + "diverged.json").find("\"diverged_at\": -1"), std::string::npos);
}

// Exact mode's defaults are the library's caps: the paper's settings, exact,
// diverge (two of five GD seeds within five steps of the teleport); capped,
// every run stays finite. Reference mode keeps the paper's settings.
TEST(CliTest, RegressionExactModeKeepsTheLibrarysCaps) {
  const std::string cmd =
      std::string(TELEPORT_REGRESSION) +
      " --dims 4,5,6,7,8 --activation leaky_relu --optimizer sgd --lr 1e-4 "
      "--teleport-at 5 --teleport-steps 8 --teleport-lr 1e-7 --steps 12 --mode exact";
  const auto capped = run(cmd);
  EXPECT_EQ(capped.code, 0) << capped.output;
  EXPECT_EQ(capped.output.find("diverged"), std::string::npos) << capped.output;
  const auto uncapped = run(cmd + " --max-step 1e12 --max-growth 1e12");
  EXPECT_EQ(uncapped.code, 0) << uncapped.output;
  EXPECT_NE(uncapped.output.find("diverged"), std::string::npos) << uncapped.output;
}

TEST(CliTest, CudaWithoutCudaIsAUsageError) {
  const auto r = run(std::string(TELEPORT_MNIST) + " --device cuda --data " + tiny_mnist() +
                     " --optimizer sgd --hidden 8 --max-steps 2 --eval-subset 16 --quiet");
  if (r.code == 0) GTEST_SKIP() << "CUDA is available here";
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--device cuda: CUDA is not available here"), std::string::npos)
      << r.output;
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
  // A failed run leaves no empty or partial output behind.
  const std::string json = kTmp + "failed.json", csv = kTmp + "failed.csv";
  const auto failed = run(std::string(TELEPORT_MNIST) + " --data " + missing + " --quiet --json " +
                          json + " --csv " + csv);
  EXPECT_EQ(failed.code, 1) << failed.output;
  EXPECT_FALSE(std::filesystem::exists(json));
  EXPECT_FALSE(std::filesystem::exists(csv));
  EXPECT_FALSE(std::filesystem::exists(json + ".partial"));
  // A truncated data file.
  const std::string dir = tiny_mnist();
  std::system(("truncate -s 1000 " + dir + "/t10k-images-idx3-ubyte").c_str());
  const auto r = run(std::string(TELEPORT_MNIST) + " --data " + dir + " --quiet --max-steps 2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("is truncated"), std::string::npos) << r.output;
}

#if defined(TELEPORT_HAVE_DISTRIBUTED)
// A TCP port nobody listens on (bound, then released).
int free_port() {
  const std::string out = scratch() + "port";
  std::system(("python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); "
               "print(s.getsockname()[1])' >" +
               out + " 2>/dev/null || echo 29517 >" + out)
                  .c_str());
  return std::stoi(read(out));
}

std::string tiny_mnist_command(const std::string& extra) {
  return std::string(TELEPORT_MNIST) + " --data " + tiny_mnist() +
         " --hidden 16,12 --batch-size 16 --eval-every 3 --eval-subset 32 --quiet " + extra;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// --nproc 2 follows one process at the same global batch (float64, JSON's
// ten digits), teleports included; only rank 0 prints and writes.
TEST(CliTest, MnistOnTwoProcessesFollowsOneProcess) {
  for (const std::string args :
       {std::string("--optimizer sgd,adagrad --epochs 2 --teleport-every 4 --teleport-lr 1 "
                    "--max-growth 100"),
        std::string("--optimizer sgd --epochs 2 --symmetry gl --activation leaky_relu "
                    "--teleport-every 3 --teleport-lr 1e-3"),
        std::string("--optimizer sgd --epochs 1 --teleport-every 2 --teleport-batch 12 "
                    "--teleport-lr 1")}) {
    const auto one =
        run(tiny_mnist_command("--dtype float64 " + args + " --json " + kTmp + "n1.json"));
    ASSERT_EQ(one.code, 0) << one.output;
    const auto two = run(
        tiny_mnist_command("--dtype float64 --nproc 2 " + args + " --json " + kTmp + "n2.json"));
    ASSERT_EQ(two.code, 0) << two.output;
    const auto a = read(kTmp + "n1.json"), b = read(kTmp + "n2.json");
    EXPECT_NE(b.find("\"world_size\": 2"), std::string::npos);
    EXPECT_NE(a.find("\"world_size\": 1"), std::string::npos);
    EXPECT_EQ(arrays(a, "loss"), arrays(b, "loss")) << args;
    EXPECT_EQ(arrays(a, "train_subset_loss"), arrays(b, "train_subset_loss")) << args;
    EXPECT_NE(b.find("\"rolled_back\": false"), std::string::npos) << "no teleport was kept";
    size_t tables = 0;
    for (size_t at = two.output.find("train_loss test_loss"); at != std::string::npos;
         at = two.output.find("train_loss test_loss", at + 1)) {
      ++tables;
    }
    EXPECT_EQ(tables, 1u) << two.output;
  }
}

// Failures of a data-parallel run end every process within its timeout, with
// one line and exit code 1 (2 for usage errors).
// Killing the --nproc launcher ends every rank: SIGTERM is passed on, and a
// SIGKILL (which nothing can pass on) reaches the ranks as their parent-death
// signal.
TEST(CliTest, KillingTheLauncherLeavesNoRank) {
  for (const char* sig : {"TERM", "KILL"}) {
    // Quoted in pieces, so that the shells' own command lines do not match.
    const std::string marker = scratch() + "launcher-\"" + sig + "\".log";
    const std::string cmd =
        tiny_mnist_command("--optimizer sgd --epochs 100000 --nproc 2 --log " + marker);
    // "[l]auncher" matches the ranks' command lines, not the shell's own.
    const std::string pattern = scratch() + "[l]auncher-" + sig + ".log";
    // Up to 15 s for the ranks to go (a loaded machine starts and ends them slowly).
    const auto r = run("sh -c '" + cmd + " & l=$!; sleep 5; kill -" + sig +
                       " $l; wait $l; for i in $(seq 15); do n=$(pgrep -f -c \"" + pattern +
                       "\"); [ \"$n\" = 0 ] && break; sleep 1; done; echo left $n'");
    EXPECT_NE(r.output.find("left 0"), std::string::npos) << sig << "\n" << r.output;
    std::system(("pkill -9 -f '" + pattern + "' 2>/dev/null").c_str());
  }
}

// A rank killed under the --nproc launcher (it can say nothing itself) ends
// the job with one line that names it, exit code 1, the other rank stopped.
TEST(CliTest, ARankKilledUnderTheLauncherIsNamed) {
  const std::string marker = scratch() + "dead-\"rank\".log";
  const std::string cmd =
      tiny_mnist_command("--optimizer sgd --epochs 100000 --nproc 2 --log " + marker);
  const std::string pattern = scratch() + "[d]ead-rank.log";
  // Rank 1 is the process whose environment holds RANK=1.
  const auto r =
      run("sh -c '" + cmd + " & l=$!; sleep 5; for p in $(pgrep -f \"" + pattern +
          "\"); do tr \"\\0\" \"\\n\" < /proc/$p/environ | grep -qx RANK=1 && kill -9 $p; done; "
          "wait $l; echo code $?'");
  std::system(("pkill -9 -f '" + pattern + "' 2>/dev/null").c_str());
  EXPECT_NE(r.output.find("code 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("teleport-mnist: rank 1 (pid "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("killed by signal 9"), std::string::npos) << r.output;
  EXPECT_EQ(lines(r.output), 2u) << r.output;  // the launcher's line and "code 1"
}

TEST(CliTest, DistributedFailuresEndWithinTheTimeout) {
  const std::string port = std::to_string(free_port());
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + port + " WORLD_SIZE=2 ";
  const std::string cmd = tiny_mnist_command("--optimizer sgd --dist-timeout 3 --no-baseline");
  struct Case {
    std::string command;
    int code;
  };
  for (const Case& c : {Case{"RANK=2 " + env + cmd, 2},  // outside WORLD_SIZE
                        Case{"RANK=1 " + env + cmd, 1},  // nobody hosts the store
                        Case{"RANK=0 " + env + cmd, 1},  // rank 1 never comes
                        Case{"RANK=0 " + env + cmd + " --nproc 3", 2}}) {
    const auto start = std::chrono::steady_clock::now();
    const auto r = run(c.command);
    EXPECT_EQ(r.code, c.code) << c.command << "\n" << r.output;
    EXPECT_EQ(lines(r.output), 1u) << c.command << "\n" << r.output;
    EXPECT_LT(seconds_since(start), 15) << c.command;
  }
  // Different options on the two ranks: both refuse, as a usage error.
  {
    const auto r = run("sh -c '" + env + "RANK=0 " + cmd + " --lr 0.1 & " + env + "RANK=1 " + cmd +
                       " --lr 0.2; b=$?; wait $!; a=$?; echo codes $a $b'");
    EXPECT_NE(r.output.find("codes 2 2"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("different options"), std::string::npos) << r.output;
  }
  // A rank killed mid-run: the other ends by itself, with exit code 1.
  {
    const std::string port2 = std::to_string(free_port());
    const std::string env2 = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + port2 + " WORLD_SIZE=2 ";
    const std::string longer =
        tiny_mnist_command("--optimizer sgd --epochs 100000 --dist-timeout 3");
    const auto start = std::chrono::steady_clock::now();
    const auto r = run("sh -c '" + env2 + "RANK=0 " + longer + " & a=$!; " + env2 + "RANK=1 " +
                       longer + " & b=$!; sleep 3; kill -9 $b; wait $a; echo code $?'");
    EXPECT_NE(r.output.find("code 1"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("rank 0: "), std::string::npos) << r.output;
    EXPECT_LT(seconds_since(start), 20);
  }
}
#endif

}  // namespace
