// torch::optim::RMSprop: the average of squared gradients (squared) and,
// centered, the average of gradients (gradient-like).
#include <teleport/internal/optimizers/adapter.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/optim/rmsprop.h>

namespace teleport::detail {
namespace {

namespace o = torch::optim;

class RMSpropAdapter final : public TypedAdapter<o::RMSpropOptions, o::RMSpropParamState, 6> {
 public:
  std::string untransportable(const OptimizerOptions& x) const override {
    return decay_refusal("RMSprop's averages",
                         static_cast<const o::RMSpropOptions&>(x).weight_decay());
  }
  // Its momentum_buffer accumulates lr g/(√v + ε): under an exact scaling of
  // v that ratio is invariant up to ε, so the buffer is kept as it is.
  Buffers buffers(OptimizerParamState& x) const override {
    auto& s = static_cast<o::RMSpropParamState&>(x);
    Buffers b;
    b.gradient_like = s.grad_avg();
    b.squared = {s.square_avg()};
    return b;
  }

  // v̂ = α v + (1 − α) g², less the squared average of gradients when centered.
  at::Tensor second_moment(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& g, double& eps) const override {
    const auto& r = static_cast<const o::RMSpropOptions&>(x);
    const auto* s = dynamic_cast<o::RMSpropParamState*>(state);
    const double alpha = r.alpha();
    eps = r.eps();
    at::Tensor v =
        (s != nullptr ? s->square_avg() * alpha : at::zeros_like(g)) + g.square() * (1 - alpha);
    if (r.centered()) {
      const at::Tensor avg =
          (s != nullptr && s->grad_avg().defined() ? s->grad_avg() * alpha : at::zeros_like(g)) +
          g * (1 - alpha);
      v = v - avg.square();
    }
    return v;
  }

  NextStep::Term next_step(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& p) const override {
    const auto& r = static_cast<const o::RMSpropOptions&>(x);
    TORCH_CHECK(r.momentum() == 0 && !r.centered(),
                "TeleportOptimizer: kLookAhead models RMSprop without momentum and not centered");
    const auto* s = dynamic_cast<o::RMSpropParamState*>(state);
    NextStep::Term t;
    t.param = p;
    if (s != nullptr) t.v = s->square_avg();
    t.lr = r.lr(), t.weight_decay = r.weight_decay();
    t.adaptive = true, t.a = 0, t.b = 1, t.c = r.alpha(), t.d = 1 - r.alpha(), t.e = 1;
    t.eps = r.eps();
    return t;
  }

  void save(torch::serialize::OutputArchive& a, const std::string& key,
            OptimizerParamState& x) const override {
    auto& s = static_cast<o::RMSpropParamState&>(x);
    write_int(a, key + "step", static_cast<int64_t>(s.step()));
    write_tensor(a, key + "square_avg", s.square_avg());
    write_tensor(a, key + "momentum_buffer", s.momentum_buffer());
    write_tensor(a, key + "grad_avg", s.grad_avg());
  }
  std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& a,
                                            const std::string& key,
                                            c10::Device device) const override {
    auto s = std::make_unique<o::RMSpropParamState>();
    read_step(a, key, *s);
    s->square_avg(read_tensor(a, key + "square_avg", device));
    s->momentum_buffer(read_tensor(a, key + "momentum_buffer", device));
    s->grad_avg(read_tensor(a, key + "grad_avg", device));
    return s;
  }
};

}  // namespace

const Adapter& rmsprop_adapter() {
  static const RMSpropAdapter adapter;
  return adapter;
}

}  // namespace teleport::detail
