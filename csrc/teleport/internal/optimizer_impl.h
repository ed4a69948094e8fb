#pragma once
// Not installed: TeleportOptimizer's state and the parts of its step: the
// teleport inside step() (optimizer.cpp), the inner state's policy
// (optimizer_state.cpp), checkpoints (optimizer_checkpoint.cpp).

#include <teleport/internal/schedule.h>
#include <teleport/optimizer.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace teleport {

struct TeleportOptimizer::Impl {
  Impl(TeleportOptimizer& self, torch::nn::Sequential model,
       std::unique_ptr<torch::optim::Optimizer> inner, TeleportOptions options,
       SymmetryList symmetries);

  // TeleportOptimizer::step(), save() and load().
  at::Tensor step(const LossClosure& closure);
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

  // One teleport inside step(), with its checks and the state policy.
  void teleport_step(const LossClosure& replay, const at::Tensor& loss, at::Tensor& current);
  // One teleport; `replay` calls the closure with the randomness of its first
  // call, `loss` is that call's loss; `current` becomes the loss at the new
  // point where the closure measured it.
  TeleportReport run_teleport(const LossClosure& replay, const at::Tensor& loss,
                              at::Tensor& current);
  // Maps, resets or keeps the inner state (docs/design.md §7); notes in `report`
  // what was kept because no exact map exists.
  void apply_state_policy(TeleportReport& report);
  void transport_whole_state(TeleportReport& report);
  // A teleport from .grad with the options' objective (kPreconditioned reads
  // the inner state's second moments).
  TeleportReport teleport_from_grad();
  // kLookAhead: the inner optimizer's next step (ascent.h).
  NextStep next_step() const;
  // Throws where StatePolicy::kTransport cannot carry the inner state exactly.
  void check_state_policy() const;
  void sync_inner();
  void check_model_unchanged() const;
  // Throws unless every symmetry acts on trainable float32/float64 parameters
  // the inner optimizer holds, each tensor at most once per side.
  void check_symmetries() const;
  // ||∇L||² over the symmetries' parameters that have a gradient, NaN where
  // none has.
  double symmetric_grad_norm_sq() const;
  // The symmetries that can take part in a teleport now: every parameter
  // trains (requires_grad) and, from .grad, has a gradient. The others go to
  // `skipped` with the reason.
  SymmetryList taking_part(bool from_grad, std::vector<std::string>& skipped) const;
  // The inner state's tensors that kTransport may move in place.
  std::vector<at::Tensor> inner_state_tensors() const;
  // TeleportOptions::verify: checks each symmetry not checked yet on `loss`
  // (check_symmetry), refuses those that fail (out of symmetries_ and
  // active_, a note in notes_ and refused_).
  void verify_symmetries(const std::function<at::Tensor()>& loss);
  // Throws on every rank alike unless every rank holds the same .grad (one
  // gathered checksum per rank).
  void check_gradients_agree() const;
  // report.elements, one per symmetry taking part, as one per symmetry
  // (undefined elements for the others).
  void align_elements(TeleportReport& report) const;

  torch::nn::Sequential model_;
  std::unique_ptr<torch::optim::Optimizer> inner_;
  TeleportOptions options_;
  SymmetryList symmetries_;
  SymmetryList active_;                    // those taking part in the current teleport
  std::vector<const Symmetry*> verified_;  // checked by verify_symmetries
  std::vector<std::string> refused_;       // refused by it in the current teleport
  std::vector<at::Tensor> buffers_;
  std::vector<std::string> notes_;
  std::shared_ptr<Collectives> group_;
  double share_ = 1;
  BatchFn next_batch_;
  LossFn loss_fn_;
  int64_t step_ = 0;
  int64_t teleports_ = 0;
  TeleportReport last_report_;
  bool has_report_ = false;
  bool noted_unknown_state_ = false;
  StallDetector stall_;  // the on-demand schedule (TeleportOptions::stall_fraction)

  TeleportOptimizer& self;  // whose param groups the inner optimizer follows
};

}  // namespace teleport
