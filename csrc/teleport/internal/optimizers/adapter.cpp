// The registry of optimizer adapters, and the archive fields they write
// (internal/optimizers/adapter.h).
#include <teleport/internal/optimizers/adapter.h>

#include <c10/util/Exception.h>

#include <cstdlib>

namespace teleport::detail {

namespace {
const std::vector<const Adapter*>& adapters() {
  static const std::vector<const Adapter*> all = {&sgd_adapter(),     &adagrad_adapter(),
                                                  &adam_adapter(),    &adamw_adapter(),
                                                  &rmsprop_adapter(), &lbfgs_adapter()};
  return all;
}
}  // namespace

const Adapter* adapter_for(const OptimizerOptions* options) {
  if (options == nullptr) return nullptr;
  for (const auto* a : adapters()) {
    if (a->holds(*options)) return a;
  }
  return nullptr;
}

const Adapter* adapter_for(const OptimizerParamState* state) {
  if (state == nullptr) return nullptr;
  for (const auto* a : adapters()) {
    if (a->holds(*state)) return a;
  }
  return nullptr;
}

const Adapter* adapter_of_kind(int64_t kind) {
  for (const auto* a : adapters()) {
    if (a->kind() == kind) return a;
  }
  return nullptr;
}

// Weight decay added to the gradient mixes λw into the buffers, and w
// transforms by A, ∇L by A^{-T}: no map carries the mixture (docs/design.md
// §7). AdamW's decoupled decay does not touch the buffers.
std::string decay_refusal(const std::string& what, double decay) {
  if (decay == 0) return "";
  return "StatePolicy::kTransport cannot carry " + what + " with weight_decay " +
         std::to_string(decay) +
         ": they hold ∇L + λw, and no map carries that sum exactly; use "
         "StatePolicy::kKeep or kReset, or decoupled decay (AdamW)";
}

void refuse_look_ahead() {
  TORCH_CHECK(false,
              "TeleportOptimizer: kLookAhead models SGD, Adagrad, RMSprop, Adam and "
              "AdamW; the inner optimizer is none of them");
  std::abort();  // not reached
}

NextStep::Term Adapter::next_step(const OptimizerOptions&, OptimizerParamState*,
                                  const at::Tensor&) const {
  refuse_look_ahead();
}

void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v) {
  a.write(key, c10::IValue(v));
}

int64_t read_int(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toInt();
}

void write_double(torch::serialize::OutputArchive& a, const std::string& key, double v) {
  a.write(key, c10::IValue(v));
}

double read_double(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toDouble();
}

// The archive cannot hold an undefined tensor (LibTorch's own ParamState
// serialize() writes them, so it is not used): a flag says whether one is there.
void write_tensor(torch::serialize::OutputArchive& a, const std::string& key, const at::Tensor& t) {
  write_int(a, key + "/defined", t.defined());
  if (t.defined()) a.write(key, t);
}

at::Tensor read_tensor(torch::serialize::InputArchive& a, const std::string& key,
                       c10::Device device) {
  if (!read_int(a, key + "/defined")) return {};
  at::Tensor t;
  a.read(key, t);
  return t.to(device);
}

}  // namespace teleport::detail
