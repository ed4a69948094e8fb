// The closed-form GL(n) ascents: step by step on the full gradients
// (closed_form_ascent, any closed-form symmetries) and in the span of the
// gradients (span_ascent, layer GL(n) only; docs/design.md §11).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/gl_path.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <typeinfo>
#include <utility>

namespace teleport::detail {
namespace {
GLAscentPath gl_ascent_path = GLAscentPath::kAuto;  // see internal/gl_path.h
}  // namespace

ForceGLAscentPath::ForceGLAscentPath(GLAscentPath path) : previous_(gl_ascent_path) {
  gl_ascent_path = path;
}
ForceGLAscentPath::~ForceGLAscentPath() { gl_ascent_path = previous_; }

// Closed form: the direction from gradients, the gradients carried along,
// the weights moved once at the end.
Ascent closed_form_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          std::vector<at::Tensor> grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  a.norm_before = norm_sq(grads);
  a.norm_after = a.norm_before;
  const at::Tensor limit = growth_limit(a.norm_before, o);
  Control control(a.norm_before, limit, o);
  // One inverse of the product instead of a product of inverses (the
  // reference arithmetic's "inverses" are I - T and must be multiplied).
  const bool invert_at_end = o.mode() == Mode::kExact;

  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> dirs;
    for (size_t k = 0; k < syms.size(); ++k) dirs.push_back(syms[k]->direction(pick(grads, where[k])));
    const std::vector<at::Tensor> unit = unit_steps(syms, dirs, o);
    const at::Tensor& scale = control.scale(a.norm_after, rise(dirs, unit));
    std::vector<GroupElement> elements;
    for (size_t k = 0; k < syms.size(); ++k) elements.push_back(step_element(*syms[k], unit[k] * scale, o));
    // The gradients after this step, known exactly without a backward pass;
    // the step is kept only if they raise ||∇L||² within the cap.
    std::vector<at::Tensor> candidate;
    for (const auto& g : grads) candidate.push_back(g.clone());
    for (size_t k = 0; k < syms.size(); ++k) {
      syms[k]->transport_gradients_(elements[k], pick(candidate, where[k]));
    }
    const at::Tensor norm = norm_sq(candidate);
    const at::Tensor ok = control.active()
                              .logical_and(accepts(norm, a.norm_after, limit, o))
                              .logical_and(all_invertible(elements, norm));
    for (size_t i = 0; i < grads.size(); ++i) {
      grads[i].copy_(at::where(ok, candidate[i], grads[i]));
    }
    for (size_t k = 0; k < syms.size(); ++k) {
      const GroupElement e = elements[k].masked(ok);
      if (invert_at_end && !e.diagonal) {
        a.total[k].g = at::mm(e.g, a.total[k].g);
      } else {
        a.total[k] = e.compose(a.total[k]);
      }
    }
    a.norm_after = at::where(ok, norm, a.norm_after);
    control.record(ok, norm);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  // The directions need only the gradients, so the weights move once, by the
  // product of the steps, with that product's exact inverse. Where that
  // inverse fails the identity is applied and the teleport rolls back.
  for (size_t k = 0; k < syms.size(); ++k) {
    if (invert_at_end && !a.total[k].diagonal) {
      auto [inverse, info] = at::linalg_inv_ex(a.total[k].g);
      const at::Tensor invertible = info.eq(0);
      a.invertible = a.invertible.defined() ? a.invertible.logical_and(invertible) : invertible;
      a.total[k].g_inv = inverse;
    }
  }
  if (a.invertible.defined()) {
    for (auto& e : a.total) e = e.masked(a.invertible);
  }
  for (size_t k = 0; k < syms.size(); ++k) syms[k]->apply_(a.total[k]);
  return a;
}

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

// One gradient in the bases of the symmetries acting on its rows (`left`,
// as W_in or b_in) and columns (`right`, as W_out), -1 for none.
struct SpanPiece {
  int left = -1, right = -1;
  at::Tensor A;     // [inner, r_left, r_right]: E_leftᵀ G E_right, both sides only
  at::Tensor BB;    // [r_left, r_left]: the left side's Gram outside A
  at::Tensor CC;    // [r_right, r_right]: the right side's Gram outside A
  at::Tensor BF;    // [r_left, q]: BB as BF BFᵀ, for gradients thinner than the basis
  at::Tensor CF;    // [r_right, q]: CC as CF CFᵀ, likewise
  at::Tensor rest;  // ||G||² outside the bases
};

