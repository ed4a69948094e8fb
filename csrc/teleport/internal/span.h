#pragma once
// Not installed: the span GL(n) engine's representation of the gradients
// (docs/design.md §11), built by span_pieces.cpp, stepped by span_engine.cpp.

#include <teleport/symmetry.h>

#include <ATen/Tensor.h>

#include <vector>

namespace teleport::detail {

// One gradient in the bases of the symmetries acting on its rows (`left`,
// as W_in or b_in) and columns (`right`, as W_out), -1 for none.
struct SpanPiece {
  int left = -1, right = -1;
  at::Tensor A;     // [inner, r_left, r_right]: E_leftᵀ G E_right, both sides only
  at::Tensor BB;    // [r_left, r_left]: the left side's Gram outside A
  at::Tensor CC;    // [r_right, r_right]: the right side's Gram outside A
  at::Tensor BF;    // [r_left, q]: a left Gram as BF BFᵀ (thin gradients, factors of wide ones)
  at::Tensor CF;    // [r_right, q]: CC as CF CFᵀ, likewise
  at::Tensor rest;  // ||G||² outside the bases
};

// One step in a basis as its differences from the identity, each a matrix
// times a host scalar: g = I + d·D and g⁻¹ = I + di·Di, so that moving a
// piece is one fused multiply-add per side, a scaled step needs no scaled
// copy, and the inverse of a small step can be D itself with di = −d.
struct SpanStep {
  at::Tensor D, Di;
  double d = 1, di = 1;
  at::Tensor invertible;  // a 0-dim bool, undefined when invertible by construction
};

// The gradients as span pieces (see SpanPiece) in bases E of the symmetries'
// spans; false when a basis would exceed 3/4 of its width (then the n × n
// steps are cheaper: docs/design.md §11), unless `forced` (the tests' switch,
// internal/gl_path.h). `squares` holds each gradient's squared norm (0-dim
// tensors), `mass` the same read on the host.
bool span_pieces(const SymmetryList& syms, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& squares, const std::vector<double>& mass,
                 const std::vector<int>& left, const std::vector<int>& right, bool forced,
                 std::vector<at::Tensor>& E, std::vector<SpanPiece>& pieces,
                 std::vector<at::Tensor>& left_projections);

}  // namespace teleport::detail
