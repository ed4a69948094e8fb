#!/usr/bin/env python3
"""The study's table and figures from the JSON files scripts/study writes.
Usage: study-table.py DIR. Prints markdown; writes DIR/study-<dataset>-<model>.png.
Per cell (dataset, model, optimizer, objective, schedule), over seeds 0, 1, 2:
final train loss (all training images), test accuracy, the change of test
accuracy against the baseline of the same seed (lowest of the seeds), the
teleport run's steps and seconds to reach the baseline's final train-subset
loss over the baseline's (per seed; - = not reached), and the teleport share
of the training time. The targets (issue: for at least one optimizer): steps
<= 0.8x on every seed, or test accuracy +0.3 points on every seed."""
import glob
import json
import os
import subprocess
import sys

DATASETS = ["mnist", "fashion"]
MODELS = ["mlp", "cnn"]
OPTIMIZERS = ["sgd", "momentum", "adagrad", "adam"]
OBJECTIVES = ["grad_norm", "preconditioned", "balance", "look_ahead", "flatness"]
SCHEDULES = [("every", "every 100, first 500"), ("stall", "on demand")]


def load(path):
    if not os.path.exists(path):
        return None
    return {r["seed"]: r for r in json.load(open(path))["runs"]}


def reach(run, target):
    ev = run["eval"]
    for s, t, l in zip(ev["step"], ev["seconds"], ev["train_subset_loss"]):
        if l is not None and l <= target:
            return s, t
    return None, None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def f(x, spec):
    return "-" if x is None else format(x, spec)


def curve(runs):
    """The mean over seeds of the train-subset loss at each evaluation."""
    rs = list(runs.values())
    steps = rs[0]["eval"]["step"]
    out = []
    for i, s in enumerate(steps):
        vals = [r["eval"]["train_subset_loss"][i] for r in rs if i < len(r["eval"]["train_subset_loss"])]
        vals = [v for v in vals if v is not None]
        if vals:
            out.append((s, sum(vals) / len(vals)))
    return out


def plot(d, dataset, model, curves):
    if subprocess.call("command -v gnuplot >/dev/null 2>&1", shell=True) != 0:
        return None
    png = os.path.join(d, f"study-{dataset}-{model}.png")
    dat = png + ".dat"
    script = ["set terminal pngcairo size 1400,1000 noenhanced", f"set output '{png}'", "set multiplot layout 2,2",
              "set logscale y", "set key top right font ',8'", "set xlabel 'step'",
              "set ylabel 'train loss (subset, mean of 3 seeds)'"]
    blocks = []
    with open(dat, "w") as out:
        for opt in OPTIMIZERS:
            labels = []
            for label, pts in curves.get(opt, []):
                out.write(f"# {label}\n" + "".join(f"{s} {l}\n" for s, l in pts) + "\n\n")
                labels.append((len(blocks), label))
                blocks.append(label)
            if not labels:
                continue
            script.append(f"set title '{dataset} {model} {opt}'")
            script.append("plot " + ", ".join(
                f"'{dat}' index {i} with lines lw {3 if lab == 'baseline' else 1} title '{lab}'" for i, lab in labels))
    script.append("unset multiplot")
    subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=False)
    return png


