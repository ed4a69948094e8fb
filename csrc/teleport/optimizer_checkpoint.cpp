// TeleportOptimizer's checkpoints: its own fields, the options, and the
// inner optimizer's state by parameter position, each optimizer's buffers as
// its adapter writes them (docs/design.md §9).
#include <teleport/internal/optimizer_impl.h>

#include <teleport/internal/inner_state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

#include <memory>
#include <string>
#include <vector>

namespace teleport {
namespace {

using namespace detail;

// 2: the options as one unit (TeleportOptions::serialize), every field; the
// state of every torch::optim optimizer by parameter position.
// 3: the on-demand schedule's and the objective's fields; the parameters'
// count and shapes, checked at load.
constexpr int64_t kCheckpointVersion = 3;

// What a checkpoint records for one parameter's inner state: none, an
// adapter's kind (internal/optimizers/), or the optimizer's own save().
constexpr int64_t kNoState = 0;
constexpr int64_t kOtherState = 8;

}  // namespace

void TeleportOptimizer::Impl::save(torch::serialize::OutputArchive& archive) const {
  write_int(archive, "teleport/version", kCheckpointVersion);
  write_int(archive, "teleport/step", step_);
  write_int(archive, "teleport/teleports", teleports_);
  archive.write("teleport/stall_mean", c10::IValue(stall_.mean()));
  write_int(archive, "teleport/stall_last", stall_.last());
  options_.serialize(archive);

  write_int(archive, "groups/count", static_cast<int64_t>(self.param_groups_.size()));
  for (size_t i = 0; i < self.param_groups_.size(); ++i) {
    torch::serialize::OutputArchive group(archive.compilation_unit());
    self.param_groups_[i].options().serialize(group);
    archive.write("groups/" + std::to_string(i), group);
  }
  // The inner state, by parameter position, for every torch::optim optimizer
  // (their own save() writes undefined buffers, such as Adam's max_exp_avg_sq
  // without amsgrad, that the archive cannot hold); others through their own.
  auto& inner = const_cast<Optimizer&>(*inner_);
  const auto params = all_params(inner);
  write_int(archive, "params/count", static_cast<int64_t>(params.size()));
  for (size_t j = 0; j < params.size(); ++j) {
    archive.write("params/" + std::to_string(j) + "/shape",
                  at::tensor(params[j].sizes().vec(), at::kLong));
  }
  bool native = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const std::string key = "state/" + std::to_string(j) + "/";
    auto* state = find_state(inner, params[j]);
    const Adapter* adapter = adapter_for(state);
    write_int(archive, key + "kind",
              state == nullptr     ? kNoState
              : adapter != nullptr ? adapter->kind()
                                   : kOtherState);
    if (adapter != nullptr) {
      adapter->save(archive, key, *state);
    } else if (state != nullptr) {
      native = true;
    }
  }
  if (native) {
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    inner_->save(nested);
    archive.write("inner", nested);
  }
}

void TeleportOptimizer::Impl::load(torch::serialize::InputArchive& archive) {
  c10::IValue probe_version;
  TORCH_CHECK(archive.try_read("teleport/version", probe_version),
              "TeleportOptimizer::load: expected a TeleportOptimizer checkpoint, got one without "
              "teleport/version (a plain optimizer's checkpoint loads into inner(): "
              "torch::load(opt.inner(), ...))");
  const int64_t version = probe_version.toInt();
  TORCH_CHECK(version == kCheckpointVersion,
              "TeleportOptimizer::load: expected a checkpoint of version ", kCheckpointVersion,
              ", got ", version);
  const auto shapes_now = all_params(*inner_);
  const int64_t count = read_int(archive, "params/count");
  TORCH_CHECK(count == static_cast<int64_t>(shapes_now.size()),
              "TeleportOptimizer::load: expected a checkpoint of ", shapes_now.size(),
              " parameters, got ", count, " (another model?)");
  for (size_t j = 0; j < shapes_now.size(); ++j) {
    at::Tensor shape;
    archive.read("params/" + std::to_string(j) + "/shape", shape);
    const std::vector<int64_t> got(shape.data_ptr<int64_t>(),
                                   shape.data_ptr<int64_t>() + shape.numel());
    TORCH_CHECK(got == shapes_now[j].sizes().vec(), "TeleportOptimizer::load: expected parameter ",
                j, " of shape ", shapes_now[j].sizes(), ", got ", c10::IntArrayRef(got),
                " (a checkpoint of another architecture?)");
  }
  step_ = read_int(archive, "teleport/step");
  teleports_ = read_int(archive, "teleport/teleports");
  {
    c10::IValue mean;
    archive.read("teleport/stall_mean", mean);
    stall_.restore(mean.toDouble(), read_int(archive, "teleport/stall_last"));
  }
  options_.serialize(archive);  // every option but on_report, which stays

  const int64_t groups = read_int(archive, "groups/count");
  TORCH_CHECK(groups == static_cast<int64_t>(self.param_groups_.size()),
              "TeleportOptimizer::load: expected a checkpoint with ", self.param_groups_.size(),
              " param groups, got ", groups);
  for (int64_t i = 0; i < groups; ++i) {
    torch::serialize::InputArchive group;
    archive.read("groups/" + std::to_string(i), group);
    self.param_groups_[i].options().serialize(group);
  }
  sync_inner();

  const auto params = all_params(*inner_);
  bool native = false;
  for (size_t j = 0; j < params.size(); ++j) {
    const std::string key = "state/" + std::to_string(j) + "/";
    c10::IValue probe;
    TORCH_CHECK(archive.try_read(key + "kind", probe),
                "TeleportOptimizer::load: the checkpoint holds fewer parameters than the "
                "optimizer (",
                params.size(), ")");
    const int64_t kind = probe.toInt();
    const Adapter* adapter = adapter_of_kind(kind);
    TORCH_CHECK(adapter != nullptr || kind == kNoState || kind == kOtherState,
                "TeleportOptimizer::load: unknown state kind ", kind, " for parameter ", j);
    if (kind == kNoState) {
      erase_state(*inner_, params[j]);
    } else if (kind == kOtherState) {
      native = true;
    } else {
      set_state(*inner_, params[j], adapter->load(archive, key, params[j].device()));
    }
  }
  if (native) {
    torch::serialize::InputArchive nested;
    archive.read("inner", nested);
    inner_->load(nested);
  }
}

}  // namespace teleport
