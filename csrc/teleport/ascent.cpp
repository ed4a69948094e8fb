#include <teleport/ascent.h>

#include <teleport/internal/gl_path.h>
#include <teleport/internal/scaling_path.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <cmath>
#include <optional>
#include <typeinfo>
#include <utility>

namespace teleport {
namespace detail {

namespace {
bool scaling_tensor_ops_on_cpu = false;  // see internal/scaling_path.h
GLAscentPath gl_ascent_path = GLAscentPath::kAuto;  // see internal/gl_path.h
}  // namespace

ForceGLAscentPath::ForceGLAscentPath(GLAscentPath path) : previous_(gl_ascent_path) {
  gl_ascent_path = path;
}
ForceGLAscentPath::~ForceGLAscentPath() { gl_ascent_path = previous_; }

ScalingTensorOpsOnCpu::ScalingTensorOpsOnCpu() : previous_(scaling_tensor_ops_on_cpu) {
  scaling_tensor_ops_on_cpu = true;
}
ScalingTensorOpsOnCpu::~ScalingTensorOpsOnCpu() { scaling_tensor_ops_on_cpu = previous_; }

Snapshot::Snapshot(std::vector<at::Tensor> params) : params_(std::move(params)) {
  at::NoGradGuard no_grad;
  for (const auto& p : params_) {
    values_.push_back(p.detach().clone());
    grads_.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  }
}

void Snapshot::restore() const {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].detach().copy_(values_[i]);
    at::Tensor& grad = const_cast<at::Tensor&>(params_[i]).mutable_grad();
    if (!grads_[i].defined()) {
      grad = at::Tensor();
    } else if (grad.defined() && grad.sizes() == grads_[i].sizes()) {
      grad.copy_(grads_[i]);
    } else {
      grad = grads_[i].clone();
    }
  }
}

std::vector<at::Tensor> distinct_parameters(const SymmetryList& symmetries) {
  std::vector<at::Tensor> out;
  for (const auto& s : symmetries) {
    for (const auto& p : s->parameters()) {
      bool seen = false;
      for (const auto& q : out) seen = seen || q.is_same(p);
      if (!seen) out.push_back(p);
    }
  }
  return out;
}

}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;

// Where each symmetry's parameters sit in the list of distinct parameters.
std::vector<std::vector<size_t>> positions(const SymmetryList& symmetries,
                                           const std::vector<at::Tensor>& params) {
  std::vector<std::vector<size_t>> out;
  for (const auto& s : symmetries) {
    std::vector<size_t> idx;
    for (const auto& p : s->parameters()) {
      for (size_t j = 0; j < params.size(); ++j) {
        if (params[j].is_same(p)) idx.push_back(j);
      }
    }
    out.push_back(std::move(idx));
  }
  return out;
}

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

// Whether a diagonal step under the linear parametrization must keep every
// factor 1 + t positive (a scaling across a ReLU is a symmetry only then).
bool keeps_positive(const Symmetry& sym, const TeleportOptions& o) {
  return sym.diagonal() && o.parametrization() == Parametrization::kLinear &&
         o.mode() == Mode::kExact;
}

// T = η D, scaled down to Frobenius norm max_step when larger, and for
// diagonal linear steps so that every factor 1 + t stays >= 1/2 (no cap in
// reference mode). The factors are computed in double so that a cap of 1e300
// over a tiny norm cannot overflow a float.
at::Tensor capped_step(const at::Tensor& direction, const TeleportOptions& o,
                       bool keep_positive) {
  const at::Tensor t = direction * o.lr();
  if (o.mode() == Mode::kReference) return t;
  at::Tensor factor =
      at::clamp_max(o.max_step() / at::clamp_min(t.norm().to(at::kDouble), 1e-300), 1.0);
  if (keep_positive) {
    factor = at::minimum(factor, 0.5 / at::clamp_min(-t.min().to(at::kDouble), 1e-300));
  }
  return t * factor.to(t.scalar_type());
}

