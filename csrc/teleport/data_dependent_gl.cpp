// The paper's data-dependent GL(n) across a LeakyReLU (symmetry.h): the
// least change of the first layer that keeps its activations' images, from a
// thin QR of the layer's inputs (docs/design.md §3).
#include <teleport/internal/batch_loss_data.h>
#include <teleport/internal/least_change.h>
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

using detail::host_matrix;
using detail::shape_of;

DataDependentGL::DataDependentGL(double negative_slope, at::Tensor w_in, at::Tensor b_in,
                                 at::Tensor w_out, std::string name)
    : LayerSymmetry(SymmetryKind::kLinearGL, std::move(w_in), std::move(b_in), std::move(w_out),
                    std::move(name)),
      slope_(negative_slope) {
  TORCH_CHECK(w_in_.dim() == 2 && w_out_.dim() == 2,
              "DataDependentGL: expected two Linear weights (2-D), got W_in ", shape_of(w_in_),
              " and W_out ", shape_of(w_out_));
  TORCH_CHECK(negative_slope > 0 && std::isfinite(negative_slope),
              "DataDependentGL: expected a LeakyReLU slope > 0 (a bijective activation), got ",
              negative_slope);
  if (name_ == "gl(" + std::to_string(width()) + ")") {
    name_ = "data-dependent " + name_;
  }
  solver_ = std::make_shared<const detail::LeastChange>(slope_, w_in_.size(1), width(),
                                                        b_in_.defined(), name_);
}

at::Tensor DataDependentGL::direction(const std::vector<at::Tensor>&) const {
  TORCH_CHECK(false, name_,
              ": the data-dependent action has no closed-form direction; use "
              "Method::kAutograd with a batch");
}

void DataDependentGL::transport_gradients_(const GroupElement&,
                                           const std::vector<at::Tensor>&) const {
  TORCH_CHECK(false, name_,
              ": gradients do not map under the data-dependent action; compute "
              "them afresh after the teleport");
}

namespace {
// The layer's inputs with a column of ones for the bias.
at::Tensor with_ones(const at::Tensor& h, bool bias) {
  return bias ? at::cat({h, at::ones({h.size(0), 1}, h.options())}, 1) : h;
}

// h hᵀ, its lower blocks computed and mirrored (some 3/4 of the products).
at::Tensor gram_of(const at::Tensor& h) {
  const int64_t n = h.size(0), k = n / 2;
  if (k < 16) return at::mm(h, h.t());
  const at::Tensor top = h.slice(0, 0, k), bottom = h.slice(0, k, n);
  const at::Tensor lower = at::mm(bottom, top.t());
  return at::cat({at::cat({at::mm(top, top.t()), lower.t()}, 1),
                  at::cat({lower, at::mm(bottom, bottom.t())}, 1)},
                 0);
}

// The Cholesky QR of factors() for small float32 inputs on the CPU, on the
// host in double (the same arithmetic as its ATen calls, a dozen of which cost
// more than the products at the sizes of the paper's problems). M is the
// inputs (with the ones column) transposed where wide and as they are where
// tall, p × k with k ≤ p: G = MᵀM = LLᵀ, R = Lᵀ, Q = M R⁻¹. A non-finite or
// not positive definite G makes R and Q NaN, as there. Returns false where
// the ATen calls are the ones to make.
// Beyond about p·k² = 2e4 multiply-adds the plain loops cost more (callgrind).
constexpr int64_t kHostFactorsMaxWork = 1 << 12;
bool cholesky_qr_on_host(const at::Tensor& h, bool bias, bool wide, at::Tensor& r_out,
                         at::Tensor& q_out, at::Tensor& gram_out) {
  const int64_t rows = h.size(0), cols = h.size(1) + (bias ? 1 : 0);
  const int64_t p = wide ? cols : rows, k = wide ? rows : cols;
  if (!detail::host_bookkeeping(h) || h.scalar_type() != at::kFloat ||
      (h.requires_grad() && at::GradMode::is_enabled()) || p * k * k > kHostFactorsMaxWork) {
    return false;
  }
  const at::Tensor hc = h.detach().contiguous();
  const float* in = hc.data_ptr<float>();
  // M[i][a]: entry i of column a of M, i < p, a < k.
  std::vector<double> m(static_cast<size_t>(p * k));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < cols; ++col) {
      const double v = col < h.size(1) ? in[row * h.size(1) + col] : 1.0;
      m[wide ? col * k + row : row * k + col] = v;
    }
  }
  std::vector<double> g(static_cast<size_t>(k * k), 0.0);
  for (int64_t i = 0; i < p; ++i) {
    const double* mi = &m[i * k];
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = 0; b <= a; ++b) g[a * k + b] += mi[a] * mi[b];
    }
  }
  double total = 0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < a; ++b) g[b * k + a] = g[a * k + b], total += 2 * g[a * k + b];
    total += g[a * k + a];
  }
  // L row by row; R = Lᵀ stored as r[j][c] = L[c][j].
  std::vector<double> r(static_cast<size_t>(k * k), 0.0);
  bool ok = std::isfinite(total);
  for (int64_t c = 0; c < k && ok; ++c) {
    for (int64_t j = 0; j <= c; ++j) {
      double s = g[c * k + j];
      for (int64_t l = 0; l < j; ++l) s -= r[l * k + c] * r[l * k + j];
      if (j == c) {
        ok = s > 0;  // false for NaN too
        r[c * k + c] = std::sqrt(s);
      } else {
        r[j * k + c] = s / r[j * k + j];
      }
    }
  }
  if (!ok) std::fill(r.begin(), r.end(), NAN);
  // Q = M R⁻¹ row by row: q_i R = m_i, R upper triangular.
  std::vector<double> q(static_cast<size_t>(p * k));
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      double s = m[i * k + j];
      for (int64_t l = 0; l < j; ++l) s -= q[i * k + l] * r[l * k + j];
      q[i * k + j] = s / r[j * k + j];
    }
  }
  r_out = host_matrix(r, k, k);
  q_out = host_matrix(q, p, k);
  if (wide) {
    if (!std::isfinite(total)) std::fill(g.begin(), g.end(), NAN);
    gram_out = host_matrix(g, k, k);
  }
  return true;
}
}  // namespace

