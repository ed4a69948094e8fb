#pragma once
// What every example writes: a table on stdout, and on request JSON, CSV and a
// gnuplot figure. JSON has one shape for all examples:
// {"config": {...}, "runs": [{"label", "seed", "loss", "grad_norm_sq", "seconds",
//   "teleports": [...], ...}]}.

#include <teleport/ascent.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace teleport::examples {

/// A JSON number; NaN and infinities become null.
inline std::string json_number(double v) {
  return std::isfinite(v) ? fmt::format("{:.10g}", v) : "null";
}

inline std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + "\"";
}

inline std::string json_array(const std::vector<double>& v) {
  std::vector<std::string> parts;
  parts.reserve(v.size());
  for (double x : v) parts.push_back(json_number(x));
  return fmt::format("[{}]", fmt::join(parts, ", "));
}

inline std::string json_report(const TeleportReport& r) {
  return fmt::format(
      R"({{"step": {}, "loss_before": {}, "loss_after": {}, "grad_norm_sq_before": {}, )"
      R"("grad_norm_sq_after": {}, "ascent_steps": {}, "shortened": {}, "rolled_back": {}, )"
      R"("exact": {}, "state_kept": {}, "seconds": {}, "reason": {}}})",
      r.step, json_number(r.loss_before), json_number(r.loss_after),
      json_number(r.grad_norm_sq_before), json_number(r.grad_norm_sq_after), r.steps, r.shortened,
      r.rolled_back, r.exact, r.state_kept, json_number(r.seconds), json_string(r.reason));
}

/// Key/value pairs whose values are already JSON.
using JsonFields = std::vector<std::pair<std::string, std::string>>;

inline std::string json_object(const JsonFields& fields) {
  std::vector<std::string> parts;
  for (const auto& [k, v] : fields) parts.push_back(fmt::format("{}: {}", json_string(k), v));
  return fmt::format("{{{}}}", fmt::join(parts, ", "));
}

/// One training run. `loss[t]`, `grad_norm_sq[t]` are measured after any
/// teleport at step t and before update t; `seconds[t]` since the run began.
// How many of `teleports` were kept, and the largest relative loss change
// among the kept ones that measured it.
inline std::pair<size_t, double> kept_and_drift(const std::vector<TeleportReport>& teleports) {
  size_t kept = 0;
  double drift = 0;
  for (const auto& r : teleports) {
    if (r.rolled_back) continue;
    ++kept;
    if (std::isfinite(r.loss_before)) {
      drift = std::max(drift, std::abs(r.loss_after - r.loss_before) / std::abs(r.loss_before));
    }
  }
  return {kept, drift};
}

inline double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

struct Run {
  std::string label;
  int64_t seed = 0;
  std::vector<double> loss, grad_norm_sq, seconds;
  std::vector<TeleportReport> teleports;
  JsonFields extra;  // example-specific fields, values already JSON
};

inline std::string json_run(const Run& r) {
  std::vector<std::string> reports;
  for (const auto& t : r.teleports) reports.push_back(json_report(t));
  JsonFields f = {{"label", json_string(r.label)},
                  {"seed", std::to_string(r.seed)},
                  {"loss", json_array(r.loss)},
                  {"grad_norm_sq", json_array(r.grad_norm_sq)},
                  {"seconds", json_array(r.seconds)},
                  {"teleports", fmt::format("[{}]", fmt::join(reports, ", "))}};
  f.insert(f.end(), r.extra.begin(), r.extra.end());
  return json_object(f);
}

/// Opens `path` for writing or throws a runtime error that names it.
inline std::ofstream open_output(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error(fmt::format("cannot write {}", path));
  return out;
}

/// Throws a runtime error that names `path` unless it can be written; leaves
/// nothing behind (checked before hours of work, written at the end).
inline void check_writable(const std::string& path) {
  const std::string probe = path + ".partial";
  open_output(probe);
  std::remove(probe.c_str());
}