// The gradients of the batch's loss at the current weights, without
// touching `.grad`; the loss itself comes back through `loss`.
std::vector<at::Tensor> batch_gradients(const BatchLoss& batch,
                                        const std::vector<at::Tensor>& params,
                                        at::Tensor& loss) {
  at::AutoGradMode enable(true);
  loss = batch.loss();
  if (batch.group() == nullptr) {
    auto grads = torch::autograd::grad({loss}, params);
    loss = loss.detach();
    return grads;
  }
  // The global batch's: share-weighted sums over the ranks, in one all-reduce.
  const at::Tensor local = loss * batch.share();
  auto grads = torch::autograd::grad({local}, params);
  grads.push_back(local.detach());
  batch.group()->all_reduce_sum(grads);
  loss = grads.back();
  grads.pop_back();
  return grads;
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

// The cap on ||∇L||² after the teleport (none in reference mode).
at::Tensor growth_limit(const at::Tensor& norm_before, const TeleportOptions& o) {
  return o.mode() == Mode::kReference ? at::full_like(norm_before, INFINITY)
                                      : norm_before * o.max_growth();
}

// Never worse (docs/design.md §6): whether a step to `candidate` = ||∇L||²
// is kept. In exact mode it must raise the objective and stay within the
// cap; the reference arithmetic keeps any finite step. NaN fails either way.
at::Tensor accepts(const at::Tensor& candidate, const at::Tensor& current,
                   const at::Tensor& limit, const TeleportOptions& o) {
  if (o.mode() == Mode::kReference) return at::isfinite(candidate);
  return (candidate > current).logical_and(candidate <= limit);
}

// The ascent's bookkeeping, kept on the device: an attempt that is refused
// halves every later step; the ascent ends when `steps` attempts were kept or
// more than max_halvings were refused (in reference mode, at the first).
class Control {
 public:
  Control(const at::Tensor& like, const TeleportOptions& o)
      : steps_(o.steps()),
        halvings_(o.mode() == Mode::kExact ? o.max_halvings() : 0),
        active_(at::full({}, o.steps() > 0, like.options().dtype(at::kBool))),
        scale_(at::ones({}, like.options())),
        taken_(at::zeros({}, like.options().dtype(at::kLong))),
        refused_(at::zeros({}, like.options().dtype(at::kLong))),
        on_cpu_(like.device().is_cpu()) {}

  /// How many attempts at most.
  int64_t attempts() const { return steps_ + halvings_ + 1; }
  /// The factor of the next attempt's step (1, halved at each refusal).
  const at::Tensor& scale() const { return scale_; }
  /// Whether the ascent still runs: `ok` below must be and-ed with it.
  const at::Tensor& active() const { return active_; }

  /// Records attempt `ok` (already and-ed with active()).
  void record(const at::Tensor& ok) {
    const at::Tensor refused = active_.logical_and(ok.logical_not());
    taken_ = taken_ + ok.to(at::kLong);
    refused_ = refused_ + refused.to(at::kLong);
    scale_ = at::where(refused, scale_ * 0.5, scale_);
    active_ = active_.logical_and(taken_ < steps_).logical_and(refused_ <= halvings_);
  }
  /// Whether the loop may stop after attempt `i`. On CPU reading the flag is
  /// free; elsewhere it is a host synchronisation, so it is read only once the
  /// attempts that an ascent with no refusal needs are done.
  bool done(int64_t i) const {
    if (i + 1 == attempts()) return true;
    if (!on_cpu_ && i + 1 < steps_) return false;
    return !active_.item<bool>();
  }
  const at::Tensor& taken() const { return taken_; }
  const at::Tensor& refused() const { return refused_; }

 private:
  int64_t steps_, halvings_;
  at::Tensor active_, scale_, taken_, refused_;
  bool on_cpu_;
};

// Whether every element of one attempt is invertible (a 0-dim bool).
at::Tensor all_invertible(const std::vector<GroupElement>& elements, const at::Tensor& like) {
  at::Tensor ok = at::ones({}, like.options().dtype(at::kBool));
  for (const auto& e : elements) {
    if (e.invertible.defined()) ok = ok.logical_and(e.invertible);
  }
  return ok;
}

// One attempt on the weights themselves: each symmetry's capped step along its
// direction, times `scale`, applied (a data-dependent action reads `batch`) and
// composed into `total`. Returns the attempt's elements.
std::vector<GroupElement> apply_steps(const SymmetryList& syms,
                                      const std::vector<at::Tensor>& directions,
                                      const at::Tensor& scale, const BatchLoss& batch,
                                      std::vector<GroupElement>& total, const TeleportOptions& o) {
  std::vector<GroupElement> elements;
  for (size_t k = 0; k < syms.size(); ++k) {
    const at::Tensor T = capped_step(directions[k], o, keeps_positive(*syms[k], o)) * scale;
    elements.push_back(step_element(*syms[k], T, o));
    syms[k]->apply_(elements.back(), &batch, o.mode());
    total[k] = elements.back().compose(total[k]);
  }
  return elements;
}

// After an attempt on the weights themselves: where `ok` is false, the weights
// and the product of steps go back to `before` (decided on the device, no
// host synchronisation); where true, the new point's directions are taken.
void keep_or_undo(const at::Tensor& ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before, std::vector<at::Tensor>& directions,
                  const std::vector<at::Tensor>& next_directions) {
  {
    at::NoGradGuard no_grad;
    // On CPU the flag is read for free: a kept attempt copies nothing, a refused
    // one copies back; elsewhere the choice stays on the device.
    const bool on_cpu = ok.device().is_cpu();
    const bool undo = on_cpu && !ok.item<bool>();
    for (size_t i = 0; i < params.size(); ++i) {
      if (!on_cpu) {
        params[i].detach().copy_(at::where(ok, params[i].detach(), before[i]));
      } else if (undo) {
        params[i].detach().copy_(before[i]);
      }
    }
  }
  for (size_t k = 0; k < total.size(); ++k) {
    total[k] = {at::where(ok, total[k].g, total_before[k].g),
                at::where(ok, total[k].g_inv, total_before[k].g_inv), total[k].diagonal, {}};
    directions[k] = at::where(ok, next_directions[k], directions[k]);
  }
}

struct Evaluation {
  at::Tensor loss, F;  // detached
  // ∂F/∂T_k at T = 0, computed on demand from the kept graph: at most once, and
  // before the weights evaluated change in place. Empty unless asked for.
  std::function<std::vector<at::Tensor>()> directions;
};

// F(T) = ||∇L((I+T)·w)||² on the batch at T = 0 and, when asked, ∂F/∂T by
// the chain rule (docs/design.md §3): ∇L at the new point treats the new
// weights as independent variables, so ∂F/∂T_k = J_kᵀ ∂F/∂w with J_k the
// derivative of action k at the identity. ∂F/∂w is a double backward through
// the loss alone; each symmetry's pullback() applies J_kᵀ (in closed form for
// the data-dependent action). On a batch spread over ranks (docs/design.md
// §10), with g_r the gradient of share_r × L_r on rank r and ḡ = Σ_r g_r the
// global batch's, F = ||ḡ||² and ∂F/∂w = Σ_r ∂(2 ḡ·g_r)/∂w: one all-reduce
// for ḡ and the loss, one for ∂F/∂w, so that every rank steps alike.
Evaluation evaluate(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                    const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
                    bool with_directions, Mode mode = Mode::kExact);

Evaluation evaluate_exact(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
                          bool with_directions) {
  at::AutoGradMode enable(true);
  std::vector<at::Tensor> current;
  ParameterOverrides overrides;
  for (const auto& p : params) {
    current.push_back(p.detach().requires_grad_(true));
    overrides.emplace_back(p, current.back());
  }
  const bool spread = batch.group() != nullptr;
  const at::Tensor loss = spread ? batch.loss(overrides) * batch.share() : batch.loss(overrides);
  const auto grads = torch::autograd::grad({loss}, current, {}, with_directions, with_directions);
  Evaluation ev;
  std::vector<at::Tensor> global;  // ḡ
  if (spread) {
    for (const auto& g : grads) global.push_back(g.detach().clone());
    global.push_back(loss.detach());
    batch.group()->all_reduce_sum(global);
    ev.loss = global.back();
    global.pop_back();
    ev.F = norm_sq(global);
  } else {
    ev.loss = loss.detach();
    ev.F = norm_sq(grads);
  }
  at::Tensor objective = ev.F;
  ev.F = ev.F.detach();
  if (!with_directions) return ev;
  if (spread) {
    objective = at::zeros({}, loss.options());
    for (size_t i = 0; i < grads.size(); ++i) objective = objective + (global[i] * grads[i]).sum() * 2;
  }
  ev.directions = [=, &syms, &where, &batch] {
    auto dF = torch::autograd::grad({objective}, current, {}, false, false, /*allow_unused=*/true);
    for (size_t i = 0; i < dF.size(); ++i) {
      dF[i] = dF[i].defined() ? dF[i] : at::zeros_like(params[i]);
    }
    if (spread) batch.group()->all_reduce_sum(dF);
    ParameterOverrides values;
    for (size_t i = 0; i < params.size(); ++i) values.emplace_back(params[i], current[i].detach());
    std::vector<at::Tensor> directions;
    for (size_t k = 0; k < syms.size(); ++k) {
      std::vector<at::Tensor> own;
      for (size_t i : where[k]) own.push_back(current[i].detach());
      directions.push_back(syms[k]->pullback(own, pick(dF, where[k]), &batch, values).detach());
    }
    return directions;
  };
  return ev;
}

// F(T) and, when asked, ∂F/∂T by double backward through the actions
// themselves, for reference mode: the published code's direction also follows
// a data-dependent action into the later layers' inputs it changes.
Evaluation evaluate(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                    const std::vector<std::vector<size_t>>& where, const BatchLoss& batch,
                    bool with_directions, Mode mode) {
  if (mode == Mode::kExact) return evaluate_exact(syms, params, where, batch, with_directions);
  TORCH_INTERNAL_ASSERT(batch.group() == nullptr, "reference mode runs on one process");
  at::AutoGradMode enable(true);
  std::vector<at::Tensor> Ts;
  std::vector<at::Tensor> current;
  for (const auto& p : params) current.push_back(p.detach());
  auto in_force = [&] {
    ParameterOverrides o;
    for (size_t i = 0; i < params.size(); ++i) o.emplace_back(params[i], current[i]);
    return o;
  };
  // In forward order: a data-dependent action reads its layer's inputs from the
  // network as the earlier actions left it.
  for (size_t k = 0; k < syms.size(); ++k) {
    Ts.push_back(syms[k]->zero_algebra().requires_grad_(true));
    const auto acted =
        syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force(), mode);
    for (size_t j = 0; j < acted.size(); ++j) current[where[k][j]] = acted[j];
  }
  const at::Tensor loss = batch.loss(in_force());
  const auto grads = torch::autograd::grad({loss}, current, {}, true, with_directions);
  const at::Tensor F = norm_sq(grads);
  Evaluation ev{loss.detach(), F.detach(), {}};
  if (with_directions) {
    ev.directions = [F, Ts] {
      std::vector<at::Tensor> directions;
      for (auto& d : torch::autograd::grad({F}, Ts)) directions.push_back(d.detach());
      return directions;
    };
  }
  return ev;
}

struct Ascent {
  at::Tensor norm_before, norm_after, loss_before, steps, shortened;
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

  explicit Ascent(const SymmetryList& syms) {
    for (const auto& s : syms) {
      const at::Tensor zero = s->zero_algebra();
      if (dynamic_cast<const LayerSymmetry*>(s.get()) == nullptr) {
        total.push_back(s->element(zero, Parametrization::kExp));
        continue;
      }
      // The identity itself (a matrix_exp of an n × n zero costs milliseconds).
      const at::Tensor id = s->diagonal() ? at::ones_like(zero) : at::eye(zero.size(0), zero.options());
      total.push_back(GroupElement{id, id.clone(), s->diagonal(), {}});
    }
  }
};

// Closed form: the direction from gradients, the gradients carried along,
// the weights moved once at the end.
Ascent closed_form_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          std::vector<at::Tensor> grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  a.norm_before = norm_sq(grads);
  a.norm_after = a.norm_before;
  Control control(a.norm_before, o);
  const at::Tensor limit = growth_limit(a.norm_before, o);
  // One inverse of the product instead of a product of inverses (the
  // reference arithmetic's "inverses" are I - T and must be multiplied).
  const bool invert_at_end = o.mode() == Mode::kExact;

  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<GroupElement> elements;
    for (size_t k = 0; k < syms.size(); ++k) {
      const at::Tensor T = capped_step(syms[k]->direction(pick(grads, where[k])), o,
                                       keeps_positive(*syms[k], o)) *
                           control.scale();
      elements.push_back(step_element(*syms[k], T, o));
    }
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
    control.record(ok);
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

// One gradient in the bases of the symmetries acting on its rows (`left`,
// as W_in or b_in) and columns (`right`, as W_out), -1 for none.
struct SpanPiece {
  int left = -1, right = -1;
  at::Tensor A;     // [inner, r_left, r_right]: E_leftᵀ G E_right, both sides only
  at::Tensor BB;    // [r_left, r_left]: the left side's Gram outside A
  at::Tensor CC;    // [r_right, r_right]: the right side's Gram outside A
  at::Tensor rest;  // ||G||² outside the bases
};

struct SpanFrame {
  at::Tensor h, h_inv;  // the product of the steps in the basis, and its inverse
};

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

