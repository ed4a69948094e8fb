// The symmetries' parameters: distinct, their roles checked, copied and
// restored; and where the ascent's bookkeeping runs (host or device).
#include <teleport/ascent.h>
#include <teleport/internal/parameters.h>
#include <teleport/internal/tensor_ops.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

namespace teleport::detail {

namespace {
bool tensor_ops_on_cpu = false;  // see internal/tensor_ops.h
}  // namespace

TensorOpsOnCpu::TensorOpsOnCpu() : previous_(tensor_ops_on_cpu) { tensor_ops_on_cpu = true; }
TensorOpsOnCpu::~TensorOpsOnCpu() { tensor_ops_on_cpu = previous_; }

bool host_bookkeeping(const at::Tensor& like) {
  return like.device().is_cpu() && !tensor_ops_on_cpu;
}
bool host_bookkeeping(const std::vector<at::Tensor>& params) {
  return host_bookkeeping(params.front());
}

Snapshot::Snapshot(std::vector<at::Tensor> params) : params_(std::move(params)) {
  at::NoGradGuard no_grad;
  for (const auto& p : params_) {
    values_.push_back(p.detach().clone());
    grads_.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  }
}

void Snapshot::restore() const {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].detach().copy_(values_[i]);
    at::Tensor& grad = const_cast<at::Tensor&>(params_[i]).mutable_grad();
    if (!grads_[i].defined()) {
      grad = at::Tensor();
    } else if (grad.defined() && grad.sizes() == grads_[i].sizes()) {
      grad.copy_(grads_[i]);
    } else {
      grad = grads_[i].clone();
    }
  }
}

std::vector<at::Tensor> distinct_parameters(const SymmetryList& symmetries) {
  std::vector<at::Tensor> out;
  for (const auto& s : symmetries) {
    for (const auto& p : s->parameters()) {
      bool seen = false;
      for (const auto& q : out) seen = seen || q.is_same(p);
      if (!seen) out.push_back(p);
    }
  }
  return out;
}

std::vector<std::vector<size_t>> positions(const SymmetryList& symmetries,
                                           const std::vector<at::Tensor>& params) {
  std::vector<std::vector<size_t>> out;
  for (const auto& s : symmetries) {
    std::vector<size_t> idx;
    for (const auto& p : s->parameters()) {
      for (size_t j = 0; j < params.size(); ++j) {
        if (params[j].is_same(p)) idx.push_back(j);
      }
    }
    out.push_back(std::move(idx));
  }
  return out;
}

size_t row_tensors(const Symmetry& symmetry) {
  if (const auto* layer = dynamic_cast<const LayerSymmetry*>(&symmetry)) {
    return layer->row_tensors();
  }
  return symmetry.parameters().size() - 1;
}

Roles roles_of(const SymmetryList& symmetries, const char* who) {
  Roles r;
  r.params = distinct_parameters(symmetries);
  r.where = positions(symmetries, r.params);
  r.rows.assign(r.params.size(), -1);
  r.columns.assign(r.params.size(), -1);
  for (size_t k = 0; k < symmetries.size(); ++k) {
    const auto& idx = r.where[k];
    for (size_t i = 0; i < idx.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        TORCH_CHECK(idx[j] != idx[i], who, ": ", symmetries[k]->name(),
                    " acts twice on one tensor of shape ", r.params[idx[i]].sizes(),
                    " (a layer paired with itself, or tied weights): that is no symmetry");
      }
    }
    if (dynamic_cast<const LayerSymmetry*>(symmetries[k].get()) == nullptr) continue;
    for (size_t i = 0; i < idx.size(); ++i) {
      const bool columns = i >= row_tensors(*symmetries[k]);
      int& side = columns ? r.columns[idx[i]] : r.rows[idx[i]];
      TORCH_CHECK(side < 0, who, ": ", side < 0 ? "" : symmetries[side]->name(), " and ",
                  symmetries[k]->name(), " both act on the ",
                  columns ? "columns (inputs)" : "rows (outputs)", " of one tensor of shape ",
                  r.params[idx[i]].sizes(),
                  ": expected each tensor acted on at most once per side (a symmetry "
                  "declared twice, or a layer used twice?)");
      side = static_cast<int>(k);
    }
  }
  return r;
}

}  // namespace teleport::detail
