# GoogleTest: the installed package, else a source tree built here, else no
# tests (with a note) so that the library still builds on a bare LibTorch.
set(TELEPORT_HAVE_GTEST OFF)
find_package(GTest QUIET)
if(GTest_FOUND)
  set(TELEPORT_HAVE_GTEST ON)
elseif(TELEPORT_GTEST_SOURCE_DIR AND EXISTS "${TELEPORT_GTEST_SOURCE_DIR}/CMakeLists.txt")
  set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
  set(BUILD_GMOCK OFF CACHE BOOL "" FORCE)
  add_subdirectory("${TELEPORT_GTEST_SOURCE_DIR}" "${CMAKE_BINARY_DIR}/_gtest" EXCLUDE_FROM_ALL)
  if(NOT TARGET GTest::gtest)  # GoogleTest >= 1.11 makes these itself
    add_library(GTest::gtest ALIAS gtest)
    add_library(GTest::gtest_main ALIAS gtest_main)
  endif()
  set(TELEPORT_HAVE_GTEST ON)
  message(STATUS "teleport: GoogleTest from ${TELEPORT_GTEST_SOURCE_DIR}")
else()
  message(WARNING "teleport: GoogleTest not found; tests are not built. Install "
                  "libgtest-dev or pass -DTELEPORT_GTEST_SOURCE_DIR=<googletest source>")
endif()
