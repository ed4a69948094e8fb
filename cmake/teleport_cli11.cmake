# CLI11 for the command lines: the installed package when there is one, else
# the headers in TELEPORT_CLI11_DIR.
set(TELEPORT_CLI11_DIR "" CACHE PATH "Directory holding CLI/CLI.hpp, used when no CLI11 package is found")
find_package(CLI11 QUIET CONFIG)
if(NOT TARGET CLI11::CLI11)
  if(NOT TELEPORT_CLI11_DIR OR NOT EXISTS "${TELEPORT_CLI11_DIR}/CLI/CLI.hpp")
    message(FATAL_ERROR
      "CLI11 not found: install libcli11-dev or pass -DTELEPORT_CLI11_DIR=<dir with CLI/CLI.hpp>")
  endif()
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  target_include_directories(CLI11::CLI11 INTERFACE "${TELEPORT_CLI11_DIR}")
endif()
