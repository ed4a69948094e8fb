#include <teleport/ascent.h>

#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/tolerance.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <cmath>
#include <optional>
#include <typeinfo>
#include <type_traits>
#include <utility>

namespace teleport {
namespace detail {

namespace {
bool tensor_ops_on_cpu = false;  // see internal/tensor_ops.h
}  // namespace

TensorOpsOnCpu::TensorOpsOnCpu() : previous_(tensor_ops_on_cpu) {
  tensor_ops_on_cpu = true;
}
TensorOpsOnCpu::~TensorOpsOnCpu() { tensor_ops_on_cpu = previous_; }

bool host_bookkeeping(const at::Tensor& like) {
  return like.device().is_cpu() && !tensor_ops_on_cpu;
}
bool host_bookkeeping(const std::vector<at::Tensor>& params) {
  return host_bookkeeping(params.front());
}

Snapshot::Snapshot(std::vector<at::Tensor> params) : params_(std::move(params)) {
  at::NoGradGuard no_grad;
  for (const auto& p : params_) {
    values_.push_back(p.detach().clone());
    grads_.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  }
}

void Snapshot::restore() const {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].detach().copy_(values_[i]);
    at::Tensor& grad = const_cast<at::Tensor&>(params_[i]).mutable_grad();
    if (!grads_[i].defined()) {
      grad = at::Tensor();
    } else if (grad.defined() && grad.sizes() == grads_[i].sizes()) {
      grad.copy_(grads_[i]);
    } else {
      grad = grads_[i].clone();
    }
  }
}

std::vector<at::Tensor> distinct_parameters(const SymmetryList& symmetries) {
  std::vector<at::Tensor> out;
  for (const auto& s : symmetries) {
    for (const auto& p : s->parameters()) {
      bool seen = false;
      for (const auto& q : out) seen = seen || q.is_same(p);
      if (!seen) out.push_back(p);
    }
  }
  return out;
}

void check_roles(const SymmetryList& symmetries, const char* who) {
  struct Role {
    const void* tensor;
    bool columns;
    size_t symmetry;
  };
  std::vector<Role> seen;
  for (size_t k = 0; k < symmetries.size(); ++k) {
    const auto params = symmetries[k]->parameters();
    const bool layer = dynamic_cast<const LayerSymmetry*>(symmetries[k].get()) != nullptr;
    for (size_t i = 0; i < params.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        TORCH_CHECK(!params[j].is_same(params[i]), who, ": ", symmetries[k]->name(),
                    " acts twice on one tensor of shape ", params[i].sizes(),
                    " (a layer paired with itself, or tied weights): that is no symmetry");
      }
      if (!layer) continue;
      // A layer symmetry's last tensor is acted on by columns, the others by rows.
      const Role role{params[i].unsafeGetTensorImpl(), i + 1 == params.size(), k};
      for (const auto& r : seen) {
        TORCH_CHECK(r.tensor != role.tensor || r.columns != role.columns, who, ": ",
                    symmetries[r.symmetry]->name(), " and ", symmetries[k]->name(),
                    " both act on the ", role.columns ? "columns (inputs)" : "rows (outputs)",
                    " of one tensor of shape ", params[i].sizes(),
                    ": expected each tensor acted on at most once per side (a symmetry "
                    "declared twice, or a layer used twice?)");
      }
      seen.push_back(role);
    }
  }
}

}  // namespace detail

namespace {

using namespace detail;  // the engines' shared parts: internal/ascent_parts.h
using Clock = std::chrono::steady_clock;

// The gradients of the batch's loss at the current weights, without
// touching `.grad`; the loss itself comes back through `loss`.
std::vector<at::Tensor> batch_gradients(const BatchLoss& batch,
                                        const std::vector<at::Tensor>& params,
                                        at::Tensor& loss) {
  at::AutoGradMode enable(true);
  loss = batch.loss();
  if (batch.group() == nullptr) {
    auto grads = torch::autograd::grad({loss}, params);
    loss = loss.detach();
    return grads;
  }
  // The global batch's: share-weighted sums over the ranks, in one all-reduce.
  const at::Tensor local = loss * batch.share();
  auto grads = torch::autograd::grad({local}, params);
  grads.push_back(local.detach());
  batch.group()->all_reduce_sum(grads);
  loss = grads.back();
  grads.pop_back();
  return grads;
}

// One attempt on the weights themselves: each symmetry's unit step times
// `scale`, applied (a data-dependent action reads `batch`) and composed into
// `total` (which, when `from_identity`, is the identity: the product is the
// attempt's element). Returns the attempt's elements. In exact mode the last
// symmetry acts first: a data-dependent action then finds its layer's inputs
// and outputs as the batch's last evaluation left them, the layers before it
// not yet changed (the actions compose either way: docs/design.md §3); the
// reference arithmetic acts in the published code's order.
template <class V>
std::vector<GroupElement> apply_steps(const SymmetryList& syms, const std::vector<at::Tensor>& unit,
                                      const V& scale, const BatchLoss& batch,
                                      std::vector<GroupElement>& total, const TeleportOptions& o,
                                      bool from_identity = false) {
  std::vector<GroupElement> elements(syms.size());
  const bool backwards = o.mode() == Mode::kExact;
  for (size_t j = 0; j < syms.size(); ++j) {
    const size_t k = backwards ? syms.size() - 1 - j : j;
    elements[k] = step_element(*syms[k], unit[k] * scale, o);
    syms[k]->apply_(elements[k], &batch, o.mode());
    total[k] = from_identity ? elements[k] : elements[k].compose(total[k]);
  }
  return elements;
}

// After an attempt on the weights themselves: where `ok` is false, the weights
// and the product of steps go back to `before` (decided on the device, no
// host synchronisation); where true, the new point's directions are taken.
void keep_or_undo(const at::Tensor& ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before, std::vector<at::Tensor>& directions,
                  const std::vector<at::Tensor>& next_directions) {
  {
    at::NoGradGuard no_grad;
    // On CPU the flag is read for free: a kept attempt copies nothing, a refused
    // one copies back; elsewhere the choice stays on the device.
    const bool on_cpu = ok.device().is_cpu();
    const bool undo = on_cpu && !ok.item<bool>();
    for (size_t i = 0; i < params.size(); ++i) {
      if (!on_cpu) {
        params[i].detach().copy_(at::where(ok, params[i].detach(), before[i]));
      } else if (undo) {
        params[i].detach().copy_(before[i]);
      }
    }
  }
  for (size_t k = 0; k < total.size(); ++k) {
    total[k] = {at::where(ok, total[k].g, total_before[k].g),
                at::where(ok, total[k].g_inv, total_before[k].g_inv), total[k].diagonal, {}};
    directions[k] = at::where(ok, next_directions[k], directions[k]);
  }
}

// The same decided on the host (on the CPU): a kept attempt copies nothing, a
// refused one copies the weights back.
void keep_or_undo(bool ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before, std::vector<at::Tensor>& directions,
                  const std::vector<at::Tensor>& next_directions) {
  if (ok) {
    for (auto& e : total) e.invertible = at::Tensor();
    directions = next_directions;
    return;
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) params[i].detach().copy_(before[i]);
  total = total_before;
}

struct Evaluation {
  at::Tensor loss, F;  // detached
  // ∂F/∂T_k at T = 0, computed on demand from the kept graph: at most once, and
  // before the weights evaluated change in place.
  std::function<std::vector<at::Tensor>()> directions;
};

// F(T) = ||∇L((I+T)·w)||² on the batch at T = 0 and ∂F/∂T (on demand) by
// the chain rule (docs/design.md §3): ∇L at the new point treats the new
// weights as independent variables, so ∂F/∂T_k = J_kᵀ ∂F/∂w with J_k the
// derivative of action k at the identity. ∂F/∂w is a double backward through
// the loss alone; each symmetry's pullback() applies J_kᵀ (in closed form for
// the data-dependent action). On a batch spread over ranks (docs/design.md
// §10), with g_r the gradient of share_r × L_r on rank r and ḡ = Σ_r g_r the
// global batch's, F = ||ḡ||² and ∂F/∂w = Σ_r ∂(2 ḡ·g_r)/∂w: one all-reduce
// for ḡ and the loss, one for ∂F/∂w, so that every rank steps alike.
Evaluation evaluate(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                    const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
                    Mode mode = Mode::kExact);

// A tensor as rows (batch × features), as BatchLoss hands out layer inputs.
at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The data-dependent actions an evaluation takes from their layer's output
// (docs/design.md §3): one whose layer inputs H are a constant of F (the first
// layer's: the batch) takes its pullback from ∂F/∂Z, Z the layer's output in
// the evaluation's graph, instead of from ∂F/∂θ = Hᵀ ∂F/∂Z
// (DataDependentGL::pullback_from_output). Within the rank condition, where
// no other symmetry acts on its weight and bias, their gradient δᵀ[H 1] (δ =
// ∂L/∂Z) enters F only as tr(δᵀ G δ), G = [H 1][H 1]ᵀ (batch × batch), with
// ∂F/∂δ = 2 G δ: it is never formed (a product with the batch × inputs H
// saved each way). On one process only: spread, Z holds this rank's rows.
struct Taps {
  std::vector<const DataDependentGL*> symmetry;  // per symmetry, null if not tapped
  std::vector<at::Tensor> h, z;                  // its layer's input and output (graph)
  std::vector<at::Tensor> gram;                  // G, where its gradient goes through G
  std::vector<bool> via_gram;                    // per parameter: its gradient is not formed