// An orthonormal basis (n × r) of the range of the PSD matrix K, by a
// randomized range finder in blocks (seeded: the same basis at every call),
// stopping when a block adds less than `tol` of K's scale, then trimmed to
// the directions whose Ritz values exceed `cut` of the largest. A basis cut
// short only confines the ascent (see above). One host read per block.
at::Tensor range_basis(const at::Tensor& K, double tol, double cut, int64_t max_columns) {
  const int64_t n = K.size(0), block = 64;
  if (n <= block) return n <= max_columns ? at::eye(n, K.options()) : at::Tensor();
  at::Generator gen = at::detail::createCPUGenerator(0x7e1e);
  at::Tensor E = at::empty({n, 0}, K.options());
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
    E = at::cat({E, std::get<0>(at::linalg_qr(Y, "reduced"))}, 1);
  }
  // The last block overshoots the rank: keep the directions of EᵀKE whose
  // eigenvalues are above `cut` of the largest (Rayleigh–Ritz).
  const auto [lambda, V] = at::linalg_eigh(at::mm(E.t(), at::mm(K, E)));
  const at::Tensor keep = lambda > lambda.max() * cut;
  const at::Tensor kept = at::nonzero(keep).flatten();
  if (kept.numel() > max_columns) return at::Tensor();
  return kept.numel() == 0 ? E.narrow(1, 0, 1) : at::mm(E, V.index_select(1, kept));
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
  auto add = [](at::Tensor& sum, const at::Tensor& x) { sum = sum.defined() ? sum + x : x; };
  // Each gradient's Grams on the sides acted on, summed per symmetry into K.
  std::vector<at::Tensor> K(m), row_gram(grads.size()), col_gram(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (left[i] >= 0) {
      const at::Tensor rows = grads[i].reshape({width[left[i]], -1});
      row_gram[i] = at::mm(rows, rows.t());
      add(K[left[i]], row_gram[i]);
    }
    if (right[i] >= 0) {
      const int64_t n = width[right[i]];
      // The rows the right side acts on (docs/design.md §2), one per block.
      const at::Tensor cols =
          grads[i].numel() == grads[i].size(0) * n
              ? grads[i].reshape({-1, n})
              : grads[i].reshape({grads[i].size(0), n, -1}).transpose(1, 2).reshape({-1, n});
      col_gram[i] = at::mm(cols.t(), cols);
      add(K[right[i]], col_gram[i]);
    }
  }
  const bool f64 = grads.front().scalar_type() == at::kDouble;
  E.assign(m, at::Tensor());
  for (size_t k = 0; k < m; ++k) {
    const bool forced = detail::gl_ascent_path == detail::GLAscentPath::kSpan;
    E[k] = range_basis(K[k], f64 ? 1e-12 : 1e-5, f64 ? 1e-15 : 1e-7,
                       forced ? width[k] : width[k] * 3 / 4);
    if (!E[k].defined()) return false;
  }
  // One piece per gradient acted on from both sides, and one per symmetry and
  // side for all the gradients acted on from that side only.
  std::vector<SpanPiece> only_left(m), only_right(m);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor total = grads[i].square().sum();
    const int l = left[i], r = right[i];
    if (l >= 0 && r >= 0) {
      const at::Tensor EG = at::mm(E[l].t(), grads[i].reshape({width[l], -1}))
                                .view({E[l].size(1), width[r], -1})
                                .permute({2, 0, 1});  // [inner, r_l, n_r]
      SpanPiece p;
      p.left = l, p.right = r;
      p.A = at::matmul(EG, E[r]);
      const at::Tensor AL = p.A.permute({1, 0, 2}).reshape({E[l].size(1), -1});
      const at::Tensor AR = p.A.permute({2, 0, 1}).reshape({E[r].size(1), -1});
      p.BB = at::mm(E[l].t(), at::mm(row_gram[i], E[l])) - at::mm(AL, AL.t());
      p.CC = at::mm(E[r].t(), at::mm(col_gram[i], E[r])) - at::mm(AR, AR.t());
      p.rest = total - p.A.square().sum() - p.BB.trace() - p.CC.trace();
      pieces.push_back(std::move(p));
    } else if (l >= 0) {
      const at::Tensor BB = at::mm(E[l].t(), at::mm(row_gram[i], E[l]));
      add(only_left[l].BB, BB);
      add(only_left[l].rest, total - BB.trace());
    } else if (r >= 0) {
      const at::Tensor CC = at::mm(E[r].t(), at::mm(col_gram[i], E[r]));
      add(only_right[r].CC, CC);
      add(only_right[r].rest, total - CC.trace());
    }
  }
  for (size_t k = 0; k < m; ++k) {
    only_left[k].left = only_right[k].right = static_cast<int>(k);
    if (only_left[k].BB.defined()) pieces.push_back(std::move(only_left[k]));
    if (only_right[k].CC.defined()) pieces.push_back(std::move(only_right[k]));
  }
  return true;
}

struct SpanState {
  at::Tensor norm;                     // ||∇L||²
  std::vector<at::Tensor> directions;  // in the bases
};

// ||∇L||² and the directions with the products of steps `f` in the bases:
// a gradient's left side moves by h^{-T}, its right side by h.
SpanState span_state(const std::vector<SpanPiece>& pieces, const std::vector<SpanFrame>& f) {
  auto add = [](at::Tensor& sum, const at::Tensor& x) { sum = sum.defined() ? sum + x : x; };
  std::vector<at::Tensor> rows(f.size()), cols(f.size()), parts;
  for (const auto& p : pieces) {
    parts.push_back(p.rest);
    const at::Tensor L = p.left >= 0 ? f[p.left].h_inv.t() : at::Tensor();
    const at::Tensor R = p.right >= 0 ? f[p.right].h : at::Tensor();
    if (p.A.defined()) {
      const at::Tensor A = at::matmul(L, at::matmul(p.A, R.t()));
      const at::Tensor AL = A.permute({1, 0, 2}).reshape({A.size(1), -1});
      const at::Tensor AR = A.permute({2, 0, 1}).reshape({A.size(2), -1});
      parts.push_back(A.square().sum());
      add(rows[p.left], at::mm(AL, AL.t()));
      add(cols[p.right], at::mm(AR, AR.t()));
    }
    if (p.BB.defined()) {
      const at::Tensor X = at::mm(L, at::mm(p.BB, L.t()));
      parts.push_back(X.trace());
      add(rows[p.left], X);
    }
    if (p.CC.defined()) {
      const at::Tensor X = at::mm(R, at::mm(p.CC, R.t()));
      parts.push_back(X.trace());
      add(cols[p.right], X);
    }
  }
  SpanState st{at::stack(parts).sum(), {}};
  for (size_t k = 0; k < f.size(); ++k) {
    at::Tensor d = at::zeros_like(f[k].h);
    if (cols[k].defined()) d = d + cols[k];
    if (rows[k].defined()) d = d - rows[k];
    st.directions.push_back(d * 2);
  }
  return st;
}

