// The closed-form GL(n) ascents: step by step on the full gradients
// (closed_form_ascent, any closed-form symmetries) and in the span of the
// gradients (span_ascent, layer GL(n) only; docs/design.md §11).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/gl_path.h>

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
  at::Tensor BF;    // [r_left, q]: a left Gram as BF BFᵀ (thin gradients, factors of wide ones)
  at::Tensor CF;    // [r_right, q]: CC as CF CFᵀ, likewise
  at::Tensor rest;  // ||G||² outside the bases
};

// One step in a basis as its differences from the identity, each a matrix
// times a host scalar: g = I + d·D and g⁻¹ = I + di·Di, so that moving a
// piece is one fused multiply-add per side, a scaled step needs no scaled
// copy, and the inverse of a small step can be D itself with di = −d.
struct SpanStep {
  at::Tensor D, Di;
  double d = 1, di = 1;
  at::Tensor invertible;  // a 0-dim bool, undefined when invertible by construction
};

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



// The machine epsilon of x's dtype (float or double).
double epsilon_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
}

// A test matrix of random signs (rows × cols, ±1) for the range finder: a
// counter-based hash of (stream, entry), so the same at every call, and far
// cheaper than drawing normals (which the range finder does not need).
at::Tensor random_signs(int64_t rows, int64_t cols, uint64_t stream, const at::TensorOptions& o) {
  at::Tensor out = at::empty({rows, cols}, o.device(at::kCPU).dtype(at::kFloat));
  float* x = out.data_ptr<float>();
  const int64_t count = rows * cols;
  for (int64_t i = 0; i < count; i += 64) {
    uint64_t z = (stream * 0x9e3779b97f4a7c15ULL) ^
                 static_cast<uint64_t>(i / 64 + 1) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;  // splitmix64's finaliser
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    const int64_t end = std::min<int64_t>(64, count - i);
    for (int64_t j = 0; j < end; ++j) x[i + j] = 1.0f - 2.0f * static_cast<float>((z >> j) & 1);
  }
  return out.to(o);
}

// Pivoted Cholesky of the b × b PSD matrix C (doubles, row-major), stopping
// once no remaining diagonal exceeds `cut`: the pivots kept, in order, and R
// (k × k, upper triangular) with C[piv, piv] = RᵀR. Rank-revealing: every
// column left out lies within √cut of the span of those kept. `left` is the
// largest remaining diagonal at the stop.
int64_t pivoted_cholesky(const double* C, int64_t b, double cut, std::vector<int64_t>& piv,
                         std::vector<double>& R, double& left) {
  std::vector<double> d(b);
  piv.resize(b);
  R.assign(b * b, 0.0);
  for (int64_t i = 0; i < b; ++i) d[i] = C[i * b + i], piv[i] = i;
  int64_t k = 0;
  left = 0;
  for (; k < b; ++k) {
    int64_t p = k;
    for (int64_t i = k + 1; i < b; ++i) {
      if (d[piv[i]] > d[piv[p]]) p = i;
    }
    left = d[piv[p]];
    if (!(d[piv[p]] > cut)) break;  // NaN stops too
    std::swap(piv[k], piv[p]);
    for (int64_t l = 0; l < k; ++l) std::swap(R[l * b + k], R[l * b + p]);
    const double rkk = std::sqrt(d[piv[k]]);
    R[k * b + k] = rkk;
    for (int64_t i = k + 1; i < b; ++i) {
      double v = C[piv[k] * b + piv[i]];
      for (int64_t l = 0; l < k; ++l) v -= R[l * b + k] * R[l * b + i];
      R[k * b + i] = v / rkk;
      d[piv[i]] -= R[k * b + i] * R[k * b + i];
    }
  }
  return k;
}