  bool tapped(size_t k) const { return symmetry[k] != nullptr; }
};

// Before the evaluation: the layers to record.
std::vector<const DataDependentGL*> tap_candidates(const SymmetryList& syms, const BatchLoss& batch) {
  std::vector<const DataDependentGL*> out(syms.size(), nullptr);
  if (batch.group() != nullptr || !batch.has_model()) return out;
  for (size_t k = 0; k < syms.size(); ++k) {
    out[k] = dynamic_cast<const DataDependentGL*>(syms[k].get());
    if (out[k] != nullptr) batch.watch(out[k]->parameters().front());
  }
  return out;
}

// After the loss's forward pass on `overrides`: which candidates are tapped.
Taps taps_of(std::vector<const DataDependentGL*> candidates, const std::vector<at::Tensor>& params,
             const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
             const ParameterOverrides& overrides) {
  const size_t n = candidates.size();
  Taps t{std::move(candidates), std::vector<at::Tensor>(n), std::vector<at::Tensor>(n),
         std::vector<at::Tensor>(n), std::vector<bool>(params.size(), false)};
  std::vector<size_t> uses(params.size(), 0);
  for (const auto& w : where) {
    for (size_t i : w) ++uses[i];
  }
  for (size_t k = 0; k < n; ++k) {
    if (t.symmetry[k] == nullptr) continue;
    const auto [h, z] = batch.traced_layer(t.symmetry[k]->parameters().front(), overrides);
    if (!z.defined() || !z.requires_grad() || h.requires_grad()) {
      t.symmetry[k] = nullptr;
      continue;
    }
    t.h[k] = h, t.z[k] = z;
    bool alone = true;  // W_in and b_in: every parameter but W_out
    for (size_t j = 0; j + 1 < where[k].size(); ++j) alone = alone && uses[where[k][j]] == 1;
    if (alone) t.gram[k] = t.symmetry[k]->input_gram(rows_of(h));
    if (!t.gram[k].defined()) continue;
    for (size_t j = 0; j + 1 < where[k].size(); ++j) t.via_gram[where[k][j]] = true;
  }
  return t;
}

Evaluation evaluate_exact(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          const std::vector<std::vector<size_t>>& where, const BatchLoss& batch) {
  at::AutoGradMode enable(true);
  std::vector<at::Tensor> current;
  ParameterOverrides overrides;
  for (const auto& p : params) {
    current.push_back(p.detach().requires_grad_(true));
    overrides.emplace_back(p, current.back());
  }
  const bool spread = batch.group() != nullptr;
  auto candidates = tap_candidates(syms, batch);  // watched: the forward pass keeps Z
  const at::Tensor loss = spread ? batch.loss(overrides) * batch.share() : batch.loss(overrides);
  const Taps taps = taps_of(std::move(candidates), params, where, batch, overrides);
  // The graph is kept for the directions, which are taken on demand. The
  // gradients g_i, and δ_k = ∂L/∂Z_k where the Gram matrix stands in for them.
  std::vector<at::Tensor> first;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!taps.via_gram[i]) first.push_back(current[i]);
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    if (taps.gram[k].defined()) first.push_back(taps.z[k]);
  }
  const auto first_grads = torch::autograd::grad({loss}, first, {}, true, true);
  std::vector<at::Tensor> grads(params.size()), deltas(syms.size());
  size_t at_first = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!taps.via_gram[i]) grads[i] = first_grads[at_first++];
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    if (taps.gram[k].defined()) deltas[k] = first_grads[at_first++];
  }
  Evaluation ev;
  // ∂F/∂w = Σ_i (∂g_i/∂w)ᵀ 2ḡ_i: one vector-Jacobian product through the
  // gradients, weighted by 2ḡ (ḡ = g on one process), with no graph for F.
  std::vector<at::Tensor> global(params.size());  // ḡ (undefined where not formed)
  for (size_t i = 0; i < params.size(); ++i) {
    if (grads[i].defined()) global[i] = grads[i].detach();
  }
  if (spread) {  // every gradient formed: nothing is tapped on a spread batch
    for (auto& g : global) g = g.clone();
    global.push_back(loss.detach());
    batch.group()->all_reduce_sum(global);
    ev.loss = global.back();
    global.pop_back();
  } else {
    ev.loss = loss.detach();
  }
  std::vector<at::Tensor> formed;
  for (const auto& g : global) {
    if (g.defined()) formed.push_back(g);
  }
  ev.F = norm_sq(formed);
  std::vector<at::Tensor> gram_delta(syms.size());  // 2 G δ, in δ's shape and dtype
  for (size_t k = 0; k < syms.size(); ++k) {
    if (!deltas[k].defined()) continue;
    const at::Tensor d = rows_of(deltas[k].detach()).to(at::kDouble);
    const at::Tensor gd = at::mm(taps.gram[k], d);
    ev.F = ev.F + (d * gd).sum().to(ev.F.scalar_type());
    gram_delta[k] = (gd * 2).to(deltas[k].scalar_type()).reshape(deltas[k].sizes());
  }
  ev.directions = [=, &syms, &where, &batch] {
    std::vector<at::Tensor> outputs, weights;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined() || !grads[i].requires_grad()) continue;  // constant in the weights
      outputs.push_back(grads[i]);
      weights.push_back(global[i] * 2);
    }
    for (size_t k = 0; k < syms.size(); ++k) {
      if (!deltas[k].defined() || !deltas[k].requires_grad()) continue;
      outputs.push_back(deltas[k]);
      weights.push_back(gram_delta[k]);
    }
    // ∂F/∂w for the weights a pullback needs (a tapped action only its
    // W_out's), then ∂F/∂Z for the tapped layers' outputs.
    std::vector<bool> needed(params.size(), false);
    for (size_t k = 0; k < syms.size(); ++k) {
      if (taps.tapped(k)) {
        needed[where[k].back()] = true;
      } else {
        for (size_t i : where[k]) needed[i] = true;
      }
    }
    std::vector<at::Tensor> inputs;
    for (size_t i = 0; i < params.size(); ++i) {
      if (needed[i]) inputs.push_back(current[i]);
    }
    for (const auto& z : taps.z) {
      if (z.defined()) inputs.push_back(z);
    }
    std::vector<at::Tensor> derivatives(inputs.size());
    if (!outputs.empty()) {
      derivatives =
          torch::autograd::grad(outputs, inputs, weights, false, false, /*allow_unused=*/true);
    }
    std::vector<at::Tensor> dF(params.size());
    size_t next = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!needed[i]) continue;
      const at::Tensor& d = derivatives[next++];
      dF[i] = d.defined() ? d : at::zeros_like(params[i]);
    }
    if (spread) batch.group()->all_reduce_sum(dF);
    ParameterOverrides values;
    for (size_t i = 0; i < params.size(); ++i) values.emplace_back(params[i], current[i].detach());
    std::vector<at::Tensor> directions;
    for (size_t k = 0; k < syms.size(); ++k) {
      if (taps.tapped(k)) {
        const at::Tensor z = rows_of(taps.z[k].detach());
        const at::Tensor& d = derivatives[next++];
        const at::Tensor dz = d.defined() ? rows_of(d) : at::zeros_like(z);
        const size_t out = where[k].back();
        directions.push_back(taps.symmetry[k]->pullback_from_output(
            dz, rows_of(taps.h[k].detach()), z, current[out].detach(), dF[out]));
        continue;
      }
      std::vector<at::Tensor> own;
      for (size_t i : where[k]) own.push_back(current[i].detach());
      directions.push_back(syms[k]->pullback(own, pick(dF, where[k]), &batch, values).detach());
    }
    return directions;
  };
  return ev;
}

