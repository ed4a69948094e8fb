// The span GL(n) engine: the closed-form GL(n) ascent in the span of the
// gradients (span_ascent, layer GL(n) only; docs/design.md §11).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/gl_path.h>
#include <teleport/internal/span.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace teleport::detail {
namespace {
GLAscentPath gl_ascent_path = GLAscentPath::kAuto;  // see internal/gl_path.h
}  // namespace

ForceGLAscentPath::ForceGLAscentPath(GLAscentPath path) : previous_(gl_ascent_path) {
  gl_ascent_path = path;
}
ForceGLAscentPath::~ForceGLAscentPath() { gl_ascent_path = previous_; }

// The closed-form GL(n) ascent in the span of the gradients (docs/design.md
// §11). Every direction 2(ΣMᵀM − ΣGGᵀ) of a symmetry lies in S, the span of
// its gradients' rows and columns, and so does every step; group elements
// I + E(h − I)Eᵀ with E an orthonormal basis of S (r ≤ 2·batch columns for
// Linear layers) map the gradients within S. Each gradient is held as its
// r × r Grams in the bases (and its block between two bases, when two
// symmetries act on it) plus its squared norm outside them, so an ascent
// step costs r × r products and inverses instead of n × n ones and products
// with the gradients. The result equals closed_form_ascent's: E spans the
// directions' range; a basis cut short by the tolerance leaves the ascent
// exact (the pieces outside are carried as constants), only confined to E.

