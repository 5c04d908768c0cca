"""The ablation study of Tables V-VIII on the toy scenes: the FULL model and every ablation row, several seeds each.

    python tools/study.py                                  # every row x 3 seeds, runs/study/study.{json,md}
    python tools/study.py --rows FULL,SGG,HOI --seeds 5 --jobs 2
    python tools/study.py --seeds 2 --first_seed 3         # seeds 3 and 4 only; then --seeds 5 tables seeds 0-4
    python tools/study.py --full pool_text --run_args "--text_embeddings clip_text.pt"   # the paper's FULL

Each (row, seed) is an ordinary train.py run in its own folder (runs/study/<row>/seed<k>): a finished run is skipped
and an interrupted one resumed when the study is started again; runs go in parallel, one thread each. The table has
the paper's layout, mean +- std over the seeds with the paper's number beside each cell.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import sg2hoi  # noqa: E402
import train  # noqa: E402

# The FULL row's flags. "pool_text" is the paper's FULL (SG2HOI+pool, CLIP-initialised classifiers: give the CLIP
# text embeddings with --run_args "--text_embeddings ..."). The toy study's default is the toy preset as it is ([CLS]
# aligned, random classifiers): without CLIP the "text" classifiers start from seeded stand-in vectors, and
# with them the toy model's box loss barely moved in phase 1 (rel_box 4.1 at step 900 against 1.2; FULL then ended
# at R@50 6 and HOI mAP 5 where the defaults reach about 72 and 58), so every row would be compared with an
# untrained model.
FULL_FLAGS = {"defaults": [], "pool_text": ["--align_feature", "pool", "--classifier_init", "text"]}
STUDY_ROWS = {  # row -> (flags on top of FULL, the paper's R@50, R@100, mR@50, mR@100, Full, Rare, Non-rare)
    "FULL": ([], (25.9, 30.3, 11.4, 13.9, 33.14, 29.27, 35.72)),
    "SGG": (["--tasks", "sgg"], (24.6, 28.4, 10.5, 12.9, None, None, None)),  # Table V
    "HOI": (["--hoi_on_frozen_sgg", "true"], (None, None, None, None, 30.28, 25.95, 31.91)),
    "-HSS": (["--use_bbseg", "false"], (23.9, 27.8, 10.1, 12.0, 30.22, 26.41, 32.64)),  # Table VI
    "HSSD": (["--semantic_embedding", "discrete"], (24.2, 28.2, 10.7, 12.5, 30.54, 26.49, 33.38)),
    "HSSG": (["--semantic_embedding", "glove"], (24.8, 28.9, 10.7, 13.4, 31.29, 27.52, 34.67)),
    "-VLpool": (["--use_vl_distill", "false"], (24.3, 27.9, 10.3, 12.3, 31.49, 27.34, 34.21)),  # Table VII
    "VLl2": (["--align_loss", "l2"], (25.6, 29.7, 11.2, 13.5, 33.10, 28.92, 35.37)),
    "-FETR": (["--use_feature_transform", "false"], (23.3, 27.1, 9.5, 11.4, 30.50, 24.13, 30.45)),  # Table VIII
    "-QUTR": (["--use_query_transform", "false"], (24.9, 28.5, 10.9, 13.0, 33.37, 28.24, 34.60)),
    "-R2ITR": (["--use_r2i", "false"], (25.0, 28.5, 11.1, 12.6, 29.10, 25.14, 30.21)),
    "RELQ": (["--hoi_queries_from_rel", "true"], (22.6, 26.1, 10.4, 11.3, 29.29, 24.03, 30.62)),
}
STUDY_COLUMNS = ("R@50", "R@100", "mR@50", "mR@100", "Full", "Rare", "Non-rare")
# The study's reduced budget: the toy model with 5 SGG + 9 joint epochs (the toy preset before commit 1493111)
# instead of the preset's 8 + 12, about 2/3 of the toy default's steps. Shorter schedules leave the HOI part
# untrained (5 + 3 epochs gave HOI mAP 2.8; 3 + 6, with a narrower backbone, R@50 19 and mAP 8), and a table of
# untrained rows measures nothing.
STUDY_BUDGET = ["--sgg_epochs", "5", "--joint_epochs", "9"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(STUDY_ROWS), help="comma-separated rows of STUDY_ROWS")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds per row")
    p.add_argument("--first_seed", type=int, default=0,
                   help="the seeds are first_seed .. first_seed + seeds - 1 (to add seeds to a finished study)")
    p.add_argument("--full", default="defaults", choices=sorted(FULL_FLAGS),
                   help="the FULL row: the toy preset's defaults, or pool_text = SG2HOI+pool with text-initialised "
                        "classifiers (the paper's; needs real CLIP text embeddings)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--jobs", type=int, default=0, help="runs in parallel (0 = one per CPU core)")
    p.add_argument("--word_vectors", default="", help="GloVe .txt for the HSSG row (skipped without one)")
    p.add_argument("--budget", default=" ".join(STUDY_BUDGET),
                   help="train.py flags shared by every run (default: 5 SGG + 9 joint epochs of the toy model)")
    p.add_argument("--run_args", default="", help="more train.py flags for every run (e.g. --toy_root)")
    a = p.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in a.rows if r not in STUDY_ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows are {list(STUDY_ROWS)}")
    return a


def run_metrics(metrics):
    """metrics.json -> the seven numbers of the paper's ablation tables, in percent (None where not trained)."""
    s, h = metrics.get("sgg"), metrics.get("hico", {}).get("default")
    row = [100 * s[k] if s else None for k in ("R@50", "R@100", "mR@50", "mR@100")]
    return row + [100 * h[k] if h else None for k in ("mAP_full", "mAP_rare", "mAP_non_rare")]