// F(T) and ∂F/∂T (on demand) by double backward through the actions
// themselves, for reference mode: the published code's direction also follows
// a data-dependent action into the later layers' inputs it changes.
Evaluation evaluate(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                    const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
                    Mode mode) {
  if (mode == Mode::kExact) return evaluate_exact(syms, params, where, batch);
  TORCH_INTERNAL_ASSERT(batch.group() == nullptr, "reference mode runs on one process");
  at::AutoGradMode enable(true);
  std::vector<at::Tensor> Ts;
  std::vector<at::Tensor> current;
  for (const auto& p : params) current.push_back(p.detach());
  auto in_force = [&] {
    ParameterOverrides o;
    for (size_t i = 0; i < params.size(); ++i) o.emplace_back(params[i], current[i]);
    return o;
  };
  // In forward order: a data-dependent action reads its layer's inputs from the
  // network as the earlier actions left it.
  for (size_t k = 0; k < syms.size(); ++k) {
    Ts.push_back(syms[k]->zero_algebra().requires_grad_(true));
    const auto acted =
        syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force(), mode);
    for (size_t j = 0; j < acted.size(); ++j) current[where[k][j]] = acted[j];
  }
  const at::Tensor loss = batch.loss(in_force());
  const auto grads = torch::autograd::grad({loss}, current, {}, true, true);
  const at::Tensor F = norm_sq(grads);
  Evaluation ev{loss.detach(), F.detach(), {}};
  ev.directions = [F, Ts] {
    std::vector<at::Tensor> directions;
    for (auto& d : torch::autograd::grad({F}, Ts)) directions.push_back(d.detach());
    return directions;
  };
  return ev;
}

// Closed form for diagonal scalings of Linear layers, on squared gradients.
// With cumulative scales c, a gradient entry (j, k) of a weight is
// G[j,k] q_k^½ r_j^½, where r = 1/c² of the symmetry on its rows and q = c² of
// the one on its columns, so ||∇L||² and every direction need only Q = G²
// weighted by r and q: one matrix-vector product each way for a weight with
// symmetries on both sides, and none otherwise. The weights and gradients are
// touched once, at the end. Same result as closed_form_ascent, far cheaper.
struct ScalingSlot {
  bool bias = false;
  int row = -1, col = -1;  // the symmetries on its rows and columns, -1 for none
  at::Tensor q;            // the squared gradient, for biases and weights with both
  at::Tensor row_sums, col_sums;  // Q 1 or Qᵀ 1 for weights with one side only
};

struct ScalingState {
  at::Tensor norm;
  std::vector<at::Tensor> directions;
};

ScalingState scaling_state(const std::vector<ScalingSlot>& slots,
                           const std::vector<at::Tensor>& c) {
  std::vector<at::Tensor> q, r;  // c² and 1/c² per symmetry
  for (const auto& ck : c) {
    q.push_back(ck.square());
    r.push_back(q.back().reciprocal());
  }
  std::vector<at::Tensor> halves(c.size());  // directions / 2
  std::vector<at::Tensor> norm_parts;
  for (const auto& s : slots) {
    if (s.bias) {  // rows only
      const at::Tensor part = s.q * r[s.row];
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
    } else if (s.col < 0) {  // rows only: Σ_k Q_jk = row_sums_j
      const at::Tensor part = r[s.row] * s.row_sums;
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
    } else if (s.row < 0) {  // columns only: Σ_j Q_jk = col_sums_k
      const at::Tensor part = q[s.col] * s.col_sums;
      norm_parts.push_back(part.sum());
      accumulate(halves[s.col], part);
    } else {
      const at::Tensor part = r[s.row] * at::mv(s.q, q[s.col]);  // r_j (Q q)_j
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
      accumulate(halves[s.col], q[s.col] * at::mv(s.q.t(), r[s.row]));  // q_k (Qᵀ r)_k
    }
  }
  ScalingState st;
  st.norm = at::stack(norm_parts).sum();
  for (auto& h : halves) st.directions.push_back(h * 2);
  return st;
}

bool all_layer_scalings(const SymmetryList& syms) {
  for (const auto& s : syms) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    if (layer == nullptr || layer->kind() != SymmetryKind::kScaling) return false;
  }
  return true;
}

