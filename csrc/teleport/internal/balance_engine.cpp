// The balance engine (kBalance): Σ||W||² lowered by positive per-unit
// factors, block coordinate descent in closed form.
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace teleport::detail {

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
  for (const auto& s : syms)
    c.push_back(at::ones({s->zero_algebra().size(0)}, params.front().options()));
  Ascent a(syms);
  a.objective_before = norm_sq(w);
  a.norm_before = norm_sq(grads);
  for (int64_t sweep = 0; sweep < o.steps(); ++sweep) {
    for (size_t k = 0; k < syms.size(); ++k) {
      const int64_t n = c[k].size(0);
      const auto& idx = where[k];  // rows (writers), then columns (readers)
      const size_t rows = row_tensors(*syms[k]);
      at::Tensor in = w[idx[0]].square().reshape({n, -1}).sum(1);
      for (size_t j = 1; j < rows; ++j) in = in + w[idx[j]].square().reshape({n, -1}).sum(1);
      auto out_of = [&](const at::Tensor& w_out) {
        return w_out.square().reshape({w_out.size(0), n, -1}).sum(at::IntArrayRef{0, 2});
      };
      at::Tensor out = out_of(w[idx[rows]]);
      for (size_t j = rows + 1; j < idx.size(); ++j) out = out + out_of(w[idx[j]]);
      // Dead units (no incoming or no outgoing weight) keep their factor.
      const at::Tensor t =
          at::where(in.gt(0).logical_and(out.gt(0)), (out / in).pow(0.25), at::ones_like(in));
      for (size_t j = 0; j < idx.size(); ++j) {
        at::Tensor& x = w[idx[j]];
        if (j < rows) {
          std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
          shape[0] = n;
          x = x * t.view(shape);
        } else {
          x = (x.reshape({x.size(0), n, -1}) / t.view({1, n, 1})).reshape(x.sizes());
        }
      }
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

}  // namespace teleport::detail