namespace {

// x + I and x − I (new tensors where x is one: no n × n identity written).
at::Tensor plus_identity(at::Tensor x) {
  x.diagonal().add_(1);
  return x;
}
at::Tensor minus_identity(const at::Tensor& x) {
  at::Tensor y = x.clone();
  y.diagonal().sub_(1);
  return y;
}

struct SpanState {
  at::Tensor norm;                     // ||∇L||²
  std::vector<at::Tensor> directions;  // in the bases
  std::vector<SpanPiece> pieces;       // the gradients after the steps
};

// The gradients moved by one step per symmetry in the bases (a gradient's
// left side by g^{-T}, its right side by g), with ||∇L||² and the directions
// there (none where `directions` is false: after the last attempt). The
// pieces are carried from step to step, so the ascent needs the product of
// the steps but not the product of their inverses.
SpanState span_state(const std::vector<SpanPiece>& pieces, const std::vector<SpanStep>& f,
                     bool identity = false, bool directions = true) {
  std::vector<at::Tensor> dir(f.size()), parts;
  SpanState st;
  // x (I + αM) and (I + αM) x, as one fused product and sum; nothing at the identity.
  auto times = [identity](const at::Tensor& x, const at::Tensor& M, double alpha) {
    return identity       ? x
           : x.dim() == 2 ? at::addmm(x, x, M, 1, alpha)
                          : at::add(x, at::matmul(x, M), alpha);
  };
  auto by = [identity](const at::Tensor& M, double alpha, const at::Tensor& x) {
    return identity       ? x
           : x.dim() == 2 ? at::addmm(x, M, x, 1, alpha)
                          : at::add(x, at::matmul(M, x), alpha);
  };
  auto squared = [](const at::Tensor& x) { return at::dot(x.reshape(-1), x.reshape(-1)); };
  // The direction 2(Σ right Grams − Σ left Grams), summed in place: X Xᵀ
  // (`gram`) or X itself added with sign ±1.
  auto add = [&dir](int k, const at::Tensor& X, double sign, bool gram) {
    if (!dir[k].defined()) {
      // (β = 0: the zero it is given is not read.)
      dir[k] = gram ? at::addmm(at::zeros({}, X.options()).expand({X.size(0), X.size(0)}), X, X.t(),
                                0, 2 * sign)
                    : X * (2 * sign);
    } else if (gram) {
      dir[k].addmm_(X, X.t(), 1, 2 * sign);
    } else {
      dir[k].add_(X, 2 * sign);
    }
  };
  for (const auto& p : pieces) {
    parts.push_back(p.rest);
    SpanPiece moved;
    moved.left = p.left, moved.right = p.right, moved.rest = p.rest;
    // The left side moves by g^{-T} = I + di·Diᵀ, the right by g = I + d·D.
    const SpanStep* l = p.left >= 0 ? &f[p.left] : nullptr;
    const SpanStep* r = p.right >= 0 ? &f[p.right] : nullptr;
    if (p.A.defined()) {
      // One kernel position (Linear layers): fused 2-D products.
      const at::Tensor A = moved.A =
          p.A.size(0) == 1 ? by(l->Di.t(), l->di, times(p.A[0], r->D.t(), r->d)).unsqueeze(0)
                           : by(l->Di.t(), l->di, times(p.A, r->D.t(), r->d));
      parts.push_back(squared(A));
      if (directions) {
        add(p.left, A.permute({1, 0, 2}).reshape({A.size(1), -1}), -1, true);
        add(p.right, A.permute({2, 0, 1}).reshape({A.size(2), -1}), 1, true);
      }
    }
    if (p.BB.defined()) {
      const at::Tensor X = moved.BB = by(l->Di.t(), l->di, times(p.BB, l->Di, l->di));
      parts.push_back(X.trace());
      if (directions) add(p.left, X, -1, false);
    }
    if (p.CC.defined()) {
      const at::Tensor X = moved.CC = by(r->D, r->d, times(p.CC, r->D.t(), r->d));
      parts.push_back(X.trace());
      if (directions) add(p.right, X, 1, false);
    }
    if (p.BF.defined()) {
      const at::Tensor LF = moved.BF = by(l->Di.t(), l->di, p.BF);
      parts.push_back(squared(LF));
      if (directions) add(p.left, LF, -1, true);
    }
    if (p.CF.defined()) {
      const at::Tensor RF = moved.CF = by(r->D, r->d, p.CF);
      parts.push_back(squared(RF));
      if (directions) add(p.right, RF, 1, true);
    }
    st.pieces.push_back(std::move(moved));
  }
  st.norm = at::stack(parts).sum();
  for (size_t k = 0; k < f.size() && directions; ++k) {
    st.directions.push_back(dir[k].defined() ? dir[k] : at::zeros_like(f[k].D));
  }
  return st;
}

// `moved` where `ok`, else `kept`.
SpanPiece chosen(const at::Tensor& ok, const SpanPiece& moved, const SpanPiece& kept) {
  auto pick_one = [&ok](const at::Tensor& a, const at::Tensor& b) {
    return a.defined() ? at::where(ok, a, b) : a;
  };
  SpanPiece p = kept;
  p.A = pick_one(moved.A, kept.A);
  p.BB = pick_one(moved.BB, kept.BB);
  p.CC = pick_one(moved.CC, kept.CC);
  p.BF = pick_one(moved.BF, kept.BF);
  p.CF = pick_one(moved.CF, kept.CF);
  return p;
}

// One step in a basis: I + T and its inverse (exp(±T) under kExp). Where
// the step's Frobenius norm is known on the host (`norm`, NaN when not) and
// small, the inverse is the Neumann series I − T + T² − …, summed to where
// its remainder, at most ‖T‖^(m+1) / (1 − ‖T‖), is below a quarter of the
// dtype's ε: at most two products instead of an LU inverse, and exact to
// rounding as that is (docs/design.md §11).
// The step is T = c·D (c a host scalar).
SpanStep basis_step(const at::Tensor& D, double c, const TeleportOptions& o, double norm) {
  if (o.parametrization() == Parametrization::kLinear && norm < 0.5) {
    const double eps = epsilon_of(D.scalar_type()) / 4;
    int64_t terms = 1;  // the series up to (−T)^terms
    double remainder = norm * norm / (1 - norm);
    for (; remainder > eps && terms < 3; ++terms) remainder *= norm;
    if (remainder <= eps && terms == 1) return {D, D, c, -c, {}};
    if (remainder <= eps) {
      const at::Tensor t = c == 1 ? D : D * c;
      at::Tensor Di = -t;  // the series less I, by Horner: Di <- −T (I + Di)
      for (int64_t j = 1; j < terms; ++j) Di = at::addmm(t, t, Di).neg_();
      return {t, Di, 1, 1, {}};
    }
  }
  const GroupElement e = GroupElement::from_algebra(c == 1 ? D : D * c, false, o.parametrization());
  return {minus_identity(e.g), minus_identity(e.g_inv), 1, 1, e.invertible};
}

// The span ascent's attempts, from the pieces and directions at the identity:
// each symmetry's product of the steps kept in h, the ascent's figures in
// `a`. The bookkeeping runs on values V: 0-dim tensors on the device, or on
// the CPU doubles read as they come, where a refused attempt is skipped
// instead of masked out.
template <class V>
void span_loop(const SymmetryList& syms, const TeleportOptions& o, std::vector<SpanPiece> pieces,
               std::vector<at::Tensor> dirs, std::vector<at::Tensor>& h, Ascent& a) {
  using Flag = typename Values<V>::Flag;
  constexpr bool on_host = std::is_same_v<V, double>;
  const size_t m = syms.size();
  V norm_after = read_as<V>(a.norm_before);
  const V limit = growth_limit(norm_after, o);
  BasicControl<V> control(norm_after, limit, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    // E is orthonormal: <d, t> in the bases is <D, T> in the layers.
    std::vector<SpanStep> steps;
    if constexpr (on_host) {
      // Each direction's norm read once: its capped step f·d (GL: no
      // positivity cap), that step's rise f‖d‖², the attempt's T = scale·f·d.
      std::vector<double> norm(m), factor(m);
      double rise = 0;
      const double floor = step_floor(a.norm_before.scalar_type(), o);
      for (size_t k = 0; k < m; ++k) {
        norm[k] = dirs[k].norm().template item<double>();
        factor[k] = capped_factor(norm[k], floor, o);
        rise += factor[k] * norm[k] * norm[k];
      }
      const double scale = control.scale(norm_after, rise);
      for (size_t k = 0; k < m; ++k) {
        const double c = scale * factor[k];
        steps.push_back(basis_step(dirs[k], c, o, std::abs(c) * norm[k]));
      }
    } else {
      const std::vector<at::Tensor> unit = unit_steps(syms, dirs, o);
      const V& scale = control.scale(norm_after, read_as<V>(rise(dirs, unit)));
      for (size_t k = 0; k < m; ++k) steps.push_back(basis_step(unit[k] * scale, 1, o, NAN));
    }
    at::Tensor invertible = at::ones({}, a.norm_before.options().dtype(at::kBool));
    for (const auto& step : steps) {
      if (step.invertible.defined()) invertible = invertible.logical_and(step.invertible);
    }
    // The last attempt's directions would go unused.
    const bool last = attempt + 1 == control.attempts();
    SpanState next = span_state(pieces, steps, /*identity=*/false, /*directions=*/!last);
    const V next_norm = read_as<V>(next.norm);
    const Flag ok = and_(and_(control.active(), accepts(next_norm, norm_after, limit, o)),
                         read_as<Flag>(invertible));
    if constexpr (on_host) {
      if (ok) {
        for (size_t k = 0; k < m; ++k) h[k] = at::addmm(h[k], steps[k].D, h[k], 1, steps[k].d);
        dirs = std::move(next.directions);
        pieces = std::move(next.pieces);
      }
    } else {
      for (size_t k = 0; k < m; ++k) {
        h[k] = at::where(ok, at::addmm(h[k], steps[k].D, h[k], 1, steps[k].d), h[k]);
        if (!last) dirs[k] = at::where(ok, next.directions[k], dirs[k]);
      }
      for (size_t i = 0; i < pieces.size(); ++i) pieces[i] = chosen(ok, next.pieces[i], pieces[i]);
    }
    norm_after = where_(ok, next_norm, norm_after);
    control.record(ok, next_norm);
    if (control.done(attempt)) break;
  }
  a.norm_after = as_tensor(norm_after, a.norm_before);
  a.steps = as_tensor(control.taken(), a.norm_before);
  a.shortened = as_tensor(control.refused(), a.norm_before);
}

// A matrix I + E M Eᵀ acting on rows, given both formed (`full`) and as
// its low-rank part (E, M).
struct RowMap {
  at::Tensor full, E, M;
};

// x <- map · x along the rows a symmetry acts on, in place: dimension 0 of
// x (`left`), or dimension 1, block by block (x as [outer, n, inner]; a
// Linear's columns when inner is 1). By the low-rank update x + E(M(Eᵀx))
// where it costs fewer multiply-adds per column (2nr + r²) than the product
// with the formed matrix (n²), or (nr + r²) where Eᵀx is `known`, else by
// that product, written to `scratch` (grown as needed, reused from call to
// call) and copied back. x is contiguous.
void move_rows_(const RowMap& map, const at::Tensor& x, bool left, at::Tensor& scratch,
                const at::Tensor& known = {}) {
  const int64_t n = map.E.size(0), r = map.E.size(1);
  auto product = [&scratch](const at::Tensor& a, const at::Tensor& b) {
    const int64_t size = a.size(0) * b.size(1);
    if (!scratch.defined() || scratch.numel() < size) scratch = at::empty({size}, a.options());
    at::Tensor out = scratch.narrow(0, 0, size).view({a.size(0), b.size(1)});
    return at::mm_out(out, a, b);
  };
  if (!left && x.numel() == x.size(0) * n) {
    // A Linear's columns: X mapᵀ, computed in X's own layout (no strided copy).
    const at::Tensor X = x.view({x.size(0), n});
    if (2 * n * r + r * r < n * n) {
      X.addmm_(at::mm(at::mm(X, map.E), map.M.t()), map.E.t());
    } else {
      X.copy_(product(X, map.full.t()));
    }
    return;
  }
  if (left) {
    const at::Tensor rows = x.view({n, -1});
    if (known.defined() && n * r + r * r < n * n) {
      rows.addmm_(map.E, at::mm(map.M, known));
    } else if (2 * n * r + r * r < n * n) {
      rows.addmm_(map.E, at::mm(map.M, at::mm(map.E.t(), rows)));
    } else {
      rows.copy_(product(map.full, rows));
    }
    return;
  }
  const at::Tensor rows = x.view({x.size(0), n, -1});
  if (2 * n * r + r * r < n * n) {
    rows.add_(at::matmul(map.E, at::matmul(map.M, at::matmul(map.E.t(), rows))));
  } else {
    rows.copy_(at::matmul(map.full, rows));
  }
}

}  // namespace

