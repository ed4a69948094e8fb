#include <teleport/optimizer.h>

#include <teleport/internal/buffers.h>
#include <teleport/internal/tolerance.h>
#include <teleport/random_state.h>
#include <teleport/schedule.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <optional>
#include <limits>
#include <sstream>
#include <type_traits>

namespace teleport {
namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerParamGroup;

// 2: the options as one unit (TeleportOptions::serialize), every field; the
// state of every torch::optim optimizer by parameter position.
// 3: the on-demand schedule's and the objective's fields; the parameters'
// count and shapes, checked at load.
constexpr int64_t kCheckpointVersion = 3;

using detail::state_key;

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

// Adam's and AdamW's settings and one parameter's state, read alike (the two
// optimizers have separate types with the same fields); nothing for others.
struct AdamLike {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  bool amsgrad = false, decoupled = false;  // decoupled: AdamW's weight decay
  int64_t step = 0;
  at::Tensor exp_avg, exp_avg_sq, max_exp_avg_sq;  // undefined before the first step
};

std::optional<AdamLike> adam_like(const torch::optim::OptimizerOptions* options,
                                  torch::optim::OptimizerParamState* state) {
  namespace o = torch::optim;
  AdamLike a;
  auto read = [&a](const auto& x) {
    a.lr = x.lr(), a.beta1 = std::get<0>(x.betas()), a.beta2 = std::get<1>(x.betas());
    a.eps = x.eps(), a.weight_decay = x.weight_decay(), a.amsgrad = x.amsgrad();
  };
  if (const auto* x = dynamic_cast<const o::AdamOptions*>(options)) {
    read(*x);
  } else if (const auto* x = dynamic_cast<const o::AdamWOptions*>(options)) {
    read(*x);
    a.decoupled = true;
  } else {
    return std::nullopt;
  }
  auto read_state = [&a](const auto& s) {
    a.step = s.step(), a.exp_avg = s.exp_avg(), a.exp_avg_sq = s.exp_avg_sq();
    a.max_exp_avg_sq = s.max_exp_avg_sq();
  };
  if (const auto* s = dynamic_cast<o::AdamParamState*>(state)) read_state(*s);
  if (const auto* s = dynamic_cast<o::AdamWParamState*>(state)) read_state(*s);
  return a;
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
  } else if (dynamic_cast<o::LBFGSParamState*>(s) == nullptr) {  // LBFGS: transport_lbfgs()
    b.known = false;
  }
  return b;
}


// The options of the param group holding `p`, or nullptr.
const torch::optim::OptimizerOptions* options_of(const Optimizer& opt, const at::Tensor& p) {
  for (const auto& group : opt.param_groups()) {
    for (const auto& q : group.params()) {
      if (q.is_same(p)) return &group.options();
    }
  }
  return nullptr;
}

// Where Adagrad's sum of squared gradients starts (its group's
// initial_accumulator_value); 0 for other optimizers.
double adagrad_offset(const Optimizer& opt, const at::Tensor& p) {
  const auto* o = dynamic_cast<const torch::optim::AdagradOptions*>(options_of(opt, p));
  return o != nullptr ? o->initial_accumulator_value() : 0.0;
}

// What the inner state of one parameter is, for checkpoints.
enum class StateKind : int64_t {
  kNone = 0, kSGD = 1, kAdagrad = 2, kAdam = 4, kAdamW = 5, kRMSprop = 6, kLBFGS = 7,
  kOther = 8,  // through the optimizer's own save()
};

StateKind kind_of(torch::optim::OptimizerParamState* s) {
  namespace o = torch::optim;
  if (s == nullptr) return StateKind::kNone;
  if (dynamic_cast<o::SGDParamState*>(s)) return StateKind::kSGD;
  if (dynamic_cast<o::AdagradParamState*>(s)) return StateKind::kAdagrad;
  if (dynamic_cast<o::AdamParamState*>(s)) return StateKind::kAdam;
  if (dynamic_cast<o::AdamWParamState*>(s)) return StateKind::kAdamW;
  if (dynamic_cast<o::RMSpropParamState*>(s)) return StateKind::kRMSprop;
  if (dynamic_cast<o::LBFGSParamState*>(s)) return StateKind::kLBFGS;
  return StateKind::kOther;
}

// A tensor that may be undefined, and lists of them.
void put(torch::serialize::OutputArchive& a, const std::string& key, const at::Tensor& t) {
  write_int(a, key + "/defined", t.defined());
  if (t.defined()) a.write(key, t);
}
at::Tensor take(torch::serialize::InputArchive& a, const std::string& key, c10::Device device) {
  if (!read_int(a, key + "/defined")) return {};
  at::Tensor t;
  a.read(key, t);
  return t.to(device);
}
template <typename List>
void put_list(torch::serialize::OutputArchive& a, const std::string& key, const List& list) {
  write_int(a, key + "/size", static_cast<int64_t>(list.size()));
  int64_t i = 0;
  for (const auto& t : list) put(a, key + "/" + std::to_string(i++), t);
}
template <typename List>
List take_list(torch::serialize::InputArchive& a, const std::string& key, c10::Device device) {
  List list;
  const int64_t n = read_int(a, key + "/size");
  for (int64_t i = 0; i < n; ++i) list.push_back(take(a, key + "/" + std::to_string(i), device));
  return list;
}
void put_double(torch::serialize::OutputArchive& a, const std::string& key, double v) {
  a.write(key, c10::IValue(v));
}
double take_double(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toDouble();
}

