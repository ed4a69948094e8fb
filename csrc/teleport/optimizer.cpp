#include <teleport/optimizer.h>

#include <teleport/random_state.h>
#include <teleport/schedule.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <sstream>
#include <type_traits>

namespace teleport {
namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerParamGroup;

// 2: the options as one unit (TeleportOptions::serialize), every field.
constexpr int64_t kCheckpointVersion = 2;

// The key the inner optimizer's state map uses for `p`. LibTorch 1.x keys by
// the TensorImpl pointer printed as a string, 2.x by the pointer itself.
template <typename Map>
typename Map::key_type state_key(const Map&, const at::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

void erase_state(Optimizer& opt, const at::Tensor& p) {
  auto& state = opt.state();
  state.erase(state_key(state, p));
}

void set_state(Optimizer& opt, const at::Tensor& p,
               std::unique_ptr<torch::optim::OptimizerParamState> s) {
  auto& state = opt.state();
  state[state_key(state, p)] = std::move(s);
}

std::vector<at::Tensor> all_params(const Optimizer& opt) {
  std::vector<at::Tensor> out;
  for (const auto& group : opt.param_groups()) {
    out.insert(out.end(), group.params().begin(), group.params().end());
  }
  return out;
}

// The inner optimizer's param groups, copied, for the base class.
std::vector<OptimizerParamGroup> groups_of(const std::unique_ptr<Optimizer>& inner) {
  TORCH_CHECK(inner != nullptr, "TeleportOptimizer: expected an inner optimizer, got null");
  return inner->param_groups();
}

std::unique_ptr<torch::optim::OptimizerOptions> defaults_of(
    const std::unique_ptr<Optimizer>& inner) {
  TORCH_CHECK(inner != nullptr, "TeleportOptimizer: expected an inner optimizer, got null");
  return inner->defaults().clone();
}

// Throws unless every parameter the symmetries act on is one of `tensors`.
void require_among(const SymmetryList& symmetries, const std::vector<at::Tensor>& tensors,
                   const char* what_is_missing) {
  for (const auto& s : symmetries) {
    for (const auto& p : s->parameters()) {
      bool found = false;
      for (const auto& q : tensors) found = found || q.is_same(p);
      TORCH_CHECK(found, "TeleportOptimizer: ", s->name(), " acts on a parameter ",
                  what_is_missing);
    }
  }
}

void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v) {
  a.write(key, c10::IValue(v));
}
int64_t read_int(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toInt();
}

// Why kTransport cannot carry this optimizer's state, or "" when it can.
// Weight decay added to the gradient (SGD with momentum, Adagrad, Adam,
// RMSprop) mixes λw into the buffers, and w transforms by A, ∇L by A^{-T}: no
// map carries the mixture (docs/design.md §7). AdamW's decoupled decay does
// not touch the buffers.
std::string untransportable(const Optimizer& opt) {
  for (const auto& group : opt.param_groups()) {
    const auto* o = &group.options();
    double decay = 0;
    std::string what;
    if (const auto* sgd = dynamic_cast<const torch::optim::SGDOptions*>(o)) {
      if (sgd->momentum() != 0) decay = sgd->weight_decay(), what = "SGD's momentum buffer";
    } else if (const auto* a = dynamic_cast<const torch::optim::AdagradOptions*>(o)) {
      decay = a->weight_decay(), what = "Adagrad's sums";
    } else if (const auto* a = dynamic_cast<const torch::optim::AdamOptions*>(o)) {
      decay = a->weight_decay(), what = "Adam's moments";
    } else if (const auto* r = dynamic_cast<const torch::optim::RMSpropOptions*>(o)) {
      decay = r->weight_decay(), what = "RMSprop's averages";
    }
    if (decay != 0) {
      return "StatePolicy::kTransport cannot carry " + what + " with weight_decay " +
             std::to_string(decay) +
             ": they hold ∇L + λw, and no map carries that sum exactly; use "
             "StatePolicy::kKeep or kReset, or decoupled decay (AdamW)";
    }
  }
  return "";
}

// The inner state's buffers of one parameter, by what they hold
// (docs/design.md §7).
struct Buffers {
  at::Tensor gradient_like;          // maps as gradients do
  std::vector<at::Tensor> squared;   // sums or averages of squared gradients
  bool known = true;                 // false for a state type not listed here
};

Buffers buffers_of(torch::optim::OptimizerParamState* s) {
  namespace o = torch::optim;
  Buffers b;
  if (s == nullptr) return b;
  if (auto* x = dynamic_cast<o::SGDParamState*>(s)) {
    b.gradient_like = x->momentum_buffer();
  } else if (auto* x = dynamic_cast<o::AdagradParamState*>(s)) {
    b.squared = {x->sum()};
  } else if (auto* x = dynamic_cast<o::AdamParamState*>(s)) {
    b.gradient_like = x->exp_avg();
    b.squared = {x->exp_avg_sq(), x->max_exp_avg_sq()};
  } else if (auto* x = dynamic_cast<o::AdamWParamState*>(s)) {
    b.gradient_like = x->exp_avg();
    b.squared = {x->exp_avg_sq(), x->max_exp_avg_sq()};
  } else if (auto* x = dynamic_cast<o::RMSpropParamState*>(s)) {
    // Its momentum_buffer accumulates lr g/(√v + ε): under an exact scaling of
    // v that ratio is invariant up to ε, so the buffer is kept as it is.
    b.gradient_like = x->grad_avg();
    b.squared = {x->square_avg()};
  } else {
    b.known = false;
  }
  return b;
}

}  // namespace

