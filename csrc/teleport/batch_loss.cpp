#include <teleport/internal/batch_loss_data.h>

#include <teleport/internal/buffers.h>
#include <teleport/internal/layer_parts.h>
#include <teleport/internal/random_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <torch/csrc/autograd/custom_function.h>

#include <torch/enum.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <algorithm>
#include <cstddef>
#include <functional>
#include <mutex>
#include <string>

namespace teleport {
const at::Tensor& value_of(const ParameterOverrides& overrides, const at::Tensor& p) {
  for (const auto& o : overrides) {
    if (p.defined() && o.first.is_same(p)) return o.second;
  }
  return p;
}

struct detail::BatchLossData::Seen {
  std::mutex mutex;                 // a const BatchLoss may be shared between threads
  std::vector<at::Tensor> watched;  // weights layer_of() or input_of() was asked about
  struct Layer {
    at::Tensor weight, input, output;  // detached
    // Their versions when recorded: a module that works in place (an in-place
    // activation) changes a recorded tensor afterwards.
    int64_t input_version = 0, output_version = 0;
    // What they were computed from: the batch and the values of the parameters
    // of this layer and the modules before it, a prefix of the evaluation's
    // values (kept alive, so that their memory is not reused), and their versions.
    std::vector<at::Tensor> values;
    std::vector<int64_t> versions;
    // Recorded under grad mode: the same input and output in that run's graph,
    // and all the very tensors the run evaluated (for traced_layer()).
    at::Tensor traced_input, traced_output;
    std::vector<at::Tensor> traced_values;
    bool intact() const {
      return input._version() == input_version &&
             (!output.defined() || output._version() == output_version);
    }
    // Whether an evaluation on `now` computes the same input and output: its
    // prefix holds the same, unchanged tensors (aliases share their storage
    // and version counter).
    bool holds_for(const std::vector<at::Tensor>& now) const {
      if (now.size() < values.size()) return false;
      for (size_t i = 0; i < values.size(); ++i) {
        const at::Tensor& a = values[i];
        const at::Tensor& b = now[i];
        if (a.data_ptr() != b.data_ptr() || versions[i] != b._version() || a.sizes() != b.sizes() ||
            a.strides() != b.strides() || a.scalar_type() != b.scalar_type() ||
            a.device() != b.device()) {
          return false;
        }
      }
      return true;
    }
  };
  std::vector<Layer> layers;

