// teleport() and its companions: validate the request, choose the engine
// (internal/engines.h), run it, and give the verdict (docs/design.md §6).
#include <teleport/ascent.h>
#include <teleport/internal/parameters.h>

#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <typeinfo>
#include <vector>

namespace teleport {
namespace {

// kAuto: closed form when every symmetry has one.
Method resolve_method(const SymmetryList& symmetries, Method method) {
  if (method != Method::kAuto) return method;
  for (const auto& s : symmetries) {
    if (!s->has_closed_form()) return Method::kAutograd;
  }
  return Method::kClosedForm;
}

using namespace detail;
using Clock = std::chrono::steady_clock;

// The engines (internal/engines.h), one per objective and path.
enum class Engine {
  kLookAhead,       // descent on the loss after the next step (kLookAhead)
  kFlatness,        // descent on sharpness() (kFlatness)
  kBalance,         // Σ||W||² lowered in closed form (kBalance)
  kPreconditioned,  // Σ g²/(√v̂ + eps) by autograd on that function (kPreconditioned)
  kAutograd,        // ||∇L||² by double backward on the batch (Method::kAutograd)
  kScaling,         // ||∇L||² in closed form, every symmetry a layer scaling
  kSpanGL,          // ||∇L||² in closed form, layer GL(n) in the gradients' span
  kClosedForm,      // ||∇L||² in closed form, any closed-form symmetry
  kIdentity,        // no element: the state policy alone (kStateOnly)
};
// kRandom runs the kGradNorm engine to size its element (random_teleport).

// A checked request, and what the chosen engine needs.
struct Problem {
  Problem(const SymmetryList& syms, const TeleportOptions& o, const BatchLoss* batch,
          const Preconditioner* pre, const NextStep* next)
      : syms(syms), o(o), batch(batch), pre(pre), next(next) {}