namespace detail {
torch::optim::OptimizerParamState* find_state(Optimizer& opt, const at::Tensor& p) {
  auto& state = opt.state();
  auto it = state.find(state_key(state, p));
  return it == state.end() ? nullptr : it->second.get();
}
}  // namespace detail

using detail::find_state;

TeleportOptimizer::TeleportOptimizer(torch::nn::Sequential model,
                                     std::unique_ptr<Optimizer> inner,
                                     TeleportOptions options,
                                     DiscoverOptions discover_options)
    : TeleportOptimizer(model, SymmetryList{}, std::move(inner), std::move(options)) {
  Discovery found = discover(model, discover_options);
  symmetries_ = std::move(found.symmetries);
  notes_ = std::move(found.notes);
  if (symmetries_.empty()) {
    notes_.push_back("no teleportable pair of Linear layers: teleports do nothing");
    TORCH_WARN("TeleportOptimizer: ", notes_.front(), " (", notes_.size() - 1,
               " note(s) from discovery in notes())");
  }
  require_among(symmetries_, all_params(*inner_),
                 "the inner optimizer does not hold; build the inner optimizer from "
                 "model->parameters()");
  const auto params = detail::distinct_parameters(symmetries_);
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == params.front().device() &&
                    p.scalar_type() == params.front().scalar_type(),
                "TeleportOptimizer: expected all teleported parameters on one device with "
                "one dtype (",
                params.front().device(), ", ", params.front().scalar_type(), "), got ",
                p.device(), ", ", p.scalar_type());
  }
}

TeleportOptimizer::TeleportOptimizer(torch::nn::Sequential model, SymmetryList symmetries,
                                     std::unique_ptr<Optimizer> inner,
                                     TeleportOptions options)
    : Optimizer(groups_of(inner), defaults_of(inner)),
      model_(std::move(model)),
      inner_(std::move(inner)),
      options_(std::move(options)),
      symmetries_(std::move(symmetries)) {
  options_.validate();
  for (const auto& s : symmetries_) {
    TORCH_CHECK(s != nullptr, "TeleportOptimizer: expected symmetries, got a null one");
  }
  check_state_policy();
}

void TeleportOptimizer::check_state_policy() const {
  if (options_.state_policy() != StatePolicy::kTransport) return;
  const std::string why = untransportable(*inner_);
  TORCH_CHECK(why.empty(), "TeleportOptimizer: ", why);
}