Ascent span_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& grads, const std::vector<int>& left,
                   const std::vector<int>& right, const TeleportOptions& o) {
  Ascent a(syms);
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
  std::vector<SpanFrame> frame;
  for (size_t k = 0; k < m; ++k) {
    const at::Tensor id = at::eye(E[k].size(1), E[k].options());
    frame.push_back({id, id.clone()});
  }
  std::vector<at::Tensor> dirs = span_state(pieces, frame).directions;
  Control control(a.norm_before, o);
  const at::Tensor limit = growth_limit(a.norm_before, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<SpanFrame> candidate;
    std::vector<GroupElement> elements;
    for (size_t k = 0; k < m; ++k) {
      const at::Tensor t = capped_step(dirs[k], o, false) * control.scale();
      elements.push_back(GroupElement::from_algebra(t, false, o.parametrization()));
      candidate.push_back({at::mm(elements[k].g, frame[k].h), at::mm(frame[k].h_inv, elements[k].g_inv)});
    }
    const SpanState next = span_state(pieces, candidate);
    const at::Tensor ok = control.active()
                              .logical_and(accepts(next.norm, a.norm_after, limit, o))
                              .logical_and(all_invertible(elements, next.norm));
    for (size_t k = 0; k < m; ++k) {
      frame[k] = {at::where(ok, candidate[k].h, frame[k].h),
                  at::where(ok, candidate[k].h_inv, frame[k].h_inv)};
      dirs[k] = at::where(ok, next.directions[k], dirs[k]);
    }
    a.norm_after = at::where(ok, next.norm, a.norm_after);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  // g = I + E(h − I)Eᵀ, its inverse from one inverse of h (not the product of
  // the steps' inverses, which accumulates rounding), applied once.
  for (size_t k = 0; k < m; ++k) {
    auto [h_inv, info] = at::linalg_inv_ex(frame[k].h);
    const at::Tensor invertible = info.eq(0);
    a.invertible = a.invertible.defined() ? a.invertible.logical_and(invertible) : invertible;
    const at::Tensor id = at::eye(E[k].size(0), E[k].options());
    const at::Tensor Ir = at::eye(E[k].size(1), E[k].options());
    const at::Tensor Et = E[k].t();
    a.total[k] = GroupElement{id + at::mm(E[k], at::mm(frame[k].h - Ir, Et)),
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

// Closed form for diagonal scalings of Linear layers, on squared gradients.
// With cumulative scales c, a gradient entry (j, k) of a weight is
// G[j,k] q_k^½ r_j^½, where r = 1/c² of the symmetry on its rows and q = c² of
// the one on its columns, so ||∇L||² and every direction need only Q = G²
// weighted by r and q: one matrix-vector product each way for a weight with
// symmetries on both sides, and none otherwise. The weights and gradients are
// touched once, at the end. Same result as closed_form_ascent, far cheaper.
struct ScalingSlot {
  bool bias = false;
  int row = -1, col = -1;  // the symmetries on its rows and columns, -1 for none
  at::Tensor q;            // the squared gradient, for biases and weights with both
  at::Tensor row_sums, col_sums;  // Q 1 or Qᵀ 1 for weights with one side only
};

struct ScalingState {
  at::Tensor norm;
  std::vector<at::Tensor> directions;
};

ScalingState scaling_state(const std::vector<ScalingSlot>& slots,
                           const std::vector<at::Tensor>& c) {
  std::vector<at::Tensor> q, r;  // c² and 1/c² per symmetry
  for (const auto& ck : c) {
    q.push_back(ck.square());
    r.push_back(q.back().reciprocal());
  }
  std::vector<at::Tensor> halves(c.size());  // directions / 2
  auto add = [&](size_t k, const at::Tensor& x) { halves[k] = halves[k].defined() ? halves[k] + x : x; };
  std::vector<at::Tensor> norm_parts;
  for (const auto& s : slots) {
    if (s.bias) {  // rows only
      const at::Tensor part = s.q * r[s.row];
      norm_parts.push_back(part.sum());
      add(s.row, -part);
    } else if (s.col < 0) {  // rows only: Σ_k Q_jk = row_sums_j
      const at::Tensor part = r[s.row] * s.row_sums;
      norm_parts.push_back(part.sum());
      add(s.row, -part);
    } else if (s.row < 0) {  // columns only: Σ_j Q_jk = col_sums_k
      const at::Tensor part = q[s.col] * s.col_sums;
      norm_parts.push_back(part.sum());
      add(s.col, part);
    } else {
      const at::Tensor part = r[s.row] * at::mv(s.q, q[s.col]);  // r_j (Q q)_j
      norm_parts.push_back(part.sum());
      add(s.row, -part);
      add(s.col, q[s.col] * at::mv(s.q.t(), r[s.row]));  // q_k (Qᵀ r)_k
    }
  }
  ScalingState st;
  st.norm = at::stack(norm_parts).sum();
  for (auto& h : halves) st.directions.push_back(h * 2);
  return st;
}

bool all_layer_scalings(const SymmetryList& syms) {
  for (const auto& s : syms) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    if (layer == nullptr || layer->kind() != SymmetryKind::kScaling) return false;
  }
  return true;
}

// The scaling ascent on CPU: the same arithmetic as the loop in
// scaling_ascent, with the vector work (widths-sized, a few microseconds in
// all) in plain loops instead of dozens of ATen calls per step, and the
// matrix-vector products through at::mv. Returns the scales c.
// Scales weights and gradients once by the scales c found by the ascent.
Ascent finish_scaling(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<std::vector<size_t>>& where, std::vector<at::Tensor> c,
                      Ascent a, bool decide_before_apply) {
  if (decide_before_apply) {
    // The new gradients are finite when their squared norm is; the new weights
    // when |w| times the largest factor any entry gets is. Otherwise apply the
    // identity: multiplying by 1 leaves every bit as it was, so no copy is
    // needed to roll back.
    std::vector<at::Tensor> largest;
    for (const auto& p : params) {
      const auto [low, high] = at::aminmax(p.detach());  // NaN propagates
      largest.push_back(at::maximum(high, -low));
    }
    at::Tensor bound = at::stack(largest).max();
    for (const auto& ck : c) bound = bound * at::clamp_min(ck.max(), 1) * at::clamp_min(ck.reciprocal().max(), 1);
    a.finite = at::isfinite(a.norm_after).logical_and(at::isfinite(bound));
    for (auto& ck : c) ck = at::where(a.finite, ck, at::ones_like(ck));
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    a.total[k] = GroupElement{c[k], c[k].reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

template <typename scalar_t>
std::vector<at::Tensor> scaling_loop_cpu(const std::vector<ScalingSlot>& slots,
                                         const std::vector<int64_t>& widths,
                                         const TeleportOptions& o, double& norm_before,
                                         double& norm_after, int64_t& steps,
                                         int64_t& refused) {
  using Vec = std::vector<double>;
  auto as_tensor = [](const Vec& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, c10::CppTypeToScalarType<scalar_t>::value);
    std::copy(v.begin(), v.end(), t.data_ptr<scalar_t>());
    return t;
  };
  // ||∇L||² and the directions at scales c.
  auto state = [&](const std::vector<Vec>& c, std::vector<Vec>& dirs) {
    std::vector<Vec> q(c.size()), r(c.size());
    dirs.assign(c.size(), Vec());
    for (size_t k = 0; k < c.size(); ++k) {
      dirs[k].assign(c[k].size(), 0.0);
      for (double ck : c[k]) {
        q[k].push_back(ck * ck);
        r[k].push_back(1 / (ck * ck));
      }
    }
    double norm = 0;
    // Adds part_j = w_j m_j to the norm, and ± 2 part_j to the directions of `k`.
    auto accumulate = [&](const Vec& w, const scalar_t* m, int k, double sign) {
      for (size_t j = 0; j < w.size(); ++j) {
        const double part = w[j] * m[j];
        norm += part;
        dirs[k][j] += sign * 2 * part;
      }
    };
    for (const auto& s : slots) {
      if (s.bias) {
        accumulate(r[s.row], s.q.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.col < 0) {
        accumulate(r[s.row], s.row_sums.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.row < 0) {
        accumulate(q[s.col], s.col_sums.data_ptr<scalar_t>(), s.col, +1);
      } else {
        const at::Tensor row_mass = at::mv(s.q, as_tensor(q[s.col]));
        accumulate(r[s.row], row_mass.data_ptr<scalar_t>(), s.row, -1);
        const at::Tensor col_mass = at::mv(s.q.t(), as_tensor(r[s.row])).contiguous();
        const scalar_t* cm = col_mass.data_ptr<scalar_t>();
        for (size_t k = 0; k < q[s.col].size(); ++k) dirs[s.col][k] += 2 * q[s.col][k] * cm[k];
      }
    }
    return norm;
  };

  std::vector<Vec> c, dirs, next_dirs;
  for (int64_t n : widths) c.emplace_back(static_cast<size_t>(n), 1.0);
  norm_before = norm_after = state(c, dirs);
  const double limit = norm_before * o.max_growth();
  const bool linear = o.parametrization() == Parametrization::kLinear;
  steps = 0;
  refused = 0;
  double halved = 1;  // the factor every step gets after the refusals so far
  // The same rules as Control: kept only if it raises the norm within the cap.
  while (steps < o.steps() && refused <= o.max_halvings()) {
    std::vector<Vec> candidate = c;
    for (size_t k = 0; k < c.size(); ++k) {
      double length = 0, lowest = INFINITY;  // of T = η D: capped as capped_step does
      for (double d : dirs[k]) {
        length += d * o.lr() * d * o.lr();
        lowest = std::min(lowest, d * o.lr());
      }
      double factor = std::min(1.0, o.max_step() / std::max(std::sqrt(length), 1e-300));
      if (linear) factor = std::min(factor, 0.5 / std::max(-lowest, 1e-300));
      const double scale = o.lr() * factor * halved;
      for (size_t j = 0; j < c[k].size(); ++j) {
        const double t = dirs[k][j] * scale;
        candidate[k][j] *= linear ? 1 + t : std::exp(t);
      }
    }
    const double norm = state(candidate, next_dirs);
    if (norm > norm_after && norm <= limit) {  // NaN fails
      c = std::move(candidate);
      dirs = std::move(next_dirs);
      norm_after = norm;
      ++steps;
    } else {
      ++refused;
      halved *= 0.5;
    }
  }
  std::vector<at::Tensor> out;
  for (const auto& ck : c) out.push_back(as_tensor(ck));
  return out;
}

Ascent scaling_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o,
                      bool decide_before_apply) {
  const auto where = positions(syms, params);
  std::vector<ScalingSlot> slots(params.size());
  for (size_t k = 0; k < syms.size(); ++k) {
    // LayerSymmetry::parameters() is {W_in, b_in?, W_out}.
    for (size_t j = 0; j + 1 < where[k].size(); ++j) slots[where[k][j]].row = static_cast<int>(k);
    slots[where[k].back()].col = static_cast<int>(k);
  }
  // A Conv weight or a Linear after a flatten is a [rows, n_col, inner] block
  // matrix whose entries in one (row, column) share their factors: Q sums the
  // squares over `inner`.
  for (size_t i = 0; i < params.size(); ++i) {
    auto& s = slots[i];
    const at::Tensor& g = grads[i];
    s.bias = g.dim() == 1;
    const int64_t n_col = s.col >= 0 ? syms[static_cast<size_t>(s.col)]->zero_algebra().size(0) : 1;
    const at::Tensor q3 = s.bias ? at::Tensor() : g.square().reshape({g.size(0), n_col, -1});
    if (s.bias) {
      s.q = g.square();
    } else if (s.row >= 0 && s.col >= 0) {
      s.q = q3.sum(2);
    } else if (s.col < 0) {
      s.row_sums = q3.sum(at::IntArrayRef{1, 2});
    } else {
      s.col_sums = q3.sum(at::IntArrayRef{0, 2});
    }
  }
  std::vector<at::Tensor> c;
  for (const auto& sym : syms) c.push_back(at::ones({sym->zero_algebra().size(0)}, params.front().options()));

  Ascent a(syms);
  if (params.front().device().is_cpu() && !detail::scaling_tensor_ops_on_cpu) {
    std::vector<int64_t> widths;
    for (const auto& ck : c) widths.push_back(ck.size(0));
    double before = 0, after = 0;
    int64_t taken = 0, refused = 0;
    AT_DISPATCH_FLOATING_TYPES(params.front().scalar_type(), "scaling_loop_cpu", [&] {
      c = scaling_loop_cpu<scalar_t>(slots, widths, o, before, after, taken, refused);
    });
    const auto scalar = params.front().options().dtype(at::kDouble);
    a.norm_before = at::full({}, before, scalar).to(params.front().scalar_type());
    a.norm_after = at::full({}, after, scalar).to(params.front().scalar_type());
    a.steps = at::full({}, taken, params.front().options().dtype(at::kLong));
    a.shortened = at::full({}, refused, params.front().options().dtype(at::kLong));
    return finish_scaling(syms, params, grads, where, std::move(c), std::move(a), decide_before_apply);
  }
  ScalingState st = scaling_state(slots, c);
  a.norm_before = st.norm;
  Control control(a.norm_before, o);
  const at::Tensor limit = growth_limit(a.norm_before, o);
  // Every operation here is on vectors of the widths or on scalars, so their
  // count, not their size, is the cost: each line is kept to what it needs.
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> candidate;
    for (size_t k = 0; k < c.size(); ++k) {
      const at::Tensor T =
          capped_step(st.directions[k], o, keeps_positive(*syms[k], o)) * control.scale();
      candidate.push_back(c[k] * (o.parametrization() == Parametrization::kExp ? at::exp(T) : T + 1));
    }
    ScalingState next = scaling_state(slots, candidate);
    const at::Tensor ok = control.active().logical_and(accepts(next.norm, st.norm, limit, o));
    for (size_t k = 0; k < c.size(); ++k) {
      c[k] = at::where(ok, candidate[k], c[k]);
      st.directions[k] = at::where(ok, next.directions[k], st.directions[k]);
    }
    st.norm = at::where(ok, next.norm, st.norm);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  a.norm_after = st.norm;
  return finish_scaling(syms, params, grads, where, std::move(c), std::move(a), decide_before_apply);
}

// Autograd: F(T) = ||∇L((I+T)·w)||² on the batch, ∂F/∂T at T = 0
// by double backward. One forward, backward and double backward per attempt.
// A refused attempt is undone by restoring the weights as they were before it
// (decided on the device), which works for any action, and the next attempt
// goes half as far along the same direction.
Ascent autograd_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const BatchLoss& batch, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  Evaluation here = evaluate(syms, params, where, batch, true, o.mode());
  a.norm_before = here.F;
  a.norm_after = here.F;
  a.loss_before = here.loss;
  const at::Tensor limit = growth_limit(here.F, o);
  Control control(here.F, o);
  std::vector<at::Tensor> directions = here.directions();
  const bool on_cpu = params.front().device().is_cpu();

  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> before;  // the weights before this attempt
    for (const auto& p : params) before.push_back(p.detach().clone());
    const std::vector<GroupElement> total_before = a.total;
    // Reference mode builds every data-dependent action from the activations
    // before this step, as the published code does.
    const BatchLoss pre_step = o.mode() == Mode::kReference ? batch.with_fixed([&] {
      ParameterOverrides fixed;
      for (size_t i = 0; i < params.size(); ++i) fixed.emplace_back(params[i], before[i]);
      return fixed;
    }())
                                                             : batch;
    const std::vector<GroupElement> elements =
        apply_steps(syms, directions, control.scale(), pre_step, a.total, o);
    Evaluation next = evaluate(syms, params, where, batch, true, o.mode());
    const at::Tensor ok = control.active()
                              .logical_and(accepts(next.F, a.norm_after, limit, o))
                              .logical_and(all_invertible(elements, next.F));
    control.record(ok);
    const bool last = control.done(attempt);
    // The new point's directions serve the next attempt only: none after the
    // last, and on CPU, where reading `ok` costs nothing, none after a refusal.
    // (Taken before keep_or_undo writes the weights the graph holds.)
    std::vector<at::Tensor> next_directions = directions;
    if (!last && (!on_cpu || ok.item<bool>())) next_directions = next.directions();
    keep_or_undo(ok, params, before, a.total, total_before, directions, next_directions);
    a.norm_after = at::where(ok, next.F, a.norm_after);
    if (last) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  return a;
}

// An objective to be lowered over the group (kLookAhead, kFlatness), of the
// acted weights `current` (the symmetries' parameters in the order of `params`,
// differentiable in the steps Ts), with `total` the elements applied so far:
// the objective, ||∇L||² and the loss there.
struct Lowered {
  at::Tensor objective, norm, loss;
  // On a batch spread over ranks: `objective` is this rank's share, to be
  // differentiated; `value` the global objective (detached). Undefined on one
  // process.
  at::Tensor value;
};
using LoweredFn = std::function<Lowered(const std::vector<at::Tensor>& current,
                                        const std::vector<at::Tensor>& Ts,
                                        const std::vector<GroupElement>& total)>;

// Descent by autograd on `fn`: like autograd_ascent, but each attempt is
// kept only if it lowers the objective (finite, invertible); a refused one is
// undone and the next goes half as far.
Ascent descent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
               const BatchLoss& batch, const LoweredFn& fn, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  struct Value {
    Lowered at;
    std::vector<at::Tensor> directions;  // −∂objective/∂T_k at T = 0
  };
  auto value = [&] {
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> Ts, current;
    for (const auto& p : params) current.push_back(p.detach());
    for (size_t k = 0; k < syms.size(); ++k) {
      ParameterOverrides in_force;
      for (size_t i = 0; i < params.size(); ++i) in_force.emplace_back(params[i], current[i]);
      Ts.push_back(syms[k]->zero_algebra().requires_grad_(true));
      const auto acted = syms[k]->act(pick(current, where[k]), Ts.back(), &batch, in_force, o.mode());
      for (size_t j = 0; j < acted.size(); ++j) current[where[k][j]] = acted[j];
    }
    const Lowered l = fn(current, Ts, a.total);
    Value v{{l.value.defined() ? l.value : l.objective.detach(), l.norm.detach(), l.loss.detach(),
             at::Tensor()},
            {}};
    for (auto& d : torch::autograd::grad({l.objective}, Ts)) v.directions.push_back(-d.detach());
    // Spread over ranks: each rank differentiated its share; the sum is the direction.
    if (batch.group() != nullptr) batch.group()->all_reduce_sum(v.directions);
    return v;
  };
  Value here = value();
  a.objective_before = a.objective_after = here.at.objective;
  a.norm_before = a.norm_after = here.at.norm;
  a.loss_before = here.at.loss;
  Control control(here.at.objective, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> before;
    for (const auto& p : params) before.push_back(p.detach().clone());
    const std::vector<GroupElement> total_before = a.total;
    const std::vector<GroupElement> elements =
        apply_steps(syms, here.directions, control.scale(), batch, a.total, o);
    Value next = value();
    const at::Tensor ok = control.active()
                              .logical_and(next.at.objective < a.objective_after)
                              .logical_and(all_invertible(elements, next.at.objective));
    keep_or_undo(ok, params, before, a.total, total_before, here.directions, next.directions);
    a.objective_after = at::where(ok, next.at.objective, a.objective_after);
    a.norm_after = at::where(ok, next.at.norm, a.norm_after);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  return a;
}

// A Lowered from this rank's shares of the objective and the loss (and the
// global ||∇L||²): on one process they are the values themselves.
Lowered spread(const BatchLoss& batch, const at::Tensor& objective, const at::Tensor& norm,
               const at::Tensor& loss) {
  if (batch.group() == nullptr) return {objective, norm, loss, {}};
  std::vector<at::Tensor> v = {objective.detach(), loss.detach()};
  batch.group()->all_reduce_sum(v);
  return {objective, norm, v[1], v[0]};
}

// kLookAhead (docs/design.md §8): the batch's loss after `next` from the acted
// point. The buffers m, v of the symmetries' parameters are carried as
// kTransport carries them: by the elements applied so far (exactly, on
// copies), then differentiably by this step's factors f = 1 + t: m/f and v/f²
// are the action of 1/f - 1 and 1/f² - 1.
LoweredFn look_ahead(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                     const BatchLoss& batch, const NextStep& next) {
  const auto where = positions(syms, params);
  return [&syms, &params, &batch, &next, where](const std::vector<at::Tensor>& current,
                                                const std::vector<at::Tensor>& Ts,
                                                const std::vector<GroupElement>& total) {
    std::vector<at::Tensor> m(params.size()), v(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      for (const auto& t : next.terms) {
        if (!t.param.is_same(params[i])) continue;
        m[i] = t.m.defined() ? t.m.detach().clone() : at::zeros_like(params[i]);
        v[i] = t.v.defined() ? t.v.detach().clone() : at::zeros_like(params[i]);
      }
      TORCH_CHECK(m[i].defined(), "teleport: kLookAhead's NextStep has no term for a parameter of "
                                  "shape ", params[i].sizes(), " that the symmetries act on");
    }
    for (size_t k = 0; k < syms.size() && next.transported; ++k) {
      syms[k]->transport_gradients_(total[k], pick(m, where[k]));
      syms[k]->transport_squared_gradients_(total[k], pick(v, where[k]));
      const at::Tensor inv = 1 / (1 + Ts[k]);
      const auto mk = syms[k]->act(pick(m, where[k]), inv - 1, nullptr, {}, Mode::kExact);
      const auto vk = syms[k]->act(pick(v, where[k]), inv.square() - 1, nullptr, {}, Mode::kExact);
      for (size_t j = 0; j < mk.size(); ++j) m[where[k][j]] = mk[j], v[where[k][j]] = vk[j];
    }
    // Every parameter the step moves: the symmetries' as acted, the others as they are.
    std::vector<at::Tensor> values;
    std::vector<at::Tensor> ms, vs;
    for (const auto& t : next.terms) {
      bool found = false;
      for (size_t i = 0; i < params.size() && !found; ++i) {
        if (!t.param.is_same(params[i])) continue;
        values.push_back(current[i]);
        ms.push_back(m[i]);
        vs.push_back(v[i]);
        found = true;
      }
      if (!found) {
        values.push_back(t.param.detach().requires_grad_(true));
        ms.push_back(t.m.defined() ? t.m.detach() : at::zeros_like(t.param));
        vs.push_back(t.v.defined() ? t.v.detach() : at::zeros_like(t.param));
      }
    }
    auto overrides = [&](const std::vector<at::Tensor>& vals) {
      ParameterOverrides o;
      for (size_t i = 0; i < vals.size(); ++i) o.emplace_back(next.terms[i].param, vals[i]);
      return o;
    };
    const double share = batch.share();
    const at::Tensor loss = batch.loss(overrides(values)) * share;
    auto grads = torch::autograd::grad({loss}, values, {}, true, true, true);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) grads[i] = at::zeros_like(values[i]);
    }
    if (batch.group() != nullptr) {
      // The step uses the global batch's gradient: summed over the ranks, in
      // one differentiable all-reduce.
      std::vector<at::Tensor> flat;
      for (const auto& g : grads) flat.push_back(g.reshape({-1}));
      const at::Tensor summed = batch.sum_over_ranks(at::cat(flat));
      int64_t offset = 0;
      for (size_t i = 0; i < grads.size(); ++i) {
        grads[i] = summed.narrow(0, offset, grads[i].numel()).view(values[i].sizes());
        offset += grads[i].numel();
      }
    }
    at::Tensor norm = at::zeros({}, loss.options());
    std::vector<at::Tensor> after;
    for (size_t i = 0; i < values.size(); ++i) {
      const NextStep::Term& t = next.terms[i];
      const at::Tensor& g = grads[i];
      for (const auto& p : params) {
        if (p.is_same(t.param)) norm = norm + g.detach().square().sum();
      }
      const at::Tensor gh = t.weight_decay != 0 ? g + t.weight_decay * values[i] : g;
      at::Tensor delta = t.a * ms[i] + t.b * gh;
      if (t.adaptive) {
        // Clamped away from 0 so that √ keeps a finite derivative (far below eps).
        const double tiny = values[i].scalar_type() == at::kDouble ? 1e-300 : 1e-37;
        delta = delta / (at::sqrt(at::clamp_min((t.c * vs[i] + t.d * gh.square()) / t.e, tiny)) + t.eps);
      }
      delta = t.lr * delta;
      if (t.decoupled_decay != 0) delta = delta + t.lr * t.decoupled_decay * values[i];
      after.push_back(values[i] - delta);
    }
    return spread(batch, batch.loss(overrides(after)) * share, norm, loss);
  };
}

// The perturbations of sharpness(): `samples` draws, each a list over
// `params` of jointly norm-`radius` Gaussian directions (seeded, on the CPU in
// double, then moved: the same on every device and rank).
std::vector<std::vector<at::Tensor>> perturbations(const std::vector<at::Tensor>& params,
                                                   const TeleportOptions& o) {
  at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(o.flatness_seed()));
  std::vector<std::vector<at::Tensor>> out;
  for (int64_t k = 0; k < o.flatness_samples(); ++k) {
    std::vector<at::Tensor> z;
    at::Tensor sq = at::zeros({}, at::kDouble);
    for (const auto& p : params) {
      z.push_back(at::randn(p.sizes(), gen, at::TensorOptions().dtype(at::kDouble)));
      sq = sq + z.back().square().sum();
    }
    const at::Tensor scale = o.flatness_radius() / sq.sqrt();
    for (auto& e : z) e = (e * scale).to(params.front().options());
    out.push_back(std::move(z));
  }
  return out;
}

// kFlatness: sharpness() of the acted weights.
LoweredFn flatness(const std::vector<at::Tensor>& params, const BatchLoss& batch,
                   const TeleportOptions& o) {
  auto eps = std::make_shared<std::vector<std::vector<at::Tensor>>>(perturbations(params, o));
  return [&params, &batch, eps](const std::vector<at::Tensor>& current,
                                const std::vector<at::Tensor>&, const std::vector<GroupElement>&) {
    auto overrides = [&](const std::vector<at::Tensor>& vals) {
      ParameterOverrides ov;
      for (size_t i = 0; i < vals.size(); ++i) ov.emplace_back(params[i], vals[i]);
      return ov;
    };
    const at::Tensor loss = batch.loss(overrides(current)) * batch.share();
    std::vector<at::Tensor> grads;
    for (const auto& g : torch::autograd::grad({loss}, current, {}, true, false, true)) {
      grads.push_back(g.defined() ? g : at::zeros({}, loss.options()));
    }
    if (batch.group() != nullptr) batch.group()->all_reduce_sum(grads);
    at::Tensor norm = at::zeros({}, loss.options());
    for (const auto& g : grads) norm = norm + g.square().sum();
    at::Tensor mean = at::zeros({}, loss.options());
    for (const auto& e : *eps) {
      std::vector<at::Tensor> moved;
      for (size_t i = 0; i < current.size(); ++i) moved.push_back(current[i] + e[i]);
      mean = mean + batch.loss(overrides(moved));
    }
    return spread(batch, mean * (batch.share() / static_cast<double>(eps->size())) - loss, norm,
                  loss);
  };
}

// kBalance (docs/design.md §8): Σ||W||² over the symmetries' parameters,
// lowered by positive per-unit factors. For unit j of one symmetry, with a_j
// its incoming squared norm (row of W_in and bias) and e_j its outgoing one
// (column block of W_out), t_j = (e_j / a_j)^¼ minimises a_j t² + e_j / t²
// with the other symmetries fixed, making the two equal. `steps` sweeps over
// the symmetries: block coordinate descent, so no sweep raises the sum. The
// sweeps run on copies; weights and gradients move once, by the product.
Ascent balance_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  std::vector<at::Tensor> w;
  for (const auto& p : params) w.push_back(p.detach().clone());
  std::vector<at::Tensor> c;
  for (const auto& s : syms) c.push_back(at::ones({s->zero_algebra().size(0)}, params.front().options()));
  Ascent a(syms);
  a.objective_before = norm_sq(w);
  a.norm_before = norm_sq(grads);
  for (int64_t sweep = 0; sweep < o.steps(); ++sweep) {
    for (size_t k = 0; k < syms.size(); ++k) {
      const int64_t n = c[k].size(0);
      const auto& idx = where[k];  // {W_in, b_in?, W_out}
      at::Tensor in = w[idx[0]].square().reshape({n, -1}).sum(1);
      if (idx.size() == 3) in = in + w[idx[1]].square();
      const at::Tensor& w_out = w[idx.back()];
      const at::Tensor out = w_out.square().reshape({w_out.size(0), n, -1}).sum(at::IntArrayRef{0, 2});
      // Dead units (no incoming or no outgoing weight) keep their factor.
      const at::Tensor t = at::where(in.gt(0).logical_and(out.gt(0)), (out / in).pow(0.25),
                                     at::ones_like(in));
      for (size_t j = 0; j + 1 < idx.size(); ++j) {
        std::vector<int64_t> shape(static_cast<size_t>(w[idx[j]].dim()), 1);
        shape[0] = n;
        w[idx[j]] = w[idx[j]] * t.view(shape);
      }
      w[idx.back()] = (w_out.reshape({w_out.size(0), n, -1}) / t.view({1, n, 1})).reshape(w_out.sizes());
      c[k] = c[k] * t;
    }
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    a.total[k] = GroupElement{c[k], c[k].reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  a.objective_after = norm_sq(w);
  a.norm_after = norm_sq(grads);
  a.steps = at::full({}, o.steps(), params.front().options().dtype(at::kLong));
  a.shortened = at::zeros({}, params.front().options().dtype(at::kLong));
  return a;
}

// kPreconditioned (docs/design.md §8): F = Σ G² f² / (D f + eps) over the
// symmetries' parameters, where f is the factor a gradient entry gets under
// positive scalings c = exp(u) (1/c on rows, c on column blocks) and D = √v̂
// maps by the same factor. Ascent on u by autograd on this elementwise
// function alone (no forward or backward pass of the network), with the
// never-worse rule and the growth cap on ||∇L||² = Σ G² f².
Ascent preconditioned_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                             const std::vector<at::Tensor>& grads, const Preconditioner& pre,
                             const TeleportOptions& o) {
  const auto where = positions(syms, params);
  std::vector<int> row(params.size(), -1), col(params.size(), -1);
  for (size_t k = 0; k < syms.size(); ++k) {
    for (size_t j = 0; j + 1 < where[k].size(); ++j) row[where[k][j]] = static_cast<int>(k);
    col[where[k].back()] = static_cast<int>(k);
  }
  std::vector<at::Tensor> g2, D;
  for (size_t i = 0; i < params.size(); ++i) {
    g2.push_back(grads[i].detach().square());
    at::Tensor d;
    for (const auto& [p, scale] : pre.scale) {
      if (p.is_same(params[i])) d = scale.detach();
    }
    TORCH_CHECK(d.defined() && d.sizes() == params[i].sizes(),
                "teleport: kPreconditioned needs √v̂ for every parameter the symmetries act on, "
                "of its shape; none or another for a parameter of shape ", params[i].sizes());
    D.push_back(d);
  }
  struct Value {
    at::Tensor F, norm;
    std::vector<at::Tensor> directions;
  };
  auto evaluate_at = [&](const std::vector<at::Tensor>& u_in) {
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> u;
    for (const auto& x : u_in) u.push_back(x.detach().requires_grad_(true));
    at::Tensor F = at::zeros({}, params.front().options()), norm = F;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      at::Tensor log_f = at::zeros({}, p.options());
      if (row[i] >= 0) {
        const at::Tensor& ur = u[static_cast<size_t>(row[i])];
        std::vector<int64_t> shape(static_cast<size_t>(p.dim()), 1);
        shape[0] = ur.size(0);
        log_f = log_f - ur.view(shape);
      }
      if (col[i] >= 0) {
        at::Tensor uc = u[static_cast<size_t>(col[i])];
        const int64_t block = p.size(1) / uc.size(0);
        if (block > 1) uc = uc.repeat_interleave(block);
        std::vector<int64_t> shape(static_cast<size_t>(p.dim()), 1);
        shape[1] = uc.size(0);
        log_f = log_f + uc.view(shape);
      }
      const at::Tensor f = at::exp(log_f);
      const at::Tensor gf2 = g2[i] * f.square();
      F = F + (gf2 / (D[i] * f + pre.eps)).sum();
      norm = norm + gf2.sum();
    }
    Value v{F.detach(), norm.detach(), {}};
    for (auto& d : torch::autograd::grad({F}, u)) v.directions.push_back(d.detach());
    return v;
  };
  std::vector<at::Tensor> u;
  for (const auto& sym : syms) u.push_back(at::zeros({sym->zero_algebra().size(0)}, params.front().options()));
  Value here = evaluate_at(u);
  Ascent a(syms);
  a.objective_before = a.objective_after = here.F;
  a.norm_before = a.norm_after = here.norm;
  const at::Tensor limit = growth_limit(here.norm, o);
  Control control(here.F, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> candidate;
    for (size_t k = 0; k < u.size(); ++k) {
      candidate.push_back(u[k] + capped_step(here.directions[k], o, false) * control.scale());
    }
    const Value next = evaluate_at(candidate);
    const at::Tensor ok = control.active()
                              .logical_and(next.F > a.objective_after)
                              .logical_and(next.norm <= limit);  // NaN fails both
    for (size_t k = 0; k < u.size(); ++k) {
      u[k] = at::where(ok, candidate[k], u[k]);
      here.directions[k] = at::where(ok, next.directions[k], here.directions[k]);
    }
    a.objective_after = at::where(ok, next.F, a.objective_after);
    a.norm_after = at::where(ok, next.norm, a.norm_after);
    control.record(ok);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  for (size_t k = 0; k < syms.size(); ++k) {
    const at::Tensor c = at::exp(u[k]);
    a.total[k] = GroupElement{c, c.reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

}  // namespace

std::vector<at::Tensor> directions(const SymmetryList& symmetries, Method method,
                                   const BatchLoss* batch) {
  TORCH_CHECK(!symmetries.empty(), "directions: expected symmetries, got none");
  method = resolve_method(symmetries, method);
  const auto params = detail::distinct_parameters(symmetries);
  const auto where = positions(symmetries, params);
  if (method == Method::kAutograd) {
    TORCH_CHECK(batch != nullptr,
                "directions: the autograd direction needs a batch and a loss, got none");
    return evaluate(symmetries, params, where, *batch, true).directions();
  }
  std::vector<at::Tensor> grads;
  if (batch != nullptr) {
    at::Tensor loss;
    grads = batch_gradients(*batch, params, loss);
  } else {
    for (const auto& p : params) {
      TORCH_CHECK(p.grad().defined(), "directions: expected gradients in .grad, got none");
      grads.push_back(p.grad());
    }
  }
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < symmetries.size(); ++k) {
    out.push_back(symmetries[k]->direction(pick(grads, where[k])));
  }
  return out;
}

Method resolve_method(const SymmetryList& symmetries, Method method) {
  if (method != Method::kAuto) return method;
  for (const auto& s : symmetries) {
    if (!s->has_closed_form()) return Method::kAutograd;
  }
  return Method::kClosedForm;
}

namespace {
TeleportReport run_teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                            const BatchLoss* batch, const Preconditioner* pre,
                            const NextStep* next);
}  // namespace

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss* batch) {
  return run_teleport(symmetries, options, batch, nullptr, nullptr);
}

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const Preconditioner& preconditioner) {
  return run_teleport(symmetries, options, nullptr, &preconditioner, nullptr);
}

