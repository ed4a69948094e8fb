// torch::optim::LBFGS: one state for all its parameters (under the first
// one's key), as flat vectors. Gradient differences y and the previous
// gradient map as gradients, steps s and the search direction as weights, so
// every yᵀs (and ρ = 1/yᵀs) is unchanged; H_diag (yᵀs / yᵀy) is kept, a
// scalar the next update recomputes.
#include <teleport/internal/optimizers/adapter.h>

#include <torch/optim/lbfgs.h>

#include <deque>

namespace teleport::detail {
namespace {

namespace o = torch::optim;

class LBFGSAdapter final : public TypedAdapter<o::LBFGSOptions, o::LBFGSParamState, 7> {
 public:
  Buffers buffers(OptimizerParamState& x) const override {
    auto& s = static_cast<o::LBFGSParamState&>(x);
    Buffers b;
    b.whole = true;
    b.flat_gradient_like.assign(s.old_dirs().begin(), s.old_dirs().end());
    b.flat_gradient_like.push_back(s.prev_flat_grad());
    b.flat_weight_like.assign(s.old_stps().begin(), s.old_stps().end());
    b.flat_weight_like.push_back(s.d());
    return b;
  }

  void save(torch::serialize::OutputArchive& a, const std::string& key,
            OptimizerParamState& x) const override {
    auto& s = static_cast<o::LBFGSParamState&>(x);
    write_int(a, key + "func_evals", s.func_evals());
    write_int(a, key + "n_iter", s.n_iter());
    write_double(a, key + "t", s.t());
    write_double(a, key + "prev_loss", s.prev_loss());
    write_tensor(a, key + "d", s.d());
    write_tensor(a, key + "H_diag", s.H_diag());
    write_tensor(a, key + "prev_flat_grad", s.prev_flat_grad());
    write_list(a, key + "old_dirs", s.old_dirs());
    write_list(a, key + "old_stps", s.old_stps());
    write_list(a, key + "ro", s.ro());
    write_int(a, key + "has_al", s.al().has_value());
    if (s.al().has_value()) write_list(a, key + "al", *s.al());
  }
  std::unique_ptr<OptimizerParamState> load(torch::serialize::InputArchive& a,
                                            const std::string& key,
                                            c10::Device device) const override {
    auto s = std::make_unique<o::LBFGSParamState>();
    s->func_evals(read_int(a, key + "func_evals"));
    s->n_iter(read_int(a, key + "n_iter"));
    s->t(read_double(a, key + "t"));
    s->prev_loss(read_double(a, key + "prev_loss"));
    s->d(read_tensor(a, key + "d", device));
    s->H_diag(read_tensor(a, key + "H_diag", device));
    s->prev_flat_grad(read_tensor(a, key + "prev_flat_grad", device));
    s->old_dirs(read_list<std::deque<at::Tensor>>(a, key + "old_dirs", device));
    s->old_stps(read_list<std::deque<at::Tensor>>(a, key + "old_stps", device));
    s->ro(read_list<std::deque<at::Tensor>>(a, key + "ro", device));
    if (read_int(a, key + "has_al")) {
      s->al(read_list<std::vector<at::Tensor>>(a, key + "al", device));
    }
    return s;
  }
};

}  // namespace

const Adapter& lbfgs_adapter() {
  static const LBFGSAdapter adapter;
  return adapter;
}

}  // namespace teleport::detail
