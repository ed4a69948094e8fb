// torch::optim::SGD: one gradient-like buffer, the momentum.
#include <teleport/internal/optimizers/adapter.h>

#include <torch/optim/sgd.h>

namespace teleport::detail {
namespace {

namespace o = torch::optim;

class SGDAdapter final : public TypedAdapter<o::SGDOptions, o::SGDParamState, 1> {
 public:
  std::string untransportable(const OptimizerOptions& x) const override {
    const auto& sgd = static_cast<const o::SGDOptions&>(x);
    return decay_refusal("SGD's momentum buffer", sgd.momentum() != 0 ? sgd.weight_decay() : 0);
  }

  Buffers buffers(OptimizerParamState& x) const override {
    Buffers b;
    b.gradient_like = static_cast<o::SGDParamState&>(x).momentum_buffer();
    return b;
  }

  // buf' = μ buf + (1 − dampening) ĝ (ĝ itself at the first step); Nesterov: ĝ + μ buf'.
  NextStep::Term next_step(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& p) const override {
    const auto& sgd = static_cast<const o::SGDOptions&>(x);
    const auto* s = dynamic_cast<o::SGDParamState*>(state);
    NextStep::Term t;
    t.param = p;
    t.lr = sgd.lr(), t.weight_decay = sgd.weight_decay();
    const double mu = sgd.momentum(), damp = sgd.dampening();
    const bool has_buf = s != nullptr && s->momentum_buffer().defined();
    if (mu != 0 && has_buf) t.m = s->momentum_buffer();
    const double fresh = has_buf ? 1 - damp : 1;
    if (mu == 0) {
      t.a = 0, t.b = 1;
    } else if (sgd.nesterov()) {
      t.a = has_buf ? mu * mu : 0, t.b = 1 + mu * fresh;
    } else {
      t.a = has_buf ? mu : 0, t.b = fresh;
    }
    return t;
  }

  void save(torch::serialize::OutputArchive& a, const std::string& key,
            OptimizerParamState& x) const override {
    write_tensor(a, key + "momentum_buffer", static_cast<o::SGDParamState&>(x).momentum_buffer());
  }
  std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& a,
                                            const std::string& key,
                                            c10::Device device) const override {
    auto s = std::make_unique<o::SGDParamState>();
    s->momentum_buffer(read_tensor(a, key + "momentum_buffer", device));
    return s;
  }
};

}  // namespace

const Adapter& sgd_adapter() {
  static const SGDAdapter adapter;
  return adapter;
}

}  // namespace teleport::detail
