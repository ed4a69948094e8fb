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

void check_roles(const SymmetryList& symmetries, const char* who) {
  struct Role {
    const void* tensor;
    bool columns;
    size_t symmetry;
  };
  std::vector<Role> seen;
  for (size_t k = 0; k < symmetries.size(); ++k) {
    const auto params = symmetries[k]->parameters();
    const bool layer = dynamic_cast<const LayerSymmetry*>(symmetries[k].get()) != nullptr;
    for (size_t i = 0; i < params.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        TORCH_CHECK(!params[j].is_same(params[i]), who, ": ", symmetries[k]->name(),
                    " acts twice on one tensor of shape ", params[i].sizes(),
                    " (a layer paired with itself, or tied weights): that is no symmetry");
      }
      if (!layer) continue;
      // A layer symmetry's last tensor is acted on by columns, the others by rows.
      const Role role{params[i].unsafeGetTensorImpl(), i + 1 == params.size(), k};
      for (const auto& r : seen) {
        TORCH_CHECK(r.tensor != role.tensor || r.columns != role.columns, who, ": ",
                    symmetries[r.symmetry]->name(), " and ", symmetries[k]->name(),
                    " both act on the ", role.columns ? "columns (inputs)" : "rows (outputs)",
                    " of one tensor of shape ", params[i].sizes(),
                    ": expected each tensor acted on at most once per side (a symmetry "
                    "declared twice, or a layer used twice?)");
      }
      seen.push_back(role);
    }
  }
}

}  // namespace teleport::detail