// The scaling ascent on CPU: the same arithmetic as the loop in
// scaling_ascent, with the vector work (widths-sized, a few microseconds in
// all) in plain loops instead of dozens of ATen calls per step, and the
// matrix-vector products through at::mv. Returns the scales c.
// Scales weights and gradients once by the scales c found by the ascent.
Ascent finish_scaling(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<std::vector<size_t>>& where, std::vector<at::Tensor> c,
                      Ascent a, bool decide_before_apply) {
  if (decide_before_apply) {
    // The new gradients are finite when their squared norm is; the new weights
    // when |w| times the largest factor any entry gets is. Otherwise apply the
    // identity: multiplying by 1 leaves every bit as it was, so no copy is
    // needed to roll back.
    std::vector<at::Tensor> largest;
    for (const auto& p : params) {
      const auto [low, high] = at::aminmax(p.detach());  // NaN propagates
      largest.push_back(at::maximum(high, -low));
    }
    at::Tensor bound = at::stack(largest).max();
    for (const auto& ck : c) bound = bound * at::clamp_min(ck.max(), 1) * at::clamp_min(ck.reciprocal().max(), 1);
    a.finite = at::isfinite(a.norm_after).logical_and(at::isfinite(bound));
    for (auto& ck : c) ck = at::where(a.finite, ck, at::ones_like(ck));
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    a.total[k] = GroupElement{c[k], c[k].reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

template <typename scalar_t>
std::vector<at::Tensor> scaling_loop_cpu(const std::vector<ScalingSlot>& slots,
                                         const std::vector<int64_t>& widths,
                                         const TeleportOptions& o, double& norm_before,
                                         double& norm_after, int64_t& steps,
                                         int64_t& refused) {
  using Vec = std::vector<double>;
  auto as_tensor = [](const Vec& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, c10::CppTypeToScalarType<scalar_t>::value);
    std::copy(v.begin(), v.end(), t.data_ptr<scalar_t>());
    return t;
  };
  // ||∇L||² and the directions at scales c.
  auto state = [&](const std::vector<Vec>& c, std::vector<Vec>& dirs) {
    std::vector<Vec> q(c.size()), r(c.size());
    dirs.assign(c.size(), Vec());
    for (size_t k = 0; k < c.size(); ++k) {
      dirs[k].assign(c[k].size(), 0.0);
      for (double ck : c[k]) {
        q[k].push_back(ck * ck);
        r[k].push_back(1 / (ck * ck));
      }
    }
    double norm = 0;
    // Adds part_j = w_j m_j to the norm, and ± 2 part_j to the directions of `k`.
    auto accumulate = [&](const Vec& w, const scalar_t* m, int k, double sign) {
      for (size_t j = 0; j < w.size(); ++j) {
        const double part = w[j] * m[j];
        norm += part;
        dirs[k][j] += sign * 2 * part;
      }
    };
    for (const auto& s : slots) {
      if (s.bias) {
        accumulate(r[s.row], s.q.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.col < 0) {
        accumulate(r[s.row], s.row_sums.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.row < 0) {
        accumulate(q[s.col], s.col_sums.data_ptr<scalar_t>(), s.col, +1);
      } else {
        const at::Tensor row_mass = at::mv(s.q, as_tensor(q[s.col]));
        accumulate(r[s.row], row_mass.data_ptr<scalar_t>(), s.row, -1);
        const at::Tensor col_mass = at::mv(s.q.t(), as_tensor(r[s.row])).contiguous();
        const scalar_t* cm = col_mass.data_ptr<scalar_t>();
        for (size_t k = 0; k < q[s.col].size(); ++k) dirs[s.col][k] += 2 * q[s.col][k] * cm[k];
      }
    }
    return norm;
  };

  std::vector<Vec> c, dirs, next_dirs;
  for (int64_t n : widths) c.emplace_back(static_cast<size_t>(n), 1.0);
  norm_before = norm_after = state(c, dirs);
  const double limit = growth_limit(norm_before, o);
  const bool linear = o.parametrization() == Parametrization::kLinear;
  const double floor = step_floor(c10::CppTypeToScalarType<scalar_t>::value, o);
  HostControl control(norm_before, limit, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<Vec> unit = dirs;  // T = η D capped as capped_step does
    double slope = 0;               // rise()
    for (size_t k = 0; k < c.size(); ++k) {
      double length = 0, lowest = INFINITY;
      for (double d : dirs[k]) {
        length += d * o.lr() * d * o.lr();
        lowest = std::min(lowest, d * o.lr());
      }
      const double negative = -lowest;
      const double factor = step_factor(std::sqrt(length), linear ? &negative : nullptr, floor, o);
      for (size_t j = 0; j < unit[k].size(); ++j) {
        unit[k][j] = dirs[k][j] * o.lr() * factor;
        slope += dirs[k][j] * unit[k][j];
      }
    }
    const double scale = control.scale(norm_after, slope);
    std::vector<Vec> candidate = c;
    for (size_t k = 0; k < c.size(); ++k) {
      for (size_t j = 0; j < c[k].size(); ++j) {
        const double t = unit[k][j] * scale;
        candidate[k][j] *= linear ? 1 + t : std::exp(t);
      }
    }
    const double norm = state(candidate, next_dirs);
    const bool ok = control.active() && accepts(norm, norm_after, limit, o);  // NaN fails
    if (ok) {
      c = std::move(candidate);
      dirs = std::move(next_dirs);
      norm_after = norm;
    }
    control.record(ok, norm);
    if (control.done(attempt)) break;
  }
  steps = control.taken();
  refused = control.refused();
  std::vector<at::Tensor> out;
  for (const auto& ck : c) out.push_back(as_tensor(ck));
  return out;
}

Ascent scaling_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o,
                      bool decide_before_apply) {
  const auto where = positions(syms, params);
  std::vector<ScalingSlot> slots(params.size());
  for (size_t k = 0; k < syms.size(); ++k) {
    // LayerSymmetry::parameters() is {W_in, b_in?, W_out}.
    for (size_t j = 0; j + 1 < where[k].size(); ++j) slots[where[k][j]].row = static_cast<int>(k);
    slots[where[k].back()].col = static_cast<int>(k);
  }
  // A Conv weight or a Linear after a flatten is a [rows, n_col, inner] block
  // matrix whose entries in one (row, column) share their factors: Q sums the
  // squares over `inner`.
  for (size_t i = 0; i < params.size(); ++i) {
    auto& s = slots[i];
    const at::Tensor& g = grads[i];
    s.bias = g.dim() == 1;
    const int64_t n_col = s.col >= 0 ? syms[static_cast<size_t>(s.col)]->zero_algebra().size(0) : 1;
    const at::Tensor q3 = s.bias ? at::Tensor() : g.square().reshape({g.size(0), n_col, -1});
    if (s.bias) {
      s.q = g.square();
    } else if (s.row >= 0 && s.col >= 0) {
      s.q = q3.sum(2);
    } else if (s.col < 0) {
      s.row_sums = q3.sum(at::IntArrayRef{1, 2});
    } else {
      s.col_sums = q3.sum(at::IntArrayRef{0, 2});
    }
  }
  std::vector<at::Tensor> c;
  for (const auto& sym : syms) c.push_back(at::ones({sym->zero_algebra().size(0)}, params.front().options()));

  Ascent a(syms);
  if (detail::host_bookkeeping(params)) {
    std::vector<int64_t> widths;
    for (const auto& ck : c) widths.push_back(ck.size(0));
    double before = 0, after = 0;
    int64_t taken = 0, refused = 0;
    AT_DISPATCH_FLOATING_TYPES(params.front().scalar_type(), "scaling_loop_cpu", [&] {
      c = scaling_loop_cpu<scalar_t>(slots, widths, o, before, after, taken, refused);
    });
    const auto scalar = params.front().options().dtype(at::kDouble);
    a.norm_before = at::full({}, before, scalar).to(params.front().scalar_type());
    a.norm_after = at::full({}, after, scalar).to(params.front().scalar_type());
    a.steps = at::full({}, taken, params.front().options().dtype(at::kLong));
    a.shortened = at::full({}, refused, params.front().options().dtype(at::kLong));
    return finish_scaling(syms, params, grads, where, std::move(c), std::move(a), decide_before_apply);
  }
  ScalingState st = scaling_state(slots, c);
  a.norm_before = st.norm;
  const at::Tensor limit = growth_limit(a.norm_before, o);
  Control control(a.norm_before, limit, o);
  // Every operation here is on vectors of the widths or on scalars, so their
  // count, not their size, is the cost: each line is kept to what it needs.
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    const std::vector<at::Tensor> unit = unit_steps(syms, st.directions, o);
    const at::Tensor& scale = control.scale(st.norm, rise(st.directions, unit));
    std::vector<at::Tensor> candidate;
    for (size_t k = 0; k < c.size(); ++k) {
      const at::Tensor T = unit[k] * scale;
      candidate.push_back(c[k] * (o.parametrization() == Parametrization::kExp ? at::exp(T) : T + 1));
    }
    ScalingState next = scaling_state(slots, candidate);
    const at::Tensor ok = control.active().logical_and(accepts(next.norm, st.norm, limit, o));
    for (size_t k = 0; k < c.size(); ++k) {
      c[k] = at::where(ok, candidate[k], c[k]);
      st.directions[k] = at::where(ok, next.directions[k], st.directions[k]);
    }
    st.norm = at::where(ok, next.norm, st.norm);
    control.record(ok, next.norm);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  a.norm_after = st.norm;
  return finish_scaling(syms, params, grads, where, std::move(c), std::move(a), decide_before_apply);
}

// Autograd: F(T) = ||∇L((I+T)·w)||² on the batch, ∂F/∂T at T = 0
// by double backward. One forward, backward and double backward per attempt.
// A refused attempt is undone by restoring the weights as they were before it
// (decided on the device), which works for any action, and the next attempt
// goes half as far along the same direction. The bookkeeping runs on values
// V: 0-dim tensors on the device, or on the CPU doubles read as they come.
template <class V>
Ascent autograd_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const BatchLoss& batch, const TeleportOptions& o) {
  using Flag = typename Values<V>::Flag;
  const auto where = positions(syms, params);
  Ascent a(syms);
  Evaluation here = evaluate(syms, params, where, batch, o.mode());
  a.norm_before = here.F;
  a.loss_before = here.loss;
  at::Tensor loss_after = here.loss;
  V norm_after = read_as<V>(here.F);
  const V limit = growth_limit(norm_after, o);
  BasicControl<V> control(norm_after, limit, o);
  control.read_every_attempt();  // an attempt is a forward, backward and double backward
  std::vector<at::Tensor> directions = here.directions();
  const bool on_cpu = params.front().device().is_cpu();

  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> before;  // the weights before this attempt
    for (const auto& p : params) before.push_back(p.detach().clone());
    const std::vector<GroupElement> total_before = a.total;
    // Reference mode builds every data-dependent action from the activations
    // before this step, as the published code does.
    const BatchLoss pre_step = o.mode() == Mode::kReference ? batch.with_fixed([&] {
      ParameterOverrides fixed;
      for (size_t i = 0; i < params.size(); ++i) fixed.emplace_back(params[i], before[i]);
      return fixed;
    }())
                                                             : batch;
    const std::vector<at::Tensor> unit = unit_steps(syms, directions, o);
    const V& scale = control.scale(norm_after, read_as<V>(rise(directions, unit)));
    // Known on the host: whether the product of steps so far is the identity.
    bool from_identity = false;
    if constexpr (std::is_same_v<V, double>) from_identity = control.taken() == 0;
    const std::vector<GroupElement> elements =
        apply_steps(syms, unit, scale, pre_step, a.total, o, from_identity);
    Evaluation next = evaluate(syms, params, where, batch, o.mode());
    const V next_F = read_as<V>(next.F);
    const Flag ok = and_(and_(control.active(), accepts(next_F, norm_after, limit, o)),
                         read_as<Flag>(all_invertible(elements, next.F)));
    control.record(ok, next_F);
    const bool last = control.done(attempt);
    // The new point's directions serve the next attempt only: none after the
    // last, and on CPU, where reading `ok` costs nothing, none after a refusal.
    // (Taken before keep_or_undo writes the weights the graph holds.)
    std::vector<at::Tensor> next_directions = directions;
    if (!last && (!on_cpu || Values<V>::read(ok))) next_directions = next.directions();
    keep_or_undo(ok, params, before, a.total, total_before, directions, next_directions);
    norm_after = where_(ok, next_F, norm_after);
    loss_after = where_(ok, next.loss, loss_after);
    if (last) break;
  }
  a.norm_after = as_tensor(norm_after, here.F);
  if (o.mode() == Mode::kExact) a.loss_after = loss_after;  // at the weights left
  a.steps = as_tensor(control.taken(), here.F);
  a.shortened = as_tensor(control.refused(), here.F);
  return a;
}

// An objective to be lowered over the group (kLookAhead, kFlatness), of the
// acted weights `current` (the symmetries' parameters in the order of `params`,
// differentiable in the steps Ts), with `total` the elements applied so far:
// the objective, ||∇L||² and the loss there.
struct Lowered {
  at::Tensor objective, norm, loss;
  // On a batch spread over ranks: `objective` is this rank's share, to be
  // differentiated; `value` the global objective (detached). Undefined on one
  // process.
  at::Tensor value;
};
using LoweredFn = std::function<Lowered(const std::vector<at::Tensor>& current,
                                        const std::vector<at::Tensor>& Ts,
                                        const std::vector<GroupElement>& total)>;

// Descent by autograd on `fn`: like autograd_ascent, but each attempt is
// kept only if it lowers the objective (finite, invertible); a refused one is
// undone and the next goes half as far.
Ascent descent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
               const BatchLoss& batch, const LoweredFn& fn, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  struct Value {
    Lowered at;
    std::vector<at::Tensor> directions;  // −∂objective/∂T_k at T = 0
  };
  auto value = [&] {
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> Ts, current;
    for (const auto& p : params) current.push_back(p.detach());
    for (size_t k = 0; k < syms.size(); ++k) {
      ParameterOverrides in_force;
      for (size_t i = 0; i < params.size(); ++i) in_force.emplace_back(params[i], current[i]);
      Ts.push_back(syms[k]->zero_algebra().requires_grad_(true));
      const auto acted = syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force, o.mode());
      for (size_t j = 0; j < acted.size(); ++j) current[where[k][j]] = acted[j];
    }
    const Lowered l = fn(current, Ts, a.total);
    Value v{{l.value.defined() ? l.value : l.objective.detach(), l.norm.detach(), l.loss.detach(),
             at::Tensor()},
            {}};
    for (auto& d : torch::autograd::grad({l.objective}, Ts)) v.directions.push_back(-d.detach());
    // Spread over ranks: each rank differentiated its share; the sum is the direction.
    if (batch.group() != nullptr) batch.group()->all_reduce_sum(v.directions);
    return v;
  };
  Value here = value();
  a.objective_before = a.objective_after = here.at.objective;
  a.norm_before = a.norm_after = here.at.norm;
  a.loss_before = here.at.loss;
  Control control(here.at.objective, o);
  control.read_every_attempt();  // an attempt is a forward and backward pass
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> before;
    for (const auto& p : params) before.push_back(p.detach().clone());
    const std::vector<GroupElement> total_before = a.total;
    const std::vector<GroupElement> elements = apply_steps(
        syms, unit_steps(syms, here.directions, o), control.scale(), batch, a.total, o);
    Value next = value();
    const at::Tensor ok = control.active()
                              .logical_and(next.at.objective < a.objective_after)
                              .logical_and(all_invertible(elements, next.at.objective));
    keep_or_undo(ok, params, before, a.total, total_before, here.directions, next.directions);
    a.objective_after = at::where(ok, next.at.objective, a.objective_after);
    a.norm_after = at::where(ok, next.at.norm, a.norm_after);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  return a;
}

