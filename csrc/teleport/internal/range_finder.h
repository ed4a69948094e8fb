#pragma once
// Not installed: the range finder of the span GL(n) engine (docs/design.md
// §11): an orthonormal basis of the span of the gradients' sides.

#include <ATen/Tensor.h>

#include <cstdint>
#include <vector>

namespace teleport::detail {

// An orthonormal basis (n × r) of the span of the columns of the matrices
// `acted` (each n × m_i: the gradients' sides a symmetry acts on), gradient
// by gradient, so that the range of acted[i] lies in the first ends[i]
// columns (a gradient's Gram in the basis is then held by a factor of that
// width: span_pieces). A gradient with at most 64 columns extends the basis
// by its columns themselves; a wider one by a randomized range finder, in
// blocks of 64 random sign combinations of its columns (one product per
// block, no n × n Gram), until a block keeps fewer than half its columns and
// leaves nothing to a later one (see extend_basis). The cut is at rounding
// level, 4096 (Σ m_i) ε² of the gradients' squared norm, because a sketch
// mixes the gradients linearly: the basis leans towards a direction left out
// by the square root of that direction's share of the mass, which must stay
// near ε for the ascent to match the dense one (a cut at 1e-5 would tilt it
// by 3e-3). So the basis holds the gradients' whole numerical range
// (docs/design.md §11); the caller computes the cut (span_pieces).
// Undefined when the basis would exceed max_columns.
at::Tensor range_basis(const std::vector<at::Tensor>& acted, double cut, int64_t max_columns,
                       std::vector<int64_t>& ends);

}  // namespace teleport::detail