  bool watches(const at::Tensor& w) const {
    for (const auto& v : watched) {
      if (v.is_same(w)) return true;
    }
    return false;
  }
  void watch(const at::Tensor& w) {
    if (!watches(w)) watched.push_back(w);
  }
  Layer* find(const at::Tensor& w) {
    for (auto& l : layers) {
      if (l.weight.is_same(w)) return &l;
    }
    return nullptr;
  }
};

BatchLoss::BatchLoss(torch::nn::Sequential model, at::Tensor input, at::Tensor target,
                     LossFn loss_fn)
    : data_(std::make_shared<detail::BatchLossData>()) {
  auto& d = *data_;
  d.model_ = std::move(model), d.input_ = std::move(input), d.target_ = std::move(target);
  d.loss_fn_ = std::move(loss_fn);
  TORCH_CHECK(!d.model_.is_empty(), "BatchLoss: expected a model, got an empty holder");
  TORCH_CHECK(d.input_.defined(), "BatchLoss: expected an input batch, got an undefined tensor");
  TORCH_CHECK(d.loss_fn_ != nullptr, "BatchLoss: expected a loss function, got none");
  std::vector<at::Tensor> tensors = d.model_->parameters();
  tensors.push_back(d.input_);
  d.devices_ = devices_of(tensors);
  d.random_ = std::make_shared<const RandomState>(d.devices_);
  d.seen_ = std::make_shared<detail::BatchLossData::Seen>();
  d.buffers_ = d.model_->buffers();
}

BatchLoss::BatchLoss(ParametricLossFn loss) : data_(std::make_shared<detail::BatchLossData>()) {
  auto& d = *data_;
  d.parametric_ = std::move(loss);
  TORCH_CHECK(d.parametric_ != nullptr, "BatchLoss: expected a loss function, got none");
  d.random_ = std::make_shared<const RandomState>();
  d.seen_ = std::make_shared<detail::BatchLossData::Seen>();
}

at::Tensor BatchLoss::loss(const ParameterOverrides& overrides) const {
  return data_->loss(overrides);
}
at::Tensor BatchLoss::forward(const ParameterOverrides& overrides) const {
  return data_->forward(overrides);
}
at::Tensor BatchLoss::global_loss(const ParameterOverrides& overrides) const {
  return data_->global_loss(overrides);
}
bool BatchLoss::has_model() const { return data_->has_model(); }
Collectives* BatchLoss::group() const { return data_->group_.get(); }
double BatchLoss::share() const { return data_->share_; }

namespace {

using Lookup = std::function<const at::Tensor&(const at::Tensor&)>;
// Called with a layer's weight, its input, (undefined where the run stops
// before the layer) its output, and how many of the model's parameters
// (in parameters() order) belong to it and the modules before it.
using Record = std::function<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, size_t)>;

// A convolution with its module's options and the given weight and bias.
template <typename FuncOptions, typename Impl, typename F>
at::Tensor convolve(const Impl& conv, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    F&& functional) {
  // By name: the variant type differs between LibTorch versions.
  const std::string mode = torch::enumtype::get_enum_name(conv.options.padding_mode());
  TORCH_CHECK(mode == "kZeros", "BatchLoss: expected convolutions with zero padding, got ", mode);
  return functional(x, w,
                    FuncOptions()
                        .bias(b)
                        .stride(conv.options.stride())
                        .padding(conv.options.padding())
                        .dilation(conv.options.dilation())
                        .groups(conv.options.groups()));
}

// A BatchNorm with its module's options and statistics and the given affine
// weight and bias, as its forward() computes it (the running statistics it
// updates in train mode are put back after the evaluation).
template <typename Impl>
at::Tensor normalize(const Impl& bn, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& b) {
  const bool batch_stats = bn.is_training() || !bn.options.track_running_stats();
  double momentum = bn.options.momentum().value_or(0.0);
  if (bn.is_training() && bn.options.track_running_stats() && bn.num_batches_tracked.defined()) {
    bn.num_batches_tracked.add_(1);
    if (!bn.options.momentum().has_value()) {
      momentum = 1.0 / bn.num_batches_tracked.template item<double>();
    }
  }
  return at::batch_norm(x, w, b, bn.running_mean, bn.running_var, batch_stats, momentum,
                        bn.options.eps(), at::globalContext().userEnabledCuDNN());
}

// The layer `m` (a Linear, a Conv or an affine BatchNorm) applied to x with its parameters looked
// up; false for any other module. `stopped` when `m`'s weight is `stop` (then
// x is its input, or its output when `through`).
bool apply_layer(const torch::nn::Module& m, at::Tensor& x, const Lookup& lookup,
                 const at::Tensor& stop, bool through, const Record& record, size_t upstream,
                 bool& stopped) {
  namespace F = torch::nn::functional;
  // LayerNorms run as themselves: no action of a Sequential's chain moves them.
  const auto parts = detail::layer_parts(m);
  if (!parts || parts->kind == detail::LayerParts::Kind::kLayerNorm) return false;
  const at::Tensor& weight = parts->weight;
  const at::Tensor& bias = parts->bias;
  if (!weight.defined()) return false;  // a BatchNorm without affine weights
  stopped = stop.defined() && weight.is_same(stop);
  if (stopped && !through) {
    if (record) record(weight, x, at::Tensor(), upstream);
    return true;
  }
  const at::Tensor input = x;
  const at::Tensor& w = lookup(weight);
  const at::Tensor& b = lookup(bias);
  if (m.as<torch::nn::Linear>()) {
    x = at::linear(x, w, b);
  } else if (const auto* c1 = m.as<torch::nn::Conv1d>()) {
    x = convolve<F::Conv1dFuncOptions>(*c1, x, w, b, [](auto&&... a) { return F::conv1d(a...); });
  } else if (const auto* c2 = m.as<torch::nn::Conv2d>()) {
    x = convolve<F::Conv2dFuncOptions>(*c2, x, w, b, [](auto&&... a) { return F::conv2d(a...); });
  } else if (const auto* c3 = m.as<torch::nn::Conv3d>()) {
    x = convolve<F::Conv3dFuncOptions>(*c3, x, w, b, [](auto&&... a) { return F::conv3d(a...); });
  } else if (const auto* b1 = m.as<torch::nn::BatchNorm1d>()) {
    x = normalize(*b1, x, w, b);
  } else if (const auto* b2 = m.as<torch::nn::BatchNorm2d>()) {
    x = normalize(*b2, x, w, b);
  } else if (const auto* b3 = m.as<torch::nn::BatchNorm3d>()) {
    x = normalize(*b3, x, w, b);
  }
  if (record) record(weight, input, x, upstream);
  return true;
}

// Runs the modules of `seq` (nested Sequentials too) on x; true when it
// reached the layer whose weight is `stop` (x is then that layer's input, or
// its output when `through`). `upstream` counts the parameters of the modules
// run so far (a Sequential's parameters() lists its modules' in order).
bool run_into(torch::nn::SequentialImpl& seq, at::Tensor& x, const Lookup& lookup,
              const at::Tensor& stop, bool through, const Record& record, size_t& upstream) {
  for (auto& module : seq) {
    if (auto* nested = module.ptr()->as<torch::nn::Sequential>()) {
      if (record) upstream += nested->parameters(/*recurse=*/false).size();
      if (run_into(*nested, x, lookup, stop, through, record, upstream)) return true;
      continue;
    }
    if (record) upstream += module.ptr()->parameters().size();
    bool stopped = false;
    if (!apply_layer(*module.ptr(), x, lookup, stop, through, record, upstream, stopped)) {
      x = module.forward(x);
    }
    if (stopped) return true;
  }
  return false;
}

// The value of `p` in an evaluation: `overrides` first, then `fixed`.
const at::Tensor& effective(const ParameterOverrides& overrides, const ParameterOverrides& fixed,
                            const at::Tensor& p) {
  const at::Tensor& v = value_of(overrides, p);
  return v.is_same(p) ? value_of(fixed, p) : v;
}

// What an evaluation runs on: the batch, then every parameter's value.
std::vector<at::Tensor> evaluation_values(const torch::nn::Sequential& model,
                                          const at::Tensor& input,
                                          const ParameterOverrides& overrides,
                                          const ParameterOverrides& fixed) {
  std::vector<at::Tensor> values = {input};
  for (const auto& p : model->parameters()) values.push_back(effective(overrides, fixed, p));
  return values;
}

// Runs the model on x up to (not including, or through when `through`) the
// layer whose weight is `stop`, or to the end when `stop` is undefined.
at::Tensor run(const torch::nn::Sequential& model, at::Tensor x,
               const ParameterOverrides& overrides, const ParameterOverrides& fixed,
               const at::Tensor& stop, bool through = false, const Record& record = {}) {
  const Lookup lookup = [&](const at::Tensor& p) -> const at::Tensor& {
    return effective(overrides, fixed, p);
  };
  size_t upstream = 0;
  const bool reached = run_into(*model.ptr(), x, lookup, stop, through, record, upstream);
  TORCH_CHECK(reached || !stop.defined(),
              "BatchLoss::input_of: the model has no Linear or Conv layer with that weight");
  return x;
}

}  // namespace

