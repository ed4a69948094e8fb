#include <teleport/so2.h>
#include <teleport/test_functions.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace teleport {
namespace {

// The rotation matrix of angle θ (a 1-element tensor), differentiably.
at::Tensor rotation(const at::Tensor& theta) {
  const at::Tensor c = at::cos(theta).reshape({}), s = at::sin(theta).reshape({});
  return at::stack({at::stack({c, -s}), at::stack({s, c})});
}

}  // namespace

SO2Symmetry::SO2Symmetry(at::Tensor xy, PlaneMap to_uv, PlaneMap to_xy, std::string name)
    : xy_(std::move(xy)),
      to_uv_(std::move(to_uv)),
      to_xy_(std::move(to_xy)),
      name_(std::move(name)) {
  TORCH_CHECK(xy_.defined() && xy_.numel() == 2,
              "SO2Symmetry: expected a parameter with 2 entries (x, y), got ",
              xy_.defined() ? xy_.numel() : 0);
  TORCH_CHECK(at::isFloatingType(xy_.scalar_type()),
              "SO2Symmetry: expected a floating-point parameter, got ", xy_.scalar_type());
  TORCH_CHECK(to_uv_ != nullptr && to_xy_ != nullptr, "SO2Symmetry: expected both maps");
}

at::Tensor SO2Symmetry::zero_algebra() const { return at::zeros({1}, xy_.options()); }

GroupElement SO2Symmetry::element(const at::Tensor& T, Parametrization) const {
  const at::Tensor g = rotation(T);
  return {g, g.t().contiguous(), false, {}};
}

at::Tensor SO2Symmetry::rotate(const at::Tensor& xy, const at::Tensor& g) const {
  const auto flat = xy.reshape({2});
  const auto [u, v] = to_uv_(flat[0], flat[1]);
  const at::Tensor uv = at::mv(g, at::stack({u, v}));
  const auto [x, y] = to_xy_(uv[0], uv[1]);
  return at::stack({x, y}).reshape(xy.sizes());
}

void SO2Symmetry::apply_(const GroupElement& e, const BatchLoss*, Mode) const {
  at::NoGradGuard no_grad;
  xy_.copy_(rotate(xy_.detach(), e.g));
}

std::vector<at::Tensor> SO2Symmetry::act(const std::vector<at::Tensor>& params, const at::Tensor& T,
                                         const BatchLoss*, const ParameterOverrides&, Mode) const {
  TORCH_CHECK(params.size() == 1, name_, ": expected 1 tensor, got ", params.size());
  return {rotate(params[0], rotation(T))};
}

void SO2Symmetry::check_unchanged() const {
  TORCH_CHECK(xy_.numel() == 2, name_,
              ": its parameter was resized after it was made: expected 2 "
              "entries, got ",
              xy_.numel());
}

at::Tensor booth(const at::Tensor& xy) {
  const auto w = xy.reshape({2});
  return (w[0] + 2 * w[1] - 7).square() + (2 * w[0] + w[1] - 5).square();
}

std::shared_ptr<SO2Symmetry> booth_symmetry(at::Tensor xy) {
  return std::make_shared<SO2Symmetry>(
      std::move(xy),
      [](const at::Tensor& x, const at::Tensor& y) {
        return std::make_pair(x + 2 * y - 7, 2 * x + y - 5);
      },
      [](const at::Tensor& u, const at::Tensor& v) {
        return std::make_pair(-u / 3 + 2 * v / 3 + 1, 2 * u / 3 - v / 3 + 3);
      },
      "so2(booth)");
}

at::Tensor rosenbrock(const at::Tensor& xy) {
  const auto w = xy.reshape({2});
  return 100 * (w[0].square() - w[1]).square() + (w[0] - 1).square();
}

std::shared_ptr<SO2Symmetry> rosenbrock_symmetry(at::Tensor xy) {
  return std::make_shared<SO2Symmetry>(
      std::move(xy),
      [](const at::Tensor& x, const at::Tensor& y) {
        return std::make_pair(10 * (x.square() - y), x - 1);
      },
      [](const at::Tensor& u, const at::Tensor& v) {
        const at::Tensor x = v + 1;
        return std::make_pair(x, x.square() - u / 10);
      },
      "so2(rosenbrock)");
}

}  // namespace teleport
