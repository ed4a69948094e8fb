// The random engine (kRandom): a control arm, a random element of the size
// an ascent takes (docs/design.md §8).
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <vector>

namespace teleport::detail {

// For symmetry k with the ascent's element M_k: T_k = r_k ||M_k - I|| / ||r_k||
// with r_k standard normal in the algebra's shape, and g_k = exp(T_k) (a
// diagonal one elementwise). To first order exp(T) - I = T, so g_k is as far
// from the identity as M_k; exp keeps it invertible and positive where the
// group is. The sizes stay on the device: no host read.
Ascent random_teleport(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                       const std::vector<at::Tensor>& grads, const BatchLoss* batch,
                       const Ascent& sizing, const Snapshot& snapshot, const TeleportOptions& o) {
  snapshot.restore();
  at::Generator gen =
      o.generator().defined() ? o.generator() : at::detail::getDefaultCPUGenerator();
  Ascent a;
  a.norm_before = sizing.norm_before;
  a.loss_before = sizing.loss_before;
  a.steps = sizing.steps;          // the size came from these ascent steps (none: nothing to draw)
  a.shortened = sizing.shortened;  // the sizing ascent's refused steps
  for (size_t k = 0; k < syms.size(); ++k) {
    const GroupElement& m = sizing.total[k];
    const at::Tensor size = (m.g - GroupElement::identity_like(m).g).norm();
    const at::Tensor zero = syms[k]->zero_algebra();
    const at::Tensor r =
        at::randn(zero.sizes(), gen, zero.options().device(at::kCPU)).to(zero.device());
    const at::Tensor T = r * (size / r.norm().clamp_min(1e-30));
    a.total.push_back(syms[k]->element(T, Parametrization::kExp));
  }
  // The last symmetry acts first, as in apply_steps: a data-dependent action
  // then reads its layer's inputs with the layers before it unchanged.
  const auto where = positions(syms, params);
  for (size_t j = 0; j < syms.size(); ++j) {
    const size_t k = syms.size() - 1 - j;
    syms[k]->apply_(a.total[k], batch, o.mode());
    if (batch == nullptr) syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  if (batch == nullptr) {
    a.norm_after = norm_sq(grads);
  } else {
    at::Tensor loss;
    a.norm_after = norm_sq(batch_gradients(*batch, params, loss));
    a.loss_after = loss;
  }
  return a;
}

}  // namespace teleport::detail
