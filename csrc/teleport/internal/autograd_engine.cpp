// The autograd engine: ascent on ||∇L||² by double backward on the batch,
// for any action (the data-dependent GL(n) included).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace teleport::detail {

// Autograd: F(T) = ||∇L((I+T)·w)||² on the batch, ∂F/∂T at T = 0
// by double backward. One forward, backward and double backward per attempt.
// A refused attempt is undone by restoring the weights as they were before it
// (decided on the device), which works for any action, and the next attempt
// goes half as far along the same direction. The bookkeeping runs on values
// V: 0-dim tensors on the device, or on the CPU doubles read as they come.
template <class V>
Ascent autograd_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const BatchLoss& batch, const TeleportOptions& o) {
  using Flag = typename Values<V>::Flag;
  const auto where = positions(syms, params);
  Ascent a(syms);
  Evaluation here = evaluate(syms, params, where, batch, o.mode());
  a.norm_before = here.F;
  a.loss_before = here.loss;
  at::Tensor loss_after = here.loss;
  V norm_after = read_as<V>(here.F);
  const V limit = growth_limit(norm_after, o);
  BasicControl<V> control(norm_after, limit, o);
  control.read_every_attempt();  // an attempt is a forward, backward and double backward
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
    const std::vector<at::Tensor> unit = unit_steps(syms, directions, o);
    const V& scale = control.scale(norm_after, read_as<V>(rise(directions, unit)));
    // Known on the host: whether the product of steps so far is the identity.
    bool from_identity = false;
    if constexpr (std::is_same_v<V, double>) from_identity = control.taken() == 0;
    const std::vector<GroupElement> elements =
        apply_steps(syms, unit, scale, pre_step, a.total, o, from_identity);
    Evaluation next = evaluate(syms, params, where, batch, o.mode());
    const V next_F = read_as<V>(next.F);
    const Flag ok = and_(and_(control.active(), accepts(next_F, norm_after, limit, o)),
                         read_as<Flag>(all_invertible(elements, next.F)));
    control.record(ok, next_F);
    const bool last = control.done(attempt);
    // The new point's directions serve the next attempt only: none after the
    // last, and on CPU, where reading `ok` costs nothing, none after a refusal.
    // (Taken before keep_or_undo writes the weights the graph holds.)
    std::vector<at::Tensor> next_directions = directions;
    if (!last && (!on_cpu || Values<V>::read(ok))) next_directions = next.directions();
    keep_or_undo(ok, params, before, a.total, total_before, directions, next_directions);
    norm_after = where_(ok, next_F, norm_after);
    loss_after = where_(ok, next.loss, loss_after);
    if (last) break;
  }
  a.norm_after = as_tensor(norm_after, here.F);
  if (o.mode() == Mode::kExact) a.loss_after = loss_after;  // at the weights left
  a.steps = as_tensor(control.taken(), here.F);
  a.shortened = as_tensor(control.refused(), here.F);
  return a;
}

template Ascent autograd_ascent<double>(const SymmetryList&, const std::vector<at::Tensor>&,
                                        const BatchLoss&, const TeleportOptions&);
template Ascent autograd_ascent<at::Tensor>(const SymmetryList&, const std::vector<at::Tensor>&,
                                            const BatchLoss&, const TeleportOptions&);

}  // namespace teleport::detail
