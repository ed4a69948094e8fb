#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/tolerance.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace teleport::detail {

std::vector<at::Tensor> pick(const std::vector<at::Tensor>& all, const std::vector<size_t>& idx) {
  std::vector<at::Tensor> out;
  out.reserve(idx.size());
  for (size_t i : idx) out.push_back(all[i]);
  return out;
}

at::Tensor norm_sq(const std::vector<at::Tensor>& tensors) {
  at::Tensor total = at::zeros({}, tensors.front().options());
  for (const auto& t : tensors) total = total + t.square().sum();
  return total;
}

void accumulate(at::Tensor& sum, const at::Tensor& x) { sum = sum.defined() ? sum + x : x; }

std::vector<at::Tensor> unit_steps(const SymmetryList& syms,
                                   const std::vector<at::Tensor>& directions,
                                   const TeleportOptions& o) {
  std::vector<at::Tensor> steps;
  for (size_t k = 0; k < syms.size(); ++k) {
    steps.push_back(capped_step(directions[k], o, keeps_positive(*syms[k], o)));
  }
  return steps;
}

at::Tensor rise(const std::vector<at::Tensor>& directions, const std::vector<at::Tensor>& steps) {
  at::Tensor total;
  for (size_t k = 0; k < steps.size(); ++k) {
    accumulate(total, at::dot(directions[k].reshape(-1), steps[k].reshape(-1)));
  }
  return total;
}

// Whether a diagonal step under the linear parametrization must keep every
// factor 1 + t positive (a scaling across a ReLU is a symmetry only then).
bool keeps_positive(const Symmetry& sym, const TeleportOptions& o) {
  return sym.diagonal() && o.parametrization() == Parametrization::kLinear &&
         o.mode() == Mode::kExact;
}

double step_floor(c10::ScalarType dtype, const TeleportOptions& o) {
  return std::min(std::sqrt(epsilon_of(dtype)), o.max_step());
}

namespace {
// Below this norm a direction counts as zero and is not lengthened.
constexpr double kZeroDirection = 1e-30;

// The factor that scales a step of Frobenius norm `norm` down to max_step or
// up to `floor`, and, given `most_negative` (−min t), keeps every
// 1 + t >= 1/2; on host doubles or 0-dim double tensors alike (NaN
// propagated either way).
template <class V>
V step_factor(const V& norm, const V* most_negative, double floor, const TeleportOptions& o) {
  const V safe = clamp_(norm, 1e-300, INFINITY);
  V factor = clamp_(o.max_step() / safe, -INFINITY, 1.0);
  const V longer = clamp_(floor / safe, 1.0, INFINITY);  // 1 unless norm < floor <= max_step
  factor = where_(norm >= o.lr() * kZeroDirection, factor * longer, factor);
  if (most_negative != nullptr) {
    factor = minimum_(factor, 0.5 / clamp_(*most_negative, 1e-300, INFINITY));
  }
  return factor;
}
}  // namespace

double step_factor(double norm, const double* most_negative, double floor,
                   const TeleportOptions& o) {
  return step_factor<double>(norm, most_negative, floor, o);
}

double capped_factor(double norm, double floor, const TeleportOptions& o) {
  return o.lr() * step_factor(norm * o.lr(), static_cast<const double*>(nullptr), floor, o);
}

// T = η D, scaled down to Frobenius norm max_step when larger, up to
// step_floor() when shorter, and for diagonal linear steps so that every
// factor 1 + t stays >= 1/2 (neither cap nor floor in reference mode). The
// factors are computed in double so that a cap of 1e300 over a tiny norm
// cannot overflow a float; on the host where reading is free. (The norm and
// minimum of η D are η times D's, so the step takes one product.)
at::Tensor capped_step(const at::Tensor& direction, const TeleportOptions& o, bool keep_positive) {
  const double lr = o.lr();
  if (o.mode() == Mode::kReference) return direction * lr;
  const double floor = step_floor(direction.scalar_type(), o);
  if (host_bookkeeping(direction)) {
    if (!keep_positive) return direction * capped_factor(direction.norm().item<double>(), floor, o);
    const double negative = -direction.min().item<double>() * lr;
    const double norm = direction.norm().item<double>() * lr;
    return direction * (lr * step_factor(norm, &negative, floor, o));
  }
  const at::Tensor negative = keep_positive ? -direction.min().to(at::kDouble) * lr : at::Tensor();
  const at::Tensor factor = step_factor(direction.norm().to(at::kDouble) * lr,
                                        keep_positive ? &negative : nullptr, floor, o);
  return direction * (factor * lr).to(direction.scalar_type());
}

// The group element of one ascent step: the symmetry's own, or in reference
// mode, for the layer actions, the published code's I + T with I - T as its
// "inverse" (its SO(2) rotations are exact and stay so).
GroupElement step_element(const Symmetry& sym, const at::Tensor& T, const TeleportOptions& o) {
  if (o.mode() == Mode::kReference && o.parametrization() == Parametrization::kLinear &&
      dynamic_cast<const LayerSymmetry*>(&sym) != nullptr) {
    const at::Tensor id = sym.diagonal() ? at::ones_like(T) : at::eye(T.size(0), T.options());
    return {id + T, id - T, sym.diagonal(), {}};
  }
  return sym.element(T, o.parametrization());
}

// Whether every element of one attempt is invertible (a 0-dim bool).
at::Tensor all_invertible(const std::vector<GroupElement>& elements, const at::Tensor& like) {
  at::Tensor ok = at::ones({}, like.options().dtype(at::kBool));
  for (const auto& e : elements) {
    if (e.invertible.defined()) ok = ok.logical_and(e.invertible);
  }
  return ok;
}

}  // namespace teleport::detail
