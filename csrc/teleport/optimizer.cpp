#include <teleport/internal/optimizer_impl.h>

#include <teleport/internal/buffers.h>
#include <teleport/internal/inner_state.h>
#include <teleport/internal/layer_parts.h>
#include <teleport/internal/parameters.h>
#include <teleport/internal/random_state.h>
#include <teleport/internal/schedule.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/activation.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <type_traits>

namespace teleport {
namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerParamGroup;

using namespace detail;

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

TeleportOptimizer::TeleportOptimizer(torch::nn::Sequential model, std::unique_ptr<Optimizer> inner,
                                     TeleportOptions options, DiscoverOptions discover_options)
    : TeleportOptimizer(model, SymmetryList{}, std::move(inner), std::move(options)) {
  Discovery found = discover(model, discover_options);
  auto& symmetries = impl_->symmetries_;
  symmetries = std::move(found.symmetries);
  impl_->notes_ = std::move(found.notes);
  if (symmetries.empty()) {
    impl_->notes_.push_back("no teleportable pair of layers: teleports do nothing");
  }
  impl_->check_symmetries();
  const auto params = detail::distinct_parameters(symmetries);
  for (const auto& p : params) {
    TORCH_CHECK(
        p.device() == params.front().device() && p.scalar_type() == params.front().scalar_type(),
        "TeleportOptimizer: expected all teleported parameters on one device with "
        "one dtype (",
        params.front().device(), ", ", params.front().scalar_type(), "), got ", p.device(), ", ",
        p.scalar_type());
  }
}

TeleportOptimizer::TeleportOptimizer(torch::nn::Sequential model, SymmetryList symmetries,
                                     std::unique_ptr<Optimizer> inner, TeleportOptions options)
    : Optimizer(groups_of(inner), defaults_of(inner)),
      impl_(std::make_unique<Impl>(*this, std::move(model), std::move(inner), std::move(options),
                                   std::move(symmetries))) {}

TeleportOptimizer::TeleportOptimizer(SymmetryList symmetries, std::unique_ptr<Optimizer> inner,
                                     TeleportOptions options)
    : TeleportOptimizer(torch::nn::Sequential(nullptr), std::move(symmetries), std::move(inner),
                        std::move(options)) {}

TeleportOptimizer::~TeleportOptimizer() = default;

at::Tensor TeleportOptimizer::step(LossClosure closure) { return impl_->step(closure); }
void TeleportOptimizer::save(torch::serialize::OutputArchive& archive) const {
  impl_->save(archive);
}
void TeleportOptimizer::load(torch::serialize::InputArchive& archive) { impl_->load(archive); }

void TeleportOptimizer::set_buffers(std::vector<at::Tensor> buffers) {
  impl_->buffers_ = std::move(buffers);
}
Collectives* TeleportOptimizer::process_group() const { return impl_->group_.get(); }
Optimizer& TeleportOptimizer::inner() { return *impl_->inner_; }
const Optimizer& TeleportOptimizer::inner() const { return *impl_->inner_; }
const SymmetryList& TeleportOptimizer::symmetries() const { return impl_->symmetries_; }
const std::vector<std::string>& TeleportOptimizer::notes() const { return impl_->notes_; }
TeleportOptions& TeleportOptimizer::options() { return impl_->options_; }
const TeleportOptions& TeleportOptimizer::options() const { return impl_->options_; }
int64_t TeleportOptimizer::step_count() const { return impl_->step_; }
int64_t TeleportOptimizer::teleport_count() const { return impl_->teleports_; }
const TeleportReport* TeleportOptimizer::last_report() const {
  return impl_->has_report_ ? &impl_->last_report_ : nullptr;
}

TeleportOptimizer::Impl::Impl(TeleportOptimizer& self, torch::nn::Sequential model,
                              std::unique_ptr<Optimizer> inner, TeleportOptions options,
                              SymmetryList symmetries)
    : model_(std::move(model)),
      inner_(std::move(inner)),
      options_(std::move(options)),
      symmetries_(std::move(symmetries)),
      self(self) {
  options_.validate();
  check_symmetries();
  check_state_policy();
  if (!model_.is_empty()) buffers_ = model_->buffers();
}

void TeleportOptimizer::Impl::check_symmetries() const {
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
  detail::roles_of(symmetries_, "TeleportOptimizer");  // throws on a conflict
  require_among(symmetries_, all_params(*inner_),
                "the inner optimizer does not hold; build the inner optimizer from the "
                "model's parameters");
}

void TeleportOptimizer::Impl::check_state_policy() const {
  if (options_.state_policy() != StatePolicy::kTransport) return;
  const std::string why = untransportable(*inner_);
  TORCH_CHECK(why.empty(), "TeleportOptimizer: ", why);
}

void TeleportOptimizer::Impl::check_model_unchanged() const {
  if (model_.is_empty()) return;
  // The tensors the layers compute with now (what forward() reads).
  std::vector<at::Tensor> current;
  auto add = [&](const at::Tensor& weight, const at::Tensor& bias) {
    if (weight.defined()) current.push_back(weight);
    if (bias.defined()) current.push_back(bias);
  };
  for (const auto& module : model_->modules(/*include_self=*/false)) {
    if (const auto parts = detail::layer_parts(*module)) add(parts->weight, parts->bias);
    if (const auto* a = module->as<torch::nn::MultiheadAttention>())
      add(a->in_proj_weight, a->in_proj_bias);
  }
  for (const auto& s : symmetries_) s->check_unchanged();
  require_among(symmetries_, current,
                "the model no longer holds (was a layer's weight replaced after the optimizer "
                "was built?); rebuild the optimizer");
}

void TeleportOptimizer::set_teleport_batch(BatchFn next_batch, LossFn loss_fn) {
  TORCH_CHECK(!impl_->model_.is_empty(),
              "set_teleport_batch: expected the optimizer to hold a model, got none");
  TORCH_CHECK(next_batch != nullptr && loss_fn != nullptr,
              "set_teleport_batch: expected a batch source and a loss function");
  impl_->next_batch_ = std::move(next_batch);
  impl_->loss_fn_ = std::move(loss_fn);
}

void TeleportOptimizer::set_process_group(std::shared_ptr<Collectives> group, double share) {
  if (group == nullptr) {
    impl_->group_ = nullptr;
    impl_->share_ = 1;
    return;
  }
  if (share < 0) share = 1.0 / static_cast<double>(group->world_size());
  TORCH_CHECK(share > 0 && share <= 1,
              "set_process_group: expected this rank's share of the "
              "global batch in (0, 1], got ",
              share);
  TORCH_CHECK(impl_->options_.mode() == Mode::kExact,
              "set_process_group: reference mode runs on one process; use Mode::kExact");
  impl_->group_ = std::move(group);
  impl_->share_ = share;
}

void TeleportOptimizer::Impl::sync_inner() {
  auto& inner_groups = inner_->param_groups();
  for (size_t i = 0; i < self.param_groups_.size(); ++i) {
    if (i == inner_groups.size()) {
      inner_->add_param_group(self.param_groups_[i]);
      continue;
    }
    inner_groups[i].params() = self.param_groups_[i].params();
    inner_groups[i].set_options(self.param_groups_[i].options().clone());
  }
}

double TeleportOptimizer::Impl::symmetric_grad_norm_sq() const {
  std::vector<at::Tensor> sums;
  for (const auto& p : detail::distinct_parameters(symmetries_)) {
    if (p.grad().defined()) sums.push_back(p.grad().square().sum());
  }
  return sums.empty() ? std::numeric_limits<double>::quiet_NaN()
                      : at::stack(sums).sum().item<double>();
}

SymmetryList TeleportOptimizer::Impl::taking_part(bool from_grad,
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

void TeleportOptimizer::Impl::verify_symmetries(const std::function<at::Tensor()>& loss) {
  SymmetryList kept;
  for (const auto& s : symmetries_) {
    const bool checked = std::find(verified_.begin(), verified_.end(), s.get()) != verified_.end();
    const bool taking_part = std::find(active_.begin(), active_.end(), s) != active_.end();
    if (checked || !taking_part || s->reads_batch()) {
      kept.push_back(s);
      continue;
    }
    const detail::Snapshot snapshot(all_params(self));  // the loss rewrites every gradient
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
    refused_.push_back(s->name() +
                       ": not a symmetry of this loss, refused: a random element of "
                       "norm max_step changed it by " +
                       c10::str(c.drift) + " (relative), above " + c10::str(c.bound));
    notes_.push_back(refused_.back());
  }
  if (kept.size() == symmetries_.size()) return;
  symmetries_ = std::move(kept);
  SymmetryList active;
  for (const auto& s : active_) {
    if (std::find(symmetries_.begin(), symmetries_.end(), s) != symmetries_.end())
      active.push_back(s);
  }
  active_ = std::move(active);
}

void TeleportOptimizer::Impl::check_gradients_agree() const {
  std::vector<at::Tensor> parts;
  for (const auto& p : detail::distinct_parameters(active_)) {
    if (!p.grad().defined()) continue;
    const at::Tensor g = p.grad().detach().to(at::kDouble);
    parts.push_back(at::stack({g.sum(), g.square().sum()}));
  }
  const at::Tensor mine =
      parts.empty() ? at::zeros({1, 2}, at::kDouble) : at::stack(parts).sum(0).reshape({1, 2});
  int64_t first_row = 0;
  const at::Tensor all = group_->all_gather_rows(mine, first_row).cpu();
  const auto sums = all.accessor<double, 2>();
  for (int64_t r = 1; r < all.size(0); ++r) {
    for (int64_t j = 0; j < 2; ++j) {
      const double a = sums[0][j], b = sums[r][j];
      TORCH_CHECK(std::abs(a - b) <= 1e-6 * (std::abs(a) + std::abs(b)),
                  "TeleportOptimizer: expected the same .grad on every rank (averaged over the "
                  "ranks before step(), e.g. teleport::distributed::average_gradients), got "
                  "gradients that differ: checksum ",
                  j == 0 ? "Σg" : "Σg²", " is ", a, " on rank 0 and ", b, " on rank ", r,
                  ". Each rank would teleport differently and the replicas would diverge");
    }
  }
}

void TeleportOptimizer::Impl::align_elements(TeleportReport& report) const {
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
void TeleportOptimizer::Impl::teleport_step(const LossClosure& replay, const at::Tensor& loss,
                                            at::Tensor& current) {
  check_model_unchanged();
  check_state_policy();
  const detail::BufferGuard buffers(buffers_);
  std::vector<std::string> skipped;
  active_ = taking_part(/*from_grad=*/!next_batch_, skipped);
  bool none_has_gradients = !symmetries_.empty() && active_.empty() && !next_batch_;
  for (const auto& s : symmetries_) {
    for (const auto& p : s->parameters())
      none_has_gradients = none_has_gradients && !p.grad().defined();
  }
  TORCH_CHECK(!none_has_gradients,
              "teleport: expected gradients in .grad (call loss.backward() "
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
  const detail::Snapshot point(all_params(self));
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

at::Tensor TeleportOptimizer::Impl::step(const LossClosure& closure) {
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
  const char* stale =
      "TeleportOptimizer: this teleport (data-dependent or reference mode) leaves "
      "the gradient stale; call step(closure) so that it can be computed afresh "
      "after it";
  TORCH_CHECK(!scheduled || !fresh_gradients || closure != nullptr, stale);
  // Every call of the closure here replays the randomness of the first (dropout
  // masks), so the losses before and after differ only by the teleport, and
  // the random stream advances as by the one call of a plain step.
  const RandomState random(devices_of(all_params(self)));
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
  const bool due =
      (watching && stall_.update(options_, symmetric_grad_norm_sq(), step_)) || scheduled;
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

TeleportReport TeleportOptimizer::Impl::run_teleport(const LossClosure& replay,
                                                     const at::Tensor& loss, at::Tensor& current) {
  if (next_batch_) {
    auto batch = next_batch_();
    BatchLoss objective(model_, batch.first, batch.second, loss_fn_);
    if (group_) objective = objective.spread_over(group_, share_);
    if (options_.verify()) verify_symmetries([&] { return objective.global_loss(); });
    TORCH_CHECK(
        options_.objective() != Objective::kPreconditioned,
        "TeleportOptimizer: kPreconditioned teleports from .grad; it takes no teleport batch");
    if (options_.objective() == Objective::kLookAhead) {
      return teleport(active_, options_, objective, next_step());
    }
    return teleport(active_, options_, &objective);
  }
  TORCH_CHECK(
      options_.objective() != Objective::kLookAhead && options_.objective() != Objective::kFlatness,
      "TeleportOptimizer: kLookAhead and kFlatness evaluate losses on a teleport batch; "
      "call set_teleport_batch first");
  if (replay == nullptr || active_.empty()) {
    return teleport_from_grad();
  }
  // Closed form from .grad, then the closure measures the loss at the new
  // point (and leaves the exact gradient there); too large a change rolls back.
  // The closure rewrites every gradient, so the snapshot holds them all.
  const detail::Snapshot snapshot(all_params(self));
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
  const bool too_far = options_.mode() == Mode::kExact &&
                       change > detail::allowed_loss_change(
                                    report.loss_before, options_.tolerance(), loss.scalar_type());
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

TeleportReport TeleportOptimizer::Impl::teleport_from_grad() {
  if (options_.objective() != Objective::kPreconditioned) return teleport(active_, options_);
  Preconditioner pre;
  bool any = false;
  double eps = -1;
  for (const auto& p : detail::distinct_parameters(active_)) {
    TORCH_CHECK(p.grad().defined(), "TeleportOptimizer: expected gradients in .grad, got none");
    const at::Tensor g = p.grad().detach();
    const auto* group = options_of(*inner_, p);
    const Adapter* adapter = adapter_for(group);
    double e = 0;
    const at::Tensor v =  // v̂, bias-corrected; none without a second moment (SGD)
        adapter != nullptr ? adapter->second_moment(*group, find_state(*inner_, p), g, e)
                           : at::Tensor();
    if (!v.defined()) continue;  // this parameter's share is plain g²
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

}  // namespace teleport
