// Attention's per-head GL groups, LayerNorm writers, discovery in a module
// tree and the ViT: invariance, equivariance, closed form = autograd.
#include "test_util.h"

#include <common/models.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/normalization.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/optim/adam.h>

namespace teleport::testing {
namespace {

class AttentionTest : public DeviceTest {};
TELEPORT_DEVICE_TESTS(AttentionTest);

namespace nn = torch::nn;
namespace F = torch::nn::functional;

// One post-norm TransformerEncoderLayer (ReLU) written out with overrides as
// LibTorch runs it, on a fixed batch: self-attention (an optional causal
// mask), residual, norm1, linear1 -> ReLU -> dropout -> linear2, residual,
// norm2. Every evaluation replays the same dropout masks.
struct EncoderCase {
  static constexpr int64_t kWidth = 8, kHeads = 2, kTokens = 5;
  nn::TransformerEncoderLayer layer{nullptr};
  at::Tensor x, y, mask;
  double dropout;

  EncoderCase(torch::TensorOptions options, bool bias, bool causal, double dropout)
      : dropout(dropout) {
    torch::manual_seed(31);
    layer = nn::TransformerEncoderLayer(
        nn::TransformerEncoderLayerOptions(kWidth, kHeads).dim_feedforward(12).dropout(dropout));
    if (!bias) {  // attention without biases (the feed-forward keeps its own)
      layer->self_attn = layer->replace_module(
          "self_attn",
          nn::MultiheadAttention(nn::MultiheadAttentionOptions(kWidth, kHeads).bias(false)));
    }
    layer->to(options.device(), torch::kDouble);
    x = torch::randn({kTokens, 3, kWidth}, options);
    y = torch::randn({kTokens, 3, kWidth}, options);
    if (causal) mask = torch::full({kTokens, kTokens}, -INFINITY, options).triu(1);
  }
  at::Tensor forward(const ParameterOverrides& ov = {}) const {
    auto v = [&](const at::Tensor& p) { return value_of(ov, p); };
    const auto& a = layer->self_attn;
    torch::manual_seed(99);
    const at::Tensor attn = std::get<0>(F::multi_head_attention_forward(
        x, x, x,
        F::MultiheadAttentionForwardFuncOptions(kWidth, kHeads, v(a->in_proj_weight),
                                                v(a->in_proj_bias), {}, {}, false, dropout,
                                                v(a->out_proj->weight), v(a->out_proj->bias))
            .training(true)
            .need_weights(false)
            .attn_mask(mask)));
    auto norm = [&](const at::Tensor& t, const nn::LayerNorm& n) {
      return F::layer_norm(t,
                           F::LayerNormFuncOptions({kWidth}).weight(v(n->weight)).bias(v(n->bias)));
    };
    const at::Tensor h =
        norm(x + F::dropout(attn, F::DropoutFuncOptions().p(dropout)), layer->norm1);
    const at::Tensor hidden =
        F::relu(F::linear(h, v(layer->linear1->weight), v(layer->linear1->bias)));
    const at::Tensor ff = F::linear(F::dropout(hidden, F::DropoutFuncOptions().p(dropout)),
                                    v(layer->linear2->weight), v(layer->linear2->bias));
    return norm(h + F::dropout(ff, F::DropoutFuncOptions().p(dropout)), layer->norm2);
  }
  BatchLoss batch() const {
    return BatchLoss(
        [this](const ParameterOverrides& ov) { return (forward(ov) - y).square().mean(); });
  }
  std::vector<at::Tensor> params() const { return detail::distinct_parameters(syms()); }
  SymmetryList syms() const { return discover(*layer).symmetries; }
};

struct EncoderSetting {
  bool bias, causal;
  double dropout;
};
const std::vector<EncoderSetting> kEncoderSettings = {
    {true, false, 0.0}, {true, true, 0.0}, {false, true, 0.0}, {true, true, 0.2}};

// Kept actions of the query–key, value–output and feed-forward groups leave
// the layer's outputs unchanged, with and without biases, a causal mask or
// (replayed) dropout.
TEST_P(AttentionTest, AttentionActionsKeepOutputs) {
  for (const auto& s : kEncoderSettings) {
    SCOPED_TRACE(::testing::Message()
                 << "bias " << s.bias << ", causal " << s.causal << ", dropout " << s.dropout);
    EncoderCase c(f64(), s.bias, s.causal, s.dropout);
    const SymmetryList syms = c.syms();
    ASSERT_EQ(syms.size(), 3u);
    EXPECT_EQ(dynamic_cast<const AttentionSymmetry&>(*syms[0]).part(),
              AttentionSymmetry::Part::kQueryKey);
    EXPECT_EQ(syms[0]->zero_algebra().sizes(), (std::vector<int64_t>{2, 4, 4}));
    const at::Tensor before = c.forward().detach();
    const auto params = clone_all(c.params());
    for (const auto& sym : syms) sym->apply_(random_element(*sym, Parametrization::kExp, 0.5));
    EXPECT_FALSE(bitwise_equal(params, c.params()));
    EXPECT_TRUE(close(c.forward().detach(), before, 1e-10));
  }
}

// Gradients map exactly under every group (equivariance), and the closed-form
// direction agrees with the autograd one (a double backward through the loss).
TEST_P(AttentionTest, AttentionGradientsMapAndClosedFormIsAutograd) {
  for (const auto& s : kEncoderSettings) {
    SCOPED_TRACE(::testing::Message()
                 << "bias " << s.bias << ", causal " << s.causal << ", dropout " << s.dropout);
    EncoderCase c(f64(), s.bias, s.causal, s.dropout);
    const SymmetryList syms = c.syms();
    const BatchLoss batch = c.batch();
    const auto closed = directions(syms, Method::kClosedForm, &batch);
    const auto autograd = directions(syms, Method::kAutograd, &batch);
    for (size_t k = 0; k < syms.size(); ++k) {
      SCOPED_TRACE(syms[k]->name());
      EXPECT_TRUE(close(closed[k], autograd[k], 1e-9));
      EXPECT_GT(closed[k].norm().item<double>(), 0);
    }
    const auto params = c.params();
    std::vector<at::Tensor> mapped = torch::autograd::grad({batch.loss()}, params);
    transport_and_apply(syms, params, mapped, [](const Symmetry& sym) {
      return random_element(sym, Parametrization::kExp, 0.4);
    });
    const auto fresh = torch::autograd::grad({batch.loss()}, params);
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(close(mapped[i], fresh[i], 1e-9));
  }
}

// Whole teleports of the layer, closed form and autograd: ||∇L||² rises, the
// loss stays.
TEST_P(AttentionTest, AttentionTeleportsRaiseTheGradientAndKeepTheLoss) {
  for (Method method : {Method::kClosedForm, Method::kAutograd}) {
    EncoderCase c(f64(), true, true, 0.2);
    const BatchLoss batch = c.batch();
    const auto r = teleport(c.syms(), TeleportOptions().method(method).steps(5).lr(0.1), &batch);
    ASSERT_FALSE(r.rolled_back) << r.reason;
    EXPECT_GT(r.steps, 0);
    EXPECT_GT(r.grad_norm_sq_after, r.grad_norm_sq_before);
    EXPECT_NEAR(batch.loss().item<double>(), r.loss_before, 1e-10 * r.loss_before);
  }
}

// A module tree holding a TransformerEncoder: discover() finds every layer's
// attention groups and feed-forward scaling, a Sequential's chain under its
// path, and notes the LayerNorm and the Linear layers it cannot place; with
// GELU the feed-forward blocks get a note instead.
struct TreeImpl : nn::Module {
  nn::TransformerEncoder encoder{nullptr};
  nn::LayerNorm norm{nullptr};
  nn::Sequential head{nullptr};
  explicit TreeImpl(bool gelu) {
    auto layer = nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(12);
    if (gelu) layer.activation(torch::kGELU);
    encoder =
        register_module("encoder", nn::TransformerEncoder(nn::TransformerEncoderOptions(layer, 2)));
    norm = register_module("norm", nn::LayerNorm(nn::LayerNormOptions({8})));
    head = register_module("head", nn::Sequential(nn::Linear(8, 6), nn::ReLU(), nn::Linear(6, 3)));
  }
};
TORCH_MODULE(Tree);

TEST(DiscoverTree, FindsAttentionFeedForwardAndChains) {
  Tree relu(false), gelu(true);
  const Discovery found = discover(*relu);
  std::vector<std::string> names;
  for (const auto& s : found.symmetries) names.push_back(s->name());
  ASSERT_EQ(names.size(), 7u) << ::testing::PrintToString(names);
  EXPECT_EQ(names[0], "attention encoder.layers.0.self_attn(8, 2 heads).query_key");
  EXPECT_EQ(names[1], "attention encoder.layers.0.self_attn(8, 2 heads).value_output");
  EXPECT_EQ(names[2], "scaling(encoder.layers.0.linear1 -> encoder.layers.0.linear2)");
  EXPECT_EQ(names[5], "scaling(encoder.layers.1.linear1 -> encoder.layers.1.linear2)");
  EXPECT_EQ(names[6], "scaling(layers head.0 and head.2)");
  auto noted = [](const Discovery& d, const std::string& what) {
    for (const auto& n : d.notes) {
      if (n.find(what) != std::string::npos) return true;
    }
    return false;
  };
  EXPECT_TRUE(noted(found, "no scaling after the LayerNorm norm"));
  const Discovery g = discover(*gelu);
  EXPECT_EQ(g.symmetries.size(), 5u);
  EXPECT_TRUE(noted(g,
                    "encoder.layers.1.linear1 -> encoder.layers.1.linear2: its activation is "
                    "not ReLU"));
  nn::MultiheadAttention separate(nn::MultiheadAttentionOptions(8, 2).kdim(6).vdim(6));
  const Discovery s = discover(*separate);
  EXPECT_TRUE(s.symmetries.empty());
  EXPECT_TRUE(noted(s, "expected packed projections"));
}

// Shape and kind checks, with what was expected and what came.
TEST(AttentionChecks, RefuseWhatIsNoSymmetry) {
  nn::MultiheadAttention separate(nn::MultiheadAttentionOptions(8, 2).kdim(6).vdim(6));
  EXPECT_NE(error_of([&] {
              attention(separate);
            }).find("expected packed projections (kdim and vdim equal to embed_dim 8), got kdim 6"),
            std::string::npos);
  nn::MultiheadAttention kv(nn::MultiheadAttentionOptions(8, 2).add_bias_kv(true));
  EXPECT_NE(error_of([&] { attention(kv); }).find("expected add_bias_kv false"), std::string::npos);
  nn::MultiheadAttention mha(8, 2);
  EXPECT_NE(error_of([&] {
              AttentionSymmetry(AttentionSymmetry::Part::kQueryKey, mha->in_proj_weight,
                                mha->in_proj_bias, mha->out_proj->weight, 3, "qk");
            }).find("expected a number of heads dividing 8, got 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              attention(nn::Linear(8, 8));
            }).find("expected a torch::nn::MultiheadAttention, got torch::nn::Linear"),
            std::string::npos);
  nn::LayerNorm plain(nn::LayerNormOptions({8}).elementwise_affine(false));
  nn::LayerNorm ln(nn::LayerNormOptions({8}));
  EXPECT_NE(error_of([&] {
              scaling(plain, nn::Linear(8, 3));
            }).find("expected an elementwise-affine LayerNorm"),
            std::string::npos);
  EXPECT_NE(error_of([&] { scaling(ln, nn::Linear(6, 3)); })
                .find("expected a LayerNorm's reader to be a Linear of 8 input features, got "
                      "Linear of weight shape [3, 6]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              scaling(ln, nn::Conv1d(8, 3, 1));
            }).find("expected a LayerNorm's reader to be a Linear of 8 input features, got Conv1d"),
            std::string::npos);
}

