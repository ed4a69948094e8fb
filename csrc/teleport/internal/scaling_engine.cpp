// The closed-form scaling engine (every symmetry a layer scaling, exact
// mode): the ascent on squared gradients, as tensor operations or, on the
// CPU, host loops.
#include <teleport/internal/ascent_parts.h>
#include <teleport/internal/engines.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace teleport::detail {

namespace {

// Closed form for diagonal scalings of Linear layers, on squared gradients.
// With cumulative scales c, a gradient entry (j, k) of a weight is
// G[j,k] q_k^½ r_j^½, where r = 1/c² of the symmetry on its rows and q = c² of
// the one on its columns, so ||∇L||² and every direction need only Q = G²
// weighted by r and q: one matrix-vector product each way for a weight with
// symmetries on both sides, and none otherwise. The weights and gradients are
// touched once, at the end. Same result as closed_form_ascent, far cheaper.
struct ScalingSlot {
  bool bias = false;
  int row = -1, col = -1;         // the symmetries on its rows and columns, -1 for none
  at::Tensor q;                   // the squared gradient, for biases and weights with both
  at::Tensor row_sums, col_sums;  // Q 1 or Qᵀ 1 for weights with one side only
};

struct ScalingState {
  at::Tensor norm;
  std::vector<at::Tensor> directions;
};

ScalingState scaling_state(const std::vector<ScalingSlot>& slots,
                           const std::vector<at::Tensor>& c) {
  std::vector<at::Tensor> q, r;  // c² and 1/c² per symmetry
  for (const auto& ck : c) {
    q.push_back(ck.square());
    r.push_back(q.back().reciprocal());
  }
  std::vector<at::Tensor> halves(c.size());  // directions / 2
  std::vector<at::Tensor> norm_parts;
  for (const auto& s : slots) {
    if (s.bias) {  // rows only
      const at::Tensor part = s.q * r[s.row];
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
    } else if (s.col < 0) {  // rows only: Σ_k Q_jk = row_sums_j
      const at::Tensor part = r[s.row] * s.row_sums;
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
    } else if (s.row < 0) {  // columns only: Σ_j Q_jk = col_sums_k
      const at::Tensor part = q[s.col] * s.col_sums;
      norm_parts.push_back(part.sum());
      accumulate(halves[s.col], part);
    } else {
      const at::Tensor part = r[s.row] * at::mv(s.q, q[s.col]);  // r_j (Q q)_j
      norm_parts.push_back(part.sum());
      accumulate(halves[s.row], -part);
      accumulate(halves[s.col], q[s.col] * at::mv(s.q.t(), r[s.row]));  // q_k (Qᵀ r)_k
    }
  }
  ScalingState st;
  st.norm = at::stack(norm_parts).sum();
  for (auto& h : halves) st.directions.push_back(h * 2);
  return st;
}

// Scales weights and gradients once by the scales c found by the ascent.
Ascent finish_scaling(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<std::vector<size_t>>& where, std::vector<at::Tensor> c,
                      Ascent a, bool decide_before_apply) {
  if (decide_before_apply) {
    // The new gradients are finite when their squared norm is; the new weights
    // when |w| times the largest factor any entry gets is. Otherwise apply the
    // identity: multiplying by 1 leaves every bit as it was, so no copy is
    // needed to roll back.
    std::vector<at::Tensor> largest;
    for (const auto& p : params) {
      const auto [low, high] = at::aminmax(p.detach());  // NaN propagates
      largest.push_back(at::maximum(high, -low));
    }
    at::Tensor bound = at::stack(largest).max();
    for (const auto& ck : c)
      bound = bound * at::clamp_min(ck.max(), 1) * at::clamp_min(ck.reciprocal().max(), 1);
    a.finite = at::isfinite(a.norm_after).logical_and(at::isfinite(bound));
    for (auto& ck : c) ck = at::where(a.finite, ck, at::ones_like(ck));
  }
  for (size_t k = 0; k < syms.size(); ++k) {
    a.total[k] = GroupElement{c[k], c[k].reciprocal(), true, {}};
    syms[k]->apply_(a.total[k]);
    syms[k]->transport_gradients_(a.total[k], pick(grads, where[k]));
  }
  return a;
}

// The scaling ascent on CPU: the same arithmetic as the loop in
// scaling_ascent, with the vector work (widths-sized, a few microseconds in
// all) in plain loops instead of dozens of ATen calls per step, and the
// matrix-vector products through at::mv. Returns the scales c.
template <typename scalar_t>
std::vector<at::Tensor> scaling_loop_cpu(const std::vector<ScalingSlot>& slots,
                                         const std::vector<int64_t>& widths,
                                         const TeleportOptions& o, double& norm_before,
                                         double& norm_after, int64_t& steps, int64_t& refused) {
  using Vec = std::vector<double>;
  auto as_tensor = [](const Vec& v) {
    at::Tensor t =
        at::empty({static_cast<int64_t>(v.size())}, c10::CppTypeToScalarType<scalar_t>::value);
    std::copy(v.begin(), v.end(), t.data_ptr<scalar_t>());
    return t;
  };
  // ||∇L||² and the directions at scales c.
  auto state = [&](const std::vector<Vec>& c, std::vector<Vec>& dirs) {
    std::vector<Vec> q(c.size()), r(c.size());
    dirs.assign(c.size(), Vec());
    for (size_t k = 0; k < c.size(); ++k) {
      dirs[k].assign(c[k].size(), 0.0);
      for (double ck : c[k]) {
        q[k].push_back(ck * ck);
        r[k].push_back(1 / (ck * ck));
      }
    }
    double norm = 0;
    // Adds part_j = w_j m_j to the norm, and ± 2 part_j to the directions of `k`.
    auto accumulate = [&](const Vec& w, const scalar_t* m, int k, double sign) {
      for (size_t j = 0; j < w.size(); ++j) {
        const double part = w[j] * m[j];
        norm += part;
        dirs[k][j] += sign * 2 * part;
      }
    };
    for (const auto& s : slots) {
      if (s.bias) {
        accumulate(r[s.row], s.q.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.col < 0) {
        accumulate(r[s.row], s.row_sums.data_ptr<scalar_t>(), s.row, -1);
      } else if (s.row < 0) {
        accumulate(q[s.col], s.col_sums.data_ptr<scalar_t>(), s.col, +1);
      } else {
        const at::Tensor row_mass = at::mv(s.q, as_tensor(q[s.col]));
        accumulate(r[s.row], row_mass.data_ptr<scalar_t>(), s.row, -1);
        const at::Tensor col_mass = at::mv(s.q.t(), as_tensor(r[s.row])).contiguous();
        const scalar_t* cm = col_mass.data_ptr<scalar_t>();
        for (size_t k = 0; k < q[s.col].size(); ++k) dirs[s.col][k] += 2 * q[s.col][k] * cm[k];
      }
    }
    return norm;
  };

  std::vector<Vec> c, dirs, next_dirs;
  for (int64_t n : widths) c.emplace_back(static_cast<size_t>(n), 1.0);
  norm_before = norm_after = state(c, dirs);
  const double limit = growth_limit(norm_before, o);
  const bool linear = o.parametrization() == Parametrization::kLinear;
  const double floor = step_floor(c10::CppTypeToScalarType<scalar_t>::value, o);
  HostControl control(norm_before, limit, o);
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    std::vector<Vec> unit = dirs;  // T = η D capped as capped_step does
    double slope = 0;              // rise()
    for (size_t k = 0; k < c.size(); ++k) {
      double length = 0, lowest = INFINITY;
      for (double d : dirs[k]) {
        length += d * o.lr() * d * o.lr();
        lowest = std::min(lowest, d * o.lr());
      }
      const double negative = -lowest;
      const double factor = step_factor(std::sqrt(length), linear ? &negative : nullptr, floor, o);
      for (size_t j = 0; j < unit[k].size(); ++j) {
        unit[k][j] = dirs[k][j] * o.lr() * factor;
        slope += dirs[k][j] * unit[k][j];
      }
    }
    const double scale = control.scale(norm_after, slope);
    std::vector<Vec> candidate = c;
    for (size_t k = 0; k < c.size(); ++k) {
      for (size_t j = 0; j < c[k].size(); ++j) {
        const double t = unit[k][j] * scale;
        candidate[k][j] *= linear ? 1 + t : std::exp(t);
      }
    }
    const double norm = state(candidate, next_dirs);
    const bool ok = control.active() && accepts(norm, norm_after, limit, o);  // NaN fails
    if (ok) {
      c = std::move(candidate);
      dirs = std::move(next_dirs);
      norm_after = norm;
    }
    control.record(ok, norm);
    if (control.done(attempt)) break;
  }
  steps = control.taken();
  refused = control.refused();
  std::vector<at::Tensor> out;
  for (const auto& ck : c) out.push_back(as_tensor(ck));
  return out;
}

}  // namespace