struct SpanStep {
  at::Tensor g, g_inv;  // one step in the basis, and its inverse
};



// An orthonormal basis (n × r) of the range of the PSD matrix K, by a
// randomized range finder in blocks (seeded: the same basis at every call),
// stopping when a block adds less than `tol` of K's scale. Once the range is
// exhausted the rest of a block is rounding, normalised by its QR; so the
// last block kept is trimmed to the directions whose Ritz values in it exceed
// `tol` of the largest (Rayleigh–Ritz on that block alone: a 64 × 64 problem,
// not one the size of the basis; K's own rounding gives its null vectors
// Ritz values near ε of the largest, so the cut is `tol`, not ε). A basis
// cut short only confines the ascent (see above). One host read per block.
at::Tensor range_basis(const at::Tensor& K, double tol, int64_t max_columns) {
  const int64_t n = K.size(0), block = 64;
  if (n <= block) return n <= max_columns ? at::eye(n, K.options()) : at::Tensor();
  at::Generator gen = at::detail::createCPUGenerator(0x7e1e);
  at::Tensor E = at::empty({n, 0}, K.options());
  int64_t last = 0;  // where the last block kept starts
  double scale = 0;
  while (E.size(1) < n) {
    if (E.size(1) > max_columns) return at::Tensor();
    const int64_t b = std::min(block, n - E.size(1));
    const at::Tensor omega = at::randn({n, b}, gen, K.options().device(at::kCPU)).to(K.device());
    at::Tensor Y = at::mm(K, omega);
    if (E.size(1) == 0) {
      scale = Y.norm().item<double>();
    } else {
      for (int pass = 0; pass < 2; ++pass) Y = Y - at::mm(E, at::mm(E.t(), Y));
      if (!(Y.norm().item<double>() > tol * scale)) break;  // NaN stops too
    }
    last = E.size(1);
    E = at::cat({E, std::get<0>(at::linalg_qr(Y, "reduced"))}, 1);
  }
  // The cut is relative to the largest Ritz value of the first block, a
  // close lower bound on K's largest eigenvalue.
  const at::Tensor Q = E.narrow(1, last, E.size(1) - last);
  const auto [lambda, V] = at::linalg_eigh(at::mm(Q.t(), at::mm(K, Q)));
  const at::Tensor first = E.narrow(1, 0, std::min(block, E.size(1)));
  const at::Tensor largest =
      last == 0 ? lambda.max() : at::linalg_eigvalsh(at::mm(first.t(), at::mm(K, first))).max();
  const at::Tensor kept = at::nonzero(lambda > largest * tol).flatten();
  if (last + kept.numel() > max_columns) return at::Tensor();
  if (last + kept.numel() == 0) return E.narrow(1, 0, 1);
  return at::cat({E.narrow(1, 0, last), at::mm(Q, V.index_select(1, kept))}, 1);
}

// The rows of a gradient that a symmetry's right side acts on (docs/design.md
// §2), as a matrix [q, n]: one row per output and kernel position.
at::Tensor column_rows(const at::Tensor& grad, int64_t n) {
  return grad.numel() == grad.size(0) * n
             ? grad.reshape({-1, n})
             : grad.reshape({grad.size(0), n, -1}).transpose(1, 2).reshape({-1, n});
}

