# fmt for examples, benchmarks and tests: the installed package when there is
# one, else the headers in TELEPORT_FMT_DIR compiled header-only.
find_package(fmt QUIET)
if(fmt_FOUND)
  message(STATUS "teleport: fmt ${fmt_VERSION} from its package")
else()
  if(NOT TELEPORT_FMT_DIR)
    message(FATAL_ERROR
      "fmt not found: install libfmt-dev or pass -DTELEPORT_FMT_DIR=<dir with fmt/core.h>")
  endif()
  if(NOT EXISTS "${TELEPORT_FMT_DIR}/fmt/format.h")
    message(FATAL_ERROR "TELEPORT_FMT_DIR=${TELEPORT_FMT_DIR} has no fmt/format.h")
  endif()
  add_library(fmt_header_only INTERFACE)
  target_include_directories(fmt_header_only INTERFACE "${TELEPORT_FMT_DIR}")
  target_compile_definitions(fmt_header_only INTERFACE FMT_HEADER_ONLY=1)
  add_library(fmt::fmt ALIAS fmt_header_only)
  message(STATUS "teleport: fmt header-only from ${TELEPORT_FMT_DIR}")
endif()