def main():
    d = sys.argv[1]
    print("| dataset | model | optimizer | lr | objective | schedule | train loss | test acc | Δacc (lowest seed) "
          "| steps to baseline's loss (per seed) | seconds (mean) | teleport share | teleports kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    figures = []
    summary = {}
    for dataset in DATASETS:
        for model in MODELS:
            curves = {}
            for opt in OPTIMIZERS:
                cell = f"{dataset}-{model}-{opt}"
                base = load(os.path.join(d, f"base-{cell}.json"))
                if base is None:
                    continue
                lr_path = os.path.join(d, f"lr-{cell}")
                lr = open(lr_path).read().strip() if os.path.exists(lr_path) else "?"
                seeds = sorted(base)
                print(f"| {dataset} | {model} | {opt} | {lr} | baseline | | "
                      f"{f(mean([base[s]['train_loss'] for s in seeds]), '.4f')} | "
                      f"{f(mean([100 * base[s]['test_accuracy'] for s in seeds]), '.2f')} | | | | | |")
                curves.setdefault(opt, []).append(("baseline", curve(base)))
                for objective in OBJECTIVES:
                    for sched, sched_name in SCHEDULES:
                        runs = load(os.path.join(d, f"{sched}-{cell}-{objective}.json"))
                        if runs is None:
                            continue
                        ratios, secs, dacc, share, kept, total = [], [], [], [], 0, 0
                        for s in seeds:
                            r, b = runs.get(s), base[s]
                            if r is None:
                                continue
                            target = b["eval"]["train_subset_loss"][-1]
                            rs, rt = reach(r, target)
                            bs, bt = reach(b, target)
                            ratios.append(rs / bs if rs is not None and bs else None)
                            secs.append(rt / bt if rt is not None and bt else None)
                            dacc.append(100 * (r["test_accuracy"] - b["test_accuracy"]))
                            share.append(r["teleport_seconds"] / max(r["train_seconds"], 1e-12))
                            kept += sum(not t["rolled_back"] for t in r["teleports"])
                            total += len(r["teleports"])
                        agg = summary.setdefault((objective, sched), {"cells": 0, "seeds": 0, "reached": 0,
                                                                       "sooner": 0, "score": 0.0, "dacc": 0.0})
                        agg["cells"] += 1
                        for x, dx in zip(ratios, dacc):
                            agg["seeds"] += 1
                            agg["reached"] += x is not None
                            agg["sooner"] += x is not None and x < 1
                            agg["score"] += min(x, 1.5) if x is not None else 1.5
                            agg["dacc"] += dx
                        speed = len(ratios) == 3 and all(x is not None and x <= 0.8 for x in ratios)
                        general = len(dacc) == 3 and all(x >= 0.3 for x in dacc)
                        if speed or general:
                            verdicts.append(f"{dataset} {model} {opt} {objective} ({sched_name}): "
                                            + ("steps <= 0.8x on every seed" if speed else "")
                                            + (" and " if speed and general else "")
                                            + ("test accuracy +0.3 on every seed" if general else ""))
                        print(f"| {dataset} | {model} | {opt} | {lr} | {objective} | {sched_name} | "
                              f"{f(mean([runs[s]['train_loss'] for s in runs]), '.4f')} | "
                              f"{f(mean([100 * runs[s]['test_accuracy'] for s in runs]), '.2f')} | "
                              f"{f(min(dacc) if dacc else None, '+.2f')} | "
                              f"{' '.join(f(x, '.2f') for x in ratios)} | {f(mean(secs), '.2f')} | "
                              f"{f(mean(share), '.1%')} | {kept}/{total} |")
                        if sched == "every":
                            curves[opt].append((objective, curve(runs)))
            png = plot(d, dataset, model, curves)
            if png:
                figures.append(png)
    print()
    # Each setting over every cell it ran in: seeds that reached the baseline's
    # final loss, the mean steps ratio (a seed that did not reach it counts 1.5),
    # and the mean change of test accuracy.
    print("| objective | schedule | cells | seeds reaching the baseline's loss | sooner (ratio < 1) "
          "| mean steps ratio (unreached = 1.5) | mean Δacc |")
    print("|---|---|---|---|---|---|---|")
    for objective in OBJECTIVES:
        for sched, sched_name in SCHEDULES:
            s = summary.get((objective, sched))
            if not s:
                continue
            print(f"| {objective} | {sched_name} | {s['cells']} | {s['reached']}/{s['seeds']} | "
                  f"{s['sooner']}/{s['seeds']} | {s['score'] / s['seeds']:.3f} | "
                  f"{s['dacc'] / s['seeds']:+.2f} |")
    print()
    if verdicts:
        print("Cells that meet a target:")
        for v in verdicts:
            print(f"- {v}")
    else:
        print("No cell meets either target (steps <= 0.8x the baseline's on every seed, or test "
              "accuracy +0.3 points on every seed).")
    for p in figures:
        print(f"\nFigure: {p}")


if __name__ == "__main__":
    main()