void TeleportOptimizer::check_model_unchanged() const {
  if (model_.is_empty()) return;
  // The tensors the Linear layers compute with now (what forward() reads).
  std::vector<at::Tensor> current;
  for (const auto& module : model_->children()) {
    if (auto* linear = module->as<torch::nn::Linear>()) {
      current.push_back(linear->weight);
      if (linear->bias.defined()) current.push_back(linear->bias);
    }
  }
  for (const auto& s : symmetries_) s->check_unchanged();
  require_among(symmetries_, current,
                "the model no longer holds (was a layer's weight replaced after the optimizer "
                "was built?); rebuild the optimizer");
}

void TeleportOptimizer::set_teleport_batch(BatchFn next_batch, LossFn loss_fn) {
  TORCH_CHECK(!model_.is_empty(),
              "set_teleport_batch: expected the optimizer to hold a model, got none");
  TORCH_CHECK(next_batch != nullptr && loss_fn != nullptr,
              "set_teleport_batch: expected a batch source and a loss function");
  next_batch_ = std::move(next_batch);
  loss_fn_ = std::move(loss_fn);
}

void TeleportOptimizer::sync_inner() {
  auto& inner_groups = inner_->param_groups();
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    if (i == inner_groups.size()) {
      inner_->add_param_group(param_groups_[i]);
      continue;
    }
    inner_groups[i].params() = param_groups_[i].params();
    inner_groups[i].set_options(param_groups_[i].options().clone());
  }
}

at::Tensor TeleportOptimizer::step(LossClosure closure) {
  sync_inner();
  if (!teleport_due(options_, step_, teleports_)) {
    ++step_;
    return inner_->step(closure);  // exactly the bare optimizer's step
  }
  check_model_unchanged();
  check_state_policy();
  // Data-dependent actions and reference arithmetic do not map gradients.
  bool fresh_gradients = options_.mode() == Mode::kReference;
  for (const auto& s : symmetries_) fresh_gradients = fresh_gradients || !s->transports_gradients();
  TORCH_CHECK(!fresh_gradients || closure != nullptr,
              "TeleportOptimizer: this teleport (data-dependent or reference mode) leaves the "
              "gradient stale; call step(closure) so that it can be computed afresh after it");
  // Every call of the closure here replays the randomness of the first (dropout
  // masks), so the losses before and after differ only by the teleport, and
  // the random stream advances as by the one call of a plain step.
  const RandomState random(devices_of(all_params(*this)));
  LossClosure replay = nullptr;
  at::Tensor loss;
  if (closure != nullptr) {
    replay = [&random, &closure] {
      random.restore();
      at::AutoGradMode enable(true);
      return closure();
    };
    at::AutoGradMode enable(true);
    loss = closure();
  }
  // The loss at the point the inner step starts from, with its gradient in .grad.
  at::Tensor current = loss;
  last_report_ = run_teleport(replay, loss, current);
  last_report_.step = step_;
  has_report_ = true;
  ++teleports_;
  if (!last_report_.rolled_back) {
    apply_state_policy(last_report_);
    if (last_report_.gradients_stale) {
      current = replay();
      last_report_.gradients_stale = false;
    }
  }
  if (options_.on_report()) options_.on_report()(last_report_);
  // The inner optimizer's first call of the closure would compute what is
  // already there; later calls (LBFGS's line search) evaluate new points.
  LossClosure inner_closure = nullptr;
  if (closure != nullptr) {
    inner_closure = [first = std::make_shared<bool>(true), current, closure] {
      if (!*first) return closure();
      *first = false;
      return current;
    };
  }
  inner_->step(inner_closure);
  ++step_;
  return loss;
}