std::pair<at::Tensor, at::Tensor> detail::LeastChange::solve(
    const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const at::Tensor& g, Mode mode,
    bool in_place, const at::Tensor& known_z) const {
  // σ⁻¹ is the LeakyReLU of slope 1/a.
  const auto sigma = [&](const at::Tensor& z) { return at::leaky_relu(z, slope_); };
  const auto sigma_inv = [&](const at::Tensor& y) { return at::leaky_relu(y, 1 / slope_); };
  const at::Tensor z = known_z.defined() ? known_z
                       : b.defined()     ? at::addmm(b, h, w.t())
                                         : at::mm(h, w.t());
  const at::Tensor target = sigma_inv(at::mm(sigma(z), g.t()));
  if (mode == Mode::kReference) {
    // The SVD behind pinv throws on non-finite input; such a step gives NaN
    // weights instead, which the ascent refuses (or the teleport rolls back).
    const at::Tensor inputs = with_ones(h, b.defined());
    const at::Tensor inputs_finite = at::isfinite(inputs).all();
    const at::Tensor finite = inputs_finite.logical_and(at::isfinite(target).all());
    at::Tensor theta = at::mm(at::linalg_pinv(at::where(inputs_finite, inputs, 0.0)),
                              at::where(finite, target, 0.0));  // (m [+1]) × n
    theta = at::where(finite, theta, NAN);
    if (!b.defined()) return {theta.t(), at::Tensor()};
    return {theta.slice(0, 0, h.size(1)).t(), theta.select(0, h.size(1))};
  }
  // The least change Δθ = inputs⁺ (target − z). Non-finite inputs give NaN
  // factors; a non-finite target, non-finite weights: a step the ascent refuses.
  return moved(factors(h), target - z, w, b, in_place);
}

