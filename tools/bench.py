"""tools/bench.py: speed at the paper's sizes, and a rehearsal of the paper run on this machine.

    python tools/bench.py metrics     # eval.py's metrics at the real test-set sizes (SGDet 26,446 images x 100
                                      # pairs; HICO-DET 9,658 x 100 pairs x 117 verbs, Default + Known-Object)
    python tools/bench.py model       # paper config (ResNet-50, 512 x 512, batch 1): model vs backbone (CPU)
    python tools/bench.py data        # the plain loaders on full-size synthetic annotations (tools/fullsize.py)
    python tools/bench.py rehearsal   # 2 gloo processes train the paper preset, SIGKILL, resume, evaluate
Each prints one JSON object.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: eval.py, sg2hoi.py, train.py
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402


# ------------------------------------------------------------------------------------------------ synthetic data


def synthetic_sgdet(num_images, num_pairs=100, num_predicates=50, num_classes=150, seed=0):
    """Random ground truth and predictions at VG150 SGDet scale: ~12 boxes and 6 relations per image, num_pairs
    ranked pairs, and predicted boxes that are near-copies of GT boxes, half of them with the GT label."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(num_images):
        n = rng.integers(2, 24)
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 300, (n, 2))], 1).astype(np.float32)
        labels = rng.integers(0, num_classes, n)
        rels = np.stack([rng.integers(0, n, 6), rng.integers(0, n, 6), rng.integers(1, num_predicates + 1, 6)], 1)
        gts.append(dict(boxes=boxes, labels=labels, rels=rels))
        m = 2 * num_pairs
        pboxes = (boxes[rng.integers(0, n, m)] + rng.normal(0, 5, (m, 4))).astype(np.float32)
        plabels = np.where(rng.random(m) < 0.5, labels[rng.integers(0, n, m)], rng.integers(0, num_classes, m))
        preds.append(dict(boxes=pboxes, labels=plabels, scores=rng.random(m).astype(np.float32),
                          rel_pairs=np.stack([np.arange(num_pairs), np.arange(num_pairs, m)], 1),
                          rel_scores=rng.dirichlet(np.ones(num_predicates + 1), num_pairs).astype(np.float32)))
    return gts, preds


def synthetic_hico(num_images, num_pairs=100, num_verbs=117, num_objects=80, seed=0):
    """Random HICO-DET-scale ground truth and QPIC-style predictions (num_pairs query pairs per image), a sparse
    verb-object mask (about 7 % of the pairs allowed, like corre_hico) and the rare triplets."""
    rng = np.random.default_rng(seed)
    correct_mat = (rng.random((num_verbs, num_objects)) < 0.07).astype(np.float32)
    correct_mat[:, 0] = 1
    valid = np.argwhere(correct_mat)  # (verb, object) pairs that are HOI classes
    gts, preds = [], []
    for _ in range(num_images):
        k = rng.integers(1, 5)
        classes = valid[rng.integers(0, len(valid), k)]
        xy = rng.uniform(0, 400, (2 * k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 200, (2 * k, 2))], 1).astype(np.float32)
        labels = np.concatenate([np.zeros(k, int), classes[:, 1]])
        hois = np.stack([np.arange(k), np.arange(k, 2 * k), classes[:, 0]], 1)
        gts.append(dict(boxes=boxes, labels=labels, hois=hois))
        pick = rng.integers(0, k, num_pairs)
        pred_boxes = np.concatenate([boxes[pick], boxes[k + pick]]) + rng.normal(0, 8, (2 * num_pairs, 4))
        preds.append(dict(boxes=pred_boxes.astype(np.float32),
                          labels=np.concatenate([np.zeros(num_pairs, int), labels[k + pick]]),
                          sub_ids=np.arange(num_pairs), obj_ids=np.arange(num_pairs, 2 * num_pairs),
                          verb_scores=rng.random((num_pairs, num_verbs)).astype(np.float32) ** 4))
    rare = valid[rng.random(len(valid)) < 0.23]
    return gts, preds, correct_mat, np.stack([np.zeros(len(rare), int), rare[:, 1], rare[:, 0]], 1)


