#pragma once

#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <functional>
#include <string>
#include <utility>

namespace teleport {

/// (x, y) -> (u, v) or back, on 0-dim tensors, differentiably.
using PlaneMap =
    std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>;

/// SO(2) acting on a 2-D parameter w = (x, y) through a change of variables
/// (x, y) -> (u, v) in which the loss is u² + v²: rotate (u, v), map back. The
/// algebra element is the angle θ (a 1-element tensor); the ascent moves it
/// by η ∂||∇L||²/∂θ. Exact for any θ; gradients are computed afresh after it.
class SO2Symmetry : public Symmetry {
 public:
  SO2Symmetry(at::Tensor xy, PlaneMap to_uv, PlaneMap to_xy, std::string name = "so2");

  std::string name() const override { return name_; }
  bool diagonal() const override { return false; }
  std::vector<at::Tensor> parameters() const override { return {xy_}; }
  at::Tensor zero_algebra() const override;
  /// The rotation by θ = T[0], whatever the parametrization.
  GroupElement element(const at::Tensor& T, Parametrization p) const override;
  void apply_(const GroupElement& e, const BatchLoss* batch = nullptr,
              Mode mode = Mode::kExact) const override;
  std::vector<at::Tensor> act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                              const BatchLoss* batch, const ParameterOverrides& in_force,
                              Mode mode = Mode::kExact) const override;
  void check_unchanged() const override;

 private:
  at::Tensor rotate(const at::Tensor& xy, const at::Tensor& g) const;

  at::Tensor xy_;
  PlaneMap to_uv_, to_xy_;
  std::string name_;
};

}  // namespace teleport
