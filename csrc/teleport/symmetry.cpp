#include <teleport/internal/symmetry_helpers.h>
#include <teleport/internal/tensor_ops.h>
#include <teleport/symmetry.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

namespace teleport {
namespace {

using detail::host_matrix;
using detail::shape_of;

// Every tensor the group acts on is a matrix once reshaped (docs/design.md
// §2): W_in on its dimension 0 (rows of a Linear weight, output channels of a
// Conv weight, a bias), W_out on its dimension 1, whose size(1) / n entries per
// group index form a block (one input column of a Linear, one input channel of
// a Conv, or the H·W columns a channel owns after a flatten).

// The shape that broadcasts a vector over dimension `dim` of x.
std::vector<int64_t> along(const at::Tensor& x, int64_t dim, int64_t size) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[static_cast<size_t>(dim)] = size;
  return shape;
}

// m X on dimension 0 of X; m is a diagonal (vector) or a matrix.
at::Tensor left(const at::Tensor& m, bool diagonal, const at::Tensor& x) {
  if (diagonal) return x * m.view(along(x, 0, m.size(0)));
  return at::mm(m, x.reshape({m.size(0), -1})).view(x.sizes());
}

// X m on dimension 1 of X, block by block.
at::Tensor right(const at::Tensor& x, bool diagonal, const at::Tensor& m) {
  const int64_t n = m.size(0), block = x.size(1) / n;
  if (diagonal) {
    const at::Tensor scale = block == 1 ? m : m.repeat_interleave(block);
    return x * scale.view(along(x, 1, x.size(1)));
  }
  const at::Tensor x3 = x.reshape({x.size(0), n, -1});  // [outer, n, inner]
  return at::matmul(x3.transpose(1, 2), m).transpose(1, 2).reshape(x.sizes());
}

// I + T and its inverse for a small matrix T on the CPU, with I + T as the
// ATen sum gives it and its inverse by Gauss–Jordan elimination with partial
// pivoting, in double on the host: at the widths of the paper's regression
// (6 × 6) linalg_inv_ex's dispatch costs far more than the arithmetic. As
// LAPACK's getrf, a zero pivot (only zeros left in a column) makes
// `invertible` false; non-finite entries give NaN. Nothing where the ATen
// calls are the ones to make: a larger matrix, another device or dtype, or
// one that autograd records.
constexpr int64_t kHostInverseMax = 16;
std::optional<GroupElement> linear_element_on_host(const at::Tensor& T) {
  if (!T.device().is_cpu() || T.dim() != 2 || T.size(0) != T.size(1) ||
      T.size(0) > kHostInverseMax ||
      (T.scalar_type() != at::kFloat && T.scalar_type() != at::kDouble) ||
      (T.requires_grad() && at::GradMode::is_enabled())) {
    return std::nullopt;
  }
  const int64_t n = T.size(0);
  const at::Tensor in = T.detach().to(at::kDouble).contiguous();
  std::vector<double> a(in.data_ptr<double>(), in.data_ptr<double>() + n * n), inv(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) a[i * n + i] += 1, inv[i * n + i] = 1;
  // t + 1 is exact in double for a float t (but where |t| < 2⁻³⁰, and then
  // both round to 1): rounded, it is the float sum.
  const at::Tensor g = host_matrix(a, n, n);
  bool invertible = true;
  for (int64_t c = 0; c < n; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < n; ++r) {
      if (std::abs(a[r * n + c]) > std::abs(a[p * n + c])) p = r;
    }
    if (a[p * n + c] == 0) {
      invertible = false;
      break;
    }
    if (p != c) {
      for (int64_t j = 0; j < n; ++j) {
        std::swap(a[p * n + j], a[c * n + j]);
        std::swap(inv[p * n + j], inv[c * n + j]);
      }
    }
    const double d = 1 / a[c * n + c];
    for (int64_t j = 0; j < n; ++j) a[c * n + j] *= d, inv[c * n + j] *= d;
    for (int64_t r = 0; r < n; ++r) {
      const double f = a[r * n + c];
      if (r == c || f == 0) continue;
      for (int64_t j = 0; j < n; ++j)
        a[r * n + j] -= f * a[c * n + j], inv[r * n + j] -= f * inv[c * n + j];
    }
  }
  return GroupElement{g.to(T.scalar_type()), host_matrix(inv, n, n).to(T.scalar_type()), false,
                      at::scalar_tensor(invertible, T.options().dtype(at::kBool))};
}

}  // namespace

