// What the autograd and lowered engines share: the batch's gradients, F =
// ||∇L||² with ∂F/∂T by double backward, and undoing a refused attempt.
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/batch_loss_data.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/least_change.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <utility>

namespace teleport::detail {

// The gradients of the batch's loss at the current weights, without
// touching `.grad`; the loss itself comes back through `loss`.
std::vector<at::Tensor> batch_gradients(const BatchLoss& batch,
                                        const std::vector<at::Tensor>& params, at::Tensor& loss) {
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

// After an attempt on the weights themselves: where `ok` is false, the weights
// and the product of steps go back to `before` (decided on the device, no
// host synchronisation); where true, the new point's directions are taken.
void keep_or_undo(const at::Tensor& ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before,
                  std::vector<at::Tensor>& directions,
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
                at::where(ok, total[k].g_inv, total_before[k].g_inv),
                total[k].diagonal,
                {}};
    directions[k] = at::where(ok, next_directions[k], directions[k]);
  }
}

// The same decided on the host (on the CPU): a kept attempt copies nothing, a
// refused one copies the weights back.
void keep_or_undo(bool ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before,
                  std::vector<at::Tensor>& directions,
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

namespace {

// A tensor as rows (batch × features), as BatchLoss hands out layer inputs.
at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The data-dependent actions an evaluation takes from their layer's output
// (docs/design.md §3): one whose layer inputs H are a constant of F (the first
// layer's: the batch) takes its pullback from ∂F/∂Z, Z the layer's output in
// the evaluation's graph, instead of from ∂F/∂θ = Hᵀ ∂F/∂Z
// (LeastChange::pullback_from_output). Within the rank condition, where
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
std::vector<const DataDependentGL*> tap_candidates(const SymmetryList& syms,
                                                   const BatchLoss& batch) {
  std::vector<const DataDependentGL*> out(syms.size(), nullptr);
  if (batch.group() != nullptr || !batch.has_model()) return out;
  for (size_t k = 0; k < syms.size(); ++k) {
    out[k] = dynamic_cast<const DataDependentGL*>(syms[k].get());
    if (out[k] != nullptr) detail::data_of(batch).watch(out[k]->parameters().front());
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
    const auto [h, z] =
        detail::data_of(batch).traced_layer(t.symmetry[k]->parameters().front(), overrides);
    if (!z.defined() || !z.requires_grad() || h.requires_grad()) {
      t.symmetry[k] = nullptr;
      continue;
    }
    t.h[k] = h, t.z[k] = z;
    bool alone = true;  // W_in and b_in: every parameter but W_out
    for (size_t j = 0; j + 1 < where[k].size(); ++j) alone = alone && uses[where[k][j]] == 1;
    if (alone) t.gram[k] = detail::least_change_of(*t.symmetry[k]).input_gram(rows_of(h));
    if (!t.gram[k].defined()) continue;
    for (size_t j = 0; j + 1 < where[k].size(); ++j) t.via_gram[where[k][j]] = true;
  }
  return t;
}

// ∂F/∂T_k for evaluate_exact(), taken on demand from the graph its
// evaluation kept: ∂F/∂w = Σ_i (∂g_i/∂w)ᵀ 2ḡ_i (and 2 G δ for the tapped
// layers' δ), then each symmetry's pullback.
struct KeptGraph {
  const SymmetryList* syms;
  const std::vector<std::vector<size_t>>* where;
  const BatchLoss* batch;
  std::vector<at::Tensor> params, current, grads, global, deltas, gram_delta;
  Taps taps;
  bool spread = false;

  std::vector<at::Tensor> operator()() const {
    const SymmetryList& syms = *this->syms;
    const std::vector<std::vector<size_t>>& where = *this->where;
    const BatchLoss& batch = *this->batch;
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
        directions.push_back(detail::least_change_of(*taps.symmetry[k])
                                 .pullback_from_output(dz, rows_of(taps.h[k].detach()), z,
                                                       current[out].detach(), dF[out]));
        continue;
      }
      std::vector<at::Tensor> own;
      for (size_t i : where[k]) own.push_back(current[i].detach());
      directions.push_back(syms[k]->pullback(own, pick(dF, where[k]), &batch, values).detach());
    }
    return directions;
  }
};

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
  ev.directions = KeptGraph{&syms,  &where, &batch,     params, current, grads,
                            global, deltas, gram_delta, taps,   spread};
  return ev;
}

}  // namespace

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
    const auto acted = syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force(), mode);
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

}  // namespace teleport::detail