// Y with the span of E's columns removed, in `passes` passes (a second
// removes what rounding of the first leaves).
at::Tensor project_out(const at::Tensor& E, at::Tensor Y, int passes) {
  if (E.size(1) == 0) return Y;
  for (int pass = 0; pass < passes; ++pass) Y = at::addmm(Y, E, at::mm(E.t(), Y), 1, -1);
  return Y;
}

// Extends the orthonormal basis E (n × c) by the directions of the block Y
// (n × b) that lie outside it with mass above `cut`: E with Y projected out,
// a pivoted Cholesky of the block's Gram (in double, on the host) keeps the
// columns whose mass outside the others exceeds the cut, orthonormalised by
// a Cholesky QR twice (Householder's where ill-conditioned). Returns how many
// were kept; `left` is the largest mass left in a column. Two host reads.
// E is a view of `rows`, E's transpose grown row by row (so that a new block
// writes only its own memory); no more columns are kept than `rows` has room for.
int64_t extend_basis(at::Tensor& E, const at::Tensor& rows, at::Tensor Y, double cut, double& left) {
  const int64_t b = Y.size(1);
  // One pass: what rounding leaves in E's span is ε of Y, far below the cut.
  Y = project_out(E, Y, 1);
  const at::Tensor Yd = Y.to(at::kDouble);
  const at::Tensor C = at::mm(Yd.t(), Yd).to(at::kCPU).contiguous();
  // The residuals the elimination computes are good to about b ε (double)
  // of the block's largest diagonal; those between the cut and that are
  // left to a later block, where the larger directions are projected out.
  const double* c = C.data_ptr<double>();
  double largest = 0;
  for (int64_t i = 0; i < b; ++i) largest = std::max(largest, c[i * b + i]);
  const double resolved = std::max(
      cut, 16.0 * static_cast<double>(b) * std::numeric_limits<double>::epsilon() * largest);
  std::vector<int64_t> piv;
  std::vector<double> R;
  // (At most the room left: the rest would be rounding of the directions kept.)
  const int64_t k = std::min(pivoted_cholesky(c, b, resolved, piv, R, left), rows.size(0) - E.size(1));
  if (k == 0) return 0;
  at::Tensor R11 = at::zeros({k, k}, C.options());
  double* r11 = R11.data_ptr<double>();
  for (int64_t i = 0; i < k; ++i) std::copy(&R[i * b + i], &R[i * b + k], r11 + i * k + i);
  const at::Tensor kept =
      at::tensor(std::vector<int64_t>(piv.begin(), piv.begin() + k)).to(Y.device());
  at::Tensor Q = at::linalg_solve_triangular(R11.to(Y.options()), Y.index_select(1, kept),
                                             /*upper=*/true, /*left=*/false);
  // Q is orthonormal to about ε κ², κ the condition of the columns kept
  // (about R's largest over its smallest diagonal entry): once more against
  // E (the second pass, which is enough) and itself makes it so to about ε,
  // by a Cholesky QR in Q's own precision (its Gram is then within 1/10 of
  // the identity) where ε κ² is below 1/10, else by Householder's.
  Q = project_out(E, Q, 1);
  const double kappa = r11[0] / r11[(k - 1) * k + k - 1];
  bool orthonormal = false;
  if (epsilon_of(Q) * kappa * kappa < 0.1) {
    const auto [L, info] = at::linalg_cholesky_ex(at::mm(Q.t(), Q));
    if (info.item<int64_t>() == 0) {
      Q = at::linalg_solve_triangular(L.t(), Q, /*upper=*/true, /*left=*/false);
      orthonormal = true;
    }
  }
  if (!orthonormal) Q = std::get<0>(at::linalg_qr(Q, "reduced"));
  const int64_t had = E.size(1);
  rows.narrow(0, had, k).copy_(Q.t());
  E = rows.narrow(0, 0, had + k).t();
  return k;
}