// The gradients as span pieces (see SpanPiece) in bases E of the symmetries'
// spans; false when a basis would exceed 3/4 of its width (then the n × n
// steps are cheaper: docs/design.md §11).
bool span_pieces(const SymmetryList& syms, const std::vector<at::Tensor>& grads,
                 const std::vector<int>& left, const std::vector<int>& right,
                 std::vector<at::Tensor>& E, std::vector<SpanPiece>& pieces) {
  const size_t m = syms.size();
  std::vector<int64_t> width(m);
  for (size_t k = 0; k < m; ++k) width[k] = static_cast<const LayerSymmetry&>(*syms[k]).width();
  // Each gradient's Grams on the sides acted on, summed per symmetry into K.
  std::vector<at::Tensor> K(m), row_gram(grads.size()), col_gram(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (left[i] >= 0) {
      const at::Tensor rows = grads[i].reshape({width[left[i]], -1});
      row_gram[i] = at::mm(rows, rows.t());
      accumulate(K[left[i]], row_gram[i]);
    }
    if (right[i] >= 0) {
      const int64_t n = width[right[i]];
      const at::Tensor cols = column_rows(grads[i], n);
      col_gram[i] = at::mm(cols.t(), cols);
      accumulate(K[right[i]], col_gram[i]);
    }
  }
  const bool f64 = grads.front().scalar_type() == at::kDouble;
  E.assign(m, at::Tensor());
  for (size_t k = 0; k < m; ++k) {
    const bool forced = detail::gl_ascent_path == detail::GLAscentPath::kSpan;
    E[k] = range_basis(K[k], f64 ? 1e-12 : 1e-5, forced ? width[k] : width[k] * 3 / 4);
    if (!E[k].defined()) return false;
  }
  // One piece per gradient acted on from both sides, and one per symmetry and
  // side for all the gradients acted on from that side only. A gradient
  // thinner than its basis (a bias, a narrow output layer) is held as its
  // projection, whose Gram it is, and costs r²q per ascent step, not r³.
  // Mass outside both bases of a two-sided gradient is rounding when the
  // bases hold its range (their purpose); below 64 ε of the gradient's
  // squared norm it is left with the constant rest instead of carried.
  const double drop = 64 * (f64 ? std::numeric_limits<double>::epsilon()
                                : std::numeric_limits<float>::epsilon());
  std::vector<SpanPiece> only_left(m), only_right(m);
  // A gradient acted on from one side only, as `acted` (n × q, the side acted
  // on as rows) with its Gram: added to that side's factor or Gram, and rest.
  auto one_side = [](at::Tensor& factor, at::Tensor& gram, at::Tensor& rest, const at::Tensor& acted,
                     const at::Tensor& full_gram, const at::Tensor& basis, const at::Tensor& total) {
    if (acted.size(1) < basis.size(1)) {
      const at::Tensor P = at::mm(basis.t(), acted);
      factor = factor.defined() ? at::cat({factor, P}, 1) : P;
      accumulate(rest, total - P.square().sum());
    } else {
      const at::Tensor X = at::mm(basis.t(), at::mm(full_gram, basis));
      accumulate(gram, X);
      accumulate(rest, total - X.trace());
    }
  };
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor total = grads[i].square().sum();
    const int l = left[i], r = right[i];
    if (l >= 0 && r >= 0) {
      const at::Tensor EG_rows = at::mm(E[l].t(), grads[i].reshape({width[l], -1}));
      const at::Tensor EG = EG_rows.view({E[l].size(1), width[r], -1}).permute({2, 0, 1});  // [inner, r_l, n_r]
      SpanPiece p;
      p.left = l, p.right = r;
      p.A = at::matmul(EG, E[r]);
      const at::Tensor AL = p.A.permute({1, 0, 2}).reshape({E[l].size(1), -1});
      const at::Tensor AR = p.A.permute({2, 0, 1}).reshape({E[r].size(1), -1});
      const at::Tensor in_left = EG_rows.square().sum(), in_a = p.A.square().sum();
      // ||E_lᵀG||² − ||A||² is the left Gram's trace outside A; ||G||² −
      // ||E_lᵀG||² bounds the right one's. One host read.
      const at::Tensor outside = at::stack({in_left - in_a, total - in_left, total}).to(at::kCPU, at::kDouble);
      const double* o = outside.data_ptr<double>();
      p.rest = total - in_a;
      if (!(std::abs(o[0]) <= drop * o[2])) {
        p.BB = at::mm(EG_rows, EG_rows.t()) - at::mm(AL, AL.t());
        p.rest = p.rest - p.BB.trace();
      }
      if (!(std::abs(o[1]) <= drop * o[2])) {
        p.CC = at::mm(E[r].t(), at::mm(col_gram[i], E[r])) - at::mm(AR, AR.t());
        p.rest = p.rest - p.CC.trace();
      }
      pieces.push_back(std::move(p));
    } else if (l >= 0) {
      one_side(only_left[l].BF, only_left[l].BB, only_left[l].rest, grads[i].reshape({width[l], -1}),
               row_gram[i], E[l], total);
    } else if (r >= 0) {
      one_side(only_right[r].CF, only_right[r].CC, only_right[r].rest, column_rows(grads[i], width[r]).t(),
               col_gram[i], E[r], total);
    }
  }
  for (size_t k = 0; k < m; ++k) {
    only_left[k].left = only_right[k].right = static_cast<int>(k);
    if (only_left[k].rest.defined()) pieces.push_back(std::move(only_left[k]));
    if (only_right[k].rest.defined()) pieces.push_back(std::move(only_right[k]));
  }
  return true;
}

