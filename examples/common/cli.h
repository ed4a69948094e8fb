#pragma once
// The command-line contract every example and the benchmark keep: a usage
// error is one line on stderr and exit code 2, a runtime error one line and
// exit code 1; never an abort or a stack trace.

#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace teleport::examples {

/// A usage error found after parsing (a bad value in a list, say): exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Parses argv into `app`, then runs `body`; maps every failure to its exit code.
inline int run_cli(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "{}: {}\n", app.get_name(), e.what());
    return 2;
  }
  try {
    return body();
  } catch (const UsageError& e) {
    fmt::print(stderr, "{}: {}\n", app.get_name(), e.what());
    return 2;
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    what = what.substr(0, what.find('\n'));
    fmt::print(stderr, "{}: {}\n", app.get_name(), what);
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: {}\n", app.get_name(), e.what());
    return 1;
  }
}

/// A finite number above `low` (or equal to it, with `inclusive`); inf and nan
/// are usage errors, so no out-of-range value reaches the library.
inline CLI::Validator finite_above(double low, bool inclusive = false) {
  return CLI::Validator(
      [low, inclusive](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v) || !std::isfinite(v) ||
            (inclusive ? v < low : v <= low)) {
          return fmt::format("expected a finite number {} {}, got {}", inclusive ? ">=" : ">", low,
                             text);
        }
        return "";
      },
      fmt::format("FINITE{}{}", inclusive ? ">=" : ">", low));
}

/// A finite number: inf and nan are usage errors.
inline CLI::Validator finite() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v) || !std::isfinite(v)) {
          return fmt::format("expected a finite number, got {}", text);
        }
        return "";
      },
      "FINITE");
}

/// "4,5,6" -> {4, 5, 6}; a malformed list is a UsageError naming the flag.
template <typename T>
std::vector<T> parse_list(const std::string& text, const std::string& flag) {
  std::vector<T> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    T value;
    if (!CLI::detail::lexical_cast(item, value) || item.empty()) {
      throw UsageError(
          fmt::format("{}: expected a comma-separated list of numbers, got '{}'", flag, text));
    }
    out.push_back(value);
  }
  if (out.empty()) throw UsageError(fmt::format("{}: expected at least one value", flag));
  return out;
}

}  // namespace teleport::examples
