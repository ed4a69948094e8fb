#pragma once
// Not installed: what the ascent engines share (internal/*_engine.cpp).

#include <teleport/internal/parameters.h>
#include <teleport/internal/tensor_ops.h>
#include <teleport/options.h>
#include <teleport/symmetry.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace teleport::detail {

std::vector<at::Tensor> pick(const std::vector<at::Tensor>& all, const std::vector<size_t>& idx);

at::Tensor norm_sq(const std::vector<at::Tensor>& tensors);

// sum += x, where an undefined sum is zero (of x's shape).
void accumulate(at::Tensor& sum, const at::Tensor& x);

// Whether a diagonal step under the linear parametrization must keep every
// factor 1 + t positive (a scaling across a ReLU is a symmetry only then).
bool keeps_positive(const Symmetry& sym, const TeleportOptions& o);

// The shortest step of the exact ascent: √ε of `dtype` (3.5e-4 in float32,
// 1.5e-8 in float64), or max_step when smaller. Near a perfect fit η D is
// far shorter than the dtype resolves on the weights, and no such step could
// raise ||∇L||² measurably; a step lengthened to the floor can, and the
// never-worse rule still shortens it where it does not (docs/design.md §6).
double step_floor(c10::ScalarType dtype, const TeleportOptions& o);

// T = η D, scaled down to Frobenius norm max_step when larger, up to
// step_floor() when shorter (a direction below 1e-30 counts as zero), and for
// diagonal linear steps so that every factor 1 + t stays >= 1/2 (neither cap
// nor floor in reference mode). The factors are computed in double so that a
// cap of 1e300 over a tiny norm cannot overflow a float.
at::Tensor capped_step(const at::Tensor& direction, const TeleportOptions& o, bool keep_positive);

// The factor capped_step() multiplies η D by, on the host: `norm` is η D's
// norm and `most_negative` −min η D (nullptr: no positivity cap).
double step_factor(double norm, const double* most_negative, double floor,
                   const TeleportOptions& o);

// The factor capped_step() multiplies a direction of Frobenius norm `norm` by
// in exact mode without a positivity cap, on the host.
double capped_factor(double norm, double floor, const TeleportOptions& o);

// Each symmetry's capped step along its direction: an attempt's steps at factor 1.
std::vector<at::Tensor> unit_steps(const SymmetryList& syms,
                                   const std::vector<at::Tensor>& directions,
                                   const TeleportOptions& o);

// The group element of one ascent step: the symmetry's own, or in reference
// mode, for the layer actions, the published code's I + T with I - T as its
// "inverse" (its SO(2) rotations are exact and stay so).
GroupElement step_element(const Symmetry& sym, const at::Tensor& T, const TeleportOptions& o);

// Whether every element of one attempt is invertible (a 0-dim bool).
at::Tensor all_invertible(const std::vector<GroupElement>& elements, const at::Tensor& like);

// Σ_k <D_k, T_k>: how fast ||∇L||² rises along steps T_k = factor × steps[k]
// at factor 0, for the directions D_k (its gradients); a 0-dim tensor.
at::Tensor rise(const std::vector<at::Tensor>& directions, const std::vector<at::Tensor>& steps);

