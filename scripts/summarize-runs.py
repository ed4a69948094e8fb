#!/usr/bin/env python3
"""Summarises a teleport-mnist --json file: one markdown row per run label,
means over seeds. Usage: summarize-runs.py FILE.json "setting" """
import json
import sys
from collections import defaultdict


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    d = json.load(open(sys.argv[1]))
    setting = sys.argv[2] if len(sys.argv) > 2 else ""
    by_label = defaultdict(list)
    for r in d["runs"]:
        by_label[r["label"]].append(r)
    for label, rs in by_label.items():
        reached = sum(r["seconds_to_target"] is not None for r in rs)
        base = [b for b in d["runs"] if b["label"] == label.split("+")[0]]
        ratios_steps, ratios_secs = [], []
        for r, b in zip(rs, base):
            if "+" in label and r["steps_to_target"] is not None and b["steps_to_target"]:
                ratios_steps.append(r["steps_to_target"] / b["steps_to_target"])
                ratios_secs.append(r["seconds_to_target"] / b["seconds_to_target"])
        teleports = [t for r in rs for t in r["teleports"]]
        drift = max((abs(t["loss_after"] - t["loss_before"]) / abs(t["loss_before"])
                     for t in teleports if t["loss_before"] is not None and t["loss_after"] is not None
                     and not t["rolled_back"]), default=None)
        share = sum(r["teleport_seconds"] for r in rs) / sum(r["train_seconds"] for r in rs)
        diverged = sum(r.get("diverged_at", -1) >= 0 for r in rs)
        if diverged:
            label += f" ({diverged} diverged)"
        print(f"| {setting} | {label} | {rs[0]['lr']:g} | {fmt(mean([r['train_loss'] for r in rs]), '.4f')} "
              f"| {100 * mean([r['test_accuracy'] for r in rs]):.2f} "
              f"| {reached}/{len(rs)} | {fmt(mean(ratios_steps), '.2f')} | {fmt(mean(ratios_secs), '.2f')} "
              f"| {100 * share:.1f}% | {sum(not t['rolled_back'] for t in teleports)}/{len(teleports)} "
              f"| {fmt(drift, '.1e')} |")


if __name__ == "__main__":
    main()
