// The schedules: fixed steps, and on demand when training stalls.
#include <teleport/internal/schedule.h>

#include <gtest/gtest.h>

#include <limits>
#include <vector>

namespace teleport {
namespace {

TEST(ScheduleTest, EveryAtUntilAndCap) {
  const auto o = TeleportOptions().every(10).at({3, 25}).until(40).max_teleports(5);
  std::vector<int64_t> fired;
  int64_t done = 0;
  for (int64_t step = 0; step < 100; ++step) {
    if (teleport_due(o, step, done)) fired.push_back(step), ++done;
  }
  EXPECT_EQ(fired, (std::vector<int64_t>{0, 3, 10, 20, 25}));
}

// ||∇L||² that falls steadily (steady progress), then collapses (a plateau).
std::vector<double> steady_then_flat(int64_t steady, int64_t flat) {
  std::vector<double> v;
  for (int64_t t = 0; t < steady; ++t) v.push_back(10.0 * (1.0 - 0.001 * t));
  for (int64_t t = 0; t < flat; ++t) v.push_back(0.1);
  return v;
}

std::vector<int64_t> firings(const TeleportOptions& o, const std::vector<double>& norms) {
  StallDetector d;
  std::vector<int64_t> out;
  for (int64_t step = 0; step < static_cast<int64_t>(norms.size()); ++step) {
    if (d.update(o, norms[step], step)) out.push_back(step);
  }
  return out;
}

TEST(ScheduleTest, OnDemandFiresOnAPlateauNotOnSteadyProgress) {
  const auto o = TeleportOptions().stall_fraction(0.5).stall_decay(0.9).stall_cooldown(20);
  EXPECT_TRUE(firings(o, steady_then_flat(300, 0)).empty());
  const auto fired = firings(o, steady_then_flat(300, 5));
  ASSERT_EQ(fired.size(), 1u);
  EXPECT_EQ(fired[0], 300);  // the first flat step
  // Off by default.
  EXPECT_TRUE(firings(TeleportOptions(), steady_then_flat(300, 50)).empty());
}

TEST(ScheduleTest, OnDemandRespectsCooldown) {
  const auto o = TeleportOptions().stall_fraction(0.5).stall_decay(0.5).stall_cooldown(10);
  // Alternating collapses every 3 steps would fire each time without a cooldown.
  std::vector<double> norms;
  for (int t = 0; t < 60; ++t) norms.push_back(t % 3 == 2 ? 0.1 : 10.0);
  const auto fired = firings(o, norms);
  ASSERT_GE(fired.size(), 2u);
  EXPECT_GE(fired.front(), 10);  // not before the first cooldown
  for (size_t i = 1; i < fired.size(); ++i) EXPECT_GE(fired[i] - fired[i - 1], 10);
  // Non-finite values are ignored, never a reason to fire.
  StallDetector d;
  EXPECT_FALSE(d.update(o, 1.0, 0));
  EXPECT_FALSE(d.update(o, std::numeric_limits<double>::quiet_NaN(), 50));
  EXPECT_EQ(d.mean(), 1.0);
}

TEST(ScheduleTest, CapAndUntilStopOnDemandToo) {
  const auto o = TeleportOptions().max_teleports(2).until(100);
  EXPECT_TRUE(teleport_allowed(o, 50, 1));
  EXPECT_FALSE(teleport_allowed(o, 50, 2));
  EXPECT_FALSE(teleport_allowed(o, 100, 0));
}

}  // namespace
}  // namespace teleport
