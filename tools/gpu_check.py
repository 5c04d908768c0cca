"""One-shot GPU check: everything that only runs on CUDA, in one command, one report file.

    python tools/gpu_check.py --out runs/gpu_check          # on one GPU, about 8 minutes
    python tools/gpu_check.py --dry --out /tmp/gpu_dry      # the same steps at toy sizes on the CPU (the tests run it)

What it runs, in order, and writes to <out>/report.md (tables, then the raw figures as JSON):
  1. the main command (the toy preset) under torchrun with one process (NCCL on CUDA): stopped after half of its
     steps, then resumed from its checkpoint to the end (a resume on CUDA, its RNG states included); the final
     metrics, images per second and wall time;
  2. --deterministic twice for a few steps: the two logs must hold the same losses;
  3. the paper preset's training step at 800 x 1333 (random weights, random targets) for ResNet-50 and -101,
     batch 1 and 4, bf16 autocast against float32: seconds per step and peak GPU memory;
  4. the same step with torch.compile on and off (ResNet-50, batch 4, bf16): compile time and seconds per step;
  5. inference ms / image of the paper preset (batch 1; the paper reports 0.28 s per image on a V100).
Everything comes from the repository (toy scenes, random weights): no download.
--dry runs every step on the CPU at toy sizes (gloo instead of NCCL, a shortened schedule, the paper preset with the
toy preset's widths at 64 px, float32 only, no compile), so that the suite keeps the script working where no GPU is
lent.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import eval as evaluation  # noqa: E402
import sg2hoi  # noqa: E402
import train  # noqa: E402

# --dry: a toy schedule of a few steps (48 training images, batch 8, 1 + 1 epochs = 12 steps), 8 test images
DRY_TOY = ["--toy_train", "48", "--toy_train_hoi", "48", "--toy_test", "8", "--batch_size", "8", "--sgg_epochs", "1",
           "--joint_epochs", "1", "--workers", "0", "--log_every", "1", "--num_rel_queries", "8",
           "--num_hoi_queries", "8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="folder for report.md and the runs")
    p.add_argument("--dry", action="store_true", help="every step on the CPU at toy sizes (no GPU needed)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per benchmark row (after 3 warm-up)")
    p.add_argument("--deterministic_steps", type=int, default=30, help="steps of each --deterministic run")
    return p.parse_args(argv)


def torchrun(args, out, env_threads=None):
    """train.py under torchrun with one process; returns (seconds, CompletedProcess)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(HERE, "train.py"), "--out", out] + args
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(env_threads)} if env_threads else {}))
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r


def step_lines(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if '"event"' not in line]


def check_main_and_resume(out, dry):
    """1. The main command, interrupted at half of its steps and resumed: metrics, images / s, wall time."""
    toy = ["--preset", "toy", "--toy_root", os.path.join(out, "toy")] + (DRY_TOY if dry else [])
    run = os.path.join(out, "main")
    # stop in phase 2 (the toy preset's 2,984 steps: phase 1 ends at 1,496), where both tasks' streams resume;
    # the first part evaluates too: --no_eval would travel with the checkpoint into the resumed run
    first_s, _ = torchrun(toy + ["--max_steps", "9" if dry else "2000"], run, 1 if dry else None)
    resumed_at = step_lines(run)[-1]["step"]
    second_s, _ = torchrun(["--resume", os.path.join(run, "ckpt.pt")], run, 1 if dry else None)
    lines = step_lines(run)
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    steps, batch = lines[-1]["step"], 8 if dry else sg2hoi.make_config("toy").batch_size
    train_s = sum(b["time"] - a["time"] for a, b in zip(lines, lines[1:]) if b["step"] == a["step"] + 1)
    return {"command": f"torchrun --standalone --nproc_per_node=1 train.py {' '.join(toy)}",
            "wall_s": round(first_s + second_s, 1), "steps": steps, "resumed_at_step": resumed_at,
            "images_per_s": round(steps * batch / max(train_s, 1e-9), 1),
            **{label: round(value, 1) for label, value in evaluation.headline(metrics).items()}}