TeleportReport TeleportOptimizer::run_teleport(const LossClosure& replay, const at::Tensor& loss,
                                               at::Tensor& current) {
  if (next_batch_) {
    auto batch = next_batch_();
    const Objective objective(model_, batch.first, batch.second, loss_fn_);
    return teleport(symmetries_, options_, &objective);
  }
  if (replay == nullptr || symmetries_.empty()) {
    return teleport(symmetries_, options_);
  }
  // Closed form from .grad, then the closure measures the loss at the new
  // point (and leaves the exact gradient there); too large a change rolls back.
  // The closure rewrites every gradient, so the snapshot holds them all.
  const detail::Snapshot snapshot(all_params(*this));
  TeleportReport report = teleport(symmetries_, options_);
  if (report.rolled_back) return report;
  const at::Tensor after = replay();
  report.loss_before = loss.item<double>();
  report.loss_after = after.item<double>();
  const double change = std::abs(report.loss_after - report.loss_before);
  const bool too_far = options_.mode() == Mode::kExact &&
                       change > options_.tolerance() * std::abs(report.loss_before);
  if (!std::isfinite(report.loss_after) || too_far) {
    snapshot.restore();
    report.rolled_back = true;
    report.elements.clear();
    report.reason = "the loss went from " + std::to_string(report.loss_before) + " to " +
                    std::to_string(report.loss_after) + ", beyond the tolerance " +
                    std::to_string(options_.tolerance());
  } else {
    current = after;
  }
  return report;
}

void TeleportOptimizer::apply_state_policy(TeleportReport& report) {
  if (options_.state_policy() == StatePolicy::kKeep || report.elements.empty()) return;
  if (options_.state_policy() == StatePolicy::kReset) {
    for (const auto& p : detail::distinct_parameters(symmetries_)) {
      auto* s = find_state(*inner_, p);
      if (auto* adagrad = dynamic_cast<torch::optim::AdagradParamState*>(s)) {
        // Adagrad creates its state up front and expects it there.
        const auto& o = static_cast<const torch::optim::AdagradOptions&>(inner_->defaults());
        adagrad->sum().fill_(o.initial_accumulator_value());
        adagrad->step(0);
      } else {
        erase_state(*inner_, p);  // other optimizers create state lazily
      }
    }
    return;
  }
  // Transport, by buffer kind: gradient-like buffers map as gradients do;
  // squared ones only where exact (diagonal scaling), else they are kept and
  // the report says so.
  for (size_t k = 0; k < symmetries_.size(); ++k) {
    const auto& sym = *symmetries_[k];
    std::vector<at::Tensor> gradient_like;
    std::vector<std::vector<at::Tensor>> squared;  // [slot][parameter]
    bool unknown = false;
    for (const auto& p : sym.parameters()) {
      const Buffers b = buffers_of(find_state(*inner_, p));
      unknown = unknown || !b.known;
      gradient_like.push_back(b.gradient_like);
      if (squared.size() < b.squared.size()) squared.resize(b.squared.size());
      for (size_t j = 0; j < b.squared.size(); ++j) {
        squared[j].resize(sym.parameters().size());
        squared[j][gradient_like.size() - 1] = b.squared[j];
      }
    }
    if (unknown && !noted_unknown_state_) {
      noted_unknown_state_ = true;
      notes_.push_back("the inner optimizer's state is of a type teleport does not know: it is "
                       "kept as it is at every teleport");
    }
    bool has_squared = false;
    for (auto& slot : squared) {
      slot.resize(sym.parameters().size());
      for (const auto& t : slot) has_squared = has_squared || t.defined();
    }
    if (!sym.transports_gradients()) {  // nothing maps exactly
      report.state_kept = true;
      continue;
    }
    sym.transport_gradients_(report.elements[k], gradient_like);
    if (!has_squared) continue;
    if (sym.can_transport_squared_gradients()) {
      for (const auto& slot : squared) sym.transport_squared_gradients_(report.elements[k], slot);
    } else {
      report.state_kept = true;
    }
  }
  if (report.state_kept) {
    report.state_note = "squared-gradient buffers (or all state, after a data-dependent action) "
                        "kept: no elementwise map is exact under this group";
  }
}