// A Lowered from this rank's shares of the objective and the loss (and the
// global ||∇L||²): on one process they are the values themselves.
Lowered spread(const BatchLoss& batch, const at::Tensor& objective, const at::Tensor& norm,
               const at::Tensor& loss) {
  if (batch.group() == nullptr) return {objective, norm, loss, {}};
  std::vector<at::Tensor> v = {objective.detach(), loss.detach()};
  batch.group()->all_reduce_sum(v);
  return {objective, norm, v[1], v[0]};
}

// kLookAhead (docs/design.md §8): the batch's loss after `next` from the acted
// point. The buffers m, v of the symmetries' parameters are carried as
// kTransport carries them: by the elements applied so far (exactly, on
// copies), then differentiably by this step's factors f = 1 + t: m/f and v/f²
// are the action of 1/f - 1 and 1/f² - 1.
LoweredFn look_ahead(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                     const BatchLoss& batch, const NextStep& next) {
  const auto where = positions(syms, params);
  return [&syms, &params, &batch, &next, where](const std::vector<at::Tensor>& current,
                                                const std::vector<at::Tensor>& Ts,
                                                const std::vector<GroupElement>& total) {
    std::vector<at::Tensor> m(params.size()), v(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      for (const auto& t : next.terms) {
        if (!t.param.is_same(params[i])) continue;
        m[i] = t.m.defined() ? t.m.detach().clone() : at::zeros_like(params[i]);
        v[i] = t.v.defined() ? t.v.detach().clone() : at::zeros_like(params[i]);
      }
      TORCH_CHECK(m[i].defined(), "teleport: kLookAhead's NextStep has no term for a parameter of "
                                  "shape ", params[i].sizes(), " that the symmetries act on");
    }
    for (size_t k = 0; k < syms.size() && next.transported; ++k) {
      syms[k]->transport_gradients_(total[k], pick(m, where[k]));
      syms[k]->transport_squared_gradients_(total[k], pick(v, where[k]));
      const at::Tensor inv = 1 / (1 + Ts[k]);
      const auto mk = syms[k]->act(pick(m, where[k]), inv - 1, nullptr, {}, Mode::kExact);
      const auto vk = syms[k]->act(pick(v, where[k]), inv.square() - 1, nullptr, {}, Mode::kExact);
      for (size_t j = 0; j < mk.size(); ++j) m[where[k][j]] = mk[j], v[where[k][j]] = vk[j];
    }
    // Every parameter the step moves: the symmetries' as acted, the others as they are.
    std::vector<at::Tensor> values;
    std::vector<at::Tensor> ms, vs;
    for (const auto& t : next.terms) {
      bool found = false;
      for (size_t i = 0; i < params.size() && !found; ++i) {
        if (!t.param.is_same(params[i])) continue;
        values.push_back(current[i]);
        ms.push_back(m[i]);
        vs.push_back(v[i]);
        found = true;
      }
      if (!found) {
        values.push_back(t.param.detach().requires_grad_(true));
        ms.push_back(t.m.defined() ? t.m.detach() : at::zeros_like(t.param));
        vs.push_back(t.v.defined() ? t.v.detach() : at::zeros_like(t.param));
      }
    }
    auto overrides = [&](const std::vector<at::Tensor>& vals) {
      ParameterOverrides o;
      for (size_t i = 0; i < vals.size(); ++i) o.emplace_back(next.terms[i].param, vals[i]);
      return o;
    };
    const double share = batch.share();
    const at::Tensor loss = batch.loss(overrides(values)) * share;
    auto grads = torch::autograd::grad({loss}, values, {}, true, true, true);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) grads[i] = at::zeros_like(values[i]);
    }
    if (batch.group() != nullptr) {
      // The step uses the global batch's gradient: summed over the ranks, in
      // one differentiable all-reduce.
      std::vector<at::Tensor> flat;
      for (const auto& g : grads) flat.push_back(g.reshape({-1}));
      const at::Tensor summed = batch.sum_over_ranks(at::cat(flat));
      int64_t offset = 0;
      for (size_t i = 0; i < grads.size(); ++i) {
        grads[i] = summed.narrow(0, offset, grads[i].numel()).view(values[i].sizes());
        offset += grads[i].numel();
      }
    }
    at::Tensor norm = at::zeros({}, loss.options());
    std::vector<at::Tensor> after;
    for (size_t i = 0; i < values.size(); ++i) {
      const NextStep::Term& t = next.terms[i];
      const at::Tensor& g = grads[i];
      for (const auto& p : params) {
        if (p.is_same(t.param)) norm = norm + g.detach().square().sum();
      }
      const at::Tensor gh = t.weight_decay != 0 ? g + t.weight_decay * values[i] : g;
      at::Tensor delta = t.a * ms[i] + t.b * gh;
      if (t.adaptive) {
        // Clamped away from 0 so that √ keeps a finite derivative (far below eps).
        const double tiny = values[i].scalar_type() == at::kDouble ? 1e-300 : 1e-37;
        delta = delta / (at::sqrt(at::clamp_min((t.c * vs[i] + t.d * gh.square()) / t.e, tiny)) + t.eps);
      }
      delta = t.lr * delta;
      if (t.decoupled_decay != 0) delta = delta + t.lr * t.decoupled_decay * values[i];
      after.push_back(values[i] - delta);
    }
    return spread(batch, batch.loss(overrides(after)) * share, norm, loss);
  };
}