# ------------------------------------------------------------------------------------------------ benchmarks


def _full_stable_sort_top(scores, k):
    """The straightforward top-k of the specification: a stable sort of every candidate, then the first k."""
    return np.argsort(-scores, kind="stable")[:k]


def benchmark_metrics(sgdet_images=26446, hico_images=9658):
    """Seconds for the full-size test sets: SGDet (graph constraint and not, zero-shot and long tail) and HICO-DET
    Default + Known-Object from the raw predictions, with the sparse synthetic verb-object mask and with a dense
    mask (every pair allowed: the worst case, e.g. a user's own dataset). eval.py's evaluators are per-image code
    written from the specification; the one shortcut they take (HICO's top 100 by sorting only the candidates
    that can be among them) is timed against the plain stable sort of all 11,700 candidates ("*_full_sort").
    The data generation is not timed."""
    out = {"sgdet_images": sgdet_images, "hico_images": hico_images,
           "note": "*_s: wall seconds; *_cpu_s: CPU seconds of this process (lower than wall on a shared machine)"}

    def timed(name, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out[f"{name}_s"] = round(time.perf_counter() - wall, 2)
        out[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)

    gts, preds = synthetic_sgdet(sgdet_images)
    zeroshot = np.array([[g["labels"][s], g["labels"][o], p] for g in gts[::50] for s, o, p in g["rels"].tolist()])
    longtail = {"head": [1, 2], "body": [3, 4], "tail": [5, 6]}
    timed("sgdet", lambda: evaluation.sgdet_metrics(gts, preds, 50, zeroshot_triplets=zeroshot, longtail=longtail))
    gts, preds, correct_mat, rare = synthetic_hico(hico_images)

    def both_settings(mask):
        evaluation.hico_map(gts, preds, mask, rare)
        evaluation.hico_map(gts, preds, mask, rare, known_object=True)
    for name, mask in (("sparse", correct_mat), ("dense", np.ones_like(correct_mat))):
        timed(f"hico_{name}_mask", lambda: both_settings(mask))
        shortcut, evaluation._stable_top = evaluation._stable_top, _full_stable_sort_top
        try:
            timed(f"hico_{name}_mask_full_sort", lambda: both_settings(mask))
        finally:
            evaluation._stable_top = shortcut
    return out


def benchmark_model(cfg, image_hw=(512, 512), warmup=2, n=5):
    """CPU seconds per image (batch 1) of the whole model's forward and of its backbone alone."""
    import torch
    import sg2hoi

    model = sg2hoi.build_model(cfg).eval()
    images, mask = torch.randn(1, 3, *image_hw), torch.zeros(1, *image_hw, dtype=torch.bool)

    def timed(fn):
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
        return (time.perf_counter() - t) / n

    t_backbone = timed(lambda: model.backbone(images))
    t_model = timed(lambda: model(images, mask))
    return {"model_s": t_model, "backbone_s": t_backbone, "ratio": t_model / t_backbone,
            "threads": torch.get_num_threads(), "image_hw": list(image_hw)}


def benchmark_rehearsal(root="/tmp/sg2hoi_fullsize", out="/tmp/sg2hoi_rehearsal", processes=2, subset=4, scale=1.0,
                        model_args=()):
    """A rehearsal of the paper run on this machine: `processes` gloo processes train the paper preset (ResNet-50,
    800 x 1333, 100 + 100 queries, VG150 and HICO-DET vocabularies) on the full-size synthetic annotations
    (tools/fullsize.py's write_fullsize_annotations; the loaders read and check all of them, training uses the first
    `subset` images of each training split): phase 1 and phase 2 steps, a checkpoint at every step, a SIGKILL of
    the whole run after the phase-1 checkpoint, a resume to the end, and an evaluation of 2 test images per task.
    Returns what train.py reported: start-up time, seconds per step, checkpoint size and write time, peak memory.
    The tests run it scaled down: annotations at `scale`, a small model (`model_args`, train.py flags)."""
    import re
    import signal
    import shutil
    import subprocess
    from fullsize import write_fullsize_annotations  # tools/fullsize.py, beside this file

    t = time.perf_counter()
    write_fullsize_annotations(root, scale=scale)
    report = {"annotations_s": round(time.perf_counter() - t, 1)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                os.path.join(ROOT, "train.py")]
    batch = processes  # one image per process
    common = ["--preset", "paper", "--vg", os.path.join(root, "vg"), "--hoi", os.path.join(root, "hico"),
              "--text_teacher", "objects", "--train_subset", str(subset), "--batch_size", str(batch),
              "--sgg_epochs", "1", "--joint_epochs", "1",
              "--eval_every", "0", "--eval_limit", "2", "--ckpt_every", "1", "--log_every", "1", "--workers", "1",
              *model_args]
    phase1 = subset // batch
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    if os.path.exists(out):
        shutil.rmtree(out)
    # 1. start, wait for the first phase-2 step's line, kill everything with SIGKILL
    t = time.perf_counter()
    proc = subprocess.Popen(torchrun + common + ["--out", out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first_lines = []
    for line in proc.stdout:
        first_lines.append(line)
        if re.match(rf"step {phase1 + 1}/", line):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    report["killed_after_s"] = round(time.perf_counter() - t, 1)
    # 2. resume to the end, with the final evaluation
    t = time.perf_counter()
    resumed = subprocess.run(torchrun + ["--resume", os.path.join(out, "ckpt.pt")], env=env, capture_output=True,
                             text=True)
    report["resume_run_s"] = round(time.perf_counter() - t, 1)
    text = "".join(first_lines) + resumed.stdout
    if resumed.returncode:
        raise RuntimeError(f"rehearsal: the resumed run failed:\n{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [x for x in log if "event" not in x]
    times = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] == a["step"] + 1]
    report.update(
        steps=[x["step"] for x in steps], phases=[x["phase"] for x in steps],
        seconds_per_step=round(float(np.median(times)), 1) if times else None,
        first_step_after_s=[float(m) for m in re.findall(r"first step done ([\d.]+) s", text)],
        checkpoint=re.findall(r"last checkpoint (\d+ MiB written in [\d.]+ s)", text),
        peak_memory_mib=[int(m) for m in re.findall(r"peak resident memory (\d+) MiB", text)],
        metrics_written=os.path.exists(os.path.join(out, "metrics.json")), out=out)
    return report


# ------------------------------------------------------------------------------------------------ command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed at the paper's sizes (metrics, model, data) and the paper-run "
                                            "rehearsal; each prints one JSON object.")
    p.add_argument("kind", choices=["metrics", "model", "data", "rehearsal"],
                   help="metrics: eval.py at the real test-set sizes; model: paper config forward vs backbone (CPU); "
                        "data: the loaders on full-size synthetic annotations; rehearsal: the paper run, scaled to "
                        "this machine, killed and resumed")
    p.add_argument("--root", default="/tmp/sg2hoi_fullsize", help="data, rehearsal: the full-size annotations")
    p.add_argument("--out", default="/tmp/sg2hoi_rehearsal", help="rehearsal: the run's folder")
    args = p.parse_args(argv)
    if args.kind == "metrics":
        result = benchmark_metrics()
    elif args.kind == "model":
        import sg2hoi
        result = benchmark_model(sg2hoi.make_config("paper"))
    elif args.kind == "data":
        from fullsize import benchmark_data  # tools/fullsize.py, beside this file
        result = benchmark_data(args.root)
    else:
        result = benchmark_rehearsal(args.root, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
