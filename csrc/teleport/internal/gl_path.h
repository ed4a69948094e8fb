#pragma once
// Not installed: a switch for the tests that compare the two ways a closed-form
// GL(n) teleport runs.

namespace teleport::detail {

/// How closed-form GL(n) teleports run: kAuto chooses; kDense carries the full
/// gradients through every ascent step (n × n matrices throughout); kSpan works
/// in the span of the gradients (docs/design.md §11) even where that span is
/// the whole space.
enum class GLAscentPath { kAuto, kDense, kSpan };

/// While one is alive, closed-form GL(n) teleports take `path`. The previous
/// choice comes back when it is destroyed, on a throw too.
class ForceGLAscentPath {
 public:
  explicit ForceGLAscentPath(GLAscentPath path);
  ~ForceGLAscentPath();
  ForceGLAscentPath(const ForceGLAscentPath&) = delete;
  ForceGLAscentPath& operator=(const ForceGLAscentPath&) = delete;

 private:
  GLAscentPath previous_;
};

}  // namespace teleport::detail