// The perturbations of sharpness(): `samples` draws, each a list over
// `params` of jointly norm-`radius` Gaussian directions (seeded, on the CPU in
// double, then moved: the same on every device and rank).
std::vector<std::vector<at::Tensor>> perturbations(const std::vector<at::Tensor>& params,
                                                   const TeleportOptions& o) {
  at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(o.flatness_seed()));
  std::vector<std::vector<at::Tensor>> out;
  for (int64_t k = 0; k < o.flatness_samples(); ++k) {
    std::vector<at::Tensor> z;
    at::Tensor sq = at::zeros({}, at::kDouble);
    for (const auto& p : params) {
      z.push_back(at::randn(p.sizes(), gen, at::TensorOptions().dtype(at::kDouble)));
      sq = sq + z.back().square().sum();
    }
    const at::Tensor scale = o.flatness_radius() / sq.sqrt();
    for (auto& e : z) e = (e * scale).to(params.front().options());
    out.push_back(std::move(z));
  }
  return out;
}

// kFlatness: sharpness() of the acted weights.
LoweredFn flatness(const std::vector<at::Tensor>& params, const BatchLoss& batch,
                   const TeleportOptions& o) {
  auto eps = std::make_shared<std::vector<std::vector<at::Tensor>>>(perturbations(params, o));
  return [&params, &batch, eps](const std::vector<at::Tensor>& current,
                                const std::vector<at::Tensor>&, const std::vector<GroupElement>&) {
    auto overrides = [&](const std::vector<at::Tensor>& vals) {
      ParameterOverrides ov;
      for (size_t i = 0; i < vals.size(); ++i) ov.emplace_back(params[i], vals[i]);
      return ov;
    };
    const at::Tensor loss = batch.loss(overrides(current)) * batch.share();
    std::vector<at::Tensor> grads;
    for (const auto& g : torch::autograd::grad({loss}, current, {}, true, false, true)) {
      grads.push_back(g.defined() ? g : at::zeros({}, loss.options()));
    }
    if (batch.group() != nullptr) batch.group()->all_reduce_sum(grads);
    at::Tensor norm = at::zeros({}, loss.options());
    for (const auto& g : grads) norm = norm + g.square().sum();
    at::Tensor mean = at::zeros({}, loss.options());
    for (const auto& e : *eps) {
      std::vector<at::Tensor> moved;
      for (size_t i = 0; i < current.size(); ++i) moved.push_back(current[i] + e[i]);
      mean = mean + batch.loss(overrides(moved));
    }
    return spread(batch, mean * (batch.share() / static_cast<double>(eps->size())) - loss, norm,
                  loss);
  };
}

// kBalance (docs/design.md §8): Σ||W||² over the symmetries' parameters,
// lowered by positive per-unit factors. For unit j of one symmetry, with a_j
// its incoming squared norm (row of W_in and bias) and e_j its outgoing one
// (column block of W_out), t_j = (e_j / a_j)^¼ minimises a_j t² + e_j / t²
// with the other symmetries fixed, making the two equal. `steps` sweeps over
// the symmetries: block coordinate descent, so no sweep raises the sum. The
// sweeps run on copies; weights and gradients move once, by the product.
Ascent balance_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  std::vector<at::Tensor> w;
  for (const auto& p : params) w.push_back(p.detach().clone());
  std::vector<at::Tensor> c;
  for (const auto& s : syms) c.push_back(at::ones({s->zero_algebra().size(0)}, params.front().options()));
  Ascent a(syms);
  a.objective_before = norm_sq(w);
  a.norm_before = norm_sq(grads);
  for (int64_t sweep = 0; sweep < o.steps(); ++sweep) {
    for (size_t k = 0; k < syms.size(); ++k) {
      const int64_t n = c[k].size(0);
      const auto& idx = where[k];  // {W_in, b_in?, W_out}
      at::Tensor in = w[idx[0]].square().reshape({n, -1}).sum(1);
      if (idx.size() == 3) in = in + w[idx[1]].square();
      const at::Tensor& w_out = w[idx.back()];
      const at::Tensor out = w_out.square().reshape({w_out.size(0), n, -1}).sum(at::IntArrayRef{0, 2});
      // Dead units (no incoming or no outgoing weight) keep their factor.
      const at::Tensor t = at::where(in.gt(0).logical_and(out.gt(0)), (out / in).pow(0.25),
                                     at::ones_like(in));
      for (size_t j = 0; j + 1 < idx.size(); ++j) {
        std::vector<int64_t> shape(static_cast<size_t>(w[idx[j]].dim()), 1);
        shape[0] = n;
        w[idx[j]] = w[idx[j]] * t.view(shape);
      }
      w[idx.back()] = (w_out.reshape({w_out.size(0), n, -1}) / t.view({1, n, 1})).reshape(w_out.sizes());
      c[k] = c[k] * t;
    }
  }
  // The growth cap: where the balanced point's ||∇L||² passes max_growth ×
  // before, the factors are shortened towards 1 in log space, c^s with s
  // halved up to max_halvings times. Σ‖W‖² is convex in s and lower at s = 1
  // than at s = 0, so every shortened point still lowers it.
  const double cap = o.max_growth() * a.norm_before.item<double>();
  std::vector<at::Tensor> log_c;
  for (const auto& ck : c) log_c.push_back(ck.log());
  auto factors = [&](double s) {
    std::vector<GroupElement> e;
    for (const auto& l : log_c) {
      const at::Tensor f = (l * s).exp();
      e.push_back(GroupElement{f, f.reciprocal(), true, {}});
    }
    return e;
  };
  auto grads_at = [&](const std::vector<GroupElement>& e) {
    std::vector<at::Tensor> g;
    for (const auto& x : grads) g.push_back(x.detach().clone());
    for (size_t k = 0; k < syms.size(); ++k) syms[k]->transport_gradients_(e[k], pick(g, where[k]));
    return g;
  };
  auto within_cap = [&](const std::vector<GroupElement>& e) {
    return norm_sq(grads_at(e)).item<double>() <= cap;
  };
  double s = 1;
  int64_t shortened = 0;
  std::vector<GroupElement> e = factors(s);
  bool ok = within_cap(e);
  while (!ok && std::isfinite(cap) && shortened < o.max_halvings()) {
    s /= 2;
    ++shortened;
    e = factors(s);
    ok = within_cap(e);
  }
  if (!ok) e = factors(0);  // the identity: rolled back
  for (size_t k = 0; k < syms.size(); ++k) {
    a.total[k] = e[k];
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  std::vector<at::Tensor> now;
  for (const auto& p : params) now.push_back(p.detach());
  a.objective_after = norm_sq(now);
  a.norm_after = norm_sq(grads);
  a.steps = at::full({}, o.steps(), params.front().options().dtype(at::kLong));
  a.shortened = at::full({}, shortened, params.front().options().dtype(at::kLong));
  return a;
}

