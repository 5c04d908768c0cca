"""train.py: train SG2HOI+ with the paper's two-phase, two-task schedule (Sec. III-D, IV-D).

    python train.py                                              # toy scenes on a CPU, trains and evaluates
    torchrun --standalone --nproc_per_node=8 train.py --preset paper --vg data/vg --hoi data/hico
    python train.py --resume runs/toy/ckpt.pt                    # continue exactly where a run stopped

Any Config field is a flag: --d_model 128, --use_bbseg false, --classifier_init text, ...

The schedule: phase 1 trains the SGG part alone on the scene-graph data (sgg_epochs); phase 2 trains SGG and HOI
jointly (joint_epochs over the HOI data) with batches that alternate SGG, HOI, SGG, ... (the two datasets never
share an image) and the SGG part at a 10x lower learning rate. AdamW, weight decay 1e-4, lr 1e-4, backbone 1e-5,
gradient clipping 0.1, lr x 0.1 after 2/3 of each phase (as DETR / QPIC).

Idle heads and DDP. In an SGG step the HOI heads get no loss, in an HOI step the relation box/class heads get none.
DDP (without find_unused_parameters) requires every parameter to take part in every backward, so the loss gets a
zero-weighted sum of every model output: all parameters are reached, their gradients for the idle task are exactly
zero and DDP reduces them as usual. After the reduction the idle task's parameters get .grad = None, so AdamW skips
them: neither its momentum nor its weight decay moves a head on the other task's steps. Phase 1 does not run the HOI
branch at all: its parameters are frozen and the model is wrapped in DDP again when phase 2 starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sg2hoi


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy", choices=sorted(sg2hoi.PRESETS))
    p.add_argument("--out", default="runs/toy", help="folder for ckpt.pt, log.jsonl, metrics.json")
    p.add_argument("--resume", default="", help="checkpoint to continue from (config, data and schedule included)")
    p.add_argument("--init_detr", default="", help="DETR COCO checkpoint (.pth) to initialise from (Sec. IV-D)")
    p.add_argument("--toy_root", default="data/toy", help="where the toy scenes are generated / cached")
    p.add_argument("--toy_train", type=int, default=3000, help="toy training images per task")
    p.add_argument("--toy_test", type=int, default=500, help="toy test images per task")
    p.add_argument("--vg", default="", help="VG150 root (RelTR JSON layout, or the SGB .h5 with --vg_format h5)")
    p.add_argument("--vg_format", default="json", choices=["json", "h5"])
    p.add_argument("--hoi", default="", help="HICO-DET or V-COCO root (QPIC layout)")
    p.add_argument("--hoi_dataset", default="hico", choices=["hico", "vcoco"])
    p.add_argument("--text_teacher", default="objects", choices=["objects", "none"],
                   help="Eq. 5 teacher without CLIP: mean text embedding of the image's objects (toy), or none")
    p.add_argument("--clip_cache", default="", help=".pt {image file: CLIP image embedding} for Eq. 5 (real data)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--ckpt_every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = the full schedule)")
    p.add_argument("--nonfinite", default="stop", choices=["stop", "skip"],
                   help="a non-finite loss stops the run (naming step and term) or skips the step (counted)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="bf16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--no_eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--eval_limit", type=int, default=0, help="evaluate on the first N test images only (0 = all)")
    for f in dataclasses.fields(sg2hoi.Config):  # every Config field is a flag
        if f.type in ("int", "float", "str", "bool", int, float, str, bool):
            kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=kind if kind is not bool else _bool, default=None)
    return p.parse_args(argv)


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_overrides(args):
    names = {f.name for f in dataclasses.fields(sg2hoi.Config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# ------------------------------------------------------------------------------------------------ data


def build_data(args, cfg):
    """(the datasets of cfg's tasks, see sg2hoi.build_data); toy scenes unless --vg / --hoi are given."""
    return sg2hoi.build_data(cfg, vars(args), is_master=is_master(), barrier=barrier)


class SeededDataset(torch.utils.data.Dataset):
    """Item i of epoch e always gets the same random augmentation, whatever the worker or a resume."""

    def __init__(self, ds, seed):
        self.ds, self.seed, self.epoch = ds, seed, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            return self.ds[i]


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch at a given batch (to resume mid-epoch)."""

    def __init__(self, *a, batch_size=1, **kw):
        super().__init__(*a, **kw)
        self.batch_size, self.start_batch = batch_size, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_batch * self.batch_size:])

    def __len__(self):
        return max(super().__len__() - self.start_batch * self.batch_size, 0)


class TaskStream:
    """An endless stream of batches of one task; knows its epoch and position for checkpoints."""

    def __init__(self, dataset, batch_size, workers, seed):
        self.dataset = SeededDataset(dataset, seed)
        self.sampler = ResumableSampler(self.dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                                        seed=seed, drop_last=True, batch_size=batch_size)
        self.batch_size, self.workers = batch_size, workers
        self.epoch, self.batch_in_epoch, self.iterator = 0, 0, None
        self.batches_per_epoch = len(self.sampler) // batch_size

    def state(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state(self, s):
        self.epoch, self.batch_in_epoch, self.iterator = s["epoch"], s["batch_in_epoch"], None

    def next(self):
        if self.iterator is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start_batch = self.batch_in_epoch
            self.dataset.epoch = self.epoch
            self.iterator = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
                collate_fn=sg2hoi.collate, drop_last=True))
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.batch_in_epoch, self.iterator = self.epoch + 1, 0, None
            return self.next()
        self.batch_in_epoch += 1
        return batch


# ------------------------------------------------------------------------------------------------ distributed


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_master():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: NCCL on CUDA GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path, model, optimizer, state, cfg, args):
    """Atomic: write a temporary file in the same folder, flush it to disk, then rename over the old one."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
            "config": dataclasses.asdict(cfg), "args": dict(vars(args)),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ optimisation


def make_optimizer(model, cfg):
    groups = model.parameter_groups()
    lrs = {"backbone": cfg.lr_backbone, "text_classifier": cfg.lr_text_classifier, "sgg": cfg.lr, "hoi": cfg.lr}
    return torch.optim.AdamW([{"params": groups[g], "lr": lrs[g], "name": g, "base_lr": lrs[g]}
                              for g in groups if groups[g]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_learning_rates(optimizer, cfg, phase, progress):
    """Phase 2 lowers the SGG part to lr_sgg_phase2; lr x 0.1 after cfg.lr_drop of each phase."""
    factor = 0.1 if progress >= cfg.lr_drop else 1.0
    for g in optimizer.param_groups:
        base = cfg.lr_sgg_phase2 if (phase == 2 and g["name"] == "sgg") else g["base_lr"]
        g["lr"] = base * factor


def zero_touch(outputs):
    """0 x every output: lets DDP see every parameter in every backward (see the module docstring)."""
    total = 0.0
    for v in outputs.values():
        for t in (v.values() if isinstance(v, dict) else [v]):
            if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad:
                total = total + t.sum() * 0.0
    return total


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    device = setup_distributed()
    torch.manual_seed(args.seed + rank())
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume:  # the checkpoint's config and data arguments win; schedule flags on this command line still apply
        cfg = sg2hoi.Config(**resume["config"])
        for k in ("toy_root", "toy_train", "toy_test", "vg", "vg_format", "hoi", "hoi_dataset", "text_teacher",
                  "clip_cache", "seed"):
            setattr(args, k, resume["args"][k])
    else:
        cfg = sg2hoi.make_config(args.preset, **config_overrides(args))
    os.makedirs(args.out, exist_ok=True)

    data = build_data(args, cfg)
    if not resume:
        cfg = sg2hoi.config_from_meta(cfg, data.get("sgg", {}).get("train", (None, None))[1],
                                      data.get("hoi", {}).get("train", (None, None))[1])
    model = sg2hoi.build_model(cfg)
    if args.init_detr and not resume:
        sg2hoi.load_detr_weights(model, args.init_detr, verbose=is_master())
    model.to(device)
    criterion = sg2hoi.build_criterion(model).to(device)
    optimizer = make_optimizer(model, cfg)

    # the teacher of Eq. 5 per task: CLIP image embeddings {file: vector}, or the class text embeddings (toy)
    teachers = dict.fromkeys(data)
    if args.clip_cache:
        teachers = dict.fromkeys(data, torch.load(args.clip_cache, weights_only=True))
    elif args.text_teacher == "objects" and cfg.use_vl_distill:
        teachers = {task: sg2hoi.class_text_embeddings(
            cfg.entity_names if task == "sgg" else cfg.hoi_object_names, cfg.text_dim, cfg.text_embeddings)
            for task in data}
    train_tf = sg2hoi.make_transforms(True, cfg.image_size, cfg.max_size, multi_scale=cfg.image_size > 480)
    streams = {task: TaskStream(sg2hoi.DetectionDataset(*data[task]["train"], train_tf, teachers[task]),
                                cfg.batch_size, args.workers, args.seed + (0 if task == "sgg" else 1))
               for task in data}

    # the schedule: phase 1 = SGG alone, phase 2 = SGG and HOI alternating (one HOI epoch = one phase-2 epoch)
    has_sgg, has_hoi = "sgg" in streams, "hoi" in streams
    phase1_steps = cfg.sgg_epochs * streams["sgg"].batches_per_epoch if has_sgg and has_hoi else 0
    if has_sgg and not has_hoi:  # SGG-only training (Table V "SGG")
        phase1_steps = (cfg.sgg_epochs + cfg.joint_epochs) * streams["sgg"].batches_per_epoch
    phase2_steps = cfg.joint_epochs * streams["hoi"].batches_per_epoch * (2 if has_sgg else 1) if has_hoi else 0
    total_steps = phase1_steps + phase2_steps
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    state = {"step": 0, "skipped_nonfinite": 0, "streams": {}}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state = resume["state"]
        for task, s in state["streams"].items():
            streams[task].load_state(s)
        torch.set_rng_state(resume["rng"]["torch"])
        if torch.cuda.is_available() and resume["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        if is_master():
            print(f"resumed from {args.resume} at step {state['step']}")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if is_master() else None
    last_terms = {}  # task -> its latest losses, for the progress line
    if is_master():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"SG2HOI+ {n_params / 1e6:.1f} M parameters | tasks {sorted(streams)} | {world_size()} process(es) "
              f"on {device} | phase 1: {phase1_steps} steps, phase 2: {phase2_steps} steps")

    use_amp = device.type == "cuda" and args.amp == "bf16"
    ddp_model, ddp_phase = None, None
    t_start, images_seen = time.time(), 0
    step = state["step"]
    while step < total_steps:
        phase = 1 if step < phase1_steps else 2
        if ddp_phase != phase:  # phase 1 freezes the HOI branch; wrap again so DDP sees the trainable set
            hoi_params = set(map(id, model.idle_parameters("sgg")))
            for p in model.parameters():
                if id(p) in hoi_params:
                    p.requires_grad_(phase == 2 or not has_sgg)
            ddp_model = DDP(model) if dist.is_initialized() else model
            if args.compile:
                ddp_model = torch.compile(ddp_model)
            ddp_phase = phase
        # alternation: phase 2 takes SGG on even steps and HOI on odd steps (HOI only if there is no SGG data)
        task = "sgg" if (phase == 1 or (has_sgg and (step - phase1_steps) % 2 == 0)) else "hoi"
        progress = step / max(phase1_steps, 1) if phase == 1 else (step - phase1_steps) / max(phase2_steps, 1)
        set_learning_rates(optimizer, cfg, phase, progress)

        images, mask, targets = streams[task].next()
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = ddp_model(images, mask, with_hoi=(phase == 2 or not has_sgg))
        losses = criterion(outputs, targets, task)
        loss = losses["loss"] + zero_touch(outputs)

        # a non-finite loss: stop and say where, or skip the step and count it (every rank agrees)
        finite = torch.tensor(float(torch.isfinite(losses["loss"])), device=device)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            if args.nonfinite == "stop":
                raise FloatingPointError(f"step {step} ({task} batch, images {[t['image_id'] for t in targets]}): "
                                         f"non-finite loss in term(s) {bad}; stopping (use --nonfinite skip to "
                                         f"skip such steps)")
            state["skipped_nonfinite"] += 1
            if is_master():
                print(f"step {step}: non-finite loss in {bad}, step skipped")
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in model.idle_parameters(task, losses):  # after DDP's reduction: AdamW must not touch the idle heads
                p.grad = None
            if cfg.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                               cfg.clip_max_norm)
            optimizer.step()
        step += 1
        images_seen += len(images) * world_size()
        state["step"] = step
        state["streams"] = {t: s.state() for t, s in streams.items()}

        if is_master():
            terms = {k: v.item() for k, v in losses.items() if not k[-1].isdigit()}  # last layer's terms
            last_terms[task] = " ".join(f"{k} {v:.3f}" for k, v in terms.items())  # the line shows both tasks
            record = {"step": step, "phase": phase, "task": task, "epoch": streams[task].epoch,
                      "lr": optimizer.param_groups[0]["lr"], "time": round(time.time() - t_start, 3),
                      **{k: round(v, 6) for k, v in terms.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % args.log_every == 0 or step == total_steps:
                elapsed = time.time() - t_start
                rate = images_seen / max(elapsed, 1e-9)
                eta = (total_steps - step) * elapsed / max(step - resume_step(resume), 1)
                line = " | ".join(f"{t}: {last_terms[t]}" for t in ("sgg", "hoi") if t in last_terms)
                print(f"step {step}/{total_steps} phase {phase} | {line} | {rate:.1f} img/s | "
                      f"ETA {eta / 60:.1f} min", flush=True)
        if step % args.ckpt_every == 0 or step == total_steps:
            if is_master():
                save_checkpoint(ckpt_path, model, optimizer, state, cfg, args)
            barrier()

    if is_master():
        print(f"training done: {step} steps in {(time.time() - t_start) / 60:.1f} min; "
              f"non-finite steps skipped: {state['skipped_nonfinite']}")
    if is_master() and not args.no_eval:
        import eval as evaluation

        metrics = evaluation.evaluate(model, cfg, data, device,
                                      limit=args.eval_limit)
        print(evaluation.format_tables(metrics))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if log:
        log.close()
    # free the model and optimiser before tearing the process group down: gloo otherwise sometimes aborts at exit
    # ("terminate called without an active exception")
    del ddp_model, model, optimizer, criterion, streams
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def resume_step(resume):
    return resume["state"]["step"] if resume else 0


if __name__ == "__main__":
    main()
