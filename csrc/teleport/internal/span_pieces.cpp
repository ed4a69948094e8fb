// The span GL(n) engine's pieces: each gradient in the bases of the
// symmetries acting on it, the bases from the range finder (docs/design.md §11).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/range_finder.h>
#include <teleport/internal/span.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace teleport::detail {
namespace {

// The rows of a gradient that a symmetry's right side acts on (docs/design.md
// §2), as a matrix [q, n]: one row per output and kernel position.
at::Tensor column_rows(const at::Tensor& grad, int64_t n) {
  return grad.numel() == grad.size(0) * n
             ? grad.reshape({-1, n})
             : grad.reshape({grad.size(0), n, -1}).transpose(1, 2).reshape({-1, n});
}

// A gradient acted on from one side only, as `acted` (n × q, the side acted
// on as rows), its range in the basis's first `end` columns: its projection
// P on the basis added to that side's factor where q is below the basis's
// width r; else, where end < r, a factor L of its Gram of width end (of the
// Gram of P's first end rows, LLᵀ; the rows below are rounding), which
// costs 2r²·end per ascent step instead of the Gram's 2r³;
// else its Gram PPᵀ added to the side's Gram. The rest of its squared norm
// goes to `rest`.
at::Tensor one_side(at::Tensor& factor, at::Tensor& gram, at::Tensor& rest, const at::Tensor& acted,
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
      auto [chol, info] = at::linalg_cholesky_ex(at::mm(top, top.t()));
      if (info.item<int64_t>() == 0) L = chol;
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
}

// The piece of gradient `grad` (squared norm `total`), acted on from both
// sides: its block A between the bases, and the Grams of its sides outside
// A where they hold more than `drop` of its squared norm. `left_projection`
// is E_lᵀG, computed here when not given.
SpanPiece two_sided_piece(const at::Tensor& grad, const at::Tensor& total, int l, int r,
                          const std::vector<at::Tensor>& E, const std::vector<int64_t>& width,
                          double drop, at::Tensor& left_projection) {
  if (!left_projection.defined()) {
    left_projection = at::mm(E[l].t(), grad.reshape({width[l], -1}));
  }
  const at::Tensor EG_rows = left_projection;
  const at::Tensor EG =
      EG_rows.view({E[l].size(1), width[r], -1}).permute({2, 0, 1});  // [inner, r_l, n_r]
  SpanPiece p;
  p.left = l, p.right = r;
  p.A = at::matmul(EG, E[r]);
  const at::Tensor AL = p.A.permute({1, 0, 2}).reshape({E[l].size(1), -1});
  const at::Tensor AR = p.A.permute({2, 0, 1}).reshape({E[r].size(1), -1});
  const at::Tensor in_left = EG_rows.square().sum(), in_a = p.A.square().sum();
  // ||E_lᵀG||² − ||A||² is the left Gram's trace outside A; ||G||² −
  // ||E_lᵀG||² bounds the right one's. One host read.
  const at::Tensor outside =
      at::stack({in_left - in_a, total - in_left, total}).to(at::kCPU, at::kDouble);
  const double* o = outside.data_ptr<double>();
  p.rest = total - in_a;
  if (!(std::abs(o[0]) <= drop * o[2])) {
    p.BB = at::mm(EG_rows, EG_rows.t()) - at::mm(AL, AL.t());
    p.rest = p.rest - p.BB.trace();
  }
  if (!(std::abs(o[1]) <= drop * o[2])) {
    const at::Tensor GE = at::mm(column_rows(grad, width[r]), E[r]);
    p.CC = at::mm(GE.t(), GE) - at::mm(AR, AR.t());
    p.rest = p.rest - p.CC.trace();
  }
  return p;
}

// The bases E of the symmetries' spans (see range_finder.h), last symmetry
// first, with the column each gradient's side range ends at (`end_left`,
// `end_right`) and the left projections E_lᵀG computed on the way; false
// when a basis would exceed 3/4 of its width (unless `forced`).
bool span_bases(const SymmetryList& syms, const std::vector<at::Tensor>& grads,
                const std::vector<double>& mass, const std::vector<int>& left,
                const std::vector<int>& right, bool forced, const std::vector<int64_t>& width,
                std::vector<at::Tensor>& E, std::vector<int64_t>& end_left,
                std::vector<int64_t>& end_right, std::vector<at::Tensor>& left_projections) {
  const size_t m = syms.size();
  // Each symmetry's cut (see range_basis): 4096 m ε² of its gradients'
  // squared norm, m the columns of the sides it acts on.
  const double eps = epsilon_of(grads.front().scalar_type());
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
  end_left.assign(grads.size(), -1);
  end_right.assign(grads.size(), -1);
  E.assign(m, at::Tensor());
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
  return true;
}

}  // namespace

bool span_pieces(const SymmetryList& syms, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& squares, const std::vector<double>& mass,
                 const std::vector<int>& left, const std::vector<int>& right, bool forced,
                 std::vector<at::Tensor>& E, std::vector<SpanPiece>& pieces,
                 std::vector<at::Tensor>& left_projections) {
  const size_t m = syms.size();
  std::vector<int64_t> width(m);
  for (size_t k = 0; k < m; ++k) width[k] = static_cast<const LayerSymmetry&>(*syms[k]).width();
  std::vector<int64_t> end_left, end_right;
  if (!span_bases(syms, grads, mass, left, right, forced, width, E, end_left, end_right,
                  left_projections)) {
    return false;
  }
  // One piece per gradient acted on from both sides, and one per symmetry and
  // side for all the gradients acted on from that side only. A gradient
  // thinner than its basis (a bias, a narrow output layer) is held as its
  // projection, whose Gram it is, and costs r²q per ascent step, not r³.
  // Mass outside both bases of a two-sided gradient is rounding when the
  // bases hold its range (their purpose); below 64 ε of the gradient's
  // squared norm it is left with the constant rest instead of carried.
  const double drop = 64 * epsilon_of(grads.front().scalar_type());
  std::vector<SpanPiece> only_left(m), only_right(m);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& total = squares[i];
    const int l = left[i], r = right[i];
    if (l >= 0 && r >= 0) {
      pieces.push_back(two_sided_piece(grads[i], total, l, r, E, width, drop, left_projections[i]));
    } else if (l >= 0) {
      left_projections[i] = one_side(only_left[l].BF, only_left[l].BB, only_left[l].rest,
                                     grads[i].reshape({width[l], -1}), E[l], end_left[i], total);
    } else if (r >= 0) {
      one_side(only_right[r].CF, only_right[r].CC, only_right[r].rest,
               column_rows(grads[i], width[r]).t(), E[r], end_right[i], total);
    }
  }
  for (size_t k = 0; k < m; ++k) {
    only_left[k].left = only_right[k].right = static_cast<int>(k);
    if (only_left[k].rest.defined()) pieces.push_back(std::move(only_left[k]));
    if (only_right[k].rest.defined()) pieces.push_back(std::move(only_right[k]));
  }
  return true;
}

}  // namespace teleport::detail
