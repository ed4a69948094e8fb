#!/usr/bin/env python3
"""The controlled study of docs/results.md ("Does teleporting pay? The
controlled study"): every arm tuned on a validation split, runs trained until
the validation loss stops improving, a random element and a state-only
control beside the teleports, the stability range, a performance profile.

Usage: scripts/study controlled [ARENA ...]   (default: mlp deep lora)
Arenas: mlp, deep, lora, mlp-fashion, deep-fashion (cheap: minutes), cnn,
resnet, vit (hours on two cores). Runs already written are kept: rerunning resumes. STUDY_OUT picks
the folder (default build/study-controlled); STUDY_JOBS how many runs go at
once (default 2, one thread each); STUDY_MNIST another teleport-mnist. The tables are printed and written to
STUDY_OUT/tables.md.

Per arena and optimizer (a cell):
  1. every arm's learning rate: 0.5x, 1x, 2x teleport-mnist's default on seed
     100 (never reported), extended by halving or doubling while the best is
     at an edge (at most twice); the lowest final validation loss wins;
  2. each arm at its own rate on seeds 0-4;
  3. the stability range: the largest rate, doubling from the default, that
     trains one epoch without diverging, without teleports, with balance
     teleports and with random elements; on seed 100, and on the seeds of
     STUDY_STABILITY_SEEDS (e.g. "0 1 2 3 4") too.
Every run holds out the last 5,000 training images (--validation 5000) and
stops after 5 evaluations (every 100 steps) without a lower validation loss,
at most 10 epochs.
"""
import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.environ.get("STUDY_MNIST", os.path.join(ROOT, "build/examples/teleport-mnist"))
OUT = os.environ.get("STUDY_OUT", os.path.join(ROOT, "build/study-controlled"))
JOBS = int(os.environ.get("STUDY_JOBS", "2"))
SEEDS = [0, 1, 2, 3, 4]
SWEEP_SEED = 100
COMMON = ["--validation", "5000", "--patience", "5", "--epochs", "10", "--eval-every", "100",
          "--eval-subset", "5000", "--quiet"]

ARENAS = {
    "mlp": (["--dataset", "mnist", "--model", "mlp"], ["sgd", "adam"]),
    "deep": (["--dataset", "mnist", "--model", "mlp", "--hidden", ",".join(["128"] * 8)],
             ["sgd", "adam"]),
    "lora": (["--model", "lora"], ["adam", "momentum"]),
    "mlp-fashion": (["--dataset", "fashion", "--model", "mlp"], ["sgd", "adam"]),
    "deep-fashion": (["--dataset", "fashion", "--model", "mlp", "--hidden",
                      ",".join(["128"] * 8)], ["sgd", "adam"]),
    "cnn": (["--dataset", "mnist", "--model", "cnn"], ["sgd", "adagrad"]),
    "resnet": (["--dataset", "mnist", "--model", "resnet"], ["momentum"]),
    "vit": (["--dataset", "mnist", "--model", "vit"], ["adam"]),
}
# Where the sweeps start: teleport-mnist's default rates when the study ran
# (examples/common/optimizers.h; its LoRA momentum rate has since become this
# study's tuned baseline, 0.0025). Kept, so that a rerun reproduces the study.
DEFAULT_LR = {"sgd": 0.2, "momentum": 0.02, "adagrad": 0.02, "adam": 1e-3}
MODEL_LR = {("cnn", "adagrad"): 0.01, ("resnet", "momentum"): 0.1, ("vit", "adam"): 3e-3}
# The arms: the baseline, the first study's best objective (balance) and the
# paper's (grad_norm), and the two controls: a random element of the
# grad_norm ascent's size, and the schedule with the state policy alone.
ARMS = {
    "baseline": ["--no-teleport"],
    "balance": ["--no-baseline", "--objective", "balance"],
    "grad_norm": ["--no-baseline", "--objective", "grad_norm"],
    "random": ["--no-baseline", "--objective", "random"],
    "state_only": ["--no-baseline", "--objective", "state_only"],
}
TELEPORT_ARMS = ["balance", "grad_norm"]
# The stability range: without teleports, with balance teleports (does
# balancing widen it, as ENorm claims?), and with random elements.
STABILITY_ARMS = ["baseline", "balance", "random"]
# Seeds it is also measured on besides the sweep's (STUDY_STABILITY_SEEDS).
STABILITY_SEEDS = [int(x) for x in os.environ.get("STUDY_STABILITY_SEEDS", "").split()]
CONTROLS = ["random", "state_only"]