GroupElement GroupElement::from_algebra(const at::Tensor& T, bool diagonal, Parametrization p) {
  GroupElement e;
  e.diagonal = diagonal;
  if (p == Parametrization::kExp) {
    e.g = diagonal ? at::exp(T) : at::matrix_exp(T);
    e.g_inv = diagonal ? at::exp(-T) : at::matrix_exp(-T);
  } else if (diagonal) {
    e.g = T + 1;
    e.g_inv = at::reciprocal(e.g);
  } else {
    if (auto host = linear_element_on_host(T)) return *host;
    e.g = T + at::eye(T.size(-1), T.options());  // a batch of matrices too
    auto [inverse, info] = at::linalg_inv_ex(e.g);
    e.g_inv = inverse;
    e.invertible = info.eq(0).all();
  }
  return e;
}

GroupElement GroupElement::identity_like(const GroupElement& like) {
  GroupElement e;
  e.diagonal = like.diagonal;
  e.g = like.diagonal ? at::ones_like(like.g)
                      : at::eye(like.g.size(-1), like.g.options()).expand_as(like.g).clone();
  e.g_inv = e.g.clone();
  return e;
}

GroupElement GroupElement::compose(const GroupElement& other) const {
  TORCH_CHECK(diagonal == other.diagonal, "compose: expected group elements of the same kind");
  GroupElement e;
  e.diagonal = diagonal;
  e.g = diagonal ? g * other.g : at::matmul(g, other.g);
  e.g_inv = diagonal ? other.g_inv * g_inv : at::matmul(other.g_inv, g_inv);
  if (invertible.defined() && other.invertible.defined()) {
    e.invertible = invertible.logical_and(other.invertible);
  } else {
    e.invertible = invertible.defined() ? invertible : other.invertible;
  }
  return e;
}

GroupElement GroupElement::masked(const at::Tensor& keep) const {
  const GroupElement id = identity_like(*this);
  GroupElement e{at::where(keep, g, id.g), at::where(keep, g_inv, id.g_inv), diagonal, {}};
  if (invertible.defined()) e.invertible = invertible.logical_or(keep.logical_not());
  return e;
}

LayerSymmetry::LayerSymmetry(SymmetryKind kind, at::Tensor w_in, at::Tensor b_in, at::Tensor w_out,
                             std::string name)
    : kind_(kind),
      w_in_(std::move(w_in)),
      b_in_(std::move(b_in)),
      w_out_(std::move(w_out)),
      name_(std::move(name)) {
  TORCH_CHECK(w_in_.defined() && w_out_.defined(),
              "LayerSymmetry: expected defined weights W_in and W_out");
  TORCH_CHECK((w_in_.dim() >= 2 || (w_in_.dim() == 1 && kind_ == SymmetryKind::kScaling)) &&
                  w_out_.dim() >= 2,
              "LayerSymmetry: expected Linear or Conv weights (2-D or more; a BatchNorm's "
              "1-D weight for scaling), got W_in ",
              shape_of(w_in_), " and W_out ", shape_of(w_out_));
  rows_ = {w_in_};
  if (b_in_.defined()) {
    TORCH_CHECK(b_in_.dim() == 1 && b_in_.size(0) == w_in_.size(0),
                "LayerSymmetry: expected a bias of ", w_in_.size(0), " entries, got ",
                shape_of(b_in_));
    rows_.push_back(b_in_);
  }
  columns_ = {w_out_};
  check_shapes("LayerSymmetry");
  if (name_.empty()) {
    name_ = std::string(diagonal() ? "scaling" : "gl") + "(" + std::to_string(width()) + ")";
  }
}

LayerSymmetry::LayerSymmetry(std::vector<at::Tensor> rows, std::vector<at::Tensor> columns,
                             std::string name)
    : kind_(SymmetryKind::kScaling),
      rows_(std::move(rows)),
      columns_(std::move(columns)),
      name_(std::move(name)) {
  TORCH_CHECK(!rows_.empty() && !columns_.empty(),
              "LayerSymmetry: expected at least one writer and one reader, got ", rows_.size(),
              " and ", columns_.size());
  for (const auto& t : rows_) {
    TORCH_CHECK(t.defined() && t.dim() >= 1, "LayerSymmetry: expected defined writer tensors");
  }
  for (const auto& t : columns_) {
    TORCH_CHECK(t.defined() && t.dim() >= 2,
                "LayerSymmetry: expected reader weights (2-D or "
                "more), got ",
                t.defined() ? shape_of(t) : std::string("an undefined tensor"));
  }
  w_in_ = rows_.front();
  w_out_ = columns_.front();
  check_shapes("LayerSymmetry");
  if (name_.empty()) name_ = "scaling(" + std::to_string(width()) + ")";
}