bool span_applies(const SymmetryList& syms, const TeleportOptions& o) {
  if (detail::gl_ascent_path == detail::GLAscentPath::kDense || o.mode() != Mode::kExact) {
    return false;
  }
  for (const auto& s : syms) {
    // Exactly LayerSymmetry: a subclass may act otherwise.
    if (typeid(*s) != typeid(LayerSymmetry) || s->diagonal()) return false;
  }
  return true;
}

Ascent span_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& grads, const std::vector<int>& left,
                   const std::vector<int>& right, const TeleportOptions& o) {
  // Its elements are formed at the end: the identities Ascent(syms) would
  // make are n × n matrices written for nothing.
  Ascent a;
  // norm_sq() by dot products: no squared copy of every gradient.
  std::vector<at::Tensor> squares;
  for (const auto& g : grads) squares.push_back(at::dot(g.reshape(-1), g.reshape(-1)));
  const at::Tensor stacked = at::stack(squares);
  a.norm_before = stacked.sum();
  a.norm_after = a.norm_before;
  const at::Tensor host = at::cat({stacked, a.norm_before.view(1)}).to(at::kCPU, at::kDouble);
  const std::vector<double> mass(host.data_ptr<double>(), host.data_ptr<double>() + grads.size());
  if (!std::isfinite(host.data_ptr<double>()[grads.size()])) {
    // Nothing to ascend from; the teleport rolls back (no step taken).
    a.total = Ascent(syms).total;
    a.steps = at::zeros({}, a.norm_before.options().dtype(at::kLong));
    a.shortened = a.steps.clone();
    return a;
  }
  std::vector<at::Tensor> E;
  std::vector<SpanPiece> pieces;
  std::vector<at::Tensor> projections(grads.size());  // Eᵀ of each gradient's left side
  if (!span_pieces(syms, grads, squares, mass, left, right,
                   detail::gl_ascent_path == detail::GLAscentPath::kSpan, E, pieces, projections)) {
    return closed_form_ascent(syms, params, grads, o);
  }
  const size_t m = syms.size();
  a.total.resize(m);
  std::vector<at::Tensor> h;       // the product of the steps kept, in the basis
  std::vector<SpanStep> identity;  // (its D only gives the shape)
  for (size_t k = 0; k < m; ++k) {
    h.push_back(at::eye(E[k].size(1), E[k].options()));
    identity.push_back({h.back(), h.back(), 1, 1, {}});
  }
  const std::vector<at::Tensor> dirs = span_state(pieces, identity, /*identity=*/true).directions;
  if (host_bookkeeping(grads)) {
    span_loop<double>(syms, o, std::move(pieces), dirs, h, a);
  } else {
    span_loop<at::Tensor>(syms, o, std::move(pieces), dirs, h, a);
  }
  // g = I + E(h − I)Eᵀ, its inverse from one inverse of h (not the product of
  // the steps' inverses, which accumulates rounding), applied once.
  // by_g[k] and by_g_inv_t[k] hold g and g^{-T} as maps of rows, for the move.
  std::vector<RowMap> by_g(m), by_g_inv_t(m);
  for (size_t k = 0; k < m; ++k) {
    auto [h_inv, info] = at::linalg_inv_ex(h[k]);
    const at::Tensor invertible = info.eq(0);
    a.invertible = a.invertible.defined() ? a.invertible.logical_and(invertible) : invertible;
    const at::Tensor M = minus_identity(h[k]), M_inv = minus_identity(h_inv), Et = E[k].t();
    a.total[k] = GroupElement{plus_identity(at::mm(E[k], at::mm(M, Et))),
                              plus_identity(at::mm(E[k], at::mm(M_inv, Et))),
                              false,
                              {}};
    by_g[k] = {a.total[k].g, E[k], M};
    by_g_inv_t[k] = {a.total[k].g_inv.t(), E[k], M_inv.t()};
  }
  // Where the inverse failed the identity is applied (and the teleport rolls
  // back); decided on the device, or read where that is free.
  const bool masked = !host_bookkeeping(grads) || !a.invertible.item<bool>();
  bool contiguous = true;
  for (size_t i = 0; i < params.size(); ++i) {
    contiguous = contiguous && params[i].is_contiguous() && grads[i].is_contiguous();
  }
  if (masked || !contiguous) {
    for (auto& e : a.total) e = masked ? e.masked(a.invertible) : e;
    const auto where = positions(syms, params);
    for (size_t k = 0; k < m; ++k) {
      syms[k]->apply_(a.total[k]);
      syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
    }
    return a;
  }
  // Each side of each tensor moved once, with g or g^{-T} as a matrix acting
  // on its rows (a right action X m is the row action of mᵀ), in low rank
  // where that is cheaper (see move_rows_).
  at::NoGradGuard no_grad;
  at::Tensor scratch;  // the dense products, one buffer
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor w = params[i].detach();
    if (left[i] >= 0) {
      move_rows_(by_g[left[i]], w, true, scratch);
      move_rows_(by_g_inv_t[left[i]], grads[i], true, scratch, projections[i]);
    }
    if (right[i] >= 0) {
      move_rows_(by_g_inv_t[right[i]], w, false, scratch);
      move_rows_(by_g[right[i]], grads[i], false, scratch);
    }
  }
  return a;
}

}  // namespace teleport::detail