// A thin QR instead of the SVD (backward stable, differentiable, and much
// cheaper; for float32 weights the Cholesky QR in factors()): within the rank
// condition (batch ≤ inputs) inputsᵀ = QR and inputs⁺ = Q R⁻ᵀ; beyond it inputs = QR and inputs⁺ =
// R⁻¹ Qᵀ, the least-squares solution. A rank-deficient batch gives non-finite values (refused like
// any non-finite step) or far-off ones (the loss check rolls back).
//
// The triangular solves, where the inputs' condition number enters, run in
// double. Within the rank condition the product with Q, the one the size of
// the weights, runs in the weights' dtype: Q is orthonormal, so its rounding
// changes the new weights by about as much as rounding them to that dtype
// does. Beyond it Qᵀ x comes before the solve and stays in double.
std::pair<at::Tensor, at::Tensor> detail::LeastChange::moved(const Factors& f, const at::Tensor& x,
                                                             at::Tensor w, at::Tensor b,
                                                             bool in_place) const {
  const int64_t m = w.size(1);
  const at::Tensor xd = x.to(at::kDouble);
  if (f.wide) {
    // Δθ = Q y with y = R⁻ᵀ x: ΔW = yᵀ Q_Wᵀ, Δb = yᵀ q_b (Q_W its first m rows).
    const at::Tensor yt =
        at::linalg_solve_triangular(f.r.t(), xd, /*upper=*/false).to(w.scalar_type()).t();
    const at::Tensor q_w = f.q_work.slice(0, 0, m);
    w = in_place ? w.addmm_(yt, q_w.t()) : at::addmm(w, yt, q_w.t());
    if (b.defined()) {
      const at::Tensor q_b = f.q_work.select(0, m);
      b = in_place ? b.addmv_(yt, q_b) : at::addmv(b, yt, q_b);
    }
    return {w, b};
  }
  const at::Tensor delta = at::linalg_solve_triangular(f.r, at::mm(f.q.t(), xd), /*upper=*/true)
                               .to(w.scalar_type());  // (m [+1]) × n
  const at::Tensor dw = delta.slice(0, 0, m).t();
  w = in_place ? w.add_(dw) : w + dw;
  if (b.defined()) b = in_place ? b.add_(delta.select(0, m)) : b + delta.select(0, m);
  return {w, b};
}

// (inputs⁺)ᵀ [c_W c_b]ᵀ: R⁻¹ Qᵀ c within the rank condition, Q R⁻ᵀ c beyond
// it; the products with Q in the weights' dtype (a direction need not be
// exact: its error is about the inputs' condition number times that dtype's
// rounding), the solves in double.
at::Tensor detail::LeastChange::pulled(const Factors& f, const at::Tensor& c_w,
                                       const at::Tensor& c_b) const {
  const int64_t m = c_w.size(1);
  if (f.wide) {
    at::Tensor qc = at::mm(f.q_work.slice(0, 0, m).t(), c_w.t());  // Qᵀ c, batch × n
    if (c_b.defined()) qc = qc + at::outer(f.q_work.select(0, m), c_b);
    return at::linalg_solve_triangular(f.r, qc.to(at::kDouble), /*upper=*/true)
        .to(c_w.scalar_type());
  }
  const at::Tensor c = c_b.defined() ? at::cat({c_w.t(), c_b.unsqueeze(0)}, 0) : c_w.t();
  const at::Tensor y = at::linalg_solve_triangular(f.r.t(), c.to(at::kDouble), /*upper=*/false);
  return at::mm(f.q_work, y.to(c_w.scalar_type()));
}