/// Writes `path` through `path.partial`, renamed once complete: a run that
/// fails leaves no empty or partial file.
inline void write_whole(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string partial = path + ".partial";
  {
    auto out = open_output(partial);
    write(out);
    out.flush();
    if (!out) {
      std::remove(partial.c_str());
      throw std::runtime_error(fmt::format("cannot write {}", path));
    }
  }
  if (std::rename(partial.c_str(), path.c_str()) != 0) {
    std::remove(partial.c_str());
    throw std::runtime_error(fmt::format("cannot write {}", path));
  }
}

inline void write_json(const std::string& path, const JsonFields& config,
                       const std::vector<Run>& runs) {
  std::vector<std::string> rs;
  for (const auto& r : runs) rs.push_back(json_run(r));
  write_whole(path, [&](std::ostream& out) {
    out << fmt::format("{{\"config\": {},\n \"runs\": [\n  {}\n]}}\n", json_object(config),
                       fmt::join(rs, ",\n  "));
  });
}

inline void write_csv(const std::string& path, const std::vector<Run>& runs) {
  write_whole(path, [&](std::ostream& out) {
    out << "label,seed,step,loss,grad_norm_sq,seconds\n";
    for (const auto& r : runs) {
      for (size_t t = 0; t < r.loss.size(); ++t) {
        out << fmt::format("{},{},{},{},{},{}\n", r.label, r.seed, t, json_number(r.loss[t]),
                           t < r.grad_norm_sq.size() ? json_number(r.grad_norm_sq[t]) : "",
                           t < r.seconds.size() ? json_number(r.seconds[t]) : "");
      }
    }
  });
}

/// A curve to plot against steps and against seconds.
struct Curve {
  std::string label;
  std::vector<double> steps, seconds, values;
};

/// Loss against steps and against seconds, side by side, log scale; through
/// gnuplot when it is installed. Returns a note for the user: where the figure
/// is, or why there is none. Throws when the path cannot be written.
inline std::string plot(const std::string& path, const std::string& title,
                        const std::string& ylabel, const std::vector<Curve>& curves) {
  check_writable(path);  // fails early, with the path, when it cannot be written
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    return fmt::format("no plot: gnuplot is not installed (apt-get install gnuplot-nox)");
  }
  const std::string data = path + ".dat", script = path + ".gp", partial = path + ".partial";
  {
    auto out = open_output(data);
    for (const auto& c : curves) {
      out << "# " << c.label << "\n";
      for (size_t i = 0; i < c.values.size(); ++i) {
        out << fmt::format("{} {} {}\n", c.steps[i], c.seconds[i], json_number(c.values[i]));
      }
      out << "\n\n";
    }
  }
  std::string plots_steps, plots_seconds;
  for (size_t i = 0; i < curves.size(); ++i) {
    const char* sep = i ? ", " : "";
    plots_steps += fmt::format("{}'{}' index {} using 1:3 with lines lw 2 title {}", sep, data, i,
                               json_string(curves[i].label));
    plots_seconds += fmt::format("{}'{}' index {} using 2:3 with lines lw 2 title {}", sep, data, i,
                                 json_string(curves[i].label));
  }
  {
    auto out = open_output(script);
    out << fmt::format(
        "set terminal pngcairo size 1400,560 noenhanced\nset output {}\n"
        "set datafile missing 'null'\nset multiplot layout 1,2 title {}\n"
        "set logscale y\nset grid\nset key top right\nset ylabel {}\n"
        "set xlabel 'step'\nplot {}\nset xlabel 'seconds'\nplot {}\nunset multiplot\n",
        json_string(partial), json_string(title), json_string(ylabel), plots_steps, plots_seconds);
  }
  const int rc = std::system(fmt::format("gnuplot '{}' 2>&1", script).c_str());
  std::remove(data.c_str());
  std::remove(script.c_str());
  if (rc != 0 || std::rename(partial.c_str(), path.c_str()) != 0) {
    std::remove(partial.c_str());
    return fmt::format("no plot: gnuplot failed on {}", path);
  }
  return fmt::format("plot written to {}", path);
}

}  // namespace teleport::examples
