// The balance engine (kBalance): Σ||W||² lowered by block coordinate
// descent in closed form: positive per-unit factors on scalings, the
// balanced factorization on GL(n).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <ATen/TensorIndexing.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace teleport::detail {
namespace {

// Q f(λ) Qᵀ for a symmetric matrix with eigenpairs (λ, Q).
at::Tensor spectral(const at::Tensor& q, const at::Tensor& f) {
  return at::mm(q * f.unsqueeze(0), q.t());
}

// The projector onto the directions a PSD matrix (numerically) carries
// nothing along: eigenvalues at most `rel` times its largest.
at::Tensor dead_directions(const at::Tensor& s, double rel) {
  const auto eig = at::linalg_eigh(s);
  const at::Tensor& l = std::get<0>(eig);
  return spectral(std::get<1>(eig), l.le(l.max() * rel).to(s.scalar_type()));
}

// The element of one GL(n) block that minimises ||g R||² + ||M g⁻¹||² with
// the other blocks fixed (docs/design.md §8), in float64, as g and g⁻¹.
// A = Σ R Rᵀ over the rows, B = Mᵀ M over the columns (M: every column block
// as [outer, n]). The minimum over g = P^½ solves P A P = B, the geometric
// mean P = A^-½ (A^½ B A^½)^½ A^-½, after which g A gᵀ = g⁻ᵀ B g⁻¹: both
// sides' Gram matrices agree. Along a direction where one side is
// (numerically) zero no invertible g attains the minimum: the infimum
// shrinks the other side to zero (a LoRA adapter with B = 0). So g solves
// that problem on L, the directions both sides carry, and is the identity on
// L's complement: with Q an orthonormal basis of L, g = I + Q (P_L^½ − I) Qᵀ,
// P_L the geometric mean of Qᵀ A Q and Qᵀ B Q. Its norms split over L and
// the complement, so this is the minimum over every g that leaves the
// complement alone; a side zero everywhere leaves the block as it is.
std::pair<at::Tensor, at::Tensor> balancing_element(const std::vector<at::Tensor>& rows,
                                                    const std::vector<at::Tensor>& columns,
                                                    int64_t n, double rel) {
  const auto f64 = rows.front().options().dtype(at::kDouble);
  at::Tensor a = at::zeros({n, n}, f64), b = at::zeros({n, n}, f64);
  for (const auto& x : rows) {
    const at::Tensor r = x.to(at::kDouble).reshape({n, -1});
    a = a + at::mm(r, r.t());
  }
  for (const auto& x : columns) {
    const at::Tensor m =
        x.to(at::kDouble).reshape({x.size(0), n, -1}).transpose(1, 2).reshape({-1, n});
    b = b + at::mm(m.t(), m);
  }
  const at::Tensor eye = at::eye(n, f64);
  const double ta = a.trace().item<double>(), tb = b.trace().item<double>();
  if (!(ta > 0 && tb > 0 && std::isfinite(ta) && std::isfinite(tb))) return {eye, eye};
  a = a / ta;  // scale-free: P for (αA, βB) is √(β/α) P for (A, B)
  b = b / tb;
  // L: where neither side is dead (the null space of the two dead projectors' sum).
  const auto split = at::linalg_eigh(dead_directions(a, rel) + dead_directions(b, rel));
  const at::Tensor q =
      std::get<1>(split).index({at::indexing::Slice(), std::get<0>(split).lt(0.5)});
  if (q.size(1) == 0) return {eye, eye};
  auto power = [](const at::Tensor& s, double p) {  // s^p for a symmetric PD s
    const auto e = at::linalg_eigh((s + s.t()) / 2);
    const at::Tensor& l = std::get<0>(e);
    return spectral(std::get<1>(e), l.clamp_min(l.max().item<double>() * 1e-300).pow(p));
  };
  const at::Tensor a_l = at::mm(at::mm(q.t(), a), q), b_l = at::mm(at::mm(q.t(), b), q);
  const at::Tensor half = power(a_l, 0.5), inv_half = power(a_l, -0.5);
  const at::Tensor p_l =
      at::mm(at::mm(inv_half, power(at::mm(at::mm(half, b_l), half), 0.5)), inv_half) *
      std::sqrt(tb / ta);
  const at::Tensor id_l = at::eye(q.size(1), f64);
  auto lift = [&](const at::Tensor& m) { return eye + at::mm(at::mm(q, m - id_l), q.t()); };
  return {lift(power(p_l, 0.5)), lift(power(p_l, -0.5))};
}

// X <- m X on dimension 0 (a copy).
at::Tensor times_rows(const at::Tensor& m, const at::Tensor& x) {
  return at::mm(m, x.reshape({m.size(0), -1})).view(x.sizes());
}

// X <- X m on dimension 1, block by block (a copy).
at::Tensor times_columns(const at::Tensor& x, const at::Tensor& m) {
  const at::Tensor x3 = x.reshape({x.size(0), m.size(0), -1});  // [outer, n, inner]
  return at::matmul(x3.transpose(1, 2), m).transpose(1, 2).reshape(x.sizes());
}

}  // namespace