detail::LeastChange::Factors detail::LeastChange::factors(const at::Tensor& h) const {
  const bool bias = bias_;
  const bool constant = !h.requires_grad();  // then Q and R are constants of the graph
  const bool cached = constant && cached_h_.defined() && cached_h_.data_ptr() == h.data_ptr() &&
                      cached_h_.sizes() == h.sizes() && cached_h_.strides() == h.strides() &&
                      cached_version_ == h._version() && cached_.q.device() == h.device() &&
                      cached_.q_work.scalar_type() == h.scalar_type();
  if (cached) return cached_;
  const at::Tensor inputs = with_ones(h, bias);
  Factors f;
  f.wide = inputs.size(0) <= inputs.size(1);
  // In double: the inputs' small singular values would amplify float32 rounding
  // of the right-hand side (10x the loss drift of the SVD, which cuts them off).
  if (cholesky_qr_on_host(h, bias, f.wide, f.r, f.q, f.gram)) {
    // The Cholesky QR below, on the host.
  } else if (h.scalar_type() == at::kFloat) {
    // Cholesky QR: with G = HHᵀ = LLᵀ (wide) Hᵀ = QR, R = Lᵀ, Q = Hᵀ R⁻¹; with
    // G = HᵀH = RᵀR (tall) H = QR, Q = H R⁻¹: a fraction of Householder's time.
    // Q's orthogonality is lost in proportion to κ², the square of H's
    // condition number, but in double that stays below what rounding the new
    // weights to float32 costs anyway (κ² 1e-16 < κ 6e-8 up to κ ~ 5e8).
    // Non-finite inputs make G non-finite (float32 squares cannot overflow
    // double): R is then NaN, and so is every step, refused.
    const at::Tensor hd = inputs.to(at::kDouble);
    const at::Tensor g = gram_of(f.wide ? hd : hd.t());
    const at::Tensor finite = at::isfinite(g.sum());
    auto [l, info] = at::linalg_cholesky_ex(at::where(finite, g, at::eye(g.size(0), g.options())));
    l = at::where(info.eq(0).logical_and(finite), l, NAN);  // singular inputs too
    f.r = l.t();
    f.q = at::linalg_solve_triangular(f.r, f.wide ? hd.t() : hd, /*upper=*/true, /*left=*/false);
    if (f.wide) f.gram = at::where(finite, g, NAN);
  } else {
    // Masked by their own finiteness only, as the factors may be kept.
    const at::Tensor finite = at::isfinite(inputs).all();
    const at::Tensor safe = at::where(finite, inputs, 0.0).to(at::kDouble);
    std::tie(f.q, f.r) = at::linalg_qr(f.wide ? safe.t() : safe, "reduced");
    f.r = at::where(finite, f.r, NAN);          // the solves give NaN steps, refused
    if (f.wide) f.gram = at::mm(f.r.t(), f.r);  // inputs = Rᵀ Qᵀ
  }
  f.q_work = f.q.to(h.scalar_type());
  if (constant) cached_h_ = h, cached_version_ = h._version(), cached_ = f;
  return f;
}

at::Tensor DataDependentGL::pullback(const std::vector<at::Tensor>& params,
                                     const std::vector<at::Tensor>& cotangents,
                                     const BatchLoss* batch,
                                     const ParameterOverrides& in_force) const {
  TORCH_CHECK(batch != nullptr, name_, ": the data-dependent action needs a batch");
  TORCH_CHECK(params.size() == parameters().size() && cotangents.size() == params.size(), name_,
              ": expected ", parameters().size(), " parameters and cotangents, got ", params.size(),
              " and ", cotangents.size());
  at::NoGradGuard no_grad;
  // At T = 0: dθ = H⁺((A Tᵀ) ⊘ σ'(Z)) and dW_out = −W_out T (docs/design.md §3).
  // H and Z as the batch's last evaluation left them where it can.
  const bool bias = b_in_.defined();
  ParameterOverrides values = {{w_in_, params[0].detach()}};
  if (bias) values.emplace_back(b_in_, params[1].detach());
  values.insert(values.end(), in_force.begin(), in_force.end());
  const auto [h, z] = detail::data_of(*batch).layer_of(w_in_, values);
  return solver_->pullback(h, z, cotangents[0], bias ? cotangents[1] : at::Tensor(),
                           params.back().detach(), cotangents.back());
}

at::Tensor detail::LeastChange::pullback(const at::Tensor& h, const at::Tensor& z,
                                         const at::Tensor& c_w, const at::Tensor& c_b,
                                         const at::Tensor& w_out, const at::Tensor& c_out) const {
  const at::Tensor a = at::leaky_relu(z, slope_);
  const at::Tensor solved = pulled(factors(h), c_w, c_b);
  const at::Tensor x = at::where(z >= 0, solved, solved / slope_);
  return at::mm(x.t(), a) - at::mm(w_out.t(), c_out);
}

void detail::LeastChange::check_layer_rows(const at::Tensor& h, const char* what) const {
  TORCH_CHECK(h.dim() == 2 && h.size(1) == inputs_, name_, ": ", what,
              " expected the layer's inputs as rows, [batch, ", inputs_, "], got ", shape_of(h));
}