void TeleportOptimizer::save(torch::serialize::OutputArchive& archive) const {
  write_int(archive, "teleport/version", kCheckpointVersion);
  write_int(archive, "teleport/step", step_);
  write_int(archive, "teleport/teleports", teleports_);
  options_.serialize(archive);

  write_int(archive, "groups/count", static_cast<int64_t>(param_groups_.size()));
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    torch::serialize::OutputArchive group(archive.compilation_unit());
    param_groups_[i].options().serialize(group);
    archive.write("groups/" + std::to_string(i), group);
  }
  // The inner state, by parameter position.
  auto& inner = const_cast<Optimizer&>(*inner_);
  const auto params = all_params(inner);
  bool native = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const std::string key = "state/" + std::to_string(j) + "/";
    auto* s = find_state(inner, params[j]);
    if (s == nullptr) {
      write_int(archive, key + "kind", 0);
    } else if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(s)) {
      write_int(archive, key + "kind", 1);
      write_int(archive, key + "has_momentum", sgd->momentum_buffer().defined());
      if (sgd->momentum_buffer().defined()) {
        archive.write(key + "momentum_buffer", sgd->momentum_buffer());
      }
    } else if (auto* adagrad = dynamic_cast<torch::optim::AdagradParamState*>(s)) {
      write_int(archive, key + "kind", 2);
      write_int(archive, key + "step", static_cast<int64_t>(adagrad->step()));
      archive.write(key + "sum", adagrad->sum());
    } else {
      write_int(archive, key + "kind", 3);
      native = true;
    }
  }
  if (native) {
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    inner_->save(nested);
    archive.write("inner", nested);
  }
}

void TeleportOptimizer::load(torch::serialize::InputArchive& archive) {
  const int64_t version = read_int(archive, "teleport/version");
  TORCH_CHECK(version == kCheckpointVersion, "TeleportOptimizer::load: expected a checkpoint of version ",
              kCheckpointVersion, ", got ", version);
  step_ = read_int(archive, "teleport/step");
  teleports_ = read_int(archive, "teleport/teleports");
  options_.serialize(archive);  // every option but on_report, which stays

  const int64_t groups = read_int(archive, "groups/count");
  TORCH_CHECK(groups == static_cast<int64_t>(param_groups_.size()),
              "TeleportOptimizer::load: expected a checkpoint with ", param_groups_.size(),
              " param groups, got ", groups);
  for (int64_t i = 0; i < groups; ++i) {
    torch::serialize::InputArchive group;
    archive.read("groups/" + std::to_string(i), group);
    param_groups_[i].options().serialize(group);
  }
  sync_inner();

  const auto params = all_params(*inner_);
  bool native = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const std::string key = "state/" + std::to_string(j) + "/";
    c10::IValue probe;
    TORCH_CHECK(archive.try_read(key + "kind", probe),
                "TeleportOptimizer::load: the checkpoint holds fewer parameters than the "
                "optimizer (", params.size(), ")");
    const int64_t kind = probe.toInt();
    if (kind == 0) {
      erase_state(*inner_, params[j]);
    } else if (kind == 1) {
      auto s = std::make_unique<torch::optim::SGDParamState>();
      if (read_int(archive, key + "has_momentum")) {
        at::Tensor buffer;
        archive.read(key + "momentum_buffer", buffer);
        s->momentum_buffer(buffer.to(params[j].options()));
      }
      set_state(*inner_, params[j], std::move(s));
    } else if (kind == 2) {
      auto s = std::make_unique<torch::optim::AdagradParamState>();
      using StepT = std::decay_t<decltype(s->step())>;
      s->step(static_cast<StepT>(read_int(archive, key + "step")));
      at::Tensor sum;
      archive.read(key + "sum", sum);
      s->sum(sum.to(params[j].options()));
      set_state(*inner_, params[j], std::move(s));
    } else {
      native = true;
    }
  }
  if (native) {
    torch::serialize::InputArchive nested;
    archive.read("inner", nested);
    inner_->load(nested);
  }
}

}  // namespace teleport
