// torch::optim::Adam and AdamW: the first moment (gradient-like) and the
// second moments (squared), read alike; AdamW's decay is decoupled.
#include <teleport/internal/optimizers/adapter.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>

#include <cmath>
#include <tuple>

namespace teleport::detail {
namespace {

namespace o = torch::optim;

template <typename Options, typename State, int64_t Kind, bool Decoupled>
class AdamAdapter final : public TypedAdapter<Options, State, Kind> {
 public:
  std::string untransportable(const OptimizerOptions& x) const override {
    if (Decoupled) return "";
    return decay_refusal("Adam's moments", static_cast<const Options&>(x).weight_decay());
  }
  Buffers buffers(OptimizerParamState& x) const override {
    auto& s = static_cast<State&>(x);
    Buffers b;
    b.gradient_like = s.exp_avg();
    b.squared = {s.exp_avg_sq(), s.max_exp_avg_sq()};
    return b;
  }

  // v̂ = max(max_exp_avg_sq, β₂ v + (1 − β₂) g²) / (1 − β₂^{t+1}).
  at::Tensor second_moment(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& g, double& eps) const override {
    const auto& opts = static_cast<const Options&>(x);
    const auto* s = dynamic_cast<State*>(state);
    const double beta2 = std::get<1>(opts.betas());
    eps = opts.eps();
    const bool has_sq = s != nullptr && s->exp_avg_sq().defined();
    at::Tensor v =
        (has_sq ? s->exp_avg_sq() * beta2 : at::zeros_like(g)) + g.square() * (1 - beta2);
    if (opts.amsgrad() && s != nullptr && s->max_exp_avg_sq().defined()) {
      v = at::maximum(s->max_exp_avg_sq(), v);
    }
    return v / (1 - std::pow(beta2, static_cast<double>(step_of(s) + 1)));
  }

  NextStep::Term next_step(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& p) const override {
    const auto& opts = static_cast<const Options&>(x);
    const auto* s = dynamic_cast<State*>(state);
    TORCH_CHECK(!opts.amsgrad(), "TeleportOptimizer: kLookAhead does not model Adam's amsgrad");
    const double b1 = std::get<0>(opts.betas()), b2 = std::get<1>(opts.betas());
    const double t1 = static_cast<double>(step_of(s) + 1);
    const double bc1 = 1 - std::pow(b1, t1), bc2 = 1 - std::pow(b2, t1);
    NextStep::Term t;
    t.param = p;
    if (s != nullptr) t.m = s->exp_avg(), t.v = s->exp_avg_sq();
    t.lr = opts.lr();
    (Decoupled ? t.decoupled_decay : t.weight_decay) = opts.weight_decay();
    t.adaptive = true, t.a = b1 / bc1, t.b = (1 - b1) / bc1, t.c = b2, t.d = 1 - b2, t.e = bc2;
    t.eps = opts.eps();
    return t;
  }

  void save(torch::serialize::OutputArchive& a, const std::string& key,
            OptimizerParamState& x) const override {
    auto& s = static_cast<State&>(x);
    write_int(a, key + "step", static_cast<int64_t>(s.step()));
    write_tensor(a, key + "exp_avg", s.exp_avg());
    write_tensor(a, key + "exp_avg_sq", s.exp_avg_sq());
    write_tensor(a, key + "max_exp_avg_sq", s.max_exp_avg_sq());
  }
  std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& a,
                                            const std::string& key,
                                            c10::Device device) const override {
    auto s = std::make_unique<State>();
    read_step(a, key, *s);
    s->exp_avg(read_tensor(a, key + "exp_avg", device));
    s->exp_avg_sq(read_tensor(a, key + "exp_avg_sq", device));
    s->max_exp_avg_sq(read_tensor(a, key + "max_exp_avg_sq", device));
    return s;
  }

 private:
  static int64_t step_of(const State* s) {
    return s != nullptr ? static_cast<int64_t>(s->step()) : 0;
  }
};

}  // namespace

const Adapter& adam_adapter() {
  static const AdamAdapter<o::AdamOptions, o::AdamParamState, 4, false> adapter;
  return adapter;
}

const Adapter& adamw_adapter() {
  static const AdamAdapter<o::AdamWOptions, o::AdamWParamState, 5, true> adapter;
  return adapter;
}

}  // namespace teleport::detail