def plan(a, rows, seeds):
    """The train.py commands still to run, [(row, seed, out, command)], and the rows skipped with the reason."""
    runs, skipped = [], {}
    for row in rows:
        flags = FULL_FLAGS[a.full] + STUDY_ROWS[row][0]
        if row == "HSSG":
            if not a.word_vectors:
                skipped[row] = "needs real word vectors (--word_vectors glove.6B.300d.txt); none can be made offline"
                continue
            flags = flags + ["--word_vectors", os.path.abspath(a.word_vectors)]
        for seed in seeds:
            out = os.path.join(a.out, row, f"seed{seed}")
            if os.path.exists(os.path.join(out, "metrics.json")):
                continue  # finished earlier
            if os.path.exists(os.path.join(out, "ckpt.pt")):  # interrupted: continue it
                cmd = ["--resume", os.path.join(out, "ckpt.pt")]
            else:
                cmd = flags + a.budget.split() + a.run_args.split() + ["--seed", str(seed), "--out", out]
            runs.append((row, seed, out, [sys.executable, os.path.join(HERE, "train.py")] + cmd))
    return runs, skipped


def run_all(runs, jobs, threads):
    """Every command, `jobs` at a time, each with its stdout in its folder; returns the folders of failed runs."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0, running, failed = time.time(), [], []
    while runs or running:
        while runs and len(running) < jobs:
            row, seed, out, cmd = runs.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.txt"), "a")
            running.append((row, seed, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for item in list(running):
            row, seed, out, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out}/stdout.txt)"
                if proc.returncode:
                    failed.append(out)
                print(f"study: {row} seed {seed} {status} [{(time.time() - t0) / 60:.1f} min]", flush=True)
    return failed


def tabulate(a, rows, seeds, skipped):
    """{row: seeds, mean, std, runs, paper} from the finished runs' metrics.json."""
    table = {}
    for row in rows:
        if row in skipped:
            table[row] = {"skipped": skipped[row], "paper": STUDY_ROWS[row][1]}
            continue
        per_seed = []
        for seed in seeds:
            path = os.path.join(a.out, row, f"seed{seed}", "metrics.json")
            if os.path.exists(path):
                with open(path) as f:
                    per_seed.append(run_metrics(json.load(f)))
        columns = list(zip(*per_seed)) if per_seed else [()] * len(STUDY_COLUMNS)
        mean = [statistics.fmean(c) if c and c[0] is not None else None for c in columns]
        std = [statistics.stdev(c) if len(c) > 1 and c[0] is not None else None for c in columns]
        table[row] = {"seeds": len(per_seed), "mean": mean, "std": std, "runs": per_seed, "paper": STUDY_ROWS[row][1]}
    return table


def markdown(table):
    """The paper's layout: one line per row, 'ours mean +- std (paper)' in each column."""
    def cell(mean, std, paper):
        ours = "-" if mean is None else f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")
        return f"{ours} ({'-' if paper is None else paper})"
    lines = ["| row | seeds | " + " | ".join(STUDY_COLUMNS) + " |", "|---|---|" + "---|" * len(STUDY_COLUMNS)]
    for row, r in table.items():
        if "skipped" in r:
            lines.append(f"| {row} | skipped: {r['skipped']} |" + " |" * len(STUDY_COLUMNS))
            continue
        cells = [cell(m, s, p) for m, s, p in zip(r["mean"], r["std"], r["paper"])]
        lines.append(f"| {row} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: toy mean ± std over seeds (the paper's number on VG / HICO-DET).\n"


def main(argv=None):
    """Train every (row, seed) not finished yet, then write study.json and study.md."""
    a = parse_args(argv)
    rows = a.rows
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    jobs = a.jobs or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
    runs, skipped = plan(a, rows, seeds)
    print(f"study: {len(runs)} run(s) to do, {jobs} at a time with {threads} thread(s) each; out {a.out}", flush=True)
    t0 = time.time()
    if runs:  # the toy scenes are generated once, before the parallel runs
        shared = train.parse_args(a.run_args.split())
        sg2hoi.build_data(sg2hoi.make_config("toy", **train.config_overrides(shared)), vars(shared))
    failed = run_all(runs, jobs, threads)
    table = tabulate(a, rows, seeds, skipped)
    with open(os.path.join(a.out, "study.json"), "w") as f:
        json.dump({"columns": STUDY_COLUMNS, "rows": table, "budget": a.budget, "run_args": a.run_args,
                   "minutes": (time.time() - t0) / 60}, f, indent=1)
    text = markdown(table)
    with open(os.path.join(a.out, "study.md"), "w") as f:
        f.write(text)
    print(text)
    if failed:
        raise SystemExit(f"study: {len(failed)} run(s) failed: {failed}")
    return table


if __name__ == "__main__":
    main()