def check_deterministic(out, dry, steps):
    """2. Two --deterministic runs of the same config: the same losses, step for step."""
    toy = ["--preset", "toy", "--toy_root", os.path.join(out, "toy"), "--no_eval", "--deterministic",
           "--max_steps", str(steps)] + (DRY_TOY if dry else [])
    logs = []
    for k in (1, 2):
        torchrun(toy, os.path.join(out, f"deterministic{k}"), 1 if dry else None)
        logs.append([{k: v for k, v in line.items() if k != "time"} for line in step_lines(
            os.path.join(out, f"deterministic{k}"))])
    return {"steps": steps, "identical_losses": logs[0] == logs[1]}


def synthetic_hoi_batch(batch, hw, cfg, device):
    """Random images and HOI targets (3 boxes, 2 HOIs per image) in the pixels of an hw canvas."""
    g = torch.Generator().manual_seed(0)
    H, W = hw
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=g)) * torch.tensor([W, H])
        boxes = torch.cat([xy, xy + wh], 1)
        targets.append(dict(boxes=boxes, labels=torch.tensor([0, 3, 5]) % cfg.num_hoi_objects,
                            hois=torch.tensor([[0, 1, 2], [0, 2, 5]]) % torch.tensor([3, 3, cfg.num_verbs]),
                            size=torch.tensor([H, W])))
    images = torch.randn(batch, 3, H, W, generator=g).to(device)
    return images, torch.zeros(batch, H, W, dtype=torch.bool, device=device), targets