// The example's ViT (examples/common/models.h), small: all its symmetries
// (attention, feed-forward, the final LayerNorm's scaling of the head) keep
// its outputs, and TeleportOptimizer with Adam teleports it, the loss kept and
// the adaptive moments kept whole under the non-diagonal elements.
TEST_P(AttentionTest, ViTSymmetriesKeepOutputsAndTeleportWithAdam) {
  torch::manual_seed(5);
  examples::ViT net(16, 2, 24, 2, 3);
  net->to(device(), torch::kDouble);
  const at::Tensor x = torch::randn({6, 784}, f64());
  const at::Tensor y = torch::randint(0, 3, {6}, f64().dtype(torch::kLong));
  const SymmetryList syms = net->symmetries();
  ASSERT_EQ(syms.size(), 7u);
  EXPECT_EQ(syms.back()->name(), "scaling(LayerNorm 16 -> Linear)");
  const at::Tensor before = net->forward(x).detach();
  const auto params = clone_all(net->parameters());
  for (const auto& s : syms) s->apply_(random_element(*s, Parametrization::kExp, 0.5));
  EXPECT_FALSE(bitwise_equal(params, net->parameters()));
  EXPECT_TRUE(close(net->forward(x).detach(), before, 1e-10));

  auto loss = [&] { return F::cross_entropy(net->forward(x), y); };
  TeleportOptimizer opt(
      syms,
      std::make_unique<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(1e-3)),
      TeleportOptions().every(2).steps(3).lr(0.05));
  for (int step = 0; step < 3; ++step) {
    opt.step([&] {
      opt.zero_grad();
      auto l = loss();
      l.backward();
      return l;
    });
  }
  ASSERT_NE(opt.last_report(), nullptr);
  const TeleportReport& r = *opt.last_report();
  ASSERT_FALSE(r.rolled_back) << r.reason;
  EXPECT_GT(r.steps, 0);
  EXPECT_TRUE(r.state_kept);
  EXPECT_NEAR(r.loss_after, r.loss_before, 1e-10 * r.loss_before);
}

}  // namespace
}  // namespace teleport::testing
