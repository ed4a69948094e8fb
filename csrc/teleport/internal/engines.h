#pragma once
// Not installed: the ascent engines behind teleport() (ascent.cpp chooses
// one; docs/design.md §6 gives the rules they share) and what they share
// beyond internal/ascent_parts.h. Closed-form GL and span GL are declared
// there.

#include <teleport/ascent.h>
#include <teleport/batch_loss.h>
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/parameters.h>

#include <ATen/Tensor.h>

#include <functional>
#include <vector>

namespace teleport::detail {

// The gradients of the batch's loss at the current weights, without
// touching `.grad`; the loss itself comes back through `loss`.
std::vector<at::Tensor> batch_gradients(const BatchLoss& batch,
                                        const std::vector<at::Tensor>& params, at::Tensor& loss);

// One attempt on the weights themselves: each symmetry's unit step times
// `scale`, applied (a data-dependent action reads `batch`) and composed into
// `total` (which, when `from_identity`, is the identity: the product is the
// attempt's element). Returns the attempt's elements. In exact mode the last
// symmetry acts first: a data-dependent action then finds its layer's inputs
// and outputs as the batch's last evaluation left them, the layers before it
// not yet changed (the actions compose either way: docs/design.md §3); the
// reference arithmetic acts in the published code's order.
template <class V>
std::vector<GroupElement> apply_steps(const SymmetryList& syms, const std::vector<at::Tensor>& unit,
                                      const V& scale, const BatchLoss& batch,
                                      std::vector<GroupElement>& total, const TeleportOptions& o,
                                      bool from_identity = false) {
  std::vector<GroupElement> elements(syms.size());
  const bool backwards = o.mode() == Mode::kExact;
  for (size_t j = 0; j < syms.size(); ++j) {
    const size_t k = backwards ? syms.size() - 1 - j : j;
    elements[k] = step_element(*syms[k], unit[k] * scale, o);
    syms[k]->apply_(elements[k], &batch, o.mode());
    total[k] = from_identity ? elements[k] : elements[k].compose(total[k]);
  }
  return elements;
}

// After an attempt on the weights themselves: where `ok` is false, the weights
// and the product of steps go back to `before` (decided on the device, no
// host synchronisation); where true, the new point's directions are taken.
void keep_or_undo(const at::Tensor& ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before,
                  std::vector<at::Tensor>& directions,
                  const std::vector<at::Tensor>& next_directions);
// The same decided on the host (on the CPU): a kept attempt copies nothing, a
// refused one copies the weights back.
void keep_or_undo(bool ok, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& before, std::vector<GroupElement>& total,
                  const std::vector<GroupElement>& total_before,
                  std::vector<at::Tensor>& directions,
                  const std::vector<at::Tensor>& next_directions);

struct Evaluation {
  at::Tensor loss, F;  // detached
  // ∂F/∂T_k at T = 0, computed on demand from the kept graph: at most once, and
  // before the weights evaluated change in place.
  std::function<std::vector<at::Tensor>()> directions;
};

// F(T) = ||∇L((I+T)·w)||² on the batch at T = 0 and ∂F/∂T (on demand) by
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
                    Mode mode = Mode::kExact);

// The closed-form scaling engine; `decide_before_apply` (a teleport from
// .grad with the library's own actions) decides finiteness before touching
// anything, so the caller needs no copy to roll back to.
bool all_layer_scalings(const SymmetryList& syms);
Ascent scaling_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o,
                      bool decide_before_apply);

// The autograd engine, its bookkeeping on V = double (host) or at::Tensor.
template <class V>
Ascent autograd_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const BatchLoss& batch, const TeleportOptions& o);

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
using LoweredFn =
    std::function<Lowered(const std::vector<at::Tensor>& current, const std::vector<at::Tensor>& Ts,
                          const std::vector<GroupElement>& total)>;

// The lowered engine: descent on `fn` (look_ahead() or flatness()).
Ascent descent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
               const BatchLoss& batch, const LoweredFn& fn, const TeleportOptions& o);
LoweredFn look_ahead(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                     const BatchLoss& batch, const NextStep& next);
LoweredFn flatness(const std::vector<at::Tensor>& params, const BatchLoss& batch,
                   const TeleportOptions& o);

Ascent balance_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o);
Ascent preconditioned_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                             const std::vector<at::Tensor>& grads, const Preconditioner& pre,
                             const TeleportOptions& o);

// kRandom: `sizing` is the kGradNorm ascent just run; `snapshot` puts the
// point (weights and .grad) back from before it. Each symmetry then takes a
// random element as far from the identity as the ascent's, and the figures
// are measured there: `grads` (.grad, without a batch) are mapped, or the
// batch's gradients and loss evaluated.
Ascent random_teleport(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const std::vector<at::Tensor>& grads, const BatchLoss* batch,
                       const Ascent& sizing, const Snapshot& snapshot, const TeleportOptions& o);

}  // namespace teleport::detail