def time_training_steps(cfg, batch, hw, device, bf16, steps, compile_model=False):
    """Seconds per HOI training step (forward through Eq. 1-8, Eq. 10, backward, AdamW) and peak memory."""
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg).to(device).train()
    criterion = sg2hoi.build_criterion(model).to(device)
    optimizer = train.make_optimizer(model, cfg)
    forward = torch.compile(model) if compile_model else model
    images, mask, targets = synthetic_hoi_batch(batch, hw, cfg, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(3 + steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and cuda):
            out = forward(images, mask, with_hoi=True)
        loss = criterion(out, targets, "hoi")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    result = {"s_per_step": round(sorted(times[3:])[len(times[3:]) // 2], 4), "first_step_s": round(times[0], 2)}
    if cuda:
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def time_inference(cfg, hw, device, bf16, n):
    """ms per image at batch 1: the model's forward and the relation / HOI triplets (Table I's time)."""
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg).to(device).eval()
    images, mask, _ = synthetic_hoi_batch(1, hw, cfg, device)
    times = []
    for i in range(3 + n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = evaluation._forward(model, images, mask, device, amp=bf16)
        sg2hoi.relation_predictions(out["rel"], [list(hw)])
        sg2hoi.hoi_predictions(out["hoi"], [list(hw)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return round(1000 * sorted(times[3:])[len(times[3:]) // 2], 1)


def paper_config(backbone, dry):
    """The paper preset with this backbone; --dry: the toy preset's widths, depths and backbone (the same code)."""
    if not dry:
        return sg2hoi.make_config("paper", backbone=backbone)
    widths = ("backbone", "d_model", "nheads", "dim_feedforward", "enc_layers", "rel_dec_layers", "r2i_layers",
              "feat_trans_layers", "query_trans_layers", "hoi_dec_layers", "num_rel_queries", "num_hoi_queries",
              "seg_hidden", "text_dim")
    return sg2hoi.make_config("paper", **{k: sg2hoi.PRESETS["toy"][k] for k in widths})


def benchmark(dry, steps):
    """3-5. The paper preset's training step (bf16 / float32), torch.compile, and inference."""
    device = torch.device("cpu" if dry else "cuda")
    hw = (64, 64) if dry else (800, 1333)
    backbones = ["tiny"] if dry else ["resnet50", "resnet101"]
    batches = [1] if dry else [1, 4]
    precisions = [False] if dry else [True, False]
    steps = 1 if dry else steps
    rows = []
    for backbone in backbones:
        cfg = paper_config(backbone, dry)
        for batch in batches:
            for bf16 in precisions:
                row = dict(backbone=backbone, batch=batch, precision="bf16" if bf16 else "float32")
                rows.append({**row, **time_training_steps(cfg, batch, hw, device, bf16, steps)})
                print(json.dumps(rows[-1]), flush=True)
    compiled = []
    if not dry:  # torch.compile on the CPU needs minutes for this model: the dry run leaves it out
        cfg = sg2hoi.make_config("paper", backbone="resnet50")
        for on in (False, True):
            compiled.append({"compile": on, **time_training_steps(cfg, 4, hw, device, True, steps, on)})
            print(json.dumps(compiled[-1]), flush=True)
    inference = []
    for backbone in backbones:
        cfg = paper_config(backbone, dry)
        for bf16 in precisions:
            inference.append({"backbone": backbone, "precision": "bf16" if bf16 else "float32",
                              "ms_per_image": time_inference(cfg, hw, device, bf16, 2 if dry else 20)})
    return {"image_hw": list(hw), "training": rows, "compile": compiled, "inference": inference}


def markdown(report):
    m = report["main"]
    lines = [f"# GPU check ({report['device']}, torch {report['torch']}, {report['date']})", "",
             f"Command: `python tools/gpu_check.py{' --dry' if report['dry'] else ''}`; total {report['wall_s']} s.",
             "", "## 1. Main command, stopped and resumed", "", f"`{m['command']}`", "",
             "| steps | resumed at | images / s | wall s | SGDet R@50 | HICO mAP Full |", "|---|---|---|---|---|---|",
             f"| {m['steps']} | {m['resumed_at_step']} | {m['images_per_s']} | {m['wall_s']} | "
             f"{m.get('SGDet R@50', '-')} | {m.get('HICO mAP Full', '-')} |", "", "## 2. --deterministic",
             "", f"{report['deterministic']['steps']} steps twice: identical losses: "
             f"{report['deterministic']['identical_losses']}", "",
             f"## 3. Training step of the paper preset at {report['bench']['image_hw']} (HOI batch, AdamW)", "",
             "| backbone | batch | precision | s / step | first step s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in report["bench"]["training"]:
        lines.append(f"| {r['backbone']} | {r['batch']} | {r['precision']} | {r['s_per_step']} | "
                     f"{r['first_step_s']} | {r.get('peak_memory_GiB', '-')} |")
    lines += ["", "## 4. torch.compile (ResNet-50, batch 4, bf16)", "", "| compile | s / step | first step s |",
              "|---|---|---|"]
    lines += [f"| {r['compile']} | {r['s_per_step']} | {r['first_step_s']} |" for r in report["bench"]["compile"]]
    lines += ["", "## 5. Inference, batch 1 (the paper: 0.28 s / image on a V100)", "",
              "| backbone | precision | ms / image |", "|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['precision']} | {r['ms_per_image']} |" for r in report["bench"]["inference"]]
    lines += ["", "## Raw figures", "", "```json", json.dumps(report, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; --dry runs the same steps on the CPU at toy sizes")
    os.makedirs(args.out, exist_ok=True)
    t = time.perf_counter()
    device = "CPU (dry run)" if args.dry else torch.cuda.get_device_name(0)
    report = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dry": args.dry}
    report["main"] = check_main_and_resume(args.out, args.dry)
    report["deterministic"] = check_deterministic(args.out, args.dry, 2 if args.dry else args.deterministic_steps)
    report["bench"] = benchmark(args.dry, args.steps)
    report["wall_s"] = round(time.perf_counter() - t, 1)
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write(markdown(report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