struct SpanState {
  at::Tensor norm;                     // ||∇L||²
  std::vector<at::Tensor> directions;  // in the bases
  std::vector<SpanPiece> pieces;       // the gradients after the steps
};

// The gradients moved by one step per symmetry in the bases (a gradient's
// left side by g^{-T}, its right side by g), with ||∇L||² and the directions
// there. The pieces are carried from step to step, so the ascent needs the
// product of the steps but not the product of their inverses.
SpanState span_state(const std::vector<SpanPiece>& pieces, const std::vector<SpanStep>& f) {
  std::vector<at::Tensor> rows(f.size()), cols(f.size()), parts;
  SpanState st;
  for (const auto& p : pieces) {
    parts.push_back(p.rest);
    SpanPiece moved;
    moved.left = p.left, moved.right = p.right, moved.rest = p.rest;
    const at::Tensor L = p.left >= 0 ? f[p.left].g_inv.t() : at::Tensor();
    const at::Tensor R = p.right >= 0 ? f[p.right].g : at::Tensor();
    if (p.A.defined()) {
      const at::Tensor A = moved.A = at::matmul(L, at::matmul(p.A, R.t()));
      const at::Tensor AL = A.permute({1, 0, 2}).reshape({A.size(1), -1});
      const at::Tensor AR = A.permute({2, 0, 1}).reshape({A.size(2), -1});
      parts.push_back(A.square().sum());
      accumulate(rows[p.left], at::mm(AL, AL.t()));
      accumulate(cols[p.right], at::mm(AR, AR.t()));
    }
    if (p.BB.defined()) {
      const at::Tensor X = moved.BB = at::mm(L, at::mm(p.BB, L.t()));
      parts.push_back(X.trace());
      accumulate(rows[p.left], X);
    }
    if (p.CC.defined()) {
      const at::Tensor X = moved.CC = at::mm(R, at::mm(p.CC, R.t()));
      parts.push_back(X.trace());
      accumulate(cols[p.right], X);
    }
    if (p.BF.defined()) {
      const at::Tensor LF = moved.BF = at::mm(L, p.BF);
      parts.push_back(LF.square().sum());
      accumulate(rows[p.left], at::mm(LF, LF.t()));
    }
    if (p.CF.defined()) {
      const at::Tensor RF = moved.CF = at::mm(R, p.CF);
      parts.push_back(RF.square().sum());
      accumulate(cols[p.right], at::mm(RF, RF.t()));
    }
    st.pieces.push_back(std::move(moved));
  }
  st.norm = at::stack(parts).sum();
  for (size_t k = 0; k < f.size(); ++k) {
    at::Tensor d = at::zeros_like(f[k].g);
    if (cols[k].defined()) d = d + cols[k];
    if (rows[k].defined()) d = d - rows[k];
    st.directions.push_back(d * 2);
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

}  // namespace

// Which symmetries act on each parameter's rows and columns; false when the
// span path does not apply (a side taken twice, a tensor it cannot read).
bool span_roles(const SymmetryList& syms, const std::vector<std::vector<size_t>>& where,
                size_t n_params, std::vector<int>& left, std::vector<int>& right) {
  left.assign(n_params, -1);
  right.assign(n_params, -1);
  for (size_t k = 0; k < syms.size(); ++k) {
    for (size_t j = 0; j < where[k].size(); ++j) {
      int& side = j + 1 == where[k].size() ? right[where[k][j]] : left[where[k][j]];
      if (side >= 0) return false;
      side = static_cast<int>(k);
    }
  }
  return true;
}

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
  Ascent a(syms);
  // norm_sq() by dot products: no squared copy of every gradient (1–5 ms at width 512).
  a.norm_before = at::zeros({}, grads.front().options());
  for (const auto& g : grads) a.norm_before = a.norm_before + at::dot(g.reshape(-1), g.reshape(-1));
  a.norm_after = a.norm_before;
  if (!std::isfinite(a.norm_before.item<double>())) {
    // Nothing to ascend from; the teleport rolls back (no step taken).
    a.steps = at::zeros({}, a.norm_before.options().dtype(at::kLong));
    a.shortened = a.steps.clone();
    return a;
  }
  std::vector<at::Tensor> E;
  std::vector<SpanPiece> pieces;
  if (!span_pieces(syms, grads, left, right, E, pieces)) {
    return closed_form_ascent(syms, params, grads, o);
  }
  const size_t m = syms.size();
  std::vector<at::Tensor> h;  // the product of the steps kept, in the basis
  std::vector<SpanStep> identity;
  for (size_t k = 0; k < m; ++k) {
    h.push_back(at::eye(E[k].size(1), E[k].options()));
    identity.push_back({h.back(), h.back()});
  }
  std::vector<at::Tensor> dirs = span_state(pieces, identity).directions;
  const at::Tensor limit = growth_limit(a.norm_before, o);
  Control control(a.norm_before, limit, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    const std::vector<at::Tensor> unit = unit_steps(syms, dirs, o);  // GL: no positivity cap
    // E is orthonormal: <d, t> in the bases is <D, T> in the layers.
    const at::Tensor& scale = control.scale(a.norm_after, rise(dirs, unit));
    std::vector<SpanStep> steps;
    std::vector<GroupElement> elements;
    for (size_t k = 0; k < m; ++k) {
      const at::Tensor t = unit[k] * scale;
      elements.push_back(GroupElement::from_algebra(t, false, o.parametrization()));
      steps.push_back({elements[k].g, elements[k].g_inv});
    }
    const SpanState next = span_state(pieces, steps);
    const at::Tensor ok = control.active()
                              .logical_and(accepts(next.norm, a.norm_after, limit, o))
                              .logical_and(all_invertible(elements, next.norm));
    for (size_t k = 0; k < m; ++k) {
      h[k] = at::where(ok, at::mm(elements[k].g, h[k]), h[k]);
      dirs[k] = at::where(ok, next.directions[k], dirs[k]);
    }
    for (size_t i = 0; i < pieces.size(); ++i) pieces[i] = chosen(ok, next.pieces[i], pieces[i]);
    a.norm_after = at::where(ok, next.norm, a.norm_after);
    control.record(ok, next.norm);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  // g = I + E(h − I)Eᵀ, its inverse from one inverse of h (not the product of
  // the steps' inverses, which accumulates rounding), applied once.
  for (size_t k = 0; k < m; ++k) {
    auto [h_inv, info] = at::linalg_inv_ex(h[k]);
    const at::Tensor invertible = info.eq(0);
    a.invertible = a.invertible.defined() ? a.invertible.logical_and(invertible) : invertible;
    const at::Tensor id = at::eye(E[k].size(0), E[k].options());
    const at::Tensor Ir = at::eye(E[k].size(1), E[k].options());
    const at::Tensor Et = E[k].t();
    a.total[k] = GroupElement{id + at::mm(E[k], at::mm(h[k] - Ir, Et)),
                              id + at::mm(E[k], at::mm(h_inv - Ir, Et)), false, {}};
  }
  const auto where = positions(syms, params);
  for (auto& e : a.total) e = e.masked(a.invertible);
  for (size_t k = 0; k < m; ++k) {
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

}  // namespace teleport::detail
