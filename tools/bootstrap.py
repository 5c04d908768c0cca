"""tools/bootstrap.py: how much of a metric, and of the difference between two runs, is the luck of the test images.

A paired bootstrap of files written by `eval.py --save-predictions` (runs evaluated on the same test images):
the test images of each split are drawn with replacement, the same draw for every run, and the headline metrics
(eval.HEADLINE) recomputed with eval.py's own metric functions.

    python tools/bootstrap.py runs/a/preds.pt runs/b/preds.pt --resamples 200 --json boot.json
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's root: eval.py
import eval as evaluation  # noqa: E402


def load_predictions(path):
    """A --save-predictions file -> collect()'s dict; ValueError naming the file and the problem."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a truncated or foreign file)
        raise ValueError(f"{path}: not a predictions file written by eval.py --save-predictions "
                         f"(torch.load failed: {type(e).__name__})") from None
    if isinstance(raw, dict) and "model" in raw:
        raise ValueError(f"{path}: this is a training checkpoint, not saved predictions: evaluate it with eval.py --ckpt")
    if not isinstance(raw, dict) or not raw or not set(raw) <= {"sgg", "hoi"}:
        raise ValueError(f"{path}: expected a dict with 'sgg' and/or 'hoi', as written by --save-predictions")
    collected = evaluation._convert(raw, lambda x: x.numpy() if torch.is_tensor(x) else x)
    for task, c in collected.items():
        if len(c["preds"]) != len(c["gts"]):
            raise ValueError(f"{path}: '{task}' has {len(c['preds'])} predictions for {len(c['gts'])} "
                             "ground-truth images")
    return collected


def resample(collected, picks):
    """collect()'s dict with each task's test images replaced by picks[task] (indices, repeats allowed): one image
    drawn twice counts twice, its ground truth and its predictions alike."""
    out = {}
    for task, c in collected.items():
        idx = picks[task]
        out[task] = {**c, "gts": [c["gts"][i] for i in idx], "preds": [c["preds"][i] for i in idx]}
    return out


def bootstrap(collected_runs, resamples=200, seed=0):
    """collected_runs: {name: collect()'s dict}, every run on the same test splits. Each of `resamples` draws
    picks the test images of each split with replacement, the same draw for every run (a paired bootstrap).
    Returns {"runs": {name: {label: (value, std)}}, "differences": {"b - a": {label: (diff, std, lo, hi)}}}
    with the 2.5 / 97.5 % percentiles of each difference against the first run."""
    names = list(collected_runs)
    sizes = {t: len(c["gts"]) for t, c in collected_runs[names[0]].items()}
    for name in names[1:]:
        other = {t: len(c["gts"]) for t, c in collected_runs[name].items()}
        if other != sizes:
            raise ValueError(f"bootstrap: {name} has test splits {other}, {names[0]} has {sizes}: the runs must "
                             f"be evaluated on the same test images")
    full = {}
    for n, c in collected_runs.items():
        try:
            full[n] = evaluation.headline(evaluation.metrics_from_collected(c))
        except ValueError as e:  # a metric function's input check: name the file
            raise ValueError(f"{n}: {e}") from None
    rng = np.random.default_rng(seed)
    draws = {n: [] for n in names}
    for _ in range(resamples):
        picks = {t: rng.integers(0, size, size) for t, size in sizes.items()}
        for n in names:
            draws[n].append(evaluation.headline(evaluation.metrics_from_collected(resample(collected_runs[n], picks))))
    labels = [label for label, _ in evaluation.HEADLINE if label in full[names[0]]]
    table = {n: np.array([[d[label] for label in labels] for d in draws[n]]) for n in names}
    result = {"resamples": resamples, "seed": seed, "images": sizes, "differences": {},
              "runs": {n: {label: (full[n][label], float(table[n][:, j].std())) for j, label in enumerate(labels)}
                       for n in names}}
    for n in names[1:]:
        diff = table[n] - table[names[0]]
        result["differences"][f"{n} - {names[0]}"] = {
            label: (full[n][label] - full[names[0]][label], float(diff[:, j].std()),
                    float(np.percentile(diff[:, j], 2.5)), float(np.percentile(diff[:, j], 97.5)))
            for j, label in enumerate(labels)}
    return result


def format_bootstrap(result):
    lines = [f"paired bootstrap: {result['resamples']} draws of the test images {result['images']} with replacement"]
    for n, row in result["runs"].items():
        lines.append(f"{n}: " + " | ".join(f"{label} {v:.1f} +- {s:.1f}" for label, (v, s) in row.items()))
    for n, row in result["differences"].items():
        lines.append(f"{n}: " + " | ".join(f"{label} {d:+.1f} (std {s:.1f}, 95 % {lo:+.1f} .. {hi:+.1f})"
                                            for label, (d, s, lo, hi) in row.items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Paired bootstrap of files written by eval.py --save-predictions: each "
                                            "headline metric's spread over draws of the test images, and each run's "
                                            "difference to the first run.")
    p.add_argument("predictions", nargs="+", help="files written by eval.py --save-predictions (same test images)")
    p.add_argument("--resamples", type=int, default=200, help="draws of the test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error("--resamples must be >= 1")
    if len(set(args.predictions)) < len(args.predictions):
        raise SystemExit("bootstrap.py: a predictions file is given twice")
    try:
        runs = {path: load_predictions(path) for path in args.predictions}
        result = bootstrap(runs, args.resamples, args.seed)
    except ValueError as e:  # load_predictions' errors included: one line naming the file and the problem
        raise SystemExit(f"bootstrap.py: {e}") from None
    print(format_bootstrap(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