// Adam and AdamW keep the same state under two types.
template <typename AdamState>
void write_adam(torch::serialize::OutputArchive& a, const std::string& key, const AdamState& x) {
  write_int(a, key + "step", static_cast<int64_t>(x.step()));
  put(a, key + "exp_avg", x.exp_avg());
  put(a, key + "exp_avg_sq", x.exp_avg_sq());
  put(a, key + "max_exp_avg_sq", x.max_exp_avg_sq());
}

template <typename AdamState>
std::unique_ptr<AdamState> read_adam(torch::serialize::InputArchive& a, const std::string& key,
                                     c10::Device device) {
  auto s = std::make_unique<AdamState>();
  s->step(static_cast<std::decay_t<decltype(s->step())>>(read_int(a, key + "step")));
  s->exp_avg(take(a, key + "exp_avg", device));
  s->exp_avg_sq(take(a, key + "exp_avg_sq", device));
  s->max_exp_avg_sq(take(a, key + "max_exp_avg_sq", device));
  return s;
}

void write_state(torch::serialize::OutputArchive& a, const std::string& key,
                 torch::optim::OptimizerParamState& state) {
  namespace o = torch::optim;
  auto* s = &state;
  if (auto* x = dynamic_cast<o::SGDParamState*>(s)) {
    put(a, key + "momentum_buffer", x->momentum_buffer());
  } else if (auto* x = dynamic_cast<o::AdagradParamState*>(s)) {
    write_int(a, key + "step", static_cast<int64_t>(x->step()));
    put(a, key + "sum", x->sum());
  } else if (auto* x = dynamic_cast<o::AdamParamState*>(s)) {
    write_adam(a, key, *x);
  } else if (auto* x = dynamic_cast<o::AdamWParamState*>(s)) {
    write_adam(a, key, *x);
  } else if (auto* x = dynamic_cast<o::RMSpropParamState*>(s)) {
    write_int(a, key + "step", static_cast<int64_t>(x->step()));
    put(a, key + "square_avg", x->square_avg());
    put(a, key + "momentum_buffer", x->momentum_buffer());
    put(a, key + "grad_avg", x->grad_avg());
  } else if (auto* x = dynamic_cast<o::LBFGSParamState*>(s)) {
    write_int(a, key + "func_evals", x->func_evals());
    write_int(a, key + "n_iter", x->n_iter());
    put_double(a, key + "t", x->t());
    put_double(a, key + "prev_loss", x->prev_loss());
    put(a, key + "d", x->d());
    put(a, key + "H_diag", x->H_diag());
    put(a, key + "prev_flat_grad", x->prev_flat_grad());
    put_list(a, key + "old_dirs", x->old_dirs());
    put_list(a, key + "old_stps", x->old_stps());
    put_list(a, key + "ro", x->ro());
    write_int(a, key + "has_al", x->al().has_value());
    if (x->al().has_value()) put_list(a, key + "al", *x->al());
  }
}

std::unique_ptr<torch::optim::OptimizerParamState> read_state(torch::serialize::InputArchive& a,
                                                             const std::string& key, StateKind kind,
                                                             c10::Device device) {
  namespace o = torch::optim;
  auto step_of = [&](auto& state) {
    using StepT = std::decay_t<decltype(state.step())>;
    state.step(static_cast<StepT>(read_int(a, key + "step")));
  };
  switch (kind) {
    case StateKind::kSGD: {
      auto s = std::make_unique<o::SGDParamState>();
      s->momentum_buffer(take(a, key + "momentum_buffer", device));
      return s;
    }
    case StateKind::kAdagrad: {
      auto s = std::make_unique<o::AdagradParamState>();
      step_of(*s);
      s->sum(take(a, key + "sum", device));
      return s;
    }
    case StateKind::kAdam:
      return read_adam<o::AdamParamState>(a, key, device);
    case StateKind::kAdamW:
      return read_adam<o::AdamWParamState>(a, key, device);
    case StateKind::kRMSprop: {
      auto s = std::make_unique<o::RMSpropParamState>();
      step_of(*s);
      s->square_avg(take(a, key + "square_avg", device));
      s->momentum_buffer(take(a, key + "momentum_buffer", device));
      s->grad_avg(take(a, key + "grad_avg", device));
      return s;
    }
    case StateKind::kLBFGS: {
      auto s = std::make_unique<o::LBFGSParamState>();
      s->func_evals(read_int(a, key + "func_evals"));
      s->n_iter(read_int(a, key + "n_iter"));
      s->t(take_double(a, key + "t"));
      s->prev_loss(take_double(a, key + "prev_loss"));
      s->d(take(a, key + "d", device));
      s->H_diag(take(a, key + "H_diag", device));
      s->prev_flat_grad(take(a, key + "prev_flat_grad", device));
      s->old_dirs(take_list<std::deque<at::Tensor>>(a, key + "old_dirs", device));
      s->old_stps(take_list<std::deque<at::Tensor>>(a, key + "old_stps", device));
      s->ro(take_list<std::deque<at::Tensor>>(a, key + "ro", device));
      if (read_int(a, key + "has_al")) {
        s->al(take_list<std::vector<at::Tensor>>(a, key + "al", device));
      }
      return s;
    }
    default:
      TORCH_INTERNAL_ASSERT(false, "read_state: no state of kind ", static_cast<int64_t>(kind));
  }
}

}  // namespace