namespace {

// Runs `f` with the generators as `random` captured them, then puts back
// the state they had before, and the module buffers (BatchNorm's running
// statistics) as they were: an evaluation for a teleport never updates them.
template <typename F>
at::Tensor replayed(const RandomState& random, const std::vector<c10::Device>& devices,
                    const std::vector<at::Tensor>& buffers, F&& f) {
  const detail::BufferGuard keep(buffers);
  const RandomState now(devices);
  random.restore();
  at::Tensor out;
  try {
    out = f();
  } catch (...) {
    now.restore();
    throw;
  }
  now.restore();
  return out;
}

}  // namespace

at::Tensor detail::BatchLossData::run_model(const ParameterOverrides& overrides,
                                            const at::Tensor& stop, bool through) const {
  Seen& seen = *seen_;
  std::lock_guard<std::mutex> lock(seen.mutex);
  if (seen.watched.empty()) {
    return replayed(*random_, devices_, buffers_,
                    [&] { return run(model_, input_, overrides, fixed_, stop, through); });
  }
  const std::vector<at::Tensor> values = evaluation_values(model_, input_, overrides, fixed_);
  std::vector<Seen::Layer> layers;
  const bool traced = at::GradMode::is_enabled();
  const Record record = [&](const at::Tensor& w, const at::Tensor& in, const at::Tensor& out,
                            size_t upstream) {
    if (!seen.watches(w)) return;
    for (auto& l : layers) {
      // A weight used by two layers: its derivatives are not its layer's alone.
      if (l.weight.is_same(w)) return l.traced_output.reset();
    }
    Seen::Layer l;
    l.weight = w, l.input = in.detach(), l.output = out.defined() ? out.detach() : out;
    l.input_version = in._version();
    l.output_version = out.defined() ? out._version() : 0;
    l.values.assign(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(
                                                         std::min(values.size(), 1 + upstream)));
    for (const auto& v : l.values) l.versions.push_back(v._version());
    if (traced && out.defined())
      l.traced_input = in, l.traced_output = out, l.traced_values = values;
    layers.push_back(std::move(l));
  };
  const at::Tensor x = replayed(*random_, devices_, buffers_, [&] {
    return run(model_, input_, overrides, fixed_, stop, through, record);
  });
  for (auto& l : layers) {
    Seen::Layer* known = seen.find(l.weight);
    if (known == nullptr) {
      seen.layers.push_back(std::move(l));
    } else if (l.output.defined() || !known->output.defined() || !known->intact() ||
               !known->holds_for(values)) {
      *known = std::move(l);  // a run that stopped before the layer keeps a valid output
    }
  }
  return x;
}