// The ascent's bookkeeping is written once for two kinds of values: 0-dim
// tensors on the parameters' device (no host synchronisation; `Flag` and
// `Count` are tensors too) and doubles on the host (bool and int64_t), for
// loops that read their values anyway (on the CPU a read is free, and dozens
// of 0-dim tensor operations per attempt are not).
inline at::Tensor and_(const at::Tensor& a, const at::Tensor& b) { return a.logical_and(b); }
inline bool and_(bool a, bool b) { return a && b; }
inline at::Tensor not_(const at::Tensor& a) { return a.logical_not(); }
inline bool not_(bool a) { return !a; }
inline at::Tensor where_(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  return at::where(c, a, b);
}
inline double where_(bool c, double a, double b) { return c ? a : b; }
inline at::Tensor where_(bool c, const at::Tensor& a, const at::Tensor& b) { return c ? a : b; }
inline at::Tensor isfinite_(const at::Tensor& x) { return at::isfinite(x); }
inline bool isfinite_(double x) { return std::isfinite(x); }
inline at::Tensor clamp_(const at::Tensor& x, double lo, double hi) { return at::clamp(x, lo, hi); }
inline double clamp_(double x, double lo, double hi) { return x < lo ? lo : x > hi ? hi : x; }
inline at::Tensor minimum_(const at::Tensor& a, const at::Tensor& b) { return at::minimum(a, b); }
inline double minimum_(double a, double b) {  // NaN propagated, as at::minimum
  return std::isnan(a) || std::isnan(b) ? NAN : std::min(a, b);
}
inline at::Tensor count_(const at::Tensor& flag) { return flag.to(at::kLong); }
inline int64_t count_(bool flag) { return flag ? 1 : 0; }
inline double relu_(double x) { return x > 0 ? x : 0; }
inline at::Tensor relu_(const at::Tensor& x) { return at::relu(x); }
inline double sqrt_(double x) { return std::sqrt(x); }
inline at::Tensor sqrt_(const at::Tensor& x) { return at::sqrt(x); }

template <class V>
struct Values;
template <>
struct Values<at::Tensor> {
  using Flag = at::Tensor;
  using Count = at::Tensor;
  static at::Tensor constant(double x, const at::Tensor& like) {
    return at::full({}, x, like.options());
  }
  static Flag flag(bool b, const at::Tensor& like) {
    return at::full({}, b, like.options().dtype(at::kBool));
  }
  static Count zero_count(const at::Tensor& like) {
    return at::zeros({}, like.options().dtype(at::kLong));
  }
  static bool read(const Flag& f) { return f.item<bool>(); }
  static bool free_to_read(const at::Tensor& like) { return like.device().is_cpu(); }
};
template <>
struct Values<double> {
  using Flag = bool;
  using Count = int64_t;
  static double constant(double x, double) { return x; }
  static Flag flag(bool b, double) { return b; }
  static Count zero_count(double) { return 0; }
  static bool read(Flag f) { return f; }
  static bool free_to_read(double) { return true; }
};

// A 0-dim tensor as a value V (the tensor itself, or read on the host), and
// back (dtype of `like`; a count as a long).
template <class V>
V read_as(const at::Tensor& t);
template <>
inline at::Tensor read_as<at::Tensor>(const at::Tensor& t) {
  return t;
}
template <>
inline double read_as<double>(const at::Tensor& t) {
  return t.item<double>();
}
template <>
inline bool read_as<bool>(const at::Tensor& t) {
  return t.item<bool>();
}
inline at::Tensor as_tensor(const at::Tensor& v, const at::Tensor&) { return v; }
inline at::Tensor as_tensor(double v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options());
}
inline at::Tensor as_tensor(int64_t v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().dtype(at::kLong));
}

// The cap on ||∇L||² after the teleport (none in reference mode).
template <class V>
V growth_limit(const V& norm_before, const TeleportOptions& o) {
  return o.mode() == Mode::kReference ? Values<V>::constant(INFINITY, norm_before)
                                      : V(norm_before * o.max_growth());
}

// Never worse (docs/design.md §6): whether a step to `candidate` = ||∇L||²
// is kept. In exact mode it must raise the objective and stay within the
// cap; the reference arithmetic keeps any finite step. NaN fails either way.
template <class V>
typename Values<V>::Flag accepts(const V& candidate, const V& current, const V& limit,
                                 const TeleportOptions& o) {
  if (o.mode() == Mode::kReference) return isfinite_(candidate);
  return and_(candidate > current, candidate <= limit);
}