namespace detail {
std::vector<at::Tensor> flat_views(const at::Tensor& flat, const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const auto& p : params) {
    out.push_back(flat.narrow(0, offset, p.numel()).view(p.sizes()));
    offset += p.numel();
  }
  return out;
}

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
    notes_.push_back("no teleportable pair of layers: teleports do nothing");
  }
  check_symmetries();
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
  check_symmetries();
  check_state_policy();
  if (!model_.is_empty()) buffers_ = model_->buffers();
}

void TeleportOptimizer::check_symmetries() const {
  for (const auto& s : symmetries_) {
    TORCH_CHECK(s != nullptr, "TeleportOptimizer: expected symmetries, got a null one");
    for (const auto& p : s->parameters()) {
      TORCH_CHECK(p.requires_grad(), "TeleportOptimizer: ", s->name(),
                  " acts on a frozen parameter (requires_grad false) of shape ", p.sizes(),
                  ": a frozen tensor is never moved; declare symmetries between trainable "
                  "layers only");
      TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                  "TeleportOptimizer: expected float32 or float64 parameters, got ",
                  p.scalar_type(), " in ", s->name());
    }
  }
  detail::check_roles(symmetries_, "TeleportOptimizer");
  require_among(symmetries_, all_params(*inner_),
                "the inner optimizer does not hold; build the inner optimizer from the "
                "model's parameters");
}

TeleportOptimizer::TeleportOptimizer(SymmetryList symmetries, std::unique_ptr<Optimizer> inner,
                                     TeleportOptions options)
    : TeleportOptimizer(torch::nn::Sequential(nullptr), std::move(symmetries), std::move(inner),
                        std::move(options)) {}

void TeleportOptimizer::check_state_policy() const {
  if (options_.state_policy() != StatePolicy::kTransport) return;
  const std::string why = untransportable(*inner_);
  TORCH_CHECK(why.empty(), "TeleportOptimizer: ", why);
}