// Every writer gives n outputs on dimension 0; every reader takes them as its
// input channels (a Conv), its columns, or whole blocks of columns (a Linear
// after a flattened Conv); one device, one floating dtype.
void LayerSymmetry::check_shapes(const char* who) {
  const int64_t n = w_in_.size(0);
  for (const auto& t : rows_) {
    TORCH_CHECK(t.size(0) == n, who, ": every writer must give ", n,
                " outputs: expected a tensor with ", n, " entries on dimension 0, got ",
                shape_of(t));
  }
  const bool flat_rows = w_in_.dim() == 2;
  for (const auto& t : columns_) {
    if (t.dim() > 2 || flat_rows) {
      // A Conv takes the outputs as its input channels, a Linear as its columns.
      TORCH_CHECK(t.size(1) == n, who, ": W_out must take W_in's outputs: expected ",
                  columns_.size() > 1 ? "every reader" : "W_out", " with ", n,
                  t.dim() > 2 ? " input channels" : " columns", ", got ", shape_of(t));
    } else {
      // Conv -> Flatten -> Linear: channel c owns a block of columns.
      TORCH_CHECK(t.size(1) % n == 0, who, ": a Linear after a flattened Conv of ", n,
                  " channels must take a whole block of columns per channel: expected a "
                  "multiple of ",
                  n, " columns, got ", shape_of(t));
    }
  }
  TORCH_CHECK(at::isFloatingType(w_in_.scalar_type()), who,
              ": expected floating-point weights, got ", w_in_.scalar_type());
  for (const auto& p : parameters()) {
    TORCH_CHECK(p.device() == w_in_.device(), who, ": expected all parameters on ", w_in_.device(),
                ", got one on ", p.device());
    TORCH_CHECK(p.scalar_type() == w_in_.scalar_type(), who, ": expected all parameters of dtype ",
                w_in_.scalar_type(), ", got one of ", p.scalar_type());
    shapes_.push_back(p.sizes().vec());
  }
}

std::vector<at::Tensor> LayerSymmetry::parameters() const {
  std::vector<at::Tensor> out = rows_;
  out.insert(out.end(), columns_.begin(), columns_.end());
  return out;
}

at::Tensor LayerSymmetry::zero_algebra() const {
  const int64_t n = width();
  return diagonal() ? at::zeros({n}, w_in_.options()) : at::zeros({n, n}, w_in_.options());
}

at::Tensor LayerSymmetry::direction(const std::vector<at::Tensor>& grads) const {
  TORCH_CHECK(grads.size() == parameters().size(), name_, ": expected ", parameters().size(),
              " gradients, got ", grads.size());
  const int64_t n = width();
  const size_t r = row_tensors();
  auto cols = [&](size_t i) {  // [outer, n, inner]
    return grads[i].reshape({grads[i].size(0), n, -1});
  };
  const at::Tensor rows = grads.front().reshape({n, -1});  // [n, rest]
  at::Tensor d;
  if (diagonal()) {
    d = cols(r).square().sum(at::IntArrayRef{0, 2});
    for (size_t i = r + 1; i < grads.size(); ++i) {
      d = d + cols(i).square().sum(at::IntArrayRef{0, 2});
    }
    d = d - rows.square().sum(1);
    for (size_t i = 1; i < r; ++i) {
      d = d - (grads[i].dim() == 1 ? grads[i].square() : grads[i].reshape({n, -1}).square().sum(1));
    }
  } else {
    const at::Tensor m = cols(r).transpose(1, 2).reshape({-1, n});  // [outer·inner, n]
    d = at::mm(m.t(), m) - at::mm(rows, rows.t());
    if (b_in_.defined()) d = d - at::outer(grads[1], grads[1]);
  }
  return d * 2;
}

// X <- m X (dimension 0) in place; a diagonal m multiplies without a temporary.
static void left_(const at::Tensor& m, bool diagonal, const at::Tensor& x) {
  if (!x.defined()) return;
  if (diagonal) {
    x.mul_(m.view(along(x, 0, m.size(0))));
  } else {
    x.copy_(left(m, false, x));
  }
}

