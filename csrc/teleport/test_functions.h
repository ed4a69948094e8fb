#pragma once
// The paper's two test functions with their SO(2) symmetries, for
// teleport-test-functions and the tests; not included by teleport/teleport.h.

#include <teleport/so2.h>

#include <ATen/Tensor.h>

#include <memory>

namespace teleport {

/// Booth: L = (x + 2y - 7)² + (2x + y - 5)², u = x + 2y - 7, v = 2x + y - 5.
at::Tensor booth(const at::Tensor& xy);
std::shared_ptr<SO2Symmetry> booth_symmetry(at::Tensor xy);

/// Rosenbrock: L = 100(x² - y)² + (x - 1)², u = 10(x² - y), v = x - 1.
at::Tensor rosenbrock(const at::Tensor& xy);
std::shared_ptr<SO2Symmetry> rosenbrock_symmetry(at::Tensor xy);

}  // namespace teleport