void TeleportOptimizer::check_model_unchanged() const {
  if (model_.is_empty()) return;
  // The tensors the layers compute with now (what forward() reads).
  std::vector<at::Tensor> current;
  auto add = [&](const at::Tensor& weight, const at::Tensor& bias) {
    current.push_back(weight);
    if (bias.defined()) current.push_back(bias);
  };
  for (const auto& module : model_->modules(/*include_self=*/false)) {
    if (const auto* l = module->as<torch::nn::Linear>()) add(l->weight, l->bias);
    if (const auto* c = module->as<torch::nn::Conv1d>()) add(c->weight, c->bias);
    if (const auto* c = module->as<torch::nn::Conv2d>()) add(c->weight, c->bias);
    if (const auto* c = module->as<torch::nn::Conv3d>()) add(c->weight, c->bias);
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

void TeleportOptimizer::set_process_group(std::shared_ptr<Collectives> group, double share) {
  if (group == nullptr) {
    group_ = nullptr;
    share_ = 1;
    return;
  }
  if (share < 0) share = 1.0 / static_cast<double>(group->world_size());
  TORCH_CHECK(share > 0 && share <= 1, "set_process_group: expected this rank's share of the "
                                       "global batch in (0, 1], got ", share);
  TORCH_CHECK(options_.mode() == Mode::kExact,
              "set_process_group: reference mode runs on one process; use Mode::kExact");
  group_ = std::move(group);
  share_ = share;
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

double TeleportOptimizer::symmetric_grad_norm_sq() const {
  std::vector<at::Tensor> sums;
  for (const auto& p : detail::distinct_parameters(symmetries_)) {
    if (p.grad().defined()) sums.push_back(p.grad().square().sum());
  }
  return sums.empty() ? std::numeric_limits<double>::quiet_NaN()
                      : at::stack(sums).sum().item<double>();
}

SymmetryList TeleportOptimizer::taking_part(bool from_grad,
                                            std::vector<std::string>& skipped) const {
  SymmetryList out;
  for (const auto& s : symmetries_) {
    std::string why;
    for (const auto& p : s->parameters()) {
      if (!p.requires_grad()) {
        why = "a parameter of shape " + c10::str(p.sizes()) + " is frozen (requires_grad false)";
      } else if (from_grad && !p.grad().defined() && why.empty()) {
        why = "a parameter of shape " + c10::str(p.sizes()) +
              " has no gradient in .grad (this forward pass did not use it)";
      }
    }
    if (why.empty()) {
      out.push_back(s);
    } else {
      skipped.push_back(s->name() + ": " + why);
    }
  }
  return out;
}

void TeleportOptimizer::verify_symmetries(const std::function<at::Tensor()>& loss) {
  SymmetryList kept;
  for (const auto& s : symmetries_) {
    const bool checked =
        std::find(verified_.begin(), verified_.end(), s.get()) != verified_.end();
    const bool taking_part = std::find(active_.begin(), active_.end(), s) != active_.end();
    if (checked || !taking_part || !s->transports_gradients()) {
      kept.push_back(s);
      continue;
    }
    const detail::Snapshot snapshot(all_params(*this));  // the loss rewrites every gradient
    SymmetryCheck c;
    try {
      c = check_symmetry(*s, loss, options_.max_step(), static_cast<uint64_t>(verified_.size()));
    } catch (...) {
      snapshot.restore();
      throw;
    }
    snapshot.restore();
    if (c.holds) {
      verified_.push_back(s.get());
      kept.push_back(s);
      continue;
    }
    refused_.push_back(s->name() + ": not a symmetry of this loss, refused: a random element of "
                       "norm max_step changed it by " + c10::str(c.drift) +
                       " (relative), above " + c10::str(c.bound));
    notes_.push_back(refused_.back());
  }
  if (kept.size() == symmetries_.size()) return;
  symmetries_ = std::move(kept);
  SymmetryList active;
  for (const auto& s : active_) {
    if (std::find(symmetries_.begin(), symmetries_.end(), s) != symmetries_.end()) active.push_back(s);
  }
  active_ = std::move(active);
}

std::vector<at::Tensor> TeleportOptimizer::inner_state_tensors() const {
  std::vector<at::Tensor> out;
  auto add = [&out](const at::Tensor& t) {
    if (t.defined()) out.push_back(t);
  };
  for (const auto& p : detail::distinct_parameters(active_)) {
    const Buffers b = buffers_of(detail::find_state(*inner_, p));
    add(b.gradient_like);
    for (const auto& t : b.squared) add(t);
  }
  const auto params = all_params(*inner_);
  if (!params.empty()) {
    if (auto* l = dynamic_cast<torch::optim::LBFGSParamState*>(detail::find_state(*inner_, params.front()))) {
      for (const auto& t : l->old_dirs()) add(t);
      for (const auto& t : l->old_stps()) add(t);
      add(l->prev_flat_grad());
      add(l->d());
    }
  }
  return out;
}

void TeleportOptimizer::check_gradients_agree() const {
  std::vector<at::Tensor> parts;
  for (const auto& p : detail::distinct_parameters(active_)) {
    if (!p.grad().defined()) continue;
    const at::Tensor g = p.grad().detach().to(at::kDouble);
    parts.push_back(at::stack({g.sum(), g.square().sum()}));
  }
  const at::Tensor mine = parts.empty() ? at::zeros({1, 2}, at::kDouble)
                                        : at::stack(parts).sum(0).reshape({1, 2});
  int64_t first_row = 0;
  const at::Tensor all = group_->all_gather_rows(mine, first_row).cpu();
  const auto sums = all.accessor<double, 2>();
  for (int64_t r = 1; r < all.size(0); ++r) {
    for (int64_t j = 0; j < 2; ++j) {
      const double a = sums[0][j], b = sums[r][j];
      TORCH_CHECK(std::abs(a - b) <= 1e-6 * (std::abs(a) + std::abs(b)),
                  "TeleportOptimizer: expected the same .grad on every rank (averaged over the "
                  "ranks before step(), e.g. teleport::distributed::average_gradients), got "
                  "gradients that differ: checksum ", j == 0 ? "Σg" : "Σg²", " is ", a,
                  " on rank 0 and ", b, " on rank ", r,
                  ". Each rank would teleport differently and the replicas would diverge");
    }
  }
}

void TeleportOptimizer::align_elements(TeleportReport& report) const {
  if (report.elements.empty() || active_.size() == symmetries_.size()) return;
  std::vector<GroupElement> all(symmetries_.size());
  for (size_t k = 0, a = 0; k < symmetries_.size() && a < active_.size(); ++k) {
    if (symmetries_[k] == active_[a]) all[k] = std::move(report.elements[a++]);
  }
  report.elements = std::move(all);
}

// One teleport inside step(): the checks, the verification of symmetries not
// checked yet, the teleport and the state policy. The buffers end as the
// closure's first call left them; whatever throws leaves weights, .grad and
// the inner state as they were.
void TeleportOptimizer::teleport_step(const LossClosure& replay, const at::Tensor& loss,
                                      at::Tensor& current) {
  check_model_unchanged();
  check_state_policy();
  const detail::BufferGuard buffers(buffers_);
  std::vector<std::string> skipped;
  active_ = taking_part(/*from_grad=*/!next_batch_, skipped);
  bool none_has_gradients = !symmetries_.empty() && active_.empty() && !next_batch_;
  for (const auto& s : symmetries_) {
    for (const auto& p : s->parameters()) none_has_gradients = none_has_gradients && !p.grad().defined();
  }
  TORCH_CHECK(!none_has_gradients, "teleport: expected gradients in .grad (call loss.backward() "
              "before step()), got none for any parameter the symmetries act on");
  if (group_) check_gradients_agree();
  refused_.clear();
  if (options_.verify() && replay != nullptr && !next_batch_) {
    verify_symmetries([&] {  // the global batch's loss, so that every rank decides alike
      std::vector<at::Tensor> l = {replay().detach().reshape({}) * share_};
      if (group_) group_->all_reduce_sum(l);
      return l[0];
    });
  }
  const detail::Snapshot point(all_params(*this));
  detail::BufferGuard state(inner_state_tensors());  // put back unless released
  try {
    last_report_ = run_teleport(replay, loss, current);
    last_report_.step = step_;
    last_report_.skipped = std::move(skipped);
    last_report_.skipped.insert(last_report_.skipped.end(), refused_.begin(), refused_.end());
    has_report_ = true;
    ++teleports_;
    if (!last_report_.rolled_back) {
      apply_state_policy(last_report_);
      if (last_report_.gradients_stale) {
        current = replay();
        last_report_.gradients_stale = false;
      }
    }
  } catch (...) {
    point.restore();
    throw;
  }
  state.release();
  align_elements(last_report_);
  if (options_.on_report()) options_.on_report()(last_report_);
}

at::Tensor TeleportOptimizer::step(LossClosure closure) {
  sync_inner();
  const bool scheduled = teleport_due(options_, step_, teleports_);
  const bool watching = options_.stall_fraction() > 0 && !symmetries_.empty() &&
                        teleport_allowed(options_, step_, teleports_);
  if (!scheduled && !watching) {
    ++step_;
    return inner_->step(closure);  // exactly the bare optimizer's step
  }
  // Data-dependent actions and reference arithmetic do not map gradients.
  bool fresh_gradients = options_.mode() == Mode::kReference;
  for (const auto& s : symmetries_) fresh_gradients = fresh_gradients || !s->transports_gradients();
  const char* stale = "TeleportOptimizer: this teleport (data-dependent or reference mode) leaves "
                      "the gradient stale; call step(closure) so that it can be computed afresh "
                      "after it";
  TORCH_CHECK(!scheduled || !fresh_gradients || closure != nullptr, stale);
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
  // On demand: the gradient the step is about to use says whether training stalled.
  const bool due = (watching && stall_.update(options_, symmetric_grad_norm_sq(), step_)) || scheduled;
  // The loss at the point the inner step starts from, with its gradient in .grad.
  at::Tensor current = loss;
  if (due) {
    TORCH_CHECK(!fresh_gradients || closure != nullptr, stale);
    teleport_step(replay, loss, current);
  }
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
    BatchLoss objective(model_, batch.first, batch.second, loss_fn_);
    if (group_) objective = objective.spread_over(group_, share_);
    if (options_.verify()) verify_symmetries([&] { return objective.global_loss(); });
    TORCH_CHECK(options_.objective() != Objective::kPreconditioned,
                "TeleportOptimizer: kPreconditioned teleports from .grad; it takes no teleport batch");
    if (options_.objective() == Objective::kLookAhead) {
      return teleport(active_, options_, objective, next_step());
    }
    return teleport(active_, options_, &objective);
  }
  TORCH_CHECK(options_.objective() != Objective::kLookAhead &&
                  options_.objective() != Objective::kFlatness,
              "TeleportOptimizer: kLookAhead and kFlatness evaluate losses on a teleport batch; "
              "call set_teleport_batch first");
  if (replay == nullptr || active_.empty()) {
    return teleport_from_grad();
  }
  // Closed form from .grad, then the closure measures the loss at the new
  // point (and leaves the exact gradient there); too large a change rolls back.
  // The closure rewrites every gradient, so the snapshot holds them all.
  const detail::Snapshot snapshot(all_params(*this));
  TeleportReport report = teleport_from_grad();
  if (report.rolled_back) return report;
  at::Tensor after, host;
  try {  // a closure or a collective that throws leaves the point as it was
    after = replay();
    std::vector<at::Tensor> losses = {loss.detach().reshape({}), after.detach().reshape({})};
    if (group_) {  // the global batch's losses, so that every rank decides alike
      for (auto& l : losses) l = l * share_;
      group_->all_reduce_sum(losses);
    }
    host = at::stack(losses).to(at::kDouble).cpu();
  } catch (...) {
    snapshot.restore();
    throw;
  }
  report.loss_before = host[0].item<double>();
  report.loss_after = host[1].item<double>();
  const double change = std::abs(report.loss_after - report.loss_before);
  const bool too_far =
      options_.mode() == Mode::kExact &&
      change > detail::allowed_loss_change(report.loss_before, options_.tolerance(),
                                           loss.scalar_type());
  if (!std::isfinite(report.loss_after) || too_far) {
    snapshot.restore();
    report.rolled_back = true;
    report.elements.clear();
    report.reason = "the loss went from " + c10::str(report.loss_before) + " to " +
                    c10::str(report.loss_after) + ", beyond the tolerance " +
                    c10::str(options_.tolerance());
  } else {
    current = after;
  }
  return report;
}

// The inner optimizer's next step in NextStep's form, with its buffers as they
// are now (docs/design.md §8); what it cannot express is refused.
NextStep TeleportOptimizer::next_step() const {
  namespace o = torch::optim;
  NextStep next;
  next.transported = options_.state_policy() == StatePolicy::kTransport;
  const bool reset = options_.state_policy() == StatePolicy::kReset;
  const auto acted = detail::distinct_parameters(active_);
  for (const auto& grp : inner_->param_groups()) {
    const auto& opts = grp.options();
    for (const auto& p : grp.params()) {
      NextStep::Term t;
      t.param = p;
      // kReset: the symmetries' parameters step from a fresh state.
      bool fresh = false;
      for (const auto& q : acted) fresh = fresh || (reset && q.is_same(p));
      auto* state = fresh ? nullptr : find_state(*inner_, p);
      if (const auto* sgd = dynamic_cast<const o::SGDOptions*>(&opts)) {
        t.lr = sgd->lr(), t.weight_decay = sgd->weight_decay();
        const auto* s = dynamic_cast<o::SGDParamState*>(state);
        const double mu = sgd->momentum(), damp = sgd->dampening();
        const bool has_buf = s != nullptr && s->momentum_buffer().defined();
        if (mu != 0 && has_buf) t.m = s->momentum_buffer();
        // buf' = μ buf + (1 - dampening) ĝ (ĝ itself at the first step); Nesterov: ĝ + μ buf'.
        const double fresh = has_buf ? 1 - damp : 1;
        if (mu == 0) {
          t.a = 0, t.b = 1;
        } else if (sgd->nesterov()) {
          t.a = has_buf ? mu * mu : 0, t.b = 1 + mu * fresh;
        } else {
          t.a = has_buf ? mu : 0, t.b = fresh;
        }
      } else if (const auto* ada = dynamic_cast<const o::AdagradOptions*>(&opts)) {
        const auto* s = dynamic_cast<o::AdagradParamState*>(state);
        const int64_t step = (s != nullptr ? s->step() : 0) + 1;
        t.lr = ada->lr() / (1 + static_cast<double>(step - 1) * ada->lr_decay());
        t.weight_decay = ada->weight_decay();
        if (s != nullptr) t.v = s->sum();
        t.adaptive = true, t.a = 0, t.b = 1, t.c = 1, t.d = 1, t.e = 1, t.eps = ada->eps();
      } else if (const auto adam = adam_like(&opts, state)) {
        TORCH_CHECK(!adam->amsgrad, "TeleportOptimizer: kLookAhead does not model Adam's amsgrad");
        const double b1 = adam->beta1, b2 = adam->beta2;
        const double bc1 = 1 - std::pow(b1, static_cast<double>(adam->step + 1));
        const double bc2 = 1 - std::pow(b2, static_cast<double>(adam->step + 1));
        t.m = adam->exp_avg, t.v = adam->exp_avg_sq;
        t.lr = adam->lr;
        (adam->decoupled ? t.decoupled_decay : t.weight_decay) = adam->weight_decay;
        t.adaptive = true, t.a = b1 / bc1, t.b = (1 - b1) / bc1, t.c = b2, t.d = 1 - b2, t.e = bc2;
        t.eps = adam->eps;
      } else if (const auto* r = dynamic_cast<const o::RMSpropOptions*>(&opts)) {
        TORCH_CHECK(r->momentum() == 0 && !r->centered(),
                    "TeleportOptimizer: kLookAhead models RMSprop without momentum and not centered");
        const auto* s = dynamic_cast<o::RMSpropParamState*>(state);
        if (s != nullptr) t.v = s->square_avg();
        t.lr = r->lr(), t.weight_decay = r->weight_decay();
        t.adaptive = true, t.a = 0, t.b = 1, t.c = r->alpha(), t.d = 1 - r->alpha(), t.e = 1;
        t.eps = r->eps();
      } else {
        TORCH_CHECK(false, "TeleportOptimizer: kLookAhead models SGD, Adagrad, RMSprop, Adam and "
                           "AdamW; the inner optimizer is none of them");
      }
      next.terms.push_back(std::move(t));
    }
  }
  return next;
}

// kPreconditioned reads √v̂ from the inner state as its next step will use it
// (docs/design.md §8); an optimizer without a second moment (SGD) has none, and
// its objective is ||∇L||².
TeleportReport TeleportOptimizer::teleport_from_grad() {
  if (options_.objective() != Objective::kPreconditioned) return teleport(active_, options_);
  namespace o = torch::optim;
  Preconditioner pre;
  bool any = false;
  double eps = -1;
  for (const auto& p : detail::distinct_parameters(active_)) {
    TORCH_CHECK(p.grad().defined(), "TeleportOptimizer: expected gradients in .grad, got none");
    const at::Tensor g = p.grad().detach();
    const torch::optim::OptimizerOptions* group = nullptr;
    for (const auto& grp : inner_->param_groups()) {
      for (const auto& q : grp.params()) {
        if (q.is_same(p)) group = &grp.options();
      }
    }
    auto* state = find_state(*inner_, p);
    at::Tensor v;  // v̂, bias-corrected
    double e = 0;
    if (const auto* a = dynamic_cast<const o::AdagradOptions*>(group)) {
      const auto* s = dynamic_cast<o::AdagradParamState*>(state);
      v = (s != nullptr ? s->sum() : at::zeros_like(g)) + g.square();
      e = a->eps();
    } else if (const auto adam = adam_like(group, state)) {
      const double beta2 = adam->beta2;
      e = adam->eps;
      const at::Tensor& sq = adam->exp_avg_sq;
      v = (sq.defined() ? sq * beta2 : at::zeros_like(g)) + g.square() * (1 - beta2);
      if (adam->amsgrad && adam->max_exp_avg_sq.defined()) v = at::maximum(adam->max_exp_avg_sq, v);
      v = v / (1 - std::pow(beta2, static_cast<double>(adam->step + 1)));
    } else if (const auto* r = dynamic_cast<const o::RMSpropOptions*>(group)) {
      const auto* s = dynamic_cast<o::RMSpropParamState*>(state);
      const double alpha = r->alpha();
      v = (s != nullptr ? s->square_avg() * alpha : at::zeros_like(g)) + g.square() * (1 - alpha);
      if (r->centered()) {
        const at::Tensor avg = (s != nullptr && s->grad_avg().defined() ? s->grad_avg() * alpha
                                                                        : at::zeros_like(g)) +
                               g * (1 - alpha);
        v = v - avg.square();
      }
      e = r->eps();
    } else {
      continue;  // no second moment: this parameter's share is plain g²
    }
    TORCH_CHECK(eps < 0 || eps == e,
                "TeleportOptimizer: kPreconditioned expects one eps for all teleported parameters");
    eps = e;
    any = true;
    pre.scale.emplace_back(p, v.clamp_min(0).sqrt());
  }
  if (!any) return teleport(active_, TeleportOptions(options_).objective(Objective::kGradNorm));
  TORCH_CHECK(pre.scale.size() == detail::distinct_parameters(active_).size(),
              "TeleportOptimizer: kPreconditioned expects every teleported parameter in an "
              "optimizer with a second moment (Adagrad, Adam, AdamW, RMSprop)");
  pre.eps = eps;
  return teleport(active_, options_, pre);
}

void TeleportOptimizer::apply_state_policy(TeleportReport& report) {
  if (options_.state_policy() == StatePolicy::kKeep || report.elements.empty()) return;
  if (options_.state_policy() == StatePolicy::kReset) {
    // LBFGS keeps one state for all its parameters, under the first one's key,
    // acted on or not: its history mixes every parameter, so it goes whole.
    const auto params = all_params(*inner_);
    if (!params.empty() &&
        dynamic_cast<torch::optim::LBFGSParamState*>(find_state(*inner_, params.front()))) {
      erase_state(*inner_, params.front());
    }
    for (const auto& p : detail::distinct_parameters(active_)) {
      auto* s = find_state(*inner_, p);
      if (auto* adagrad = dynamic_cast<torch::optim::AdagradParamState*>(s)) {
        // Adagrad creates its state up front and expects it there, its sums
        // starting at its group's initial accumulator value.
        adagrad->sum().fill_(adagrad_offset(*inner_, p));
        adagrad->step(0);
      } else {
        erase_state(*inner_, p);  // other optimizers create state lazily
      }
    }
    return;
  }
  // Transport, by buffer kind and by the element applied (docs/design.md §7):
  // gradient-like buffers map as gradients do; squared ones exactly under a
  // diagonal element (squared factors). Under a non-diagonal element no
  // elementwise map of the squared buffers exists, and an adaptive optimizer's
  // first and second moments are one unit (centered RMSprop takes
  // √(v − m²), Adam divides m by √v): both are kept, a state the optimizer
  // itself produced, and the report says so.
  for (size_t k = 0; k < active_.size(); ++k) {
    const auto& sym = *active_[k];
    const GroupElement& e = report.elements[k];
    const auto params = sym.parameters();
    std::vector<at::Tensor> gradient_like;
    std::vector<std::vector<at::Tensor>> squared;  // [slot][parameter]
    std::vector<double> offsets;                   // Adagrad's initial accumulator
    bool unknown = false, has_squared = false;
    for (size_t i = 0; i < params.size(); ++i) {
      const Buffers b = buffers_of(find_state(*inner_, params[i]));
      unknown = unknown || !b.known;
      gradient_like.push_back(b.gradient_like);
      offsets.push_back(b.squared.empty() ? 0 : adagrad_offset(*inner_, params[i]));
      if (squared.size() < b.squared.size()) squared.resize(b.squared.size());
      for (size_t j = 0; j < b.squared.size(); ++j) {
        squared[j].resize(params.size());
        squared[j][i] = b.squared[j];
        has_squared = has_squared || b.squared[j].defined();
      }
    }
    if (unknown && !noted_unknown_state_) {
      noted_unknown_state_ = true;
      notes_.push_back("the inner optimizer's state is of a type teleport does not know: it is "
                       "kept as it is at every teleport");
    }
    if (!sym.transports_gradients()) {  // nothing maps exactly
      report.state_kept = true;
      continue;
    }
    const bool squares_map = e.diagonal && sym.can_transport_squared_gradients();
    if (has_squared && !squares_map) {
      for (size_t i = 0; i < params.size(); ++i) {
        bool adaptive = false;
        for (const auto& slot : squared) adaptive = adaptive || (i < slot.size() && slot[i].defined());
        if (adaptive) gradient_like[i] = at::Tensor();  // kept with its second moment
      }
      report.state_kept = true;
    }
    sym.transport_gradients_(e, gradient_like);
    if (!has_squared || !squares_map) continue;
    at::NoGradGuard no_grad;
    for (auto& slot : squared) {
      slot.resize(params.size());
      // sum = initial + Σg²: only the sum of squares scales.
      for (size_t i = 0; i < params.size(); ++i) {
        if (slot[i].defined() && offsets[i] != 0) slot[i].sub_(offsets[i]);
      }
      sym.transport_squared_gradients_(e, slot);
      for (size_t i = 0; i < params.size(); ++i) {
        if (slot[i].defined() && offsets[i] != 0) slot[i].add_(offsets[i]);
      }
    }
  }
  transport_lbfgs(report);
  if (report.state_kept) {
    report.state_note = "under a non-diagonal element the adaptive optimizer's moments (first "
                        "and second, one unit) were kept, as was all state after a "
                        "data-dependent action: no elementwise map is exact there";
  }
}

// LBFGS keeps one state for all its parameters, as flat vectors: gradient
// differences y and the previous gradient map as gradients, steps s and the
// search direction as weights, so every yᵀs (and ρ = 1/yᵀs) is unchanged.
// H_diag (yᵀs / yᵀy) is kept: it is a scalar the next update recomputes.
void TeleportOptimizer::transport_lbfgs(TeleportReport& report) {
  const auto params = all_params(*inner_);
  if (params.empty()) return;
  auto* state = dynamic_cast<torch::optim::LBFGSParamState*>(find_state(*inner_, params.front()));
  if (state == nullptr) return;
  std::vector<at::Tensor> gradient_like(state->old_dirs().begin(), state->old_dirs().end());
  std::vector<at::Tensor> weight_like(state->old_stps().begin(), state->old_stps().end());
  gradient_like.push_back(state->prev_flat_grad());
  weight_like.push_back(state->d());
  for (size_t k = 0; k < active_.size(); ++k) {
    const auto& sym = *active_[k];
    if (!sym.transports_gradients()) {
      report.state_kept = true;
      continue;
    }
    std::vector<size_t> where;  // the symmetry's parameters among the optimizer's
    for (const auto& p : sym.parameters()) {
      for (size_t j = 0; j < params.size(); ++j) {
        if (params[j].is_same(p)) where.push_back(j);
      }
    }
    auto pick = [&](const at::Tensor& flat) {
      std::vector<at::Tensor> views;
      if (!flat.defined()) return views;
      const auto all = detail::flat_views(flat, params);
      for (size_t j : where) views.push_back(all[j]);
      return views;
    };
    at::NoGradGuard no_grad;
    const GroupElement& e = report.elements[k];
    for (const auto& y : gradient_like) {
      if (y.defined()) sym.transport_gradients_(e, pick(y));
    }
    for (const auto& s : weight_like) {
      if (s.defined()) sym.transport_gradients_(e.contragredient(), pick(s));
    }
  }
}

void TeleportOptimizer::save(torch::serialize::OutputArchive& archive) const {
  write_int(archive, "teleport/version", kCheckpointVersion);
  write_int(archive, "teleport/step", step_);
  write_int(archive, "teleport/teleports", teleports_);
  archive.write("teleport/stall_mean", c10::IValue(stall_.mean()));
  write_int(archive, "teleport/stall_last", stall_.last());
  options_.serialize(archive);

  write_int(archive, "groups/count", static_cast<int64_t>(param_groups_.size()));
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    torch::serialize::OutputArchive group(archive.compilation_unit());
    param_groups_[i].options().serialize(group);
    archive.write("groups/" + std::to_string(i), group);
  }
  // The inner state, by parameter position, for every torch::optim optimizer
  // (their own save() writes undefined buffers, such as Adam's max_exp_avg_sq
  // without amsgrad, that the archive cannot hold); others through their own.
  auto& inner = const_cast<Optimizer&>(*inner_);
  const auto params = all_params(inner);
  write_int(archive, "params/count", static_cast<int64_t>(params.size()));
  for (size_t j = 0; j < params.size(); ++j) {
    archive.write("params/" + std::to_string(j) + "/shape",
                  at::tensor(params[j].sizes().vec(), at::kLong));
  }
  bool native = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const std::string key = "state/" + std::to_string(j) + "/";
    const StateKind kind = kind_of(find_state(inner, params[j]));
    write_int(archive, key + "kind", static_cast<int64_t>(kind));
    if (kind == StateKind::kOther) {
      native = true;
    } else if (kind != StateKind::kNone) {
      write_state(archive, key, *find_state(inner, params[j]));
    }
  }
  if (native) {
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    inner_->save(nested);
    archive.write("inner", nested);
  }
}

