#pragma once
// Not installed: everything the library knows about one torch::optim optimizer
// type, behind one interface (docs/design.md §7–§9). One adapter per type, in
// a file of its own (sgd.cpp, adagrad.cpp, adam.cpp for Adam and AdamW,
// rmsprop.cpp, lbfgs.cpp); adding an optimizer is one more adapter and its
// line in adapters() (adapter.cpp).

#include <teleport/ascent.h>

#include <ATen/Tensor.h>
#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace teleport::detail {

using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;

/// One parameter's state buffers, by what they hold (docs/design.md §7).
struct Buffers {
  at::Tensor gradient_like;         // maps as gradients do
  std::vector<at::Tensor> squared;  // sums or averages of squared gradients
  /// One state for all the optimizer's parameters, as flat vectors laid out
  /// as the parameters are (LBFGS): gradient-like ones (gradient differences,
  /// the previous gradient) and weight-like ones (steps, the search direction).
  std::vector<at::Tensor> flat_gradient_like, flat_weight_like;
  bool whole = false;  // true for such a state: reset as a whole
  bool known = true;   // false for a state type no adapter knows
};

class Adapter {
 public:
  virtual ~Adapter() = default;
  /// The number checkpoints record for this state type (never reused).
  virtual int64_t kind() const = 0;
  virtual bool holds(const OptimizerOptions& options) const = 0;
  virtual bool holds(const OptimizerParamState& state) const = 0;

  /// Why kTransport cannot carry the state under these options, or "".
  virtual std::string untransportable(const OptimizerOptions& /*options*/) const { return ""; }
  virtual Buffers buffers(OptimizerParamState& state) const = 0;
  /// Where the squared buffers start (Adagrad's initial accumulator value):
  /// only what lies above it scales under a teleport.
  virtual double squared_offset(const OptimizerOptions& /*options*/) const { return 0; }
  /// kReset: puts the state back as at step 0 in place and returns true, or
  /// returns false when the optimizer creates its state lazily (then erased).
  virtual bool reset(const OptimizerOptions& /*options*/, OptimizerParamState& /*state*/) const {
    return false;
  }
  /// kPreconditioned: v̂, the second moment the next step divides by with
  /// the current gradient `g` counted (bias-corrected), and the optimizer's
  /// eps; undefined for an optimizer without one. `state` may be null.
  virtual at::Tensor second_moment(const OptimizerOptions& /*options*/,
                                   OptimizerParamState* /*state*/, const at::Tensor& /*g*/,
                                   double& /*eps*/) const {
    return {};
  }
  /// kLookAhead: the next step for parameter `p` in NextStep's form, or a
  /// throw naming what it cannot express. `state` may be null.
  virtual NextStep::Term next_step(const OptimizerOptions& options, OptimizerParamState* state,
                                   const at::Tensor& p) const;

  /// Checkpoints: the state's fields under `key` (undefined buffers marked).
  virtual void save(torch::serialize::OutputArchive& archive, const std::string& key,
                    OptimizerParamState& state) const = 0;
  virtual std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& archive,
                                                    const std::string& key,
                                                    c10::Device device) const = 0;
};

/// An adapter for one options type and one state type, checkpointed as `Kind`.
template <typename Options, typename State, int64_t Kind>
class TypedAdapter : public Adapter {
 public:
  int64_t kind() const override { return Kind; }
  bool holds(const OptimizerOptions& x) const override {
    return dynamic_cast<const Options*>(&x) != nullptr;
  }
  bool holds(const OptimizerParamState& x) const override {
    return dynamic_cast<const State*>(&x) != nullptr;
  }
};

/// The refusal untransportable() gives for `what` (the buffers) holding
/// ∇L + λw with weight decay λ = `decay`; "" when `decay` is 0.
std::string decay_refusal(const std::string& what, double decay);

/// The adapter for these options or this state, or nullptr (an optimizer no
/// adapter knows; a null pointer).
const Adapter* adapter_for(const OptimizerOptions* options);
const Adapter* adapter_for(const OptimizerParamState* state);
/// The adapter a checkpoint's kind names, or nullptr.
const Adapter* adapter_of_kind(int64_t kind);

/// Throws: kLookAhead cannot model this optimizer.
[[noreturn]] void refuse_look_ahead();

/// The adapters, one per optimizer type (adapter.cpp).
const Adapter& sgd_adapter();
const Adapter& adagrad_adapter();
const Adapter& adam_adapter();
const Adapter& adamw_adapter();
const Adapter& rmsprop_adapter();
const Adapter& lbfgs_adapter();

/// The archive's fields as the adapters write them: integers, doubles,
/// tensors that may be undefined, lists of them.
void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v);
int64_t read_int(torch::serialize::InputArchive& a, const std::string& key);
void write_double(torch::serialize::OutputArchive& a, const std::string& key, double v);
double read_double(torch::serialize::InputArchive& a, const std::string& key);
void write_tensor(torch::serialize::OutputArchive& a, const std::string& key, const at::Tensor& t);
at::Tensor read_tensor(torch::serialize::InputArchive& a, const std::string& key,
                       c10::Device device);

template <typename List>
void write_list(torch::serialize::OutputArchive& a, const std::string& key, const List& list) {
  write_int(a, key + "/size", static_cast<int64_t>(list.size()));
  int64_t i = 0;
  for (const auto& t : list) write_tensor(a, key + "/" + std::to_string(i++), t);
}
template <typename List>
List read_list(torch::serialize::InputArchive& a, const std::string& key, c10::Device device) {
  List list;
  const int64_t n = read_int(a, key + "/size");
  for (int64_t i = 0; i < n; ++i)
    list.push_back(read_tensor(a, key + "/" + std::to_string(i), device));
  return list;
}

/// A step counter of any integer type, read back.
template <typename State>
void read_step(torch::serialize::InputArchive& a, const std::string& key, State& s) {
  using Step = std::decay_t<decltype(s.step())>;
  s.step(static_cast<Step>(read_int(a, key + "step")));
}

}  // namespace teleport::detail