// kPreconditioned (docs/design.md §8): F = Σ G² f² / (D f + eps) over the
// symmetries' parameters, where f is the factor a gradient entry gets under
// positive scalings c = exp(u) (1/c on rows, c on column blocks) and D = √v̂
// maps by the same factor. Ascent on u by autograd on this elementwise
// function alone (no forward or backward pass of the network), with the
// never-worse rule and the growth cap on ||∇L||² = Σ G² f².
Ascent preconditioned_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                             const std::vector<at::Tensor>& grads, const Preconditioner& pre,
                             const TeleportOptions& o) {
  const auto where = positions(syms, params);
  std::vector<int> row(params.size(), -1), col(params.size(), -1);
  for (size_t k = 0; k < syms.size(); ++k) {
    for (size_t j = 0; j + 1 < where[k].size(); ++j) row[where[k][j]] = static_cast<int>(k);
    col[where[k].back()] = static_cast<int>(k);
  }
  std::vector<at::Tensor> g2, D;
  for (size_t i = 0; i < params.size(); ++i) {
    g2.push_back(grads[i].detach().square());
    at::Tensor d;
    for (const auto& [p, scale] : pre.scale) {
      if (p.is_same(params[i])) d = scale.detach();
    }
    TORCH_CHECK(d.defined() && d.sizes() == params[i].sizes(),
                "teleport: kPreconditioned needs √v̂ for every parameter the symmetries act on, "
                "of its shape; none or another for a parameter of shape ", params[i].sizes());
    D.push_back(d);
  }
  struct Value {
    at::Tensor F, norm;
    std::vector<at::Tensor> directions;
  };
  auto evaluate_at = [&](const std::vector<at::Tensor>& u_in) {
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> u;
    for (const auto& x : u_in) u.push_back(x.detach().requires_grad_(true));
    at::Tensor F = at::zeros({}, params.front().options()), norm = F;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      at::Tensor log_f = at::zeros({}, p.options());
      if (row[i] >= 0) {
        const at::Tensor& ur = u[static_cast<size_t>(row[i])];
        std::vector<int64_t> shape(static_cast<size_t>(p.dim()), 1);
        shape[0] = ur.size(0);
        log_f = log_f - ur.view(shape);
      }
      if (col[i] >= 0) {
        at::Tensor uc = u[static_cast<size_t>(col[i])];
        const int64_t block = p.size(1) / uc.size(0);
        if (block > 1) uc = uc.repeat_interleave(block);
        std::vector<int64_t> shape(static_cast<size_t>(p.dim()), 1);
        shape[1] = uc.size(0);
        log_f = log_f + uc.view(shape);
      }
      const at::Tensor f = at::exp(log_f);
      const at::Tensor gf2 = g2[i] * f.square();
      F = F + (gf2 / (D[i] * f + pre.eps)).sum();
      norm = norm + gf2.sum();
    }
    Value v{F.detach(), norm.detach(), {}};
    for (auto& d : torch::autograd::grad({F}, u)) v.directions.push_back(d.detach());
    return v;
  };
  std::vector<at::Tensor> u;
  for (const auto& sym : syms) u.push_back(at::zeros({sym->zero_algebra().size(0)}, params.front().options()));
  Value here = evaluate_at(u);
  Ascent a(syms);
  a.objective_before = a.objective_after = here.F;
  a.norm_before = a.norm_after = here.norm;
  const at::Tensor limit = growth_limit(here.norm, o);
  Control control(here.F, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> candidate;
    for (size_t k = 0; k < u.size(); ++k) {
      candidate.push_back(u[k] + capped_step(here.directions[k], o, false) * control.scale());
    }
    const Value next = evaluate_at(candidate);
    const at::Tensor ok = control.active()
                              .logical_and(next.F > a.objective_after)
                              .logical_and(next.norm <= limit);  // NaN fails both
    for (size_t k = 0; k < u.size(); ++k) {
      u[k] = at::where(ok, candidate[k], u[k]);
      here.directions[k] = at::where(ok, next.directions[k], here.directions[k]);
    }
    a.objective_after = at::where(ok, next.F, a.objective_after);
    a.norm_after = at::where(ok, next.norm, a.norm_after);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  for (size_t k = 0; k < syms.size(); ++k) {
    const at::Tensor c = at::exp(u[k]);
    a.total[k] = GroupElement{c, c.reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

}  // namespace

std::vector<at::Tensor> directions(const SymmetryList& symmetries, Method method,
                                   const BatchLoss* batch) {
  TORCH_CHECK(!symmetries.empty(), "directions: expected symmetries, got none");
  method = resolve_method(symmetries, method);
  const auto params = detail::distinct_parameters(symmetries);
  const auto where = positions(symmetries, params);
  if (method == Method::kAutograd) {
    TORCH_CHECK(batch != nullptr,
                "directions: the autograd direction needs a batch and a loss, got none");
    return evaluate(symmetries, params, where, *batch).directions();
  }
  std::vector<at::Tensor> grads;
  if (batch != nullptr) {
    at::Tensor loss;
    grads = batch_gradients(*batch, params, loss);
  } else {
    for (const auto& p : params) {
      TORCH_CHECK(p.grad().defined(), "directions: expected gradients in .grad, got none");
      grads.push_back(p.grad());
    }
  }
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < symmetries.size(); ++k) {
    out.push_back(symmetries[k]->direction(pick(grads, where[k])));
  }
  return out;
}

Method resolve_method(const SymmetryList& symmetries, Method method) {
  if (method != Method::kAuto) return method;
  for (const auto& s : symmetries) {
    if (!s->has_closed_form()) return Method::kAutograd;
  }
  return Method::kClosedForm;
}

namespace {
TeleportReport run_teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                            const BatchLoss* batch, const Preconditioner* pre,
                            const NextStep* next);
}  // namespace

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss* batch) {
  return run_teleport(symmetries, options, batch, nullptr, nullptr);
}

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const Preconditioner& preconditioner) {
  return run_teleport(symmetries, options, nullptr, &preconditioner, nullptr);
}

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss& batch, const NextStep& next) {
  return run_teleport(symmetries, options, &batch, nullptr, &next);
}

double sharpness(const SymmetryList& symmetries, const BatchLoss& batch,
                 const TeleportOptions& options) {
  options.validate();
  const auto params = detail::distinct_parameters(symmetries);
  TORCH_CHECK(!params.empty(), "sharpness: expected symmetries, got none");
  at::AutoGradMode enable(true);  // flatness() differentiates the loss for ||∇L||²
  std::vector<at::Tensor> current;
  for (const auto& p : params) current.push_back(p.detach().clone().requires_grad_(true));
  const Lowered l = flatness(params, batch, options)(current, {}, {});
  return (l.value.defined() ? l.value : l.objective).item<double>();
}