// kBalance (docs/design.md §8): Σ||W||² over the symmetries' parameters,
// lowered by block coordinate descent in closed form. For unit j of a
// scaling symmetry, with a_j its incoming squared norm (row of W_in and bias)
// and e_j its outgoing one (column block of W_out), t_j = (e_j / a_j)^¼
// minimises a_j t² + e_j / t² with the other symmetries fixed, making the two
// equal; a GL(n) symmetry takes its balancing_element(). `steps` sweeps over
// the symmetries, so no sweep raises the sum. The sweeps run on copies;
// weights and gradients move once, by the product.
Ascent balance_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  const auto dtype = params.front().scalar_type();
  // A Gram eigenvalue below √ε of the largest (ε of the weights' dtype) is zero.
  const double rel = std::sqrt(dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : std::numeric_limits<float>::epsilon());
  std::vector<at::Tensor> w;
  for (const auto& p : params) w.push_back(p.detach().clone());
  // Each symmetry's element so far: the factors of a scaling, the matrix of a
  // GL(n) symmetry (float64).
  std::vector<at::Tensor> c;
  for (const auto& s : syms) {
    const int64_t n = s->zero_algebra().size(0);
    c.push_back(s->diagonal() ? at::ones({n}, params.front().options())
                              : at::eye(n, params.front().options().dtype(at::kDouble)));
  }
  Ascent a(syms);
  a.objective_before = norm_sq(w);
  a.norm_before = norm_sq(grads);
  for (int64_t sweep = 0; sweep < o.steps(); ++sweep) {
    for (size_t k = 0; k < syms.size(); ++k) {
      const int64_t n = c[k].size(0);
      const auto& idx = where[k];  // rows (writers), then columns (readers)
      const size_t rows = row_tensors(*syms[k]);
      if (!syms[k]->diagonal()) {
        std::vector<at::Tensor> r, m;
        for (size_t j = 0; j < idx.size(); ++j) (j < rows ? r : m).push_back(w[idx[j]]);
        const auto [g, g_inv] = balancing_element(r, m, n, rel);
        const at::Tensor g_w = g.to(dtype), g_inv_w = g_inv.to(dtype);
        for (size_t j = 0; j < idx.size(); ++j) {
          at::Tensor& x = w[idx[j]];
          x = j < rows ? times_rows(g_w, x) : times_columns(x, g_inv_w);
        }
        c[k] = at::mm(g, c[k]);
        continue;
      }
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
  // A GL(n) element G enters every norm (of the weights and of the
  // gradients) only through GᵀG: replacing G by H = (GᵀG)^½ (G = U H, U
  // orthogonal) changes none of them, and H^s = Q diag(h^s) Qᵀ is a path from
  // the identity.
  // The growth cap: where the balanced point's ||∇L||² passes max_growth ×
  // before, the elements are shortened towards the identity in log space,
  // c^s and H^s with s halved up to max_halvings times. For scalings Σ‖W‖² is
  // convex in s and lower at s = 1 than at s = 0, so every shortened point
  // still lowers it; a GL point that does not is rolled back.
  const double cap = o.max_growth() * a.norm_before.item<double>();
  std::vector<at::Tensor> log_c, basis;
  for (const auto& ck : c) {
    if (ck.dim() == 1) {
      log_c.push_back(ck.log());
      basis.emplace_back();
    } else {
      const auto e = at::linalg_eigh(at::mm(ck.t(), ck));
      log_c.push_back(std::get<0>(e).log() / 2);
      basis.push_back(std::get<1>(e));
    }
  }
  auto factors = [&](double s) {
    std::vector<GroupElement> e;
    for (size_t k = 0; k < log_c.size(); ++k) {
      const at::Tensor& l = log_c[k];
      if (!basis[k].defined()) {
        const at::Tensor f = (l * s).exp();
        e.push_back(GroupElement{f, f.reciprocal(), true, {}});
      } else {
        e.push_back(GroupElement{spectral(basis[k], (l * s).exp()).to(dtype),
                                 spectral(basis[k], (l * -s).exp()).to(dtype),
                                 false,
                                 {}});
      }
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
