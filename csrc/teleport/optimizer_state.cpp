// TeleportOptimizer and the inner optimizer's state: the state policy
// applied after a teleport, LBFGS's history, the next step for kLookAhead
// (docs/design.md §7, §8).
#include <teleport/internal/optimizer_impl.h>
#include <teleport/internal/parameters.h>

#include <teleport/internal/inner_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace teleport {

using namespace detail;

std::vector<at::Tensor> TeleportOptimizer::Impl::inner_state_tensors() const {
  std::vector<at::Tensor> out;
  auto add = [&out](const std::vector<at::Tensor>& tensors) {
    for (const auto& t : tensors) {
      if (t.defined()) out.push_back(t);
    }
  };
  for (const auto& p : detail::distinct_parameters(active_)) {
    const Buffers b = buffers_of(detail::find_state(*inner_, p));
    add({b.gradient_like});
    add(b.squared);
  }
  const Buffers whole = whole_state(*inner_);
  add(whole.flat_gradient_like);
  add(whole.flat_weight_like);
  return out;
}

// The inner optimizer's next step in NextStep's form, with its buffers as they
// are now (docs/design.md §8); what it cannot express is refused.
NextStep TeleportOptimizer::Impl::next_step() const {
  NextStep next;
  next.transported = options_.state_policy() == StatePolicy::kTransport;
  const bool reset = options_.state_policy() == StatePolicy::kReset;
  const auto acted = detail::distinct_parameters(active_);
  for (const auto& grp : inner_->param_groups()) {
    const Adapter* adapter = adapter_for(&grp.options());
    for (const auto& p : grp.params()) {
      // kReset: the symmetries' parameters step from a fresh state.
      bool fresh = false;
      for (const auto& q : acted) fresh = fresh || (reset && q.is_same(p));
      auto* state = fresh ? nullptr : find_state(*inner_, p);
      if (adapter == nullptr) refuse_look_ahead();
      next.terms.push_back(adapter->next_step(grp.options(), state, p));
    }
  }
  return next;
}

void TeleportOptimizer::Impl::apply_state_policy(TeleportReport& report) {
  if (options_.state_policy() == StatePolicy::kKeep || report.elements.empty()) return;
  if (options_.state_policy() == StatePolicy::kReset) {
    // LBFGS keeps one state for all its parameters, under the first one's key,
    // acted on or not: its history mixes every parameter, so it goes whole.
    const auto params = all_params(*inner_);
    if (whole_state(*inner_).whole) erase_state(*inner_, params.front());
    for (const auto& p : detail::distinct_parameters(active_)) {
      auto* s = find_state(*inner_, p);
      const Adapter* a = adapter_for(s);
      const auto* options = options_of(*inner_, p);
      // Adagrad creates its state up front and expects it there; other
      // optimizers create state lazily.
      if (a == nullptr || options == nullptr || !a->reset(*options, *s)) erase_state(*inner_, p);
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
      offsets.push_back(b.squared.empty() ? 0 : squared_offset(*inner_, params[i]));
      if (squared.size() < b.squared.size()) squared.resize(b.squared.size());
      for (size_t j = 0; j < b.squared.size(); ++j) {
        squared[j].resize(params.size());
        squared[j][i] = b.squared[j];
        has_squared = has_squared || b.squared[j].defined();
      }
    }
    if (unknown && !noted_unknown_state_) {
      noted_unknown_state_ = true;
      notes_.push_back(
          "the inner optimizer's state is of a type teleport does not know: it is "
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
        for (const auto& slot : squared)
          adaptive = adaptive || (i < slot.size() && slot[i].defined());
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
  transport_whole_state(report);
  if (report.state_kept) {
    report.state_note =
        "under a non-diagonal element the adaptive optimizer's moments (first "
        "and second, one unit) were kept, as was all state after a "
        "data-dependent action: no elementwise map is exact there";
  }
}

// A state kept for all parameters at once (LBFGS's), as flat vectors laid out
// as the parameters are: the adapter says which map as gradients and which as
// weights (internal/optimizers/lbfgs.cpp).
void TeleportOptimizer::Impl::transport_whole_state(TeleportReport& report) {
  const Buffers whole = whole_state(*inner_);
  if (!whole.whole) return;
  const auto params = all_params(*inner_);
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
    for (const auto& y : whole.flat_gradient_like) {
      if (y.defined()) sym.transport_gradients_(e, pick(y));
    }
    for (const auto& s : whole.flat_weight_like) {
      if (s.defined()) sym.transport_gradients_(e.contragredient(), pick(s));
    }
  }
}

}  // namespace teleport
