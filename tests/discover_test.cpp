// Which symmetries discover() finds in a Sequential, and what it refuses.
#include "test_util.h"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/pooling.h>

#include <torch/nn/modules/dropout.h>

namespace teleport::testing {
namespace {

using namespace torch::nn;

class DiscoverTest : public DeviceTest {};
TELEPORT_DEVICE_TESTS(DiscoverTest);

TEST_P(DiscoverTest, FindsScalingAcrossReLUAndGLAcrossNothing) {
  Sequential model(Flatten(), Linear(8, 6), ReLU(), Linear(6, 5), Linear(5, 4), LeakyReLU(),
                   Dropout(0.1), Linear(4, 3));
  model->to(device());
  const auto found = discover(model);
  ASSERT_EQ(found.symmetries.size(), 3u);
  auto kind = [&](size_t k) {
    return std::dynamic_pointer_cast<LayerSymmetry>(found.symmetries[k])->kind();
  };
  EXPECT_EQ(kind(0), SymmetryKind::kScaling);
  EXPECT_EQ(kind(1), SymmetryKind::kLinearGL);
  EXPECT_EQ(kind(2), SymmetryKind::kScaling);
  EXPECT_TRUE(found.notes.empty());
  // The symmetries act on the model's own tensors.
  auto* first = model->ptr(1)->as<Linear>();
  EXPECT_TRUE(found.symmetries[0]->parameters()[0].is_same(first->weight));
}

TEST_P(DiscoverTest, ScalingEverywhereWhenAsked) {
  Sequential model(Linear(4, 5), Identity(), Linear(5, 3));
  const auto found = discover(model, DiscoverOptions().linear_gl(false));
  ASSERT_EQ(found.symmetries.size(), 1u);
  EXPECT_TRUE(found.symmetries[0]->diagonal());
}

TEST_P(DiscoverTest, UnsupportedModuleBreaksTheChainAndIsReported) {
  Sequential model(Linear(4, 5), Tanh(), Linear(5, 6), ReLU(), Linear(6, 3), Sigmoid());
  const auto found = discover(model);
  ASSERT_EQ(found.symmetries.size(), 1u);
  EXPECT_EQ(found.symmetries[0]->name(), "scaling(layers 2 and 4)");
  ASSERT_EQ(found.notes.size(), 1u);
  EXPECT_NE(found.notes[0].find("module 1 (torch::nn::TanhImpl)"), std::string::npos)
      << found.notes[0];
}

TEST_P(DiscoverTest, ShapeChangeBetweenLayersGivesNoSymmetry) {
  // Linear on (N, 2, 4) inputs, flattened to 2*5 features for the next layer.
  Sequential model(Linear(4, 5), Flatten(), Linear(10, 3));
  const auto found = discover(model);
  EXPECT_TRUE(found.symmetries.empty());
  ASSERT_EQ(found.notes.size(), 1u);
  EXPECT_NE(found.notes[0].find("takes 10 features, the first gives 5"), std::string::npos);
}

// CNNs: convolutions, pooling, dropout and nested containers carry the chain;
// BatchNorm, grouped convolutions and a missing Flatten break it, with a note.
TEST_P(DiscoverTest, FindsConvolutionalSymmetriesAndReportsWhatBreaksThem) {
  namespace nn = torch::nn;
  Sequential cnn(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::MaxPool2d(2), ReLU(),
                 Nested(nn::Conv2d(nn::Conv2dOptions(4, 6, 3)), nn::Dropout2d(0.5)),
                 nn::AvgPool2d(2), nn::Flatten(), Linear(6, 8), nn::Dropout(0.5), ReLU(),
                 Linear(8, 3));
  auto found = discover(cnn);
  ASSERT_EQ(found.symmetries.size(), 3u);
  EXPECT_EQ(found.symmetries[0]->name(), "scaling(layers 0 and 3.0)");
  EXPECT_EQ(found.symmetries[1]->name(), "scaling(layers 3.0 and 6)");
  EXPECT_EQ(found.symmetries[2]->name(), "scaling(layers 6 and 9)");
  EXPECT_TRUE(found.notes.empty());
  // Nothing nonlinear between: GL, through average pooling and a flatten too.
  Sequential linear(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::AvgPool2d(2), nn::Flatten(),
                    Linear(4 * 9, 3));
  found = discover(linear);
  ASSERT_EQ(found.symmetries.size(), 1u);
  EXPECT_EQ(found.symmetries[0]->name(), "gl(layers 0 and 3)");

  Sequential broken(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::BatchNorm2d(4), ReLU(),
                    nn::Conv2d(nn::Conv2dOptions(4, 4, 3).groups(2)), ReLU(),
                    nn::Conv2d(nn::Conv2dOptions(4, 2, 1)), Linear(5, 3));
  found = discover(broken);
  EXPECT_TRUE(found.symmetries.empty());
  ASSERT_EQ(found.notes.size(), 4u);
  EXPECT_NE(found.notes[0].find("feeding a BatchNorm is scale-invariant"), std::string::npos)
      << found.notes[0];
  EXPECT_NE(found.notes[1].find("grouped convolution"), std::string::npos) << found.notes[1];
  EXPECT_NE(found.notes[2].find("grouped convolution"), std::string::npos) << found.notes[2];
  EXPECT_NE(found.notes[3].find("no Flatten between"), std::string::npos) << found.notes[3];
  // A BatchNorm without affine weights has nothing to scale: it breaks the chain.
  Sequential plain(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)),
                   nn::BatchNorm2d(nn::BatchNormOptions(4).affine(false)), ReLU(),
                   nn::Conv2d(nn::Conv2dOptions(4, 2, 3)));
  found = discover(plain);
  EXPECT_TRUE(found.symmetries.empty());
  ASSERT_EQ(found.notes.size(), 1u);
  EXPECT_NE(found.notes[0].find("without affine weights"), std::string::npos) << found.notes[0];
}