// The sizing of steps under the growth cap (docs/design.md §6). An attempt
// from `current` aims at 3/4 of the room left below the cap, where the linear
// model of ||∇L||² says it would pass the cap; the ascent stops once 7/8 of
// the cap's budget (limit − start) is used. After an attempt refused beyond
// the cap, the quadratic through it aims at the middle of that last eighth.
constexpr double kAimedFraction = 0.75, kStopFraction = 0.875, kBandMiddle = 0.9375;
template <class V>
V budget_point(const V& start, const V& limit, double fraction) {
  return start + (limit - start) * fraction;
}
// The factor at which the linear model current + rise × factor reaches `aim`.
template <class V>
V linear_bound(const V& current, const V& rise, const V& aim) {
  return (aim - current) / rise;
}
// After an attempt at factor s from `current` that went beyond the cap to
// `next`: the factor at which the quadratic through (0, current) with slope
// `rise` and through (s, next) reaches `aim` (where the linear model sits
// below it, the linear model's), over s. The caller keeps it within
// [1/10, 9/10] and halves where it is not finite.
template <class V>
V interpolated_shrink(const V& s, const V& current, const V& rise, const V& next, const V& aim) {
  const V delta = aim - current;
  const V curvature = relu_((next - current - rise * s) / (s * s));
  return delta * 2 / ((rise + sqrt_(rise * rise + curvature * delta * 4)) * s);
}

// The ascent's bookkeeping, on 0-dim tensors (Control) or host doubles
// (HostControl): the ascent ends when `steps` attempts were kept or more than
// max_halvings were refused (in reference mode, at the first). A refused
// attempt halves every later step. An ascent of ||∇L||² under the growth cap
// in exact mode (the second constructor) also sizes its steps by the rise of
// ||∇L||² (docs/design.md §6): an attempt whose linear model passes the cap
// is shortened to where it reaches 3/4 of the room left, an attempt refused
// beyond the cap shortens the next to where the quadratic model through it
// reaches 15/16 of the cap's budget (by 1/10 to 9/10), and the ascent stops
// once a kept attempt has used 7/8 of that budget.
template <class V>
class BasicControl {
 public:
  using Flag = typename Values<V>::Flag;
  using Count = typename Values<V>::Count;

  BasicControl(const V& like, const TeleportOptions& o)
      : steps_(o.steps()),
        halvings_(o.mode() == Mode::kExact ? o.max_halvings() : 0),
        active_(Values<V>::flag(o.steps() > 0, like)),
        scale_(Values<V>::constant(1, like)),
        taken_(Values<V>::zero_count(like)),
        refused_(Values<V>::zero_count(like)),
        free_to_read_(Values<V>::free_to_read(like)) {}
  /// An ascent of ||∇L||² from `norm_before` under the cap `limit`.
  BasicControl(const V& norm_before, const V& limit, const TeleportOptions& o)
      : BasicControl(norm_before, o) {
    if (o.mode() != Mode::kExact) return;
    capped_ = true;
    limit_ = limit;
    stop_ = budget_point(norm_before, limit, kStopFraction);
    band_ = budget_point(norm_before, limit, kBandMiddle);
  }

  /// How many attempts at most.
  int64_t attempts() const { return steps_ + halvings_ + 1; }
  /// The factor of the next attempt's step (1, shortened at each refusal).
  const V& scale() const { return scale_; }
  /// The same for an attempt of the capped ascent from ||∇L||² = `current`
  /// whose steps at factor 1 make ||∇L||² rise at `rise` (see rise()).
  const V& scale(const V& current, const V& rise) {
    if (!capped_) return scale_;
    sized_ = true;
    current_ = current;
    rise_ = rise;
    const V bound = linear_bound(current, rise, budget_point(current, limit_, kAimedFraction));
    const Flag passes = and_(rise > 0, current + rise * scale_ > limit_);  // NaN: no
    scale_ = where_(and_(passes, bound > 0), bound, scale_);
    return scale_;
  }
  /// Whether the ascent still runs: `ok` below must be and-ed with it.
  const Flag& active() const { return active_; }

  /// Records attempt `ok` (already and-ed with active()).
  void record(const Flag& ok) { record(ok, nullptr); }
  /// The same for the capped ascent, with `next` the attempt's ||∇L||².
  void record(const Flag& ok, const V& next) { record(ok, &next); }