def arms_of(arena):
    # The ViT's attention groups are GL(d) per head: balance refuses them.
    return [a for a in ARMS if not (arena == "vit" and a == "balance")]


def default_lr(arena, optimizer):
    return MODEL_LR.get((arena, optimizer), DEFAULT_LR[optimizer])


def run(name, args):
    """Runs teleport-mnist unless OUT/name.json is there; returns its first run."""
    path = os.path.join(OUT, name + ".json")
    if not (os.path.exists(path) and os.path.getsize(path) > 0):
        print("study:", name, file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([MNIST] + args + ["--json", path + ".tmp"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return json.load(f)["runs"][0]


def fmt_lr(x):
    return f"{x:g}"


def validation_of(r):
    v = r.get("validation_loss")
    return v if (v is not None and r["diverged_at"] < 0 and math.isfinite(v)) else math.inf


def tune(pool, arena, optimizer, arm):
    """The arm's rate: lowest final validation loss on the sweep seed."""
    flags, _ = ARENAS[arena]
    base = default_lr(arena, optimizer)
    tried = {}

    def batch(factors):
        jobs = {}
        for f in factors:
            lr = base * f
            if fmt_lr(lr) in tried:
                continue
            name = f"sweep-{arena}-{optimizer}-{arm}-{fmt_lr(lr)}"
            args = flags + COMMON + ["--optimizer", optimizer, "--lr", fmt_lr(lr), "--seeds",
                                     str(SWEEP_SEED)] + ARMS[arm]
            jobs[fmt_lr(lr)] = pool.submit(run, name, args)
        for lr, job in jobs.items():
            tried[lr] = validation_of(job.result())

    factors = [0.5, 1, 2]
    batch(factors)
    for _ in range(2):
        best = min(tried, key=lambda k: tried[k])
        lrs = sorted(tried, key=float)
        if best == lrs[0]:
            factors = [float(lrs[0]) / base / 2]
        elif best == lrs[-1]:
            factors = [float(lrs[-1]) / base * 2]
        else:
            break
        batch(factors)
    return float(min(tried, key=lambda k: tried[k])), tried


def stability(pool, arena, optimizer, arm, seed):
    """The largest rate, doubling from the default (at most 64x), that trains
    one epoch: a finite loss, and a final train-subset loss below the first."""
    flags, _ = ARENAS[arena]
    base = default_lr(arena, optimizer)
    common = [c for c in COMMON if c not in ("--patience", "5", "--epochs", "10")]
    largest = None
    for k in range(7):
        lr = base * 2**k
        tag = "" if seed == SWEEP_SEED else f"-{seed}"
        name = f"stable-{arena}-{optimizer}-{arm}-{fmt_lr(lr)}{tag}"
        args = flags + common + ["--epochs", "1", "--optimizer", optimizer, "--lr", fmt_lr(lr),
                                 "--seeds", str(seed)] + ARMS[arm]
        r = pool.submit(run, name, args).result()
        curve = r["eval"]["train_subset_loss"]
        if not (r["diverged_at"] < 0 and curve[-1] is not None and curve[-1] < curve[0]):
            break
        largest = lr
    return largest


def steps_to(r, target):
    """(steps, seconds) of the first evaluation at or below `target`, or None."""
    e = r["eval"]
    for s, t, v in zip(e["step"], e["seconds"], e["train_subset_loss"]):
        if v is not None and v <= target:
            return s, t
    return None


def main():
    arenas = sys.argv[1:] or ["mlp", "deep", "lora"]
    for a in arenas:
        if a not in ARENAS:
            sys.exit(f"study: unknown arena {a}; expected one of {', '.join(ARENAS)}")
    os.makedirs(OUT, exist_ok=True)
    lines = []
    cells = {}  # (arena, optimizer) -> arm -> [run per seed]
    # Runs go to `pool` (JOBS at a time); the sweeps that wait on them, to
    # `coord`, so that no waiting sweep holds a run's place.
    with cf.ThreadPoolExecutor(JOBS) as pool, cf.ThreadPoolExecutor(32) as coord:
        for arena in arenas:
            flags, optimizers = ARENAS[arena]
            for optimizer in optimizers:
                rates = {}
                sweeps = {arm: coord.submit(tune, pool, arena, optimizer, arm)
                          for arm in arms_of(arena)}
                for arm, job in sweeps.items():
                    rates[arm], tried = job.result()
                    lines.append(f"- {arena}/{optimizer}/{arm}: validation loss by rate "
                                 + ", ".join(f"{k}: {v:.4f}" for k, v in
                                             sorted(tried.items(), key=lambda x: float(x[0])))
                                 + f" -> {fmt_lr(rates[arm])}")
                runs = {}
                for arm in arms_of(arena):
                    runs[arm] = [pool.submit(run, f"seed-{arena}-{optimizer}-{arm}-{s}",
                                             flags + COMMON + ["--optimizer", optimizer, "--lr",
                                                               fmt_lr(rates[arm]), "--seeds",
                                                               str(s)] + ARMS[arm])
                                 for s in SEEDS]
                cells[(arena, optimizer)] = {
                    "rates": rates,
                    "runs": {arm: [j.result() for j in js] for arm, js in runs.items()},
                }
                stable = {(arm, seed): coord.submit(stability, pool, arena, optimizer, arm, seed)
                          for arm in STABILITY_ARMS if arm in arms_of(arena)
                          for seed in [SWEEP_SEED] + STABILITY_SEEDS}
                cells[(arena, optimizer)]["stable"] = {k: j.result() for k, j in stable.items()}
    write_tables(cells, lines)


def mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def plot_profile(profile):
    """OUT/profile.png: the performance profile as step curves (gnuplot)."""
    taus = [1 + i / 1000 for i in range(0, 301)]
    data = os.path.join(OUT, "profile.dat")
    with open(data, "w") as f:
        for arm, ratios in profile.items():
            f.write(f'"{arm}"\n')
            for t in taus:
                f.write(f"{t} {sum(r <= t + 1e-12 for r in ratios) / len(ratios)}\n")
            f.write("\n\n")
    png = os.path.join(OUT, "profile.png")
    script = "\n".join([
        "set terminal pngcairo size 800,500 noenhanced", f"set output '{png}'",
        "set title 'Performance profile: test error within tau of the best arm'",
        "set xlabel 'tau'", "set ylabel 'fraction of cell-seeds'", "set key bottom right",
        "set yrange [0:1.02]",
        "plot " + ", ".join(f"'{data}' index {i} with steps lw 2 title columnheader(1)"
                            for i in range(len(profile)))])
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"study: no profile.png ({e})", file=sys.stderr)


def write_tables(cells, sweep_lines):
    out = ["## Per cell (5 seeds, each arm at its own tuned rate)", ""]
    out.append("| cell | arm | lr | train loss | val loss | test acc | steps | steps to base | "
               "secs to base | tp share |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    profile = {}  # arm -> list of (test error / best arm's error) per cell and seed
    for (arena, optimizer), cell in cells.items():
        runs = cell["runs"]
        base = runs["baseline"]
        per_arm = {}
        for arm, rs in runs.items():
            ratios, secs, acc_gain = [], [], []
            for b, r in zip(base, rs):
                target = b["eval"]["train_subset_loss"][-1]
                mine, theirs = steps_to(r, target), steps_to(b, target)
                ratios.append(mine[0] / theirs[0] if mine and theirs and theirs[0] > 0 else math.inf)
                secs.append(mine[1] / theirs[1] if mine and theirs and theirs[1] > 0 else math.inf)
                acc_gain.append(100 * (r["test_accuracy"] - b["test_accuracy"]))
            per_arm[arm] = {"steps": ratios, "secs": secs, "gain": acc_gain}
            share = mean([r["teleport_seconds"] / max(r["train_seconds"], 1e-12) for r in rs])
            accs = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in rs)
            steps = ", ".join("-" if not math.isfinite(x) else f"{x:.2f}" for x in ratios)
            out.append(
                f"| {arena}/{optimizer} | {arm} | {fmt_lr(cell['rates'][arm])} | "
                f"{mean([r['train_loss'] for r in rs]):.4f} | "
                f"{mean([r['validation_loss'] for r in rs]):.4f} | "
                f"{100 * mean([r['test_accuracy'] for r in rs]):.2f}% ({accs}) | "
                f"{mean([r['steps'] for r in rs]):.0f} | {steps} | "
                f"{mean(secs):.2f}x | {100 * share:.1f}% |")
        for arm in TELEPORT_ARMS:
            if arm not in per_arm:
                continue
            p = per_arm[arm]
            faster = all(x <= 0.8 for x in p["steps"])
            better = all(g >= 0.3 for g in p["gain"])
            beats = {c: (all(x < y for x, y in zip(p["steps"], per_arm[c]["steps"])) if faster else
                         all(g > h for g, h in zip(p["gain"], per_arm[c]["gain"])))
                     for c in CONTROLS if c in per_arm}
            met = (faster or better) and all(beats.values())
            verdicts.append(f"- {arena}/{optimizer}/{arm}: steps ≤ 0.8x on every seed: "
                            f"{'yes' if faster else 'no'}; test accuracy +0.3 on every seed: "
                            f"{'yes' if better else 'no'}; target met (and beats both controls): "
                            f"{'yes' if met else 'no'}")
        for s in range(len(SEEDS)):
            errors = {arm: 1 - rs[s]["test_accuracy"] for arm, rs in runs.items()}
            best = min(errors.values())
            for arm, e in errors.items():
                profile.setdefault(arm, []).append(e / best if best > 0 else 1.0)
    out += ["", "## Targets", ""] + verdicts
    out += ["", "## Stability (largest rate, doubling from the default, that trains one epoch;",
            f"seed {SWEEP_SEED}"
            + (f", then seeds {', '.join(map(str, STABILITY_SEEDS))})" if STABILITY_SEEDS else ")"),
            "", "| cell | " + " | ".join(STABILITY_ARMS) + " |", "|---|" + "---|" * len(STABILITY_ARMS)]
    show = lambda v: "-" if v is None else fmt_lr(v)
    for (arena, optimizer), cell in cells.items():
        st = cell["stable"]
        row = []
        for arm in STABILITY_ARMS:
            seeds = [SWEEP_SEED] + STABILITY_SEEDS
            row.append("n/a" if (arm, SWEEP_SEED) not in st else
                       "; ".join([show(st[(arm, SWEEP_SEED)])] +
                                 ([", ".join(show(st[(arm, s)]) for s in STABILITY_SEEDS)]
                                  if STABILITY_SEEDS else [])))
        out.append(f"| {arena}/{optimizer} | " + " | ".join(row) + " |")
    taus = [1.0, 1.01, 1.02, 1.05, 1.1, 1.2]
    out += ["", "## Performance profile (test error; fraction of cell-seeds within τ of the best arm)",
            "", "| arm | " + " | ".join(f"τ={t:g}" for t in taus) + " |",
            "|---|" + "---|" * len(taus)]
    for arm, ratios in profile.items():
        out.append(f"| {arm} | " + " | ".join(
            f"{sum(r <= t + 1e-12 for r in ratios) / len(ratios):.2f}" for t in taus) + " |")
    plot_profile(profile)
    out += ["", "## Sweeps (seed 100)", ""] + sweep_lines
    text = "\n".join(out) + "\n"
    with open(os.path.join(OUT, "tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
