// The range finder of the span GL(n) engine: random-sign sketches, a
// rank-revealing pivoted Cholesky and Cholesky QR (docs/design.md §11).
#include <teleport/internal/range_finder.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace teleport::detail {
namespace {

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
int64_t extend_basis(at::Tensor& E, const at::Tensor& rows, at::Tensor Y, double cut,
                     double& left) {
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
  const int64_t k =
      std::min(pivoted_cholesky(c, b, resolved, piv, R, left), rows.size(0) - E.size(1));
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
  if (epsilon_of(Q.scalar_type()) * kappa * kappa < 0.1) {
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

}  // namespace

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
        const int64_t k = extend_basis(
            E, rows, at::mm(acted[i], random_signs(m, b, stream++, first.options())), cut, left);
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

}  // namespace teleport::detail
