#include <teleport/ascent.h>
#include <teleport/internal/parameters.h>
#include <teleport/internal/tolerance.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace teleport {

SymmetryCheck check_symmetry(const Symmetry& symmetry, const std::function<at::Tensor()>& loss,
                             double size, uint64_t seed) {
  TORCH_CHECK(loss != nullptr, "check_symmetry: expected a loss, got none");
  TORCH_CHECK(std::isfinite(size) && size > 0, "check_symmetry: expected a finite size > 0, got ",
              size);
  TORCH_CHECK(!symmetry.reads_batch(), "check_symmetry: ", symmetry.name(),
              " acts through a batch (data-dependent); its teleports check the loss on it");
  const auto params = symmetry.parameters();
  TORCH_CHECK(!params.empty(), "check_symmetry: ", symmetry.name(), " acts on no tensor");
  const at::Tensor zero = symmetry.zero_algebra();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor t = at::randn(zero.sizes(), gen, at::TensorOptions().dtype(at::kDouble));
  t = (t * (size / t.norm().item<double>())).to(zero.options());
  const GroupElement e = symmetry.element(t, Parametrization::kExp);

  const double before = loss().detach().to(at::kDouble).item<double>();
  const detail::Snapshot snapshot(params);
  double after = std::numeric_limits<double>::quiet_NaN();
  try {
    symmetry.apply_(e);
    after = loss().detach().to(at::kDouble).item<double>();
  } catch (...) {
    snapshot.restore();
    throw;
  }
  snapshot.restore();
  SymmetryCheck c;
  c.bound = params.front().scalar_type() == at::kDouble ? 1e-9 : 1e-5;
  c.drift =
      std::abs(after - before) / std::max(std::abs(before), std::numeric_limits<double>::min());
  // Relative, but never below the rounding of a loss of order-one terms, as
  // the teleports' own loss check.
  c.holds = std::isfinite(after) &&
            std::abs(after - before) <=
                detail::allowed_loss_change(before, c.bound, params.front().scalar_type());
  if (!std::isfinite(after)) c.drift = std::numeric_limits<double>::infinity();
  return c;
}

}  // namespace teleport