void TeleportOptimizer::load(torch::serialize::InputArchive& archive) {
  c10::IValue probe_version;
  TORCH_CHECK(archive.try_read("teleport/version", probe_version),
              "TeleportOptimizer::load: expected a TeleportOptimizer checkpoint, got one without "
              "teleport/version (a plain optimizer's checkpoint loads into inner(): "
              "torch::load(opt.inner(), ...))");
  const int64_t version = probe_version.toInt();
  TORCH_CHECK(version == kCheckpointVersion, "TeleportOptimizer::load: expected a checkpoint of version ",
              kCheckpointVersion, ", got ", version);
  const auto shapes_now = all_params(*inner_);
  const int64_t count = read_int(archive, "params/count");
  TORCH_CHECK(count == static_cast<int64_t>(shapes_now.size()),
              "TeleportOptimizer::load: expected a checkpoint of ", shapes_now.size(),
              " parameters, got ", count, " (another model?)");
  for (size_t j = 0; j < shapes_now.size(); ++j) {
    at::Tensor shape;
    archive.read("params/" + std::to_string(j) + "/shape", shape);
    const std::vector<int64_t> got(shape.data_ptr<int64_t>(), shape.data_ptr<int64_t>() + shape.numel());
    TORCH_CHECK(got == shapes_now[j].sizes().vec(), "TeleportOptimizer::load: expected parameter ",
                j, " of shape ", shapes_now[j].sizes(), ", got ", c10::IntArrayRef(got),
                " (a checkpoint of another architecture?)");
  }
  step_ = read_int(archive, "teleport/step");
  teleports_ = read_int(archive, "teleport/teleports");
  {
    c10::IValue mean;
    archive.read("teleport/stall_mean", mean);
    stall_.restore(mean.toDouble(), read_int(archive, "teleport/stall_last"));
  }
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
    TORCH_CHECK(kind >= 0 && kind <= static_cast<int64_t>(StateKind::kOther),
                "TeleportOptimizer::load: unknown state kind ", kind, " for parameter ", j);
    if (kind == static_cast<int64_t>(StateKind::kNone)) {
      erase_state(*inner_, params[j]);
    } else if (kind == static_cast<int64_t>(StateKind::kOther)) {
      native = true;
    } else {
      set_state(*inner_, params[j],
                read_state(archive, key, static_cast<StateKind>(kind), params[j].device()));
    }
  }
  if (native) {
    torch::serialize::InputArchive nested;
    archive.read("inner", nested);
    inner_->load(nested);
  }
}

}  // namespace teleport
