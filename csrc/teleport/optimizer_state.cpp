// TeleportOptimizer and the inner optimizer's state: the state policy
// applied after a teleport, LBFGS's history, the next step for kLookAhead
// (docs/design.md §7, §8).
#include <teleport/internal/parameters.h>
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

#include <cmath>
#include <deque>
#include <vector>

namespace teleport {

using namespace detail;

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
    if (auto* l = dynamic_cast<torch::optim::LBFGSParamState*>(
            detail::find_state(*inner_, params.front()))) {
      for (const auto& t : l->old_dirs()) add(t);
      for (const auto& t : l->old_stps()) add(t);
      add(l->prev_flat_grad());
      add(l->d());
    }
  }
  return out;
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
        TORCH_CHECK(
            r->momentum() == 0 && !r->centered(),
            "TeleportOptimizer: kLookAhead models RMSprop without momentum and not centered");
        const auto* s = dynamic_cast<o::RMSpropParamState*>(state);
        if (s != nullptr) t.v = s->square_avg();
        t.lr = r->lr(), t.weight_decay = r->weight_decay();
        t.adaptive = true, t.a = 0, t.b = 1, t.c = r->alpha(), t.d = 1 - r->alpha(), t.e = 1;
        t.eps = r->eps();
      } else {
        TORCH_CHECK(false,
                    "TeleportOptimizer: kLookAhead models SGD, Adagrad, RMSprop, Adam and "
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
  transport_lbfgs(report);
  if (report.state_kept) {
    report.state_note =
        "under a non-diagonal element the adaptive optimizer's moments (first "
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

}  // namespace teleport
