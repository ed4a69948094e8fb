#pragma once
// Not installed: a switch for the tests that compare the two ways a closed-form
// GL(n) teleport runs.

namespace teleport::detail {

/// While one is alive, closed-form GL(n) teleports carry the full gradients
/// through every ascent step (n × n matrices throughout) instead of working in
/// the span of the gradients (docs/design.md §11). The previous choice comes
/// back when it is destroyed, on a throw too.
class DenseGLAscent {
 public:
  DenseGLAscent();
  ~DenseGLAscent();
  DenseGLAscent(const DenseGLAscent&) = delete;
  DenseGLAscent& operator=(const DenseGLAscent&) = delete;

 private:
  bool previous_;
};

}  // namespace teleport::detail