at::Tensor detail::BatchLossData::forward(const ParameterOverrides& overrides) const {
  TORCH_CHECK(has_model(), "BatchLoss::forward: this objective has no model");
  return run_model(overrides, at::Tensor(), false);
}

namespace {

// `t` summed over the ranks (a copy; `t` is left as it is).
at::Tensor summed(Collectives& group, const at::Tensor& t) {
  std::vector<at::Tensor> v = {t.detach().clone()};
  group.all_reduce_sum(v);
  return v[0];
}

Collectives& group_of(torch::autograd::AutogradContext* ctx) {
  return *reinterpret_cast<Collectives*>(ctx->saved_data["group"].toInt());
}

// Every rank's rows, in rank order. The rows of rank q reach the loss of every
// rank, so the gradient flowing back into them is the sum over the ranks of
// the gradient each rank's result received: an all-reduce, then this rank's rows.
struct GatherRows : public torch::autograd::Function<GatherRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                            Collectives* group) {
    int64_t first = 0;
    at::Tensor all = group->all_gather_rows(rows, first);
    ctx->saved_data["first"] = first;
    ctx->saved_data["rows"] = rows.size(0);
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    return all;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    return {summed(group_of(ctx), grad[0])
                .narrow(0, ctx->saved_data["first"].toInt(), ctx->saved_data["rows"].toInt()),
            at::Tensor()};
  }
};

// A sum over the ranks; every rank's result reaches every rank's loss, so
// the backward pass is the same sum.
struct SumOverRanks : public torch::autograd::Function<SumOverRanks> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            Collectives* group) {
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    return summed(*group, x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    return {summed(group_of(ctx), grad[0]), at::Tensor()};
  }
};

}  // namespace

at::Tensor detail::BatchLossData::sum_over_ranks(const at::Tensor& x) const {
  return group_ ? SumOverRanks::apply(x, group_.get()) : x;
}

at::Tensor detail::BatchLossData::rows_of(const at::Tensor& x) const {
  const at::Tensor rows = x.reshape({-1, x.size(-1)});
  return group_ ? GatherRows::apply(rows, group_.get()) : rows;
}