TeleportReport teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                        const BatchLoss& batch, const NextStep& next) {
  return run_teleport(symmetries, options, &batch, nullptr, &next);
}

double sharpness(const SymmetryList& symmetries, const BatchLoss& batch,
                 const TeleportOptions& options) {
  options.validate();
  const auto params = detail::distinct_parameters(symmetries);
  TORCH_CHECK(!params.empty(), "sharpness: expected symmetries, got none");
  at::AutoGradMode enable(true);  // flatness() differentiates the loss for ||∇L||²
  std::vector<at::Tensor> current;
  for (const auto& p : params) current.push_back(p.detach().clone().requires_grad_(true));
  const Lowered l = flatness(params, batch, options)(current, {}, {});
  return (l.value.defined() ? l.value : l.objective).item<double>();
}

namespace {
TeleportReport run_teleport(const SymmetryList& symmetries, const TeleportOptions& options,
                            const BatchLoss* batch, const Preconditioner* pre,
                            const NextStep* next) {
  const auto start = Clock::now();
  options.validate();
  TeleportReport report;
  if (symmetries.empty()) {
    report.reason = "no symmetries to teleport";
    return report;
  }
  for (const auto& s : symmetries) s->check_unchanged();
  const auto params = detail::distinct_parameters(symmetries);
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == params.front().device() &&
                    p.scalar_type() == params.front().scalar_type(),
                "teleport: expected all parameters on one device with one dtype (",
                params.front().device(), ", ", params.front().scalar_type(), "), got ",
                p.device(), ", ", p.scalar_type());
  }
  const bool look_ahead_obj = options.objective() == Objective::kLookAhead;
  const bool lowered = look_ahead_obj || options.objective() == Objective::kFlatness;
  TORCH_CHECK(!lowered || batch != nullptr,
              "teleport: kLookAhead and kFlatness evaluate losses and need a teleport batch (a "
              "BatchLoss; TeleportOptimizer::set_teleport_batch), got none");
  TORCH_CHECK(!look_ahead_obj || next != nullptr,
              "teleport: kLookAhead needs the inner optimizer's next step: use TeleportOptimizer, "
              "or teleport(symmetries, options, batch, next_step)");
  const Method method = resolve_method(symmetries, options.method());
  TORCH_CHECK(method == Method::kClosedForm || batch != nullptr,
              "teleport: the autograd direction needs a batch and a loss (a BatchLoss), "
              "got none");
  for (const auto& s : symmetries) {
    TORCH_CHECK(method == Method::kAutograd || s->has_closed_form(), "teleport: ",
                s->name(), " has no closed-form direction; use Method::kAutograd");
    TORCH_CHECK(s->transports_gradients() || batch != nullptr, "teleport: ", s->name(),
                " is data-dependent and needs a batch and a loss (a BatchLoss), got none");
  }
  TORCH_CHECK(batch == nullptr || batch->group() == nullptr || options.mode() == Mode::kExact,
              "teleport: reference mode runs on one process; a batch spread over ranks needs "
              "Mode::kExact");
  report.exact = options.mode() == Mode::kExact;
  for (const auto& s : symmetries) report.exact = s->exact_for(batch) && report.exact;
  std::vector<at::Tensor> grads;
  if (batch == nullptr) {
    for (const auto& p : params) {
      TORCH_CHECK(p.grad().defined(),
                  "teleport: expected gradients in .grad (call loss.backward() before "
                  "step()), got an undefined gradient for a parameter of shape ",
                  p.sizes());
      grads.push_back(p.grad());
    }
  }

  const bool balance = options.objective() == Objective::kBalance;
  const bool preconditioned = options.objective() == Objective::kPreconditioned;

  TORCH_CHECK(!preconditioned || (pre != nullptr && batch == nullptr),
              "teleport: kPreconditioned needs the inner optimizer's preconditioner and "
              "teleports from .grad: use TeleportOptimizer, or teleport(symmetries, options, "
              "preconditioner)");
  for (const auto& s : symmetries) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    TORCH_CHECK(!(balance || preconditioned) || (layer != nullptr && s->transports_gradients()),
                "teleport: kBalance and kPreconditioned act by positive factors on Linear and Conv "
                "layer symmetries; ", s->name(), " is not one");
    TORCH_CHECK(!look_ahead_obj || (layer != nullptr && s->transports_gradients() && s->diagonal()),
                "teleport: kLookAhead acts by positive scalings on Linear and Conv layers (where "
                "the inner state is carried exactly); ", s->name(), " is not one");
    TORCH_CHECK(!lowered || s->transports_gradients(), "teleport: kFlatness acts on Linear and "
                "Conv layer symmetries; ", s->name(), " is not one");
  }
  const bool fast_scaling = all_layer_scalings(symmetries) && options.mode() == Mode::kExact &&
                            method == Method::kClosedForm && !balance && !preconditioned &&
                            !lowered;
  // Closed-form GL(n) in the span of the gradients where every symmetry is a
  // layer GL(n) and each tensor has at most one symmetry per side.
  std::vector<int> left, right;
  const bool span = method == Method::kClosedForm && !fast_scaling && !balance &&
                    !preconditioned && !lowered && span_applies(symmetries, options) &&
                    span_roles(symmetries, positions(symmetries, params), params.size(), left,
                               right);
  // The scaling path from .grad decides finiteness before it touches anything;
  // every other path keeps a copy to roll back to.
  const bool self_checking = fast_scaling && batch == nullptr;
  std::optional<detail::Snapshot> snapshot;
  if (!self_checking) snapshot.emplace(params);
  at::Tensor loss_before;
  if ((method == Method::kClosedForm || balance) && batch != nullptr && !lowered) {
    grads = batch_gradients(*batch, params, loss_before);
  }
  Ascent a(symmetries);
  try {
    a = look_ahead_obj ? descent(symmetries, params, *batch,
                                 look_ahead(symmetries, params, *batch, *next), options)
        : lowered        ? descent(symmetries, params, *batch, flatness(params, *batch, options),
                                   options)
        : balance          ? balance_ascent(symmetries, params, grads, options)
        : preconditioned ? preconditioned_ascent(symmetries, params, grads, *pre, options)
        : method == Method::kAutograd ? autograd_ascent(symmetries, params, *batch, options)
        : fast_scaling ? scaling_ascent(symmetries, params, grads, options, self_checking)
        : span ? span_ascent(symmetries, params, grads, left, right, options)
               : closed_form_ascent(symmetries, params, grads, options);
    if (batch != nullptr) {
      // .grad was not the ascent's own gradient: map it to the new point too,
      // where gradients map; elsewhere it must be computed afresh.
      for (size_t k = 0; k < symmetries.size(); ++k) {
        if (!symmetries[k]->transports_gradients() || options.mode() == Mode::kReference) {
          report.gradients_stale = true;
          continue;
        }
        std::vector<at::Tensor> g;
        for (const auto& p : symmetries[k]->parameters()) g.push_back(p.grad());
        symmetries[k]->transport_gradients_(a.total[k], g);
      }
    }
  } catch (...) {
    if (snapshot) snapshot->restore();  // nothing half-written survives an error
    throw;
  }
  if (loss_before.defined()) a.loss_before = loss_before;

  // One host synchronisation for all the checks.
  const auto dtype = a.norm_before.dtype();
  std::vector<at::Tensor> checks = {a.norm_before, a.norm_after, a.steps.to(dtype),
                                    a.shortened.to(dtype)};
  // A sum is non-finite when any entry is (or, harmlessly, when it overflows),
  // and costs one read where isfinite() would allocate.
  if (a.finite.defined()) {
    checks.push_back(at::where(a.finite, 0.0, NAN).to(dtype));
  } else {
    std::vector<at::Tensor> sums;
    for (const auto& p : params) sums.push_back(p.detach().sum());
    checks.push_back(at::stack(sums).sum().to(dtype));
  }
  checks.push_back(a.invertible.defined() ? a.invertible.to(dtype) : at::ones({}, a.norm_before.options()));
  // The teleport objective: ||∇L||² (raised) unless the path says otherwise.
  checks.push_back(a.objective_before.defined() ? a.objective_before.to(dtype) : a.norm_before);
  checks.push_back(a.objective_after.defined() ? a.objective_after.to(dtype) : a.norm_after);
  if (batch != nullptr) {
    at::NoGradGuard no_grad;
    checks.push_back(a.loss_before.to(dtype));
    checks.push_back(batch->global_loss().to(dtype));
  }
  const at::Tensor host = at::stack(checks).to(at::kDouble).cpu();
  const double* v = host.data_ptr<double>();
  report.grad_norm_sq_before = v[0];
  report.grad_norm_sq_after = v[1];
  report.steps = static_cast<int64_t>(v[2]);
  report.shortened = static_cast<int64_t>(v[3]);
  const bool all_finite = std::isfinite(v[4]);
  const bool invertible = v[5] != 0;
  report.objective_before = v[6];
  report.objective_after = v[7];
  if (batch != nullptr) {
    report.loss_before = v[8];
    report.loss_after = v[9];
  }
  const bool guarded = options.mode() == Mode::kExact;
  std::string rollback;
  if (!std::isfinite(report.grad_norm_sq_before)) {
    rollback = "non-finite weights or gradients before the teleport: skipped";
  } else if (!invertible) {
    rollback = "the product of the ascent steps could not be inverted";
  } else if (!all_finite || !std::isfinite(report.grad_norm_sq_after)) {
    rollback = "non-finite weights or gradients";
  } else if (balance && !(report.objective_after < report.objective_before)) {
    rollback = "no sweep lowered the sum of squared weights (the units are balanced already)";
  } else if (lowered && !(report.objective_after < report.objective_before)) {
    rollback = std::string("no step lowered the ") +
               (look_ahead_obj ? "loss after the next step" : "sharpness") + " (" +
               std::to_string(report.shortened) + " refused and halved)";
  } else if (preconditioned && !(report.objective_after > report.objective_before)) {
    rollback = "no ascent step raised the preconditioned objective (" +
               std::to_string(report.shortened) + " refused and halved)";
  } else if (guarded && !balance && !preconditioned && !lowered &&
             !(report.grad_norm_sq_after > report.grad_norm_sq_before)) {
    rollback = "no ascent step raised ||grad L||^2 (" + std::to_string(report.shortened) +
               " refused and halved)";
  } else if (batch != nullptr) {
    const double change = std::abs(report.loss_after - report.loss_before);
    if (!std::isfinite(report.loss_after)) {
      rollback = "non-finite loss";
    } else if (guarded && change > options.tolerance() * std::abs(report.loss_before)) {
      rollback = "the loss changed by " + std::to_string(change) + " (relative " +
                 std::to_string(change / std::abs(report.loss_before)) +
                 "), above the tolerance " + std::to_string(options.tolerance());
    }
  }
  if (!rollback.empty()) {
    if (snapshot) snapshot->restore();  // else nothing was changed
    report.gradients_stale = false;
    report.rolled_back = true;
    report.reason = rollback;
  } else {
    if (report.steps < options.steps() && !balance) {
      report.reason = "stopped after " + std::to_string(report.steps) + " of " +
                      std::to_string(options.steps()) + " steps: " +
                      std::to_string(report.shortened) +
                      " refused (lower, non-finite or beyond the growth cap) and halved";
    }
    report.elements = std::move(a.total);
  }
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}
}  // namespace

}  // namespace teleport
