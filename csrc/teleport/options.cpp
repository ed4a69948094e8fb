#include <teleport/options.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <string>

namespace teleport {

void TeleportOptions::validate() const {
  TORCH_CHECK(every() >= 0, "TeleportOptions: expected every >= 0, got ", every());
  for (int64_t s : at()) {
    TORCH_CHECK(s >= 0, "TeleportOptions: expected steps in `at` >= 0, got ", s);
  }
  TORCH_CHECK(until() >= -1, "TeleportOptions: expected until >= 0 or -1 (no limit), got ",
              until());
  TORCH_CHECK(max_teleports() >= -1,
              "TeleportOptions: expected max_teleports >= 0 or -1 (no limit), got ",
              max_teleports());
  TORCH_CHECK(stall_fraction() >= 0 && stall_fraction() < 1,
              "TeleportOptions: expected stall_fraction in [0, 1) (0 = off), got ",
              stall_fraction());
  TORCH_CHECK(stall_decay() >= 0 && stall_decay() < 1,
              "TeleportOptions: expected stall_decay in [0, 1), got ", stall_decay());
  TORCH_CHECK(stall_cooldown() >= 0, "TeleportOptions: expected stall_cooldown >= 0, got ",
              stall_cooldown());
  TORCH_CHECK(steps() >= 0, "TeleportOptions: expected steps >= 0, got ", steps());
  TORCH_CHECK(std::isfinite(lr()) && lr() > 0, "TeleportOptions: expected a finite lr > 0, got ",
              lr());
  TORCH_CHECK(tolerance() > 0, "TeleportOptions: expected tolerance > 0, got ", tolerance());
  TORCH_CHECK(std::isfinite(max_step()) && max_step() > 0,
              "TeleportOptions: expected a finite max_step > 0, got ", max_step());
  TORCH_CHECK(max_growth() >= 1,
              "TeleportOptions: expected max_growth >= 1 (a ratio of gradient norms), got ",
              max_growth());
  TORCH_CHECK(max_halvings() >= 0, "TeleportOptions: expected max_halvings >= 0, got ",
              max_halvings());
  TORCH_CHECK(static_cast<int>(objective()) >= 0 && static_cast<int>(objective()) < 7,
              "TeleportOptions: expected an Objective, got ", static_cast<int>(objective()));
  TORCH_CHECK(std::isfinite(flatness_radius()) && flatness_radius() > 0,
              "TeleportOptions: expected a finite flatness_radius > 0, got ", flatness_radius());
  TORCH_CHECK(flatness_samples() >= 1, "TeleportOptions: expected flatness_samples >= 1, got ",
              flatness_samples());
  TORCH_CHECK(objective() == Objective::kGradNorm || mode() == Mode::kExact,
              "TeleportOptions: only kGradNorm has reference arithmetic; expected Mode::kExact");
}

namespace {

// 2: flatness_radius, flatness_samples, flatness_seed (version 1 reads with their defaults).
constexpr int64_t kVersion = 3;
const std::string kPrefix = "teleport/options/";

void put(torch::serialize::OutputArchive& a, const std::string& key, c10::IValue v) {
  a.write(kPrefix + key, v);
}
c10::IValue get(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(kPrefix + key, v);
  return v;
}

// An enum read back, checked against its number of values.
template <typename E>
E get_enum(torch::serialize::InputArchive& a, const std::string& key, int64_t count) {
  const int64_t v = get(a, key).toInt();
  TORCH_CHECK(v >= 0 && v < count, "TeleportOptions: a checkpoint holds ", key, " = ", v,
              ", expected 0 to ", count - 1);
  return static_cast<E>(v);
}

}  // namespace

void TeleportOptions::serialize(torch::serialize::OutputArchive& archive) const {
  put(archive, "version", kVersion);
  put(archive, "every", every());
  // A tensor holds the list; {-1} stands for the empty one (steps are >= 0).
  archive.write(kPrefix + "at", ::at::tensor(at().empty() ? std::vector<int64_t>{-1} : at()));
  put(archive, "until", until());
  put(archive, "max_teleports", max_teleports());
  put(archive, "stall_fraction", stall_fraction());
  put(archive, "stall_decay", stall_decay());
  put(archive, "stall_cooldown", stall_cooldown());
  put(archive, "steps", steps());
  put(archive, "lr", lr());
  put(archive, "method", static_cast<int64_t>(method()));
  put(archive, "parametrization", static_cast<int64_t>(parametrization()));
  put(archive, "mode", static_cast<int64_t>(mode()));
  put(archive, "objective", static_cast<int64_t>(objective()));
  put(archive, "tolerance", tolerance());
  put(archive, "max_step", max_step());
  put(archive, "max_growth", max_growth());
  put(archive, "max_halvings", max_halvings());
  put(archive, "state_policy", static_cast<int64_t>(state_policy()));
  put(archive, "flatness_radius", flatness_radius());
  put(archive, "flatness_samples", flatness_samples());
  put(archive, "flatness_seed", flatness_seed());
  put(archive, "verify", verify());
}

void TeleportOptions::serialize(torch::serialize::InputArchive& archive) {
  const int64_t version = get(archive, "version").toInt();
  TORCH_CHECK(version >= 1 && version <= kVersion,
              "TeleportOptions: expected options of version 1 to ", kVersion, ", got ", version);
  every(get(archive, "every").toInt());
  ::at::Tensor steps_at;
  archive.read(kPrefix + "at", steps_at);
  steps_at = steps_at.to(::at::kLong).contiguous();
  std::vector<int64_t> list(steps_at.data_ptr<int64_t>(),
                            steps_at.data_ptr<int64_t>() + steps_at.numel());
  if (list == std::vector<int64_t>{-1}) list.clear();
  at(list);
  until(get(archive, "until").toInt());
  max_teleports(get(archive, "max_teleports").toInt());
  stall_fraction(get(archive, "stall_fraction").toDouble());
  stall_decay(get(archive, "stall_decay").toDouble());
  stall_cooldown(get(archive, "stall_cooldown").toInt());
  steps(get(archive, "steps").toInt());
  lr(get(archive, "lr").toDouble());
  method(get_enum<Method>(archive, "method", 3));
  parametrization(get_enum<Parametrization>(archive, "parametrization", 2));
  mode(get_enum<Mode>(archive, "mode", 2));
  objective(get_enum<Objective>(archive, "objective", 7));
  tolerance(get(archive, "tolerance").toDouble());
  max_step(get(archive, "max_step").toDouble());
  max_growth(get(archive, "max_growth").toDouble());
  max_halvings(get(archive, "max_halvings").toInt());
  state_policy(get_enum<StatePolicy>(archive, "state_policy", 3));
  if (version >= 2) {
    flatness_radius(get(archive, "flatness_radius").toDouble());
    flatness_samples(get(archive, "flatness_samples").toInt());
    flatness_seed(get(archive, "flatness_seed").toInt());
  }
  if (version >= 3) verify(get(archive, "verify").toBool());
  validate();
}

}  // namespace teleport