std::pair<at::Tensor, at::Tensor> detail::BatchLossData::layer_of(
    const at::Tensor& weight, const ParameterOverrides& overrides) const {
  TORCH_CHECK(has_model(), "BatchLoss::layer_of: this objective has no model");
  at::Tensor input, output;
  {
    Seen& seen = *seen_;
    std::lock_guard<std::mutex> lock(seen.mutex);
    seen.watch(weight);
    if (!at::GradMode::is_enabled()) {
      const Seen::Layer* l = seen.find(weight);
      if (l != nullptr && l->output.defined() && l->intact() &&
          l->holds_for(evaluation_values(model_, input_, overrides, fixed_))) {
        input = l->input, output = l->output;
      }
    }
  }
  if (!output.defined()) {
    const Record record = [&](const at::Tensor& w, const at::Tensor& in, const at::Tensor&,
                              size_t) {
      if (w.is_same(weight)) input = in;
    };
    output = replayed(*random_, devices_, buffers_, [&] {
      return run(model_, input_, overrides, fixed_, weight, /*through=*/true, record);
    });
  }
  return {rows_of(input), rows_of(output)};
}

void detail::BatchLossData::watch(const at::Tensor& weight) const {
  TORCH_CHECK(has_model(), "BatchLoss::watch: this objective has no model");
  TORCH_CHECK(weight.defined(),
              "BatchLoss::watch: expected a layer's weight, got an undefined tensor");
  std::lock_guard<std::mutex> lock(seen_->mutex);
  seen_->watch(weight);
}

std::pair<at::Tensor, at::Tensor> detail::BatchLossData::traced_layer(
    const at::Tensor& weight, const ParameterOverrides& overrides) const {
  if (!has_model()) return {};
  const std::vector<at::Tensor> now = evaluation_values(model_, input_, overrides, fixed_);
  std::lock_guard<std::mutex> lock(seen_->mutex);
  const Seen::Layer* l = seen_->find(weight);
  if (l == nullptr || !l->traced_output.defined() || !l->intact() || !l->holds_for(now) ||
      l->traced_values.size() != now.size()) {
    return {};
  }
  for (size_t i = 0; i < now.size(); ++i) {
    if (!l->traced_values[i].is_same(now[i])) return {};
  }
  return {l->traced_input, l->traced_output};
}

at::Tensor detail::BatchLossData::input_of(const at::Tensor& weight,
                                           const ParameterOverrides& overrides) const {
  TORCH_CHECK(has_model(), "BatchLoss::input_of: this objective has no model");
  {
    std::lock_guard<std::mutex> lock(seen_->mutex);
    seen_->watch(weight);  // for layer_of() later
  }
  return rows_of(replayed(*random_, devices_, buffers_,
                          [&] { return run(model_, input_, overrides, fixed_, weight); }));
}

BatchLoss BatchLoss::spread_over(std::shared_ptr<Collectives> group, double share) const {
  TORCH_CHECK(group != nullptr, "BatchLoss::spread_over: expected a process group, got null");
  if (share < 0) share = 1.0 / static_cast<double>(group->world_size());
  TORCH_CHECK(share > 0 && share <= 1,
              "BatchLoss::spread_over: expected this rank's share of "
              "the global batch in (0, 1], got ",
              share);
  BatchLoss copy = *this;
  copy.data_ = std::make_shared<detail::BatchLossData>(*data_);
  copy.data_->group_ = std::move(group);
  copy.data_->share_ = share;
  return copy;
}

at::Tensor detail::BatchLossData::global_loss(const ParameterOverrides& overrides) const {
  at::NoGradGuard no_grad;
  if (!group_) return loss(overrides).detach();
  return summed(*group_, loss(overrides) * share_);
}

BatchLoss BatchLoss::with_fixed(ParameterOverrides fixed) const {
  BatchLoss copy = *this;
  copy.data_ = std::make_shared<detail::BatchLossData>(*data_);
  copy.data_->fixed_ = std::move(fixed);
  return copy;
}

at::Tensor detail::BatchLossData::loss(const ParameterOverrides& overrides) const {
  at::Tensor l =
      parametric_ ? replayed(*random_, devices_, buffers_, [&] { return parametric_(overrides); })
                  : loss_fn_(forward(overrides), target_);
  TORCH_CHECK(l.numel() == 1, "BatchLoss: expected the loss function to return a scalar, got ",
              l.sizes());
  return l.reshape({});
}

}  // namespace teleport