at::Tensor detail::LeastChange::pullback_from_output(const at::Tensor& dF_dz, const at::Tensor& h,
                                                     const at::Tensor& z, const at::Tensor& w_out,
                                                     const at::Tensor& c_out) const {
  check_layer_rows(h, "pullback_from_output");
  TORCH_CHECK(
      z.dim() == 2 && z.size(0) == h.size(0) && z.size(1) == width_ && dF_dz.sizes() == z.sizes(),
      name_, ": pullback_from_output expected Z and dF/dZ of ", h.size(0), " x ", width_,
      " (the layer's outputs), got ", shape_of(z), " and ", shape_of(dF_dz));
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(1) == width_ && c_out.sizes() == w_out.sizes(), name_,
              ": pullback_from_output expected W_out and its cotangent of shape [*, ", width_,
              "], got ", shape_of(w_out), " and ", shape_of(c_out));
  at::NoGradGuard no_grad;
  // (inputs⁺)ᵀ c_θᵀ with c_θ = inputsᵀ ∂F/∂Z: ∂F/∂Z itself where the inputs'
  // rows are independent (inputsᵀ = QR: R⁻¹ Qᵀ Q R ∂F/∂Z), else Q Qᵀ ∂F/∂Z
  // (inputs = QR). No solve, and no product the size of the weights.
  at::Tensor solved = dF_dz;
  if (h.size(0) > h.size(1) + (bias_ ? 1 : 0)) {
    const at::Tensor q = factors(h).q_work;
    solved = at::mm(q, at::mm(q.t(), dF_dz));
  }
  const at::Tensor x = at::where(z >= 0, solved, solved / slope_);
  return at::mm(x.t(), at::leaky_relu(z, slope_)) - at::mm(w_out.t(), c_out);
}

at::Tensor detail::LeastChange::input_gram(const at::Tensor& h) const {
  check_layer_rows(h, "input_gram");
  at::NoGradGuard no_grad;
  if (h.size(0) > h.size(1) + (bias_ ? 1 : 0)) return {};
  return factors(h).gram;
}

bool DataDependentGL::exact_for(const BatchLoss* batch) const {
  TORCH_CHECK(batch != nullptr, name_, ": the data-dependent action needs a batch");
  const at::Tensor h = detail::data_of(*batch).input_of(w_in_);
  const int64_t columns = h.size(1) + (b_in_.defined() ? 1 : 0);
  if (h.size(0) <= columns) return true;
  TORCH_WARN_ONCE(name_, ": a batch of ", h.size(0), " exceeds the ", columns,
                  " inputs (+1 for the bias) that keep the data-dependent action exact; the "
                  "teleport relies on its tolerance");
  return false;
}

void DataDependentGL::apply_(const GroupElement& e, const BatchLoss* batch, Mode mode) const {
  TORCH_CHECK(batch != nullptr, name_, ": the data-dependent action needs a batch");
  at::NoGradGuard no_grad;
  if (mode == Mode::kExact) {
    // The layer's inputs and outputs as the batch's last evaluation left them,
    // where the weights have not changed since.
    const auto [h, z] = detail::data_of(*batch).layer_of(w_in_);
    solver_->solve(h, w_in_, b_in_, e.g, mode, /*in_place=*/true, z);
  } else {
    auto [w, b] = solver_->solve(detail::data_of(*batch).input_of(w_in_), w_in_, b_in_, e.g, mode);
    w_in_.copy_(w);
    if (b_in_.defined()) b_in_.copy_(b);
  }
  w_out_.copy_(at::mm(w_out_, e.g_inv));
}

std::vector<at::Tensor> DataDependentGL::act(const std::vector<at::Tensor>& params,
                                             const at::Tensor& T, const BatchLoss* batch,
                                             const ParameterOverrides& in_force, Mode mode) const {
  TORCH_CHECK(batch != nullptr, name_, ": the data-dependent action needs a batch");
  const at::Tensor g = T + at::eye(T.size(0), T.options());
  const at::Tensor h = detail::data_of(*batch).input_of(w_in_, in_force);
  auto [w, b] = solver_->solve(h, params[0], b_in_.defined() ? params[1] : at::Tensor(), g, mode);
  std::vector<at::Tensor> out = {w};
  if (b_in_.defined()) out.push_back(b);
  out.push_back(at::mm(params.back(), at::linalg_inv(g)));  // g = I at T = 0
  return out;
}

}  // namespace teleport
