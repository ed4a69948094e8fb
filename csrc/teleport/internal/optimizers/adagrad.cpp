// torch::optim::Adagrad: one squared buffer, the sum of squared gradients
// from the group's initial accumulator value.
#include <teleport/internal/optimizers/adapter.h>

#include <ATen/ATen.h>
#include <torch/optim/adagrad.h>

namespace teleport::detail {
namespace {

namespace o = torch::optim;

class AdagradAdapter final : public TypedAdapter<o::AdagradOptions, o::AdagradParamState, 2> {
 public:
  std::string untransportable(const OptimizerOptions& x) const override {
    return decay_refusal("Adagrad's sums", static_cast<const o::AdagradOptions&>(x).weight_decay());
  }
  Buffers buffers(OptimizerParamState& x) const override {
    Buffers b;
    b.squared = {static_cast<o::AdagradParamState&>(x).sum()};
    return b;
  }
  double squared_offset(const OptimizerOptions& x) const override {
    const auto* ada = dynamic_cast<const o::AdagradOptions*>(&x);
    return ada != nullptr ? ada->initial_accumulator_value() : 0.0;
  }
  // Adagrad creates its state up front and expects it there.
  bool reset(const OptimizerOptions& x, OptimizerParamState& state) const override {
    auto& s = static_cast<o::AdagradParamState&>(state);
    s.sum().fill_(squared_offset(x));
    s.step(0);
    return true;
  }

  at::Tensor second_moment(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& g, double& eps) const override {
    const auto* s = dynamic_cast<o::AdagradParamState*>(state);
    eps = static_cast<const o::AdagradOptions&>(x).eps();
    return (s != nullptr ? s->sum() : at::zeros_like(g)) + g.square();
  }

  NextStep::Term next_step(const OptimizerOptions& x, OptimizerParamState* state,
                           const at::Tensor& p) const override {
    const auto& ada = static_cast<const o::AdagradOptions&>(x);
    const auto* s = dynamic_cast<o::AdagradParamState*>(state);
    NextStep::Term t;
    t.param = p;
    const int64_t step = (s != nullptr ? s->step() : 0) + 1;
    t.lr = ada.lr() / (1 + static_cast<double>(step - 1) * ada.lr_decay());
    t.weight_decay = ada.weight_decay();
    if (s != nullptr) t.v = s->sum();
    t.adaptive = true, t.a = 0, t.b = 1, t.c = 1, t.d = 1, t.e = 1, t.eps = ada.eps();
    return t;
  }

  void save(torch::serialize::OutputArchive& a, const std::string& key,
            OptimizerParamState& x) const override {
    auto& s = static_cast<o::AdagradParamState&>(x);
    write_int(a, key + "step", static_cast<int64_t>(s.step()));
    write_tensor(a, key + "sum", s.sum());
  }
  std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& a,
                                            const std::string& key,
                                            c10::Device device) const override {
    auto s = std::make_unique<o::AdagradParamState>();
    read_step(a, key, *s);
    s->sum(read_tensor(a, key + "sum", device));
    return s;
  }
};

}  // namespace

const Adapter& adagrad_adapter() {
  static const AdagradAdapter adapter;
  return adapter;
}

}  // namespace teleport::detail