namespace {
TeleportReport run_teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                            const BatchLoss* batch, const Preconditioner* pre,
                            const NextStep* next) {
  const auto start = Clock::now();
  options.validate();
  TeleportReport report;
  if (symmetries.empty()) {
    report.reason = "no symmetries to teleport";
    return report;
  }
  for (const auto& s : symmetries) s->check_unchanged();
  detail::check_roles(symmetries, "teleport");
  const auto params = detail::distinct_parameters(symmetries);
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == params.front().device() &&
                    p.scalar_type() == params.front().scalar_type(),
                "teleport: expected all parameters on one device with one dtype (",
                params.front().device(), ", ", params.front().scalar_type(), "), got ",
                p.device(), ", ", p.scalar_type());
  }
  const bool look_ahead_obj = options.objective() == Objective::kLookAhead;
  const bool lowered = look_ahead_obj || options.objective() == Objective::kFlatness;
  TORCH_CHECK(!lowered || batch != nullptr,
              "teleport: kLookAhead and kFlatness evaluate losses and need a teleport batch (a "
              "BatchLoss; TeleportOptimizer::set_teleport_batch), got none");
  TORCH_CHECK(!look_ahead_obj || next != nullptr,
              "teleport: kLookAhead needs the inner optimizer's next step: use TeleportOptimizer, "
              "or teleport(symmetries, options, batch, next_step)");
  const Method method = resolve_method(symmetries, options.method());
  TORCH_CHECK(method == Method::kClosedForm || batch != nullptr,
              "teleport: the autograd direction needs a batch and a loss (a BatchLoss), "
              "got none");
  for (const auto& s : symmetries) {
    TORCH_CHECK(method == Method::kAutograd || s->has_closed_form(), "teleport: ",
                s->name(), " has no closed-form direction; use Method::kAutograd");
    TORCH_CHECK(s->transports_gradients() || batch != nullptr, "teleport: ", s->name(),
                " is data-dependent and needs a batch and a loss (a BatchLoss), got none");
  }
  TORCH_CHECK(batch == nullptr || batch->group() == nullptr || options.mode() == Mode::kExact,
              "teleport: reference mode runs on one process; a batch spread over ranks needs "
              "Mode::kExact");
  report.exact = options.mode() == Mode::kExact;
  for (const auto& s : symmetries) report.exact = s->exact_for(batch) && report.exact;
  std::vector<at::Tensor> grads;
  if (batch == nullptr) {
    for (const auto& p : params) {
      TORCH_CHECK(p.requires_grad(), "teleport: expected trainable parameters, got a frozen one "
                  "(requires_grad false) of shape ", p.sizes(),
                  ": a frozen tensor is never moved; leave its symmetries out");
      TORCH_CHECK(p.grad().defined(),
                  "teleport: expected gradients in .grad (call loss.backward() before "
                  "step()), got an undefined gradient for a parameter of shape ",
                  p.sizes());
      grads.push_back(p.grad());
    }
  }

  const bool balance = options.objective() == Objective::kBalance;
  const bool preconditioned = options.objective() == Objective::kPreconditioned;

  TORCH_CHECK(!preconditioned || (pre != nullptr && batch == nullptr),
              "teleport: kPreconditioned needs the inner optimizer's preconditioner and "
              "teleports from .grad: use TeleportOptimizer, or teleport(symmetries, options, "
              "preconditioner)");
  for (const auto& s : symmetries) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    TORCH_CHECK(!(balance || preconditioned) || (layer != nullptr && s->transports_gradients()),
                "teleport: kBalance and kPreconditioned act by positive factors on Linear and Conv "
                "layer symmetries; ", s->name(), " is not one");
    TORCH_CHECK(!look_ahead_obj || (layer != nullptr && s->transports_gradients() && s->diagonal()),
                "teleport: kLookAhead acts by positive scalings on Linear and Conv layers (where "
                "the inner state is carried exactly); ", s->name(), " is not one");
    TORCH_CHECK(!lowered || s->transports_gradients(), "teleport: kFlatness acts on Linear and "
                "Conv layer symmetries; ", s->name(), " is not one");
  }
  const bool fast_scaling = all_layer_scalings(symmetries) && options.mode() == Mode::kExact &&
                            method == Method::kClosedForm && !balance && !preconditioned &&
                            !lowered;
  // Closed-form GL(n) in the span of the gradients where every symmetry is a
  // layer GL(n) and each tensor has at most one symmetry per side.
  std::vector<int> left, right;
  const bool span = method == Method::kClosedForm && !fast_scaling && !balance &&
                    !preconditioned && !lowered && span_applies(symmetries, options) &&
                    span_roles(symmetries, positions(symmetries, params), params.size(), left,
                               right);
  // The scaling path from .grad decides finiteness before it touches anything;
  // every other path keeps a copy to roll back to.
  // Only the library's own actions, which cannot throw half-way through, go
  // without one: a subclass's apply_() may (and is then undone by the copy).
  bool library_actions = true;
  for (const auto& s : symmetries) library_actions = library_actions && typeid(*s) == typeid(LayerSymmetry);
  const bool self_checking = fast_scaling && batch == nullptr && library_actions;
  std::optional<detail::Snapshot> snapshot;
  if (!self_checking) snapshot.emplace(params);
  at::Tensor loss_before;
  if ((method == Method::kClosedForm || balance) && batch != nullptr && !lowered) {
    grads = batch_gradients(*batch, params, loss_before);
  }
  Ascent a;  // the ascent's own, below
  try {
    a = look_ahead_obj ? descent(symmetries, params, *batch,
                                 look_ahead(symmetries, params, *batch, *next), options)
        : lowered        ? descent(symmetries, params, *batch, flatness(params, *batch, options),
                                   options)
        : balance          ? balance_ascent(symmetries, params, grads, options)
        : preconditioned ? preconditioned_ascent(symmetries, params, grads, *pre, options)
        : method == Method::kAutograd ? (host_bookkeeping(params)
                                            ? autograd_ascent<double>(symmetries, params, *batch, options)
                                            : autograd_ascent<at::Tensor>(symmetries, params, *batch, options))
        : fast_scaling ? scaling_ascent(symmetries, params, grads, options, self_checking)
        : span ? span_ascent(symmetries, params, grads, left, right, options)
               : closed_form_ascent(symmetries, params, grads, options);
    if (batch != nullptr) {
      // .grad was not the ascent's own gradient: map it to the new point too,
      // where gradients map; elsewhere it must be computed afresh.
      for (size_t k = 0; k < symmetries.size(); ++k) {
        if (!symmetries[k]->transports_gradients() || options.mode() == Mode::kReference) {
          report.gradients_stale = true;
          continue;
        }
        std::vector<at::Tensor> g;
        for (const auto& p : symmetries[k]->parameters()) g.push_back(p.grad());
        symmetries[k]->transport_gradients_(a.total[k], g);
      }
    }
  } catch (...) {
    if (snapshot) snapshot->restore();  // nothing half-written survives an error
    throw;
  }
  if (loss_before.defined()) a.loss_before = loss_before;

  // One host synchronisation for all the checks.
  const auto dtype = a.norm_before.dtype();
  std::vector<at::Tensor> checks = {a.norm_before, a.norm_after, a.steps.to(dtype),
                                    a.shortened.to(dtype)};
  // A sum is non-finite when any entry is (or, harmlessly, when it overflows),
  // and costs one read where isfinite() would allocate.
  if (a.finite.defined()) {
    checks.push_back(at::where(a.finite, 0.0, NAN).to(dtype));
  } else {
    std::vector<at::Tensor> sums;
    for (const auto& p : params) sums.push_back(p.detach().sum());
    checks.push_back(at::stack(sums).sum().to(dtype));
  }
  checks.push_back(a.invertible.defined() ? a.invertible.to(dtype) : at::ones({}, a.norm_before.options()));
  // The teleport objective: ||∇L||² (raised) unless the path says otherwise.
  checks.push_back(a.objective_before.defined() ? a.objective_before.to(dtype) : a.norm_before);
  checks.push_back(a.objective_after.defined() ? a.objective_after.to(dtype) : a.norm_after);
  if (batch != nullptr) {
    at::NoGradGuard no_grad;
    checks.push_back(a.loss_before.to(dtype));
    checks.push_back((a.loss_after.defined() ? a.loss_after : batch->global_loss()).to(dtype));
  }
  const c10::ScalarType dtype_of_loss = a.norm_before.scalar_type();
  const at::Tensor host = at::stack(checks).to(at::kDouble).cpu();
  const double* v = host.data_ptr<double>();
  report.grad_norm_sq_before = v[0];
  report.grad_norm_sq_after = v[1];
  report.steps = static_cast<int64_t>(v[2]);
  report.shortened = static_cast<int64_t>(v[3]);
  const bool all_finite = std::isfinite(v[4]);
  const bool invertible = v[5] != 0;
  report.objective_before = v[6];
  report.objective_after = v[7];
  if (batch != nullptr) {
    report.loss_before = v[8];
    report.loss_after = v[9];
  }
  const bool guarded = options.mode() == Mode::kExact;
  std::string rollback;
  if (!std::isfinite(report.grad_norm_sq_before)) {
    rollback = "non-finite weights or gradients before the teleport: skipped";
  } else if (!invertible) {
    rollback = "the product of the ascent steps could not be inverted";
  } else if (!all_finite || !std::isfinite(report.grad_norm_sq_after)) {
    rollback = "non-finite weights or gradients";
  } else if (balance && !(report.objective_after < report.objective_before)) {
    rollback = "no sweep lowered the sum of squared weights within the growth cap (the units "
               "are balanced already, or balancing them raises ||grad L||^2 beyond max_growth)";
  } else if (lowered && !(report.objective_after < report.objective_before)) {
    rollback = std::string("no step lowered the ") +
               (look_ahead_obj ? "loss after the next step" : "sharpness") + " (" +
               std::to_string(report.shortened) + " refused and halved)";
  } else if (preconditioned && !(report.objective_after > report.objective_before)) {
    rollback = "no ascent step raised the preconditioned objective (" +
               std::to_string(report.shortened) + " refused and halved)";
  } else if (guarded && !balance && !preconditioned && !lowered &&
             !(report.grad_norm_sq_after > report.grad_norm_sq_before)) {
    rollback = "no ascent step raised ||grad L||^2 (" + std::to_string(report.shortened) +
               " refused and shortened)";
  } else if (batch != nullptr) {
    const double change = std::abs(report.loss_after - report.loss_before);
    if (!std::isfinite(report.loss_after)) {
      rollback = "non-finite loss";
    } else if (guarded && change > detail::allowed_loss_change(report.loss_before,
                                                               options.tolerance(), dtype_of_loss)) {
      rollback = "the loss went from " + c10::str(report.loss_before) + " to " +
                 c10::str(report.loss_after) + ": a change of " + c10::str(change) +
                 " (relative " + c10::str(change / std::abs(report.loss_before)) +
                 "), above the tolerance " + c10::str(options.tolerance());
    }
  }
  if (!rollback.empty()) {
    if (snapshot) snapshot->restore();  // else nothing was changed
    report.gradients_stale = false;
    report.rolled_back = true;
    report.reason = rollback;
  } else {
    if (report.steps < options.steps() && !balance) {
      const bool capped = guarded && !preconditioned && !lowered;
      const double before = report.grad_norm_sq_before;
      const bool used = capped && report.grad_norm_sq_after >=
                                      detail::budget_point(before, before * options.max_growth(),
                                                           detail::kStopFraction);
      const std::string refused = std::to_string(report.shortened) + " refused";
      report.reason = "stopped after " + std::to_string(report.steps) + " of " +
                      std::to_string(options.steps()) + " steps: " +
                      (used ? "7/8 of the growth cap's budget used (" + refused + ")"
                            : refused + " (lower, non-finite or beyond the growth cap) and " +
                                  (capped ? "shortened" : "halved"));
    }
    report.elements = std::move(a.total);
  }
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}
}  // namespace

}  // namespace teleport
