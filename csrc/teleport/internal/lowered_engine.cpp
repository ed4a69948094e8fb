// The lowered engine: descent by autograd on an objective of the acted
// weights, the loss after the inner optimizer's next step (kLookAhead) or the
// sharpness (kFlatness).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/batch_loss_data.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <memory>
#include <vector>

namespace teleport::detail {

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
      const auto acted =
          syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force, o.mode());
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
    const std::vector<GroupElement> elements =
        apply_steps(syms, unit_steps(syms, here.directions, o), control.scale(), batch, a.total, o);
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

namespace {

// A Lowered from this rank's shares of the objective and the loss (and the
// global ||∇L||²): on one process they are the values themselves.
Lowered spread(const BatchLoss& batch, const at::Tensor& objective, const at::Tensor& norm,
               const at::Tensor& loss) {
  if (batch.group() == nullptr) return {objective, norm, loss, {}};
  std::vector<at::Tensor> v = {objective.detach(), loss.detach()};
  batch.group()->all_reduce_sum(v);
  return {objective, norm, v[1], v[0]};
}

}  // namespace

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
      TORCH_CHECK(m[i].defined(),
                  "teleport: kLookAhead's NextStep has no term for a parameter of "
                  "shape ",
                  params[i].sizes(), " that the symmetries act on");
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
      const at::Tensor summed = detail::data_of(batch).sum_over_ranks(at::cat(flat));
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
        delta = delta /
                (at::sqrt(at::clamp_min((t.c * vs[i] + t.d * gh.square()) / t.e, tiny)) + t.eps);
      }
      delta = t.lr * delta;
      if (t.decoupled_decay != 0) delta = delta + t.lr * t.decoupled_decay * values[i];
      after.push_back(values[i] - delta);
    }
    return spread(batch, batch.loss(overrides(after)) * share, norm, loss);
  };
}

namespace {

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

}  // namespace

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

}  // namespace teleport::detail