  /// Whether the loop may stop after attempt `i`. Where reading the flag is
  /// free (host values, the CPU) it is read every time; elsewhere it is a host
  /// synchronisation, read only once the attempts that an ascent with no
  /// refusal needs are done.
  bool done(int64_t i) const {
    if (i + 1 == attempts()) return true;
    if (!free_to_read_ && i + 1 < steps_) return false;
    return !Values<V>::read(active_);
  }
  /// For engines whose attempt costs more than a host synchronisation (a
  /// forward and backward pass): the flag is read after every attempt, so no
  /// attempt runs after the ascent stopped.
  void read_every_attempt() { free_to_read_ = true; }
  const Count& taken() const { return taken_; }
  const Count& refused() const { return refused_; }

 private:
  void record(const Flag& ok, const V* next) {
    const Flag refused = and_(active_, not_(ok));
    taken_ = taken_ + count_(ok);
    refused_ = refused_ + count_(refused);
    V shrink = Values<V>::constant(0.5, scale_);
    if (capped_ && next != nullptr && sized_) {  // after scale(current, rise)
      const Flag beyond = and_(and_(isfinite_(*next), *next > limit_), rise_ > 0);
      const V f = interpolated_shrink(scale_, current_, rise_, *next, band_);
      shrink = where_(and_(beyond, isfinite_(f)), clamp_(f, 0.1, 0.9), shrink);
      active_ = and_(active_, not_(and_(ok, *next >= stop_)));
    }
    scale_ = where_(refused, scale_ * shrink, scale_);
    active_ = and_(and_(active_, taken_ < steps_), refused_ <= halvings_);
  }

  int64_t steps_, halvings_;
  Flag active_;
  V scale_;
  Count taken_, refused_;
  bool free_to_read_;
  bool capped_ = false, sized_ = false;
  V limit_{}, stop_{}, band_{}, current_{}, rise_{};  // the capped ascent's
};
using Control = BasicControl<at::Tensor>;
using HostControl = BasicControl<double>;

// What an ascent engine hands back to teleport(), which checks it in one host read.
struct Ascent {
  at::Tensor norm_before, norm_after, loss_before, steps, shortened;
  // The batch's loss at the weights the ascent leaves, where it evaluated
  // them there in exact mode (else teleport() measures it).
  at::Tensor loss_after;
  // The teleport objective where it is not ||∇L||² (kBalance: Σ||W||²,
  // lowered); undefined otherwise.
  at::Tensor objective_before, objective_after;
  // Where the path decided before touching anything that its result is finite
  // (and otherwise applied the identity): a 0-dim bool; undefined elsewhere.
  at::Tensor finite;
  // False where the product of the steps could not be inverted (the identity
  // was applied instead and the teleport rolls back); undefined = invertible.
  at::Tensor invertible;
  std::vector<GroupElement> total;  // one per symmetry, starting at the identity

  Ascent() = default;  // no symmetries, nothing measured (filled in by its path)
  explicit Ascent(const SymmetryList& syms) {
    for (const auto& s : syms) {
      const at::Tensor zero = s->zero_algebra();
      if (dynamic_cast<const LayerSymmetry*>(s.get()) == nullptr) {
        total.push_back(s->element(zero, Parametrization::kExp));
        continue;
      }
      // The identity itself (a matrix_exp of an n × n zero costs milliseconds).
      const at::Tensor id =
          s->diagonal() ? at::ones_like(zero) : at::eye(zero.size(0), zero.options());
      total.push_back(GroupElement{id, id.clone(), s->diagonal(), {}});
    }
  }
};

// Closed form: the direction from gradients, the gradients carried along,
// the weights moved once at the end.
Ascent closed_form_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          std::vector<at::Tensor> grads, const TeleportOptions& o);

// The closed-form GL(n) ascent in the span of the gradients (docs/design.md
// §11), for lists of layer GL(n) symmetries in exact mode (span_applies), with
// their Roles: which one acts on each tensor's rows, `left`, and columns,
// `right`, -1 for none. It falls back to closed_form_ascent where a basis
// would cover most of a layer.
bool span_applies(const SymmetryList& syms, const TeleportOptions& o);
Ascent span_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& grads, const std::vector<int>& left,
                   const std::vector<int>& right, const TeleportOptions& o);

}  // namespace teleport::detail