// Conv -> BatchNorm -> ReLU -> Conv: the BatchNorm's affine weight and bias
// carry a scaling to the next Conv's input channels (exact in train and eval
// mode), and to a Linear's column blocks after pooling and a flatten; the Conv
// feeding the BatchNorm gets none, with a note.
TEST_P(DiscoverTest, BatchNormWritesAScalingToTheNextLayer) {
  namespace nn = torch::nn;
  torch::manual_seed(3);
  Sequential net(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::BatchNorm2d(4), ReLU(),
                 nn::Conv2d(nn::Conv2dOptions(4, 6, 3)), nn::BatchNorm2d(6), ReLU(),
                 nn::MaxPool2d(2), nn::Flatten(), Linear(6 * 16, 3));
  net->to(device(), torch::kDouble);
  auto found = discover(net);
  ASSERT_EQ(found.symmetries.size(), 2u);
  EXPECT_EQ(found.symmetries[0]->name(), "scaling(layers 1 and 3)");
  EXPECT_EQ(found.symmetries[1]->name(), "scaling(layers 4 and 8)");
  ASSERT_EQ(found.notes.size(), 2u);
  for (const auto& note : found.notes) {
    EXPECT_NE(note.find("feeding a BatchNorm"), std::string::npos) << note;
  }
  const auto x = torch::randn({5, 1, 12, 12}, f64());
  for (bool train : {true, false}) {
    SCOPED_TRACE(train ? "train mode" : "eval mode");
    net->train(train);
    const auto before = net->forward(x).detach();
    std::vector<at::Tensor> running;
    for (const auto& b : net->buffers()) running.push_back(b.clone());
    for (const auto& s : found.symmetries) {
      const at::Tensor T = torch::randn(s->zero_algebra().sizes(), f64()) * 0.5;
      s->apply_(GroupElement::from_algebra(T, /*diagonal=*/true, Parametrization::kExp));
    }
    if (!train) {  // evaluation reads the running statistics, and leaves them
      const auto buffers = net->buffers();
      for (size_t i = 0; i < buffers.size(); ++i) EXPECT_TRUE(at::equal(buffers[i], running[i]));
    }
    const auto after = net->forward(x).detach();
    EXPECT_LE((after - before).abs().max().item<double>(),
              1e-10 * before.abs().max().item<double>());
  }
}

TEST_P(DiscoverTest, NothingToFindInOneLayerOrEmptyModels) {
  EXPECT_TRUE(discover(Sequential(Linear(4, 3), ReLU())).symmetries.empty());
  EXPECT_TRUE(discover(Sequential()).symmetries.empty());
  EXPECT_NE(error_of([] { discover(Sequential(nullptr)); }).find("empty holder"),
            std::string::npos);
}

}  // namespace
}  // namespace teleport::testing