bool all_layer_scalings(const SymmetryList& syms) {
  for (const auto& s : syms) {
    const auto* layer = dynamic_cast<const LayerSymmetry*>(s.get());
    if (layer == nullptr || layer->kind() != SymmetryKind::kScaling) return false;
  }
  return true;
}

Ascent scaling_ascent(const SymmetryList& syms, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads, const TeleportOptions& o,
                      bool decide_before_apply) {
  const auto where = positions(syms, params);
  std::vector<ScalingSlot> slots(params.size());
  for (size_t k = 0; k < syms.size(); ++k) {
    const size_t rows = row_tensors(*syms[k]);
    for (size_t j = 0; j < where[k].size(); ++j) {
      (j < rows ? slots[where[k][j]].row : slots[where[k][j]].col) = static_cast<int>(k);
    }
  }
  // A Conv weight or a Linear after a flatten is a [rows, n_col, inner] block
  // matrix whose entries in one (row, column) share their factors: Q sums the
  // squares over `inner`.
  for (size_t i = 0; i < params.size(); ++i) {
    auto& s = slots[i];
    const at::Tensor& g = grads[i];
    s.bias = g.dim() == 1;
    const int64_t n_col = s.col >= 0 ? syms[static_cast<size_t>(s.col)]->zero_algebra().size(0) : 1;
    const at::Tensor q3 = s.bias ? at::Tensor() : g.square().reshape({g.size(0), n_col, -1});
    if (s.bias) {
      s.q = g.square();
    } else if (s.row >= 0 && s.col >= 0) {
      s.q = q3.sum(2);
    } else if (s.col < 0) {
      s.row_sums = q3.sum(at::IntArrayRef{1, 2});
    } else {
      s.col_sums = q3.sum(at::IntArrayRef{0, 2});
    }
  }
  std::vector<at::Tensor> c;
  for (const auto& sym : syms)
    c.push_back(at::ones({sym->zero_algebra().size(0)}, params.front().options()));

  Ascent a(syms);
  if (detail::host_bookkeeping(params)) {
    std::vector<int64_t> widths;
    for (const auto& ck : c) widths.push_back(ck.size(0));
    double before = 0, after = 0;
    int64_t taken = 0, refused = 0;
    AT_DISPATCH_FLOATING_TYPES(params.front().scalar_type(), "scaling_loop_cpu", [&] {
      c = scaling_loop_cpu<scalar_t>(slots, widths, o, before, after, taken, refused);
    });
    const auto scalar = params.front().options().dtype(at::kDouble);
    a.norm_before = at::full({}, before, scalar).to(params.front().scalar_type());
    a.norm_after = at::full({}, after, scalar).to(params.front().scalar_type());
    a.steps = at::full({}, taken, params.front().options().dtype(at::kLong));
    a.shortened = at::full({}, refused, params.front().options().dtype(at::kLong));
    return finish_scaling(syms, params, grads, where, std::move(c), std::move(a),
                          decide_before_apply);
  }
  ScalingState st = scaling_state(slots, c);
  a.norm_before = st.norm;
  const at::Tensor limit = growth_limit(a.norm_before, o);
  Control control(a.norm_before, limit, o);
  // Every operation here is on vectors of the widths or on scalars, so their
  // count, not their size, is the cost: each line is kept to what it needs.
  for (int64_t attempt = 0; attempt < control.attempts(); ++attempt) {
    const std::vector<at::Tensor> unit = unit_steps(syms, st.directions, o);
    const at::Tensor& scale = control.scale(st.norm, rise(st.directions, unit));
    std::vector<at::Tensor> candidate;
    for (size_t k = 0; k < c.size(); ++k) {
      const at::Tensor T = unit[k] * scale;
      candidate.push_back(c[k] *
                          (o.parametrization() == Parametrization::kExp ? at::exp(T) : T + 1));
    }
    ScalingState next = scaling_state(slots, candidate);
    const at::Tensor ok = control.active().logical_and(accepts(next.norm, st.norm, limit, o));
    for (size_t k = 0; k < c.size(); ++k) {
      c[k] = at::where(ok, candidate[k], c[k]);
      st.directions[k] = at::where(ok, next.directions[k], st.directions[k]);
    }
    st.norm = at::where(ok, next.norm, st.norm);
    control.record(ok, next.norm);
    if (control.done(attempt)) break;
  }
  a.steps = control.taken();
  a.shortened = control.refused();
  a.norm_after = st.norm;
  return finish_scaling(syms, params, grads, where, std::move(c), std::move(a),
                        decide_before_apply);
}

}  // namespace teleport::detail