// X <- X m (dimension 1, block by block) in place.
static void right_(const at::Tensor& x, bool diagonal, const at::Tensor& m) {
  if (!x.defined()) return;
  if (diagonal && x.size(1) == m.size(0)) {
    x.mul_(m.view(along(x, 1, m.size(0))));
  } else {
    x.copy_(right(x, diagonal, m));
  }
}

void LayerSymmetry::apply_(const GroupElement& e, const BatchLoss*, Mode) const {
  at::NoGradGuard no_grad;
  for (const auto& t : rows_) left_(e.g, e.diagonal, t);
  for (const auto& t : columns_) right_(t, e.diagonal, e.g_inv);
}

void LayerSymmetry::transport_gradients_(const GroupElement& e,
                                         const std::vector<at::Tensor>& grads) const {
  at::NoGradGuard no_grad;
  // g^{-T} X for the rows, X gᵀ for the columns.
  const at::Tensor g_inv_t = e.diagonal ? e.g_inv : e.g_inv.t();
  const at::Tensor g_t = e.diagonal ? e.g : e.g.t();
  for (size_t i = 0; i < grads.size(); ++i) {
    if (i < row_tensors()) {
      left_(g_inv_t, e.diagonal, grads[i]);
    } else {
      right_(grads[i], e.diagonal, g_t);
    }
  }
}

void LayerSymmetry::transport_squared_gradients_(const GroupElement& e,
                                                 const std::vector<at::Tensor>& sums) const {
  TORCH_CHECK(e.diagonal, name_,
              ": sums of squared gradients map exactly only under diagonal "
              "scaling, not under full GL(n)");
  at::NoGradGuard no_grad;
  const at::Tensor rows = e.g_inv.square(), cols = e.g.square();
  for (size_t i = 0; i < sums.size(); ++i) {
    if (i < row_tensors()) {
      left_(rows, true, sums[i]);
    } else {
      right_(sums[i], true, cols);
    }
  }
}

std::vector<at::Tensor> LayerSymmetry::act(const std::vector<at::Tensor>& params,
                                           const at::Tensor& T, const BatchLoss*,
                                           const ParameterOverrides&, Mode) const {
  TORCH_CHECK(params.size() == parameters().size(), name_, ": expected ", parameters().size(),
              " tensors, got ", params.size());
  const GroupElement e = GroupElement::from_algebra(T, diagonal(), Parametrization::kLinear);
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    out.push_back(i < row_tensors() ? left(e.g, e.diagonal, params[i])
                                    : right(params[i], e.diagonal, e.g_inv));
  }
  return out;
}

void LayerSymmetry::check_unchanged() const { detail::check_kept(parameters(), shapes_, name_); }

at::Tensor Symmetry::direction(const std::vector<at::Tensor>&) const {
  TORCH_CHECK(false, name(),
              ": expected a closed-form direction, got a symmetry without one "
              "(teleport it with Method::kAutograd)");
}

void Symmetry::transport_gradients_(const GroupElement&, const std::vector<at::Tensor>&) const {
  TORCH_CHECK(false, name(),
              ": expected an action whose gradients map exactly, got one "
              "without transport_gradients_() (gradients are computed afresh)");
}

void Symmetry::transport_squared_gradients_(const GroupElement&,
                                            const std::vector<at::Tensor>&) const {
  TORCH_CHECK(false, name(),
              ": expected an action that carries squared gradients exactly, got "
              "one without transport_squared_gradients_()");
}

at::Tensor Symmetry::pullback(const std::vector<at::Tensor>& params,
                              const std::vector<at::Tensor>& cotangents, const BatchLoss* batch,
                              const ParameterOverrides& in_force) const {
  TORCH_CHECK(cotangents.size() == params.size(), name(), ": expected ", params.size(),
              " cotangents, got ", cotangents.size());
  at::AutoGradMode enable(true);
  const at::Tensor T = zero_algebra().requires_grad_(true);
  std::vector<at::Tensor> values;
  for (const auto& p : params) values.push_back(p.detach());
  const auto acted = act(values, T, batch, in_force, Mode::kExact);
  at::Tensor s = at::zeros({}, T.options());
  for (size_t j = 0; j < acted.size(); ++j) s = s + (acted[j] * cotangents[j]).sum();
  return torch::autograd::grad({s}, {T})[0];
}

}  // namespace teleport
