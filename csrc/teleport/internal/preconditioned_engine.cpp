// The preconditioned engine (kPreconditioned): ascent on Σ g²/(√v̂ + eps)
// over positive scalings, elementwise, by autograd on that function alone.
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

namespace teleport::detail {

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
    const size_t rows = row_tensors(*syms[k]);
    for (size_t j = 0; j < where[k].size(); ++j) {
      (j < rows ? row[where[k][j]] : col[where[k][j]]) = static_cast<int>(k);
    }
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
                "of its shape; none or another for a parameter of shape ",
                params[i].sizes());
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
  for (const auto& sym : syms)
    u.push_back(at::zeros({sym->zero_algebra().size(0)}, params.front().options()));
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

}  // namespace teleport::detail