// An orthonormal basis (n × r) of the span of the columns of the matrices
// `acted` (each n × m_i: the gradients' sides a symmetry acts on), gradient
// by gradient, so that the range of acted[i] lies in the first ends[i]
// columns (a gradient's Gram in the basis is then held by a factor of that
// width: span_pieces). A gradient with at most 64 columns extends the basis
// by its columns themselves; a wider one by a randomized range finder, in
// blocks of 64 random sign combinations of its columns (one product per
// block, no n × n Gram), until a block keeps fewer than half its columns and
// leaves nothing to a later one (see extend_basis). The cut is at rounding
// level, 4096 (Σ m_i) ε² of the gradients' squared norm, because a sketch
// mixes the gradients linearly: the basis leans towards a direction left out
// by the square root of that direction's share of the mass, which must stay
// near ε for the ascent to match the dense one (a cut at 1e-5 would tilt it
// by 3e-3). So the basis holds the gradients' whole numerical range
// (docs/design.md §11); the caller computes the cut (span_pieces).
// Undefined when the basis would exceed max_columns.
at::Tensor range_basis(const std::vector<at::Tensor>& acted, double cut, int64_t max_columns,
                       std::vector<int64_t>& ends) {
  const at::Tensor& first = acted.front();
  const int64_t n = first.size(0), block = 64;
  ends.assign(acted.size(), n);
  if (n <= block) return n <= max_columns ? at::eye(n, first.options()) : at::Tensor();
  // Room for the basis and one more block: beyond max_columns it is refused.
  const at::Tensor rows = at::empty({std::min(n, max_columns + block), n}, first.options());
  at::Tensor E = rows.narrow(0, 0, 0).t();
  uint64_t stream = 0;
  for (size_t i = 0; i < acted.size(); ++i) {
    const int64_t m = acted[i].size(1);
    double left = 0;
    if (m <= block) {
      // Its columns as they are, until nothing above the cut is left in them.
      while (E.size(1) < n && extend_basis(E, rows, acted[i], cut, left) > 0 && left > cut) {
      }
    } else {
      while (E.size(1) < n && E.size(1) <= max_columns) {
        const int64_t b = std::min(block, n - E.size(1));
        const int64_t k = extend_basis(E, rows, at::mm(acted[i], random_signs(m, b, stream++, first.options())),
                                       cut, left);
        // A block of b random combinations captures every direction of a
        // range of dimension d ≤ b/2 (its sketch there is well conditioned):
        // fewer than b/2 kept, with nothing left to a later block, means the
        // range is exhausted (and k == 0 means nothing above the cut is left).
        if (k == 0 || (2 * k < b && !(left > cut))) break;
      }
    }
    if (E.size(1) > max_columns) return at::Tensor();
    ends[i] = E.size(1);
  }
  if (E.size(1) == 0) {  // no gradient: any direction
    ends.assign(acted.size(), 1);
    return at::eye(n, 1, first.options());
  }
  return E;
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
// `squares` holds each gradient's squared norm (0-dim tensors), `mass` the
// same read on the host.
bool span_pieces(const SymmetryList& syms, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& squares, const std::vector<double>& mass,
                 const std::vector<int>& left, const std::vector<int>& right,
                 std::vector<at::Tensor>& E, std::vector<SpanPiece>& pieces,
                 std::vector<at::Tensor>& left_projections) {
  const size_t m = syms.size();
  std::vector<int64_t> width(m);
  for (size_t k = 0; k < m; ++k) width[k] = static_cast<const LayerSymmetry&>(*syms[k]).width();
  // Each symmetry's cut (see range_basis): 4096 m ε² of its gradients'
  // squared norm, m the columns of the sides it acts on.
  const double eps = epsilon_of(grads.front());
  std::vector<double> cut(m), inner(m);
  for (size_t i = 0; i < grads.size(); ++i) {
    for (int k : {left[i], right[i]}) {
      if (k < 0) continue;
      cut[k] += mass[i];
      inner[k] += static_cast<double>(grads[i].numel() / width[k]);
    }
  }
  for (size_t k = 0; k < m; ++k) cut[k] *= 4096.0 * inner[k] * eps * eps;
  // The bases, last symmetry first. Each gradient's sides acted on, as
  // columns of n-vectors: rows for the left side, column_rows() transposed
  // for the right. A gradient acted on from both sides has its rows in the
  // left basis, found first where the symmetries form a chain: its right
  // side's range is that of E_lᵀG (r_l rows instead of n_l; the mass left
  // out is below the left basis's cut, which must then be below this one's).
  // Its left side's range ends at column end_left[i] of the left basis, its
  // right side's at end_right[i] (range_basis's `ends`).
  std::vector<int64_t> end_left(grads.size(), -1), end_right(grads.size(), -1);
  E.assign(m, at::Tensor());
  const bool forced = detail::gl_ascent_path == detail::GLAscentPath::kSpan;
  for (size_t k = m; k-- > 0;) {
    std::vector<at::Tensor> acted;
    std::vector<size_t> which;
    for (size_t i = 0; i < grads.size(); ++i) {
      const int l = left[i], r = right[i];
      if (l == static_cast<int>(k)) {
        acted.push_back(grads[i].reshape({width[k], -1}));
      } else if (r == static_cast<int>(k)) {
        if (l >= 0 && E[l].defined() && cut[l] <= cut[k]) {
          left_projections[i] = at::mm(E[l].t(), grads[i].reshape({width[l], -1}));
          acted.push_back(column_rows(left_projections[i], width[k]).t());
        } else {
          acted.push_back(column_rows(grads[i], width[k]).t());
        }
      } else {
        continue;
      }
      which.push_back(i);
    }
    std::vector<int64_t> ends;
    E[k] = range_basis(acted, cut[k], forced ? width[k] : width[k] * 3 / 4, ends);
    if (!E[k].defined()) return false;
    for (size_t j = 0; j < which.size(); ++j) {
      (left[which[j]] == static_cast<int>(k) ? end_left : end_right)[which[j]] = ends[j];
    }
  }
  // One piece per gradient acted on from both sides, and one per symmetry and
  // side for all the gradients acted on from that side only. A gradient
  // thinner than its basis (a bias, a narrow output layer) is held as its
  // projection, whose Gram it is, and costs r²q per ascent step, not r³.
  // Mass outside both bases of a two-sided gradient is rounding when the
  // bases hold its range (their purpose); below 64 ε of the gradient's
  // squared norm it is left with the constant rest instead of carried.
  const double drop = 64 * epsilon_of(grads.front());
  std::vector<SpanPiece> only_left(m), only_right(m);
  // A gradient acted on from one side only, as `acted` (n × q, the side acted
  // on as rows), its range in the basis's first `end` columns: its projection
  // P on the basis added to that side's factor where q is below the basis's
  // width r; else, where end < r, a factor L of its Gram of width end (of the
  // Gram of P's first end rows, LLᵀ; the rows below are rounding), which
  // costs 2r²·end per ascent step instead of the Gram's 2r³;
  // else its Gram PPᵀ added to the side's Gram. The rest of its squared norm
  // goes to `rest`.
  auto one_side = [](at::Tensor& factor, at::Tensor& gram, at::Tensor& rest, const at::Tensor& acted,
                     const at::Tensor& basis, int64_t end, const at::Tensor& total) {
    const at::Tensor P = at::mm(basis.t(), acted);
    const int64_t r = basis.size(1);
    at::Tensor F;
    if (acted.size(1) < r) {
      F = P;
    } else if (end < r) {
      // On the CPU the Cholesky factor of those rows' Gram, where rounding
      // leaves it positive definite (one read); else the triangle of a QR.
      const at::Tensor top = P.narrow(0, 0, end);
      at::Tensor L;
      if (host_bookkeeping(top)) {
        auto [factor, info] = at::linalg_cholesky_ex(at::mm(top, top.t()));
        if (info.item<int64_t>() == 0) L = factor;
      }
      if (!L.defined()) L = std::get<1>(at::linalg_qr(top.t(), "r")).t();
      F = at::cat({L, at::zeros({r - end, L.size(1)}, L.options())});
    } else {
      const at::Tensor PP = at::mm(P, P.t());
      accumulate(gram, PP);
      accumulate(rest, total - PP.trace());
      return P;
    }
    factor = factor.defined() ? at::cat({factor, F}, 1) : F;
    accumulate(rest, total - at::dot(F.reshape(-1), F.reshape(-1)));
    return P;
  };
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& total = squares[i];
    const int l = left[i], r = right[i];
    if (l >= 0 && r >= 0) {
      if (!left_projections[i].defined()) {
        left_projections[i] = at::mm(E[l].t(), grads[i].reshape({width[l], -1}));
      }
      const at::Tensor EG_rows = left_projections[i];
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
        const at::Tensor GE = at::mm(column_rows(grads[i], width[r]), E[r]);
        p.CC = at::mm(GE.t(), GE) - at::mm(AR, AR.t());
        p.rest = p.rest - p.CC.trace();
      }
      pieces.push_back(std::move(p));
    } else if (l >= 0) {
      left_projections[i] = one_side(only_left[l].BF, only_left[l].BB, only_left[l].rest,
                                     grads[i].reshape({width[l], -1}), E[l], end_left[i], total);
    } else if (r >= 0) {
      one_side(only_right[r].CF, only_right[r].CC, only_right[r].rest, column_rows(grads[i], width[r]).t(),
               E[r], end_right[i], total);
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
// there (none where `directions` is false: after the last attempt). The
// pieces are carried from step to step, so the ascent needs the product of
// the steps but not the product of their inverses.
SpanState span_state(const std::vector<SpanPiece>& pieces, const std::vector<SpanStep>& f,
                     bool identity = false, bool directions = true) {
  std::vector<at::Tensor> dir(f.size()), parts;
  SpanState st;
  // x (I + αM) and (I + αM) x, as one fused product and sum; nothing at the identity.
  auto times = [identity](const at::Tensor& x, const at::Tensor& M, double alpha) {
    return identity ? x : x.dim() == 2 ? at::addmm(x, x, M, 1, alpha) : at::add(x, at::matmul(x, M), alpha);
  };
  auto by = [identity](const at::Tensor& M, double alpha, const at::Tensor& x) {
    return identity ? x : x.dim() == 2 ? at::addmm(x, M, x, 1, alpha) : at::add(x, at::matmul(M, x), alpha);
  };
  auto squared = [](const at::Tensor& x) { return at::dot(x.reshape(-1), x.reshape(-1)); };
  // The direction 2(Σ right Grams − Σ left Grams), summed in place: X Xᵀ
  // (`gram`) or X itself added with sign ±1.
  auto add = [&dir](int k, const at::Tensor& X, double sign, bool gram) {
    if (!dir[k].defined()) {
      // (β = 0: the zero it is given is not read.)
      dir[k] = gram ? at::addmm(at::zeros({}, X.options()).expand({X.size(0), X.size(0)}), X, X.t(), 0, 2 * sign)
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
    const double eps = epsilon_of(D) / 4;
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
  // Its elements are formed at the end: the identities Ascent(syms) would
  // make are n × n matrices written for nothing (milliseconds at width 512).
  Ascent a;
  // norm_sq() by dot products: no squared copy of every gradient (1–5 ms at width 512).
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
  if (!span_pieces(syms, grads, squares, mass, left, right, E, pieces, projections)) {
    return closed_form_ascent(syms, params, grads, o);
  }
  const size_t m = syms.size();
  a.total.resize(m);
  std::vector<at::Tensor> h;  // the product of the steps kept, in the basis
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
                              plus_identity(at::mm(E[k], at::mm(M_inv, Et))), false, {}};
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
