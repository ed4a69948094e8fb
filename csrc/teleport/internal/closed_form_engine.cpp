// The closed-form engine for any closed-form symmetries: the direction from
// the gradients, the gradients carried along step by step, the weights moved
// once at the end.
#include <teleport/internal/ascent_parts.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace teleport::detail {

// Closed form: the direction from gradients, the gradients carried along,
// the weights moved once at the end.
Ascent closed_form_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                          std::vector<at::Tensor> grads, const TeleportOptions& o) {
  const auto where = positions(syms, params);
  Ascent a(syms);
  a.norm_before = norm_sq(grads);
  a.norm_after = a.norm_before;
  const at::Tensor limit = growth_limit(a.norm_before, o);
  Control control(a.norm_before, limit, o);
  // One inverse of the product instead of a product of inverses (the
  // reference arithmetic's "inverses" are I - T and must be multiplied).
  const bool invert_at_end = o.mode() == Mode::kExact;

  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<at::Tensor> dirs;
    for (size_t k = 0; k < syms.size(); ++k)
      dirs.push_back(syms[k]->direction(pick(grads, where[k])));
    const std::vector<at::Tensor> unit = unit_steps(syms, dirs, o);
    const at::Tensor& scale = control.scale(a.norm_after, rise(dirs, unit));
    std::vector<GroupElement> elements;
    for (size_t k = 0; k < syms.size(); ++k)
      elements.push_back(step_element(*syms[k], unit[k] * scale, o));
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
        a.total[k].g = at::matmul(e.g, a.total[k].g);
      } else {
        a.total[k] = e.compose(a.total[k]);
      }
    }
    a.norm_after = at::where(ok, norm, a.norm_after);
    control.record(ok, norm);
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
      const at::Tensor invertible = info.eq(0).all();
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

}  // namespace teleport::detail
