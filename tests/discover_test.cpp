// Which symmetries discover() finds in a Sequential, and what it refuses.
#include "test_util.h"

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

TEST_P(DiscoverTest, NothingToFindInOneLayerOrEmptyModels) {
  EXPECT_TRUE(discover(Sequential(Linear(4, 3), ReLU())).symmetries.empty());
  EXPECT_TRUE(discover(Sequential()).symmetries.empty());
  EXPECT_NE(error_of([] { discover(Sequential(nullptr)); }).find("empty holder"),
            std::string::npos);
}

}  // namespace
}  // namespace teleport::testing
