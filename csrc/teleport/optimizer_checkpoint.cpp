// TeleportOptimizer's checkpoints: its own fields, the options, and the
// inner optimizer's state by parameter position, each optimizer's buffers by
// name (docs/design.md §9).
#include <teleport/optimizer.h>

#include <teleport/internal/inner_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <deque>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace teleport {
namespace {

using namespace detail;

// 2: the options as one unit (TeleportOptions::serialize), every field; the
// state of every torch::optim optimizer by parameter position.
// 3: the on-demand schedule's and the objective's fields; the parameters'
// count and shapes, checked at load.
constexpr int64_t kCheckpointVersion = 3;

void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v) {
  a.write(key, c10::IValue(v));
}
int64_t read_int(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toInt();
}

// What the inner state of one parameter is, for checkpoints.
enum class StateKind : int64_t {
  kNone = 0,
  kSGD = 1,
  kAdagrad = 2,
  kAdam = 4,
  kAdamW = 5,
  kRMSprop = 6,
  kLBFGS = 7,
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
                                                              const std::string& key,
                                                              StateKind kind, c10::Device device) {
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
  TORCH_CHECK(version == kCheckpointVersion,
              "TeleportOptimizer::load: expected a checkpoint of version ", kCheckpointVersion,
              ", got ", version);
  const auto shapes_now = all_params(*inner_);
  const int64_t count = read_int(archive, "params/count");
  TORCH_CHECK(count == static_cast<int64_t>(shapes_now.size()),
              "TeleportOptimizer::load: expected a checkpoint of ", shapes_now.size(),
              " parameters, got ", count, " (another model?)");
  for (size_t j = 0; j < shapes_now.size(); ++j) {
    at::Tensor shape;
    archive.read("params/" + std::to_string(j) + "/shape", shape);
    const std::vector<int64_t> got(shape.data_ptr<int64_t>(),
                                   shape.data_ptr<int64_t>() + shape.numel());
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
                "optimizer (",
                params.size(), ")");
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