  const SymmetryList& syms;
  const TeleportOptions& o;
  const BatchLoss* batch;
  const Preconditioner* pre;
  const NextStep* next;
  std::vector<at::Tensor> params;  // distinct, in first-seen order
  std::vector<at::Tensor> grads;   // from .grad (no batch), or the batch's (closed form)
  Method method = Method::kClosedForm;
  Engine engine = Engine::kClosedForm;
  std::vector<int> left, right;      // the layer symmetry on each tensor's rows, columns
  bool decide_before_apply = false;  // kScaling from .grad: no copy needed to roll back
};

// Every check a teleport makes before it touches anything; fills `params`,
// `method` and, without a batch, `grads` from .grad.
void validate(Problem& p, TeleportReport& report) {
  const SymmetryList& symmetries = p.syms;
  const TeleportOptions& options = p.o;
  const BatchLoss* batch = p.batch;
  for (const auto& s : symmetries) s->check_unchanged();
  Roles roles = roles_of(symmetries, "teleport");
  p.params = std::move(roles.params);
  p.left = std::move(roles.rows);
  p.right = std::move(roles.columns);
  for (const auto& q : p.params) {
    TORCH_CHECK(q.device() == p.params.front().device() &&
                    q.scalar_type() == p.params.front().scalar_type(),
                "teleport: expected all parameters on one device with one dtype (",
                p.params.front().device(), ", ", p.params.front().scalar_type(), "), got ",
                q.device(), ", ", q.scalar_type());
  }
  const Objective objective = options.objective();
  const bool look_ahead_obj = objective == Objective::kLookAhead;
  const bool lowered = look_ahead_obj || objective == Objective::kFlatness;
  TORCH_CHECK(!lowered || batch != nullptr,
              "teleport: kLookAhead and kFlatness evaluate losses and need a teleport batch (a "
              "BatchLoss; TeleportOptimizer::set_teleport_batch), got none");
  TORCH_CHECK(!look_ahead_obj || p.next != nullptr,
              "teleport: kLookAhead needs the inner optimizer's next step: use TeleportOptimizer, "
              "or teleport(symmetries, options, batch, next_step)");
  p.method = resolve_method(symmetries, options.method());
  TORCH_CHECK(p.method == Method::kClosedForm || batch != nullptr,
              "teleport: the autograd direction needs a batch and a loss (a BatchLoss), "
              "got none");
  for (const auto& s : symmetries) {
    TORCH_CHECK(p.method == Method::kAutograd || s->has_closed_form(), "teleport: ", s->name(),
                " has no closed-form direction; use Method::kAutograd");
    TORCH_CHECK(s->transports_gradients() || batch != nullptr, "teleport: ", s->name(),
                " is data-dependent and needs a batch and a loss (a BatchLoss), got none");
  }
  TORCH_CHECK(batch == nullptr || batch->group() == nullptr || options.mode() == Mode::kExact,
              "teleport: reference mode runs on one process; a batch spread over ranks needs "
              "Mode::kExact");
  report.exact = options.mode() == Mode::kExact;
  for (const auto& s : symmetries) report.exact = s->exact_for(batch) && report.exact;
  if (batch == nullptr) {
    for (const auto& q : p.params) {
      TORCH_CHECK(q.requires_grad(),
                  "teleport: expected trainable parameters, got a frozen one "
                  "(requires_grad false) of shape ",
                  q.sizes(), ": a frozen tensor is never moved; leave its symmetries out");
      TORCH_CHECK(q.grad().defined(),
                  "teleport: expected gradients in .grad (call loss.backward() before "
                  "step()), got an undefined gradient for a parameter of shape ",
                  q.sizes());
      p.grads.push_back(q.grad());
    }
  }
  const bool balance = objective == Objective::kBalance;
  const bool preconditioned = objective == Objective::kPreconditioned;
  TORCH_CHECK(!preconditioned || (p.pre != nullptr && batch == nullptr),
              "teleport: kPreconditioned needs the inner optimizer's preconditioner and "
              "teleports from .grad: use TeleportOptimizer, or teleport(symmetries, options, "
              "preconditioner)");
  for (const auto& s : symmetries) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    TORCH_CHECK(!(balance || preconditioned) || (layer != nullptr && s->transports_gradients()),
                "teleport: kBalance and kPreconditioned act on Linear and Conv layer symmetries "
                "(by positive factors; kBalance by the balanced factorization on GL(n)); ",
                s->name(), " is not one");
    TORCH_CHECK(!look_ahead_obj || (layer != nullptr && s->transports_gradients() && s->diagonal()),
                "teleport: kLookAhead acts by positive scalings on Linear and Conv layers (where "
                "the inner state is carried exactly); ",
                s->name(), " is not one");
    TORCH_CHECK(!lowered || s->transports_gradients(),
                "teleport: kFlatness acts on Linear and "
                "Conv layer symmetries; ",
                s->name(), " is not one");
  }
}

// The engine for a validated problem: the objective's own, else by method and
// by what the symmetries are.
Engine choose(Problem& p) {
  switch (p.o.objective()) {
    case Objective::kLookAhead:
      return Engine::kLookAhead;
    case Objective::kFlatness:
      return Engine::kFlatness;
    case Objective::kBalance:
      return Engine::kBalance;
    case Objective::kPreconditioned:
      return Engine::kPreconditioned;
    case Objective::kStateOnly:
      return Engine::kIdentity;
    case Objective::kGradNorm:
    case Objective::kRandom:
      break;
  }
  if (p.method == Method::kAutograd) return Engine::kAutograd;
  if (all_layer_scalings(p.syms) && p.o.mode() == Mode::kExact) {
    // Only the library's own actions, which cannot throw half-way through,
    // go without a copy: a subclass's apply_() may (and is undone by the copy).
    bool library_actions = true;
    for (const auto& s : p.syms)
      library_actions = library_actions && typeid(*s) == typeid(LayerSymmetry);
    // kRandom puts the point back after sizing its element: it needs the copy.
    p.decide_before_apply =
        p.batch == nullptr && library_actions && p.o.objective() != Objective::kRandom;
    return Engine::kScaling;
  }
  if (span_applies(p.syms, p.o)) return Engine::kSpanGL;
  return Engine::kClosedForm;
}

Ascent run_engine(const Problem& p) {
  switch (p.engine) {
    case Engine::kLookAhead:
      return descent(p.syms, p.params, *p.batch, look_ahead(p.syms, p.params, *p.batch, *p.next),
                     p.o);
    case Engine::kFlatness:
      return descent(p.syms, p.params, *p.batch, flatness(p.params, *p.batch, p.o), p.o);
    case Engine::kBalance:
      return balance_ascent(p.syms, p.params, p.grads, p.o);
    case Engine::kPreconditioned:
      return preconditioned_ascent(p.syms, p.params, p.grads, *p.pre, p.o);
    case Engine::kAutograd:
      return host_bookkeeping(p.params)
                 ? autograd_ascent<double>(p.syms, p.params, *p.batch, p.o)
                 : autograd_ascent<at::Tensor>(p.syms, p.params, *p.batch, p.o);
    case Engine::kScaling:
      return scaling_ascent(p.syms, p.params, p.grads, p.o, p.decide_before_apply);
    case Engine::kSpanGL:
      return span_ascent(p.syms, p.params, p.grads, p.left, p.right, p.o);
    case Engine::kClosedForm:
      return closed_form_ascent(p.syms, p.params, p.grads, p.o);
    case Engine::kIdentity: {
      Ascent a(p.syms);
      a.norm_before = a.norm_after = norm_sq(p.grads);
      a.steps = at::zeros({}, p.params.front().options().dtype(at::kLong));
      a.shortened = a.steps.clone();
      return a;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "teleport: unknown engine");
}

// Whether the engine reads the batch's gradient from `grads` (the closed-form
// ones); the others evaluate the batch themselves or teleport from .grad.
bool reads_batch_gradients(Engine e) {
  return e == Engine::kBalance || e == Engine::kScaling || e == Engine::kSpanGL ||
         e == Engine::kClosedForm || e == Engine::kIdentity;
}

// Runs the engine and, after a teleport on a batch, maps .grad to the new
// point too (where gradients map; elsewhere it is stale). Anything thrown
// puts the point back first.
Ascent ascend(Problem& p, TeleportReport& report, const std::optional<Snapshot>& snapshot) {
  try {
    at::Tensor loss_before;
    if (p.batch != nullptr && reads_batch_gradients(p.engine)) {
      p.grads = batch_gradients(*p.batch, p.params, loss_before);
    }
    Ascent a = run_engine(p);
    if (loss_before.defined()) a.loss_before = loss_before;
    if (p.o.objective() == Objective::kRandom) {
      a = random_teleport(p.syms, p.params, p.grads, p.batch, a, *snapshot, p.o);
    }
    if (p.batch == nullptr || p.engine == Engine::kIdentity) return a;  // .grad holds
    for (size_t k = 0; k < p.syms.size(); ++k) {
      if (!p.syms[k]->transports_gradients() || p.o.mode() == Mode::kReference) {
        report.gradients_stale = true;
        continue;
      }
      std::vector<at::Tensor> g;
      for (const auto& q : p.syms[k]->parameters()) g.push_back(q.grad());
      p.syms[k]->transport_gradients_(a.total[k], g);
    }
    return a;
  } catch (...) {
    if (snapshot) snapshot->restore();  // nothing half-written survives an error
    throw;
  }
}

// What the verdict reads: every figure of the ascent in one host read.
struct Figures {
  bool finite = true, invertible = true;
};
Figures read_figures(const Problem& p, const Ascent& a, TeleportReport& report) {
  const auto dtype = a.norm_before.dtype();
  std::vector<at::Tensor> checks = {a.norm_before, a.norm_after, a.steps.to(dtype),
                                    a.shortened.to(dtype)};
  // A sum is non-finite when any entry is (or, harmlessly, when it overflows),
  // and costs one read where isfinite() would allocate.
  if (a.finite.defined()) {
    checks.push_back(at::where(a.finite, 0.0, NAN).to(dtype));
  } else {
    std::vector<at::Tensor> sums;
    for (const auto& q : p.params) sums.push_back(q.detach().sum());
    checks.push_back(at::stack(sums).sum().to(dtype));
  }
  checks.push_back(a.invertible.defined() ? a.invertible.to(dtype)
                                          : at::ones({}, a.norm_before.options()));
  // The teleport objective: ||∇L||² (raised) unless the engine says otherwise.
  checks.push_back(a.objective_before.defined() ? a.objective_before.to(dtype) : a.norm_before);
  checks.push_back(a.objective_after.defined() ? a.objective_after.to(dtype) : a.norm_after);
  if (p.batch != nullptr) {
    at::NoGradGuard no_grad;
    checks.push_back(a.loss_before.to(dtype));
    checks.push_back((a.loss_after.defined() ? a.loss_after : p.batch->global_loss()).to(dtype));
  }
  const at::Tensor host = at::stack(checks).to(at::kDouble).cpu();
  const double* v = host.data_ptr<double>();
  report.grad_norm_sq_before = v[0];
  report.grad_norm_sq_after = v[1];
  report.steps = static_cast<int64_t>(v[2]);
  report.shortened = static_cast<int64_t>(v[3]);
  report.objective_before = v[6];
  report.objective_after = v[7];
  if (p.batch != nullptr) {
    report.loss_before = v[8];
    report.loss_after = v[9];
  }
  return {std::isfinite(v[4]), v[5] != 0};
}

// Why the teleport must be rolled back (docs/design.md §6), or "".
std::string rollback_reason(const Problem& p, const Figures& f, const TeleportReport& r,
                            c10::ScalarType dtype) {
  const Engine e = p.engine;
  const bool lowered = e == Engine::kLookAhead || e == Engine::kFlatness;
  const std::string refused = std::to_string(r.shortened) + " refused";
  if (!std::isfinite(r.grad_norm_sq_before)) {
    return "non-finite weights or gradients before the teleport: skipped";
  }
  if (!f.invertible) return "the product of the ascent steps could not be inverted";
  if (!f.finite || !std::isfinite(r.grad_norm_sq_after)) return "non-finite weights or gradients";
  if (e == Engine::kBalance && !(r.objective_after < r.objective_before)) {
    return "no sweep lowered the sum of squared weights within the growth cap (the units "
           "are balanced already, one side of each pair is zero, or balancing them raises "
           "||grad L||^2 beyond max_growth)";
  }
  if (lowered && !(r.objective_after < r.objective_before)) {
    return std::string("no step lowered the ") +
           (e == Engine::kLookAhead ? "loss after the next step" : "sharpness") + " (" + refused +
           " and halved)";
  }
  if (e == Engine::kPreconditioned && !(r.objective_after > r.objective_before)) {
    return "no ascent step raised the preconditioned objective (" + refused + " and halved)";
  }
  const bool random = p.o.objective() == Objective::kRandom;
  if (random && r.steps == 0) {
    return "the kGradNorm ascent that sizes the random element took no step (" + refused +
           " and shortened): nothing to draw";
  }
  const bool guarded = p.o.mode() == Mode::kExact;
  const bool grad_norm = !lowered && !random && e != Engine::kBalance &&
                         e != Engine::kPreconditioned && e != Engine::kIdentity;
  if (guarded && grad_norm && !(r.grad_norm_sq_after > r.grad_norm_sq_before)) {
    return "no ascent step raised ||grad L||^2 (" + refused + " and shortened)";
  }
  if (p.batch == nullptr) return "";
  const double change = std::abs(r.loss_after - r.loss_before);
  if (!std::isfinite(r.loss_after)) return "non-finite loss";
  if (guarded && change > allowed_loss_change(r.loss_before, p.o.tolerance(), dtype)) {
    return "the loss went from " + c10::str(r.loss_before) + " to " + c10::str(r.loss_after) +
           ": a change of " + c10::str(change) + " (relative " +
           c10::str(change / std::abs(r.loss_before)) + "), above the tolerance " +
           c10::str(p.o.tolerance());
  }
  return "";
}

// Why a kept ascent stopped before its steps, or "".
std::string stop_reason(const Problem& p, const TeleportReport& r) {
  const Engine e = p.engine;
  if (r.steps >= p.o.steps() || e == Engine::kBalance || e == Engine::kIdentity ||
      p.o.objective() == Objective::kRandom) {
    return "";
  }
  const bool capped = p.o.mode() == Mode::kExact && e != Engine::kPreconditioned &&
                      e != Engine::kLookAhead && e != Engine::kFlatness;
  const double before = r.grad_norm_sq_before;
  const bool used = capped && r.grad_norm_sq_after >=
                                  budget_point(before, before * p.o.max_growth(), kStopFraction);
  const std::string refused = std::to_string(r.shortened) + " refused";
  return "stopped after " + std::to_string(r.steps) + " of " + std::to_string(p.o.steps()) +
         " steps: " +
         (used ? "7/8 of the growth cap's budget used (" + refused + ")"
               : refused + " (lower, non-finite or beyond the growth cap) and " +
                     (capped ? "shortened" : "halved"));
}

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
  Problem p(symmetries, options, batch, pre, next);
  validate(p, report);
  p.engine = choose(p);
  // The scaling engine from .grad decides finiteness before it touches
  // anything; every other keeps a copy to roll back to.
  std::optional<Snapshot> snapshot;
  if (!p.decide_before_apply) snapshot.emplace(p.params);
  Ascent a = ascend(p, report, snapshot);
  const Figures figures = read_figures(p, a, report);
  report.reason = rollback_reason(p, figures, report, a.norm_before.scalar_type());
  if (!report.reason.empty()) {
    if (snapshot) snapshot->restore();  // else nothing was changed
    report.gradients_stale = false;
    report.rolled_back = true;
  } else {
    report.reason = stop_reason(p, report);
    report.elements = std::move(a.total);
  }
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
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
    return evaluate(symmetries, params, where, *batch).directions();
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

}  // namespace teleport
