"""train.py: train SG2HOI+ with the paper's two-phase, two-task schedule (Sec. III-D, IV-D).

    python train.py                                              # toy scenes on a CPU, trains and evaluates
    torchrun --standalone --nproc_per_node=8 train.py --preset paper --vg data/vg --hoi data/hico
    python train.py --resume runs/toy/ckpt.pt                    # continue exactly where a run stopped

Any Config field is a flag: --d_model 128, --use_bbseg false, --classifier_init text, ...

`main` is five named steps, each a function below:
  1. setup        processes (torchrun: NCCL on GPUs, gloo on CPUs), seeds, the config (or the resumed checkpoint's)
  2. load_data    the datasets of the config's tasks and one endless batch stream per task
  3. build        model, criterion, optimiser; DETR initialisation; the resumed state
  4. train        the schedule loop: one optimiser step = `train_step`, checkpoints, evaluation during training
  5. final_evaluation   on every rank, metrics computed by rank 0, written to metrics.json

The schedule: phase 1 trains the SGG part alone on the scene-graph data (sgg_epochs); phase 2 trains SGG and HOI
jointly (joint_epochs over the HOI data) with batches that alternate SGG, HOI, SGG, ... (the two datasets never
share an image) and the SGG part at a 10x lower learning rate. With --hoi_on_frozen_sgg true (Table V "HOI") phase 2
trains the HOI part alone on HOI batches with the SGG part frozen. AdamW, weight decay 1e-4, lr 1e-4, backbone 1e-5,
gradient clipping 0.1, lr x 0.1 after 2/3 of each phase (as DETR / QPIC). Not in the paper: --ema_decay d > 0 keeps an
exponential moving average of the weights (make_ema), which evaluation, best.pt and eval.py then use.

The same experiment on 1 or N processes. `batch_size` is the GLOBAL batch (images per optimiser step). Each of the
W processes takes batch_size / W images per step, split into micro-batches of at most --micro_batch images whose
gradients are accumulated (DDP synchronises only the last one). DistributedSampler hands out a seeded permutation so
that step k always consumes the images at positions [k B, (k + 1) B) of it, whatever W; every image's augmentation
is seeded by (seed, epoch, image index); every loss term is normalised by the counts of the whole global batch
(sg2hoi.batch_counts); the toy backbone normalises with GroupNorm, independent of the batch. What still differs
between process counts is the order of float additions.

Idle heads and DDP. An SGG step does not run the HOI branch (Sec. III-C) at all, and in an HOI step the relation
box/class heads get no loss. DDP (without find_unused_parameters) requires every parameter to take part in every
backward, so under DDP the loss gets a zero-weighted sum of the trainable parameters it does not reach
(`zero_touch`): all parameters are reached, their gradients for the idle task are exactly zero and DDP reduces them
as usual. After the reduction the idle task's parameters get .grad = None, so AdamW skips them: neither its momentum
nor its weight decay moves a head on the other task's steps. In phase 1 the HOI part is frozen, and the model is
wrapped in DDP again when phase 2 starts.
"""
from __future__ import annotations

import time

T_START = time.time()  # before torch is imported: the start-up time reported includes the imports

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import resource
import shutil
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as evaluation
import sg2hoi

# ------------------------------------------------------------------------------------------------ command line

# Flags that only say how to run, not what is computed: they may differ on --resume. Everything else (the preset,
# every Config field, the data, the seed, the initialisation) defines the experiment and is taken from the checkpoint.
RUNTIME_FLAGS = {"out", "resume", "workers", "pin_memory", "prefetch", "log_every", "ckpt_every", "max_steps",
                 "nonfinite", "max_skips", "amp", "compile", "deterministic", "no_eval", "eval_limit", "eval_every",
                 "best_metric", "micro_batch", "dist_timeout", "bad_images", "check_images_only"}
PATH_FLAGS = ("toy_root", "vg", "hoi", "clip_cache", "init_detr")  # stored as absolute paths in checkpoints


def make_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)

    def add(*a, **kw):
        if suppress_defaults:
            kw.pop("default", None)
        p.add_argument(*a, **kw)

    add("--preset", default="toy", choices=sorted(sg2hoi.PRESETS))
    add("--out", default=None, help="folder for ckpt.pt, best.pt, log.jsonl, metrics.json (default: runs/<preset>; "
                                    "with --resume: the checkpoint's folder)")
    add("--resume", default="", help="checkpoint to continue from (its config, data and schedule)")
    add("--init_detr", default="", help="DETR COCO checkpoint (.pth) to initialise from (Sec. IV-D)")
    add("--toy_root", default="data/toy", help="where the toy scenes are generated / cached")
    add("--toy_train", type=int, default=3000, help="toy scene-graph (VG) training images")
    add("--toy_train_hoi", type=int, default=1000, help="toy HOI training images (HICO-DET and V-COCO each)")
    add("--toy_test", type=int, default=500, help="toy test images per task")
    add("--vg", default="", help="VG150 root (RelTR JSON layout, or the SGB .h5 with --vg_format h5)")
    add("--vg_format", default="json", choices=["json", "h5"])
    add("--hoi", default="", help="HICO-DET or V-COCO root (QPIC layout)")
    add("--hoi_dataset", default="hico", choices=["hico", "vcoco"])
    add("--text_teacher", default="auto", choices=["auto", "objects", "none"],
        help="Eq. 5 teacher without --clip_cache: objects = the mean text embedding of the image's objects, none = "
             "no teacher; auto = objects on the toy scenes, and on real data a refusal (not the paper's experiment)")
    add("--clip_cache", default="", help=".pt {image file name: CLIP image embedding} for Eq. 5 (real data)")
    add("--train_subset", type=int, default=0,
        help="train on the first N images of each training split only (0 = all; for rehearsals at full size)")
    add("--num_val_im", type=int, default=5000,
        help="--vg_format h5: the first N training images of the .h5 form the validation split (SGB)")
    add("--seed", type=int, default=0)
    # how to run (may change on --resume)
    add("--micro_batch", type=int, default=0,
        help="at most this many images per process per forward; the rest of the global batch is accumulated "
             "(0 = batch_size / processes, no accumulation)")
    add("--workers", type=int, default=-1, help="loader workers per process (-1 = from the CPU count)")
    add("--pin_memory", default="auto", choices=["auto", "true", "false"], help="auto = on CUDA")
    add("--prefetch", type=int, default=4, help="batches each loader worker prepares ahead")
    add("--log_every", type=int, default=50)
    add("--ckpt_every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    add("--max_steps", type=int, default=0, help="stop after this many steps (0 = the full schedule)")
    add("--nonfinite", default="stop", choices=["stop", "skip"],
        help="non-finite model outputs or loss: stop naming the step and term, or skip the step (counted)")
    add("--max_skips", type=int, default=20, help="--nonfinite skip: stop after this many consecutive skipped steps")
    add("--amp", default="bf16", choices=["bf16", "none"], help="bf16 autocast (CUDA only)")
    add("--compile", action="store_true", default=False, help="torch.compile the model")
    add("--deterministic", action="store_true", default=False, help="torch.use_deterministic_algorithms(True)")
    add("--no_eval", action="store_true", default=False, help="skip the final evaluation")
    add("--eval_limit", type=int, default=0, help="evaluate on the first N test images only (0 = all)")
    add("--eval_every", type=int, default=-1,
        help="evaluate every N epochs of the current phase, logging to log.jsonl and keeping best.pt "
             "(0 = only at the end; -1 = the preset's default: toy 0, paper 1)")
    add("--best_metric", default="auto",
        help="metric that selects best.pt, e.g. sgg.R@50 or hico.default.mAP_full (auto: SGDet R@50 in phase 1, "
             "the HOI mAP in phase 2)")
    add("--dist_timeout", type=float, default=60.0,
        help="minutes a process waits in a collective before the run fails (torch's own default is 10)")
    add("--bad_images", default="stop", choices=["stop", "skip"],
        help="an image that cannot be decoded stops the run naming file and record, or is dropped from its batch "
             "with a warning and a count")
    add("--check_images_only", action="store_true", default=False,
        help="decode every train and test image once, list the bad ones, exit (1 if any is bad)")
    for f in dataclasses.fields(sg2hoi.Config):  # every Config field is a flag
        if f.type in ("int", "float", "str", "bool", int, float, str, bool):
            kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS if suppress_defaults else None)
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.explicit = set(vars(make_parser(suppress_defaults=True).parse_args(argv)))  # flags given on the line
    for name, low in (("log_every", 1), ("ckpt_every", 1), ("max_steps", 0), ("micro_batch", 0), ("prefetch", 1),
                      ("max_skips", 1), ("eval_limit", 0), ("eval_every", -1), ("toy_train", 1), ("toy_train_hoi", 1),
                      ("toy_test", 1), ("train_subset", 0), ("workers", -1)):
        if getattr(args, name) < low:
            raise SystemExit(f"train.py: --{name} must be >= {low}, got {getattr(args, name)}")
    if not args.dist_timeout > 0:
        raise SystemExit(f"train.py: --dist_timeout must be > 0 minutes, got {args.dist_timeout}")
    return args


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_overrides(args):
    names = {f.name for f in dataclasses.fields(sg2hoi.Config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


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


def synchronise_batch_norm(model, device):
    """BBSeg's BatchNorm (Config.seg_norm="batch", the paper's) normalises over the images of one forward. With one
    image per GPU each process would normalise over its own image, and 1 and N processes would train different
    models. Under NCCL, SyncBatchNorm normalises over the micro-batches of all processes together: N GPUs with one
    image each then compute what one process with the N images in one micro-batch computes. torch has no
    SyncBatchNorm for CPU tensors, so on CPU (gloo) the statistics stay per process, as said once here; the toy
    preset uses seg_norm="group", which does not depend on the batch at all."""
    if world_size() == 1 or not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state-dict names
    if is_master():
        print(f"note: BBSeg's BatchNorm normalises over each process's own images on {device.type} (SyncBatchNorm "
              f"needs CUDA): {world_size()} processes train a different model from 1 (--seg_norm group does not)")
    return model


def gradient_sync(ddp_model, last):
    """Gradient accumulation: only the last micro-batch's backward all-reduces the gradients (DDP's no_sync for the
    others). torch.compile wraps the DDP module in an OptimizedModule, which is no DDP instance: look inside."""
    ddp = getattr(ddp_model, "_orig_mod", ddp_model)
    if isinstance(ddp, DDP) and not last:
        return ddp.no_sync()
    return contextlib.nullcontext()


def make_deterministic():
    """--deterministic: the same run gives the same numbers on the same machine. cuBLAS needs a fixed workspace for
    that (read at its first call, so set before any CUDA work), and torch then raises on every operation that has
    no deterministic kernel instead of running it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


# ------------------------------------------------------------------------------------------------ data streams


class SeededDataset(torch.utils.data.Dataset):
    """Item (i, epoch) always gets the same random augmentation, whatever the worker, the process or a resume.
    The epoch travels with the index (EpochSampler), so persistent loader workers see it too."""

    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index_and_epoch):
        i, epoch = index_and_epoch
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a CUDA seeding with its stack trace
            # (1.4 ms per image on a CPU machine, a tenth of a toy step)
            torch.default_generator.manual_seed(self.seed * 1_000_003 + epoch * 10_007 + i)
            return self.ds[i]


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (drop_last: every process gets the same count) that yields (index, epoch) and can start
    an epoch at a given micro-batch (to resume mid-epoch)."""

    def __init__(self, *a, micro_batch=1, **kw):
        super().__init__(*a, drop_last=True, **kw)
        self.micro_batch, self.start_batch = micro_batch, 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start_batch * self.micro_batch:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return max(super().__len__() - self.start_batch * self.micro_batch, 0)


def loader_settings(args, device):
    """Workers per process from the CPU count and the processes on this machine; pinned memory on CUDA. With two
    cores or fewer per process the main process loads (measured on the 2-core toy run: 56 images/s without a
    worker, 46 with one competing for the same cores)."""
    workers = args.workers
    if workers < 0:  # one core per process for the model, the rest for loading; none to spare: load in process
        cores = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = 0 if cores <= 2 else min(8, cores - 1)
    pin = device.type == "cuda" if args.pin_memory == "auto" else args.pin_memory == "true"
    return dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                prefetch_factor=args.prefetch if workers > 0 else None)


class TaskStream:
    """An endless stream of micro-batches of one task. An epoch is `steps_per_epoch` optimiser steps of
    `accumulation` micro-batches each; it knows its position for checkpoints. The loader (and its workers) live
    for the whole run."""

    def __init__(self, dataset, global_batch, micro_batch, accumulation, seed, loader_kw, name):
        self.dataset = SeededDataset(dataset, seed)
        self.sampler = EpochSampler(self.dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                                    micro_batch=micro_batch)
        self.steps_per_epoch = len(dataset) // global_batch  # the same for any number of processes
        self.micro_per_epoch = self.steps_per_epoch * accumulation
        # its own generator: starting an iterator draws a worker base seed, which must not consume the global RNG
        # (dropout's), or a resumed run (which starts its iterator mid-epoch) would draw different dropout masks
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=micro_batch, sampler=self.sampler,
                                                  collate_fn=sg2hoi.collate, drop_last=True,
                                                  generator=torch.Generator().manual_seed(seed), **loader_kw)
        self.name, self.epoch, self.batch_in_epoch, self.iterator = name, 0, 0, None

    def state(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state(self, s):
        self.epoch, self.batch_in_epoch, self.iterator = s["epoch"], s["batch_in_epoch"], None

    def next(self):
        if self.batch_in_epoch >= self.micro_per_epoch:  # the epoch's steps are done (a partial step is dropped)
            self.epoch, self.batch_in_epoch, self.iterator = self.epoch + 1, 0, None
        if self.iterator is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start_batch = self.batch_in_epoch
            self.iterator = iter(self.loader)
        self.batch_in_epoch += 1
        return next(self.iterator)


# ------------------------------------------------------------------------------------------------ schedule


@dataclasses.dataclass
class Schedule:
    """Which phase and task each optimiser step belongs to.

    phase 1: SGG alone (sgg_epochs; all epochs when only the SGG task is trained);
    phase 2: SGG, HOI, SGG, ... alternating (joint_epochs over the HOI data: 2 steps per HOI batch), or HOI alone
             (--tasks hoi, or hoi_on_frozen_sgg = Table V "HOI")."""
    phase1_steps: int
    phase2_steps: int
    phase2_tasks: tuple
    steps_per_epoch: dict  # phase -> optimiser steps per epoch of that phase

    @property
    def total(self):
        return self.phase1_steps + self.phase2_steps

    def phase(self, step):
        return 1 if step < self.phase1_steps else 2

    def task(self, step):
        if self.phase(step) == 1:
            return "sgg"
        return self.phase2_tasks[(step - self.phase1_steps) % len(self.phase2_tasks)]

    def progress(self, step):
        """Fraction of the current phase done (for the learning-rate drop)."""
        if self.phase(step) == 1:
            return step / max(self.phase1_steps, 1)
        return (step - self.phase1_steps) / max(self.phase2_steps, 1)

    def is_eval_step(self, step, every_epochs):
        """After `step` steps: the end of every `every_epochs`-th epoch of the current phase, and each phase's end."""
        if every_epochs <= 0:
            return False
        phase = self.phase(step - 1)
        start = 0 if phase == 1 else self.phase1_steps
        end = self.phase1_steps if phase == 1 else self.total
        period = every_epochs * self.steps_per_epoch[phase]
        return step == end or (period > 0 and (step - start) % period == 0)


def make_schedule(cfg, streams):
    sgg_spe = streams["sgg"].steps_per_epoch if "sgg" in streams else 0
    hoi_spe = streams["hoi"].steps_per_epoch if "hoi" in streams else 0
    if "hoi" not in streams:  # SGG-only training (Table V "SGG")
        return Schedule((cfg.sgg_epochs + cfg.joint_epochs) * sgg_spe, 0, (), {1: sgg_spe, 2: 0})
    if "sgg" not in streams:  # HOI from HOI data only (--tasks hoi)
        return Schedule(0, cfg.joint_epochs * hoi_spe, ("hoi",), {1: 0, 2: hoi_spe})
    if cfg.hoi_on_frozen_sgg:  # Table V "HOI": SGG first, then the HOI part alone on a frozen SGG part
        return Schedule(cfg.sgg_epochs * sgg_spe, cfg.joint_epochs * hoi_spe, ("hoi",), {1: sgg_spe, 2: hoi_spe})
    return Schedule(cfg.sgg_epochs * sgg_spe, 2 * cfg.joint_epochs * hoi_spe, ("sgg", "hoi"),
                    {1: sgg_spe, 2: 2 * hoi_spe})


def split_batch(global_batch, processes, micro_batch):
    """Global batch -> (images per micro-batch, micro-batches per step) of one process; the micro-batches of a step
    are equal, so that the step sees exactly global_batch images."""
    if global_batch % processes:
        raise SystemExit(f"train.py: batch_size {global_batch} (the global batch) is not divisible by {processes} "
                         f"processes; choose a batch_size that is")
    per_process = global_batch // processes
    steps = max(1, math.ceil(per_process / micro_batch)) if micro_batch else 1
    while per_process % steps:
        steps += 1
    return per_process // steps, steps


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path, ckpt):
    """Atomic: write a temporary file in the same folder, flush it to disk, then rename over the old one. A failed
    write (disk full, ...) removes its temporary file and says what failed where."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise SystemExit(f"could not write checkpoint {path}: {e} ({free / 2**20:.0f} MiB free on that disk; "
                         f"the previous checkpoint, if any, is intact)") from None


def remove_stale_temporaries(out):
    """Temporary checkpoint files of interrupted writes (a SIGKILL mid-write) are useless: remove them."""
    for tmp in glob.glob(os.path.join(out, "*.pt.tmp*")):
        os.remove(tmp)
        print(f"removed the unfinished checkpoint write {tmp}")


def load_checkpoint(path):
    """A train.py checkpoint, with one clear line for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or non-torch file
        raise SystemExit(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in ("model", "optimizer", "state", "config", "args", "rng") if
               not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path}: not a train.py checkpoint (missing {missing}); a bare state dict can "
                         f"initialise a model but cannot resume a run")
    unknown = set(ckpt["config"]) - {f.name for f in dataclasses.fields(sg2hoi.Config)}
    if unknown:
        raise SystemExit(f"--resume {path}: its config has field(s) {sorted(unknown)} that this sg2hoi.Config does "
                         f"not know (written by another version of the code)")
    return ckpt


def rng_states():
    """Every process's CPU RNG state and that of its own GPU, in rank order (dropout draws differ per process). Only
    the process's own device (not every visible one): a run resumed on a node with fewer GPUs restores the same."""
    own = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}
    if not dist.is_initialized():
        return [own]
    states = [None] * world_size()
    dist.all_gather_object(states, own)
    return states


def restore_rng_states(states):
    if len(states) != world_size():
        if is_master():
            print(f"warning: the checkpoint holds the RNG states of {len(states)} process(es), this run has "
                  f"{world_size()}: dropout draws will differ from an uninterrupted run")
        return
    own = states[rank()]
    torch.set_rng_state(own["torch"])
    if torch.cuda.is_available() and torch.is_tensor(own["cuda"]) and own["cuda"].numel():
        torch.cuda.set_rng_state(own["cuda"])  # this process's device (torch.cuda.set_device in init_distributed)


def rewrite_log_for_resume(log_path, step, ckpt_path):
    """A resumed run repeats the steps after its last checkpoint: drop them from the log, then mark the resume, so
    that a reader of log.jsonl sees each step once."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    kept.append(json.dumps({"event": "resume", "step": step, "checkpoint": ckpt_path,
                            "dropped_lines": len(lines) - len(kept)}) + "\n")
    with open(log_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)


# ------------------------------------------------------------------------------------------------ 1. set-up


def setup(args):
    """Processes, seeds, the config and the output folder. With --resume the checkpoint's experiment is continued:
    a flag that would change it is refused (RUNTIME_FLAGS may change)."""
    if args.deterministic:
        make_deterministic()
    device = evaluation.init_distributed(args.dist_timeout)
    torch.manual_seed(args.seed + rank())
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume:
        saved = resume["args"]
        conflicts = []
        for name in sorted(args.explicit - RUNTIME_FLAGS):
            given = getattr(args, name)
            before = resume["config"].get(name, saved.get(name))
            if name in PATH_FLAGS + ("text_embeddings", "word_vectors") and given:
                given = os.path.abspath(given)
            if given != before:
                conflicts.append(f"--{name} {given} (the checkpoint has {before})")
        if conflicts:
            raise SystemExit(f"--resume {args.resume} continues that run's experiment; these flags would change it: "
                             f"{'; '.join(conflicts)}. Start a new run (--out elsewhere) to change them. Flags that "
                             f"may change on resume: {', '.join(sorted(RUNTIME_FLAGS - {'resume'}))}")
        for k, v in saved.items():  # the experiment's flags come from the checkpoint, and so do the runtime flags
            # (a runtime flag not given now keeps the run's value; --max_steps only stops one invocation early)
            if k not in RUNTIME_FLAGS or (k not in args.explicit and k not in ("resume", "out", "max_steps",
                                                                              "check_images_only")):
                setattr(args, k, v)
        cfg = sg2hoi.Config(**resume["config"])
        if args.out is None:  # continue in the checkpoint's own folder, never in another run's
            args.out = os.path.dirname(os.path.abspath(args.resume))
    else:
        for name in PATH_FLAGS:  # a checkpoint must find its data from any working directory
            if getattr(args, name):
                setattr(args, name, os.path.abspath(getattr(args, name)))
        overrides = config_overrides(args)
        for name in ("text_embeddings", "word_vectors"):
            if overrides.get(name):
                overrides[name] = os.path.abspath(overrides[name])
        try:
            cfg = sg2hoi.make_config(args.preset, **overrides)
        except ValueError as e:
            raise SystemExit(f"train.py: {e}") from None
        args.out = args.out or os.path.join("runs", args.preset)
    if args.eval_every < 0:
        args.eval_every = 0 if args.preset == "toy" else 1
    os.makedirs(args.out, exist_ok=True)
    if is_master():
        remove_stale_temporaries(args.out)
    return SimpleNamespace(args=args, cfg=cfg, device=device, resume=resume)


# ------------------------------------------------------------------------------------------------ 2. data


def load_data(run):
    """Datasets (toy scenes unless --vg / --hoi), the config's class names from them, one stream per task."""
    args = run.args
    data = sg2hoi.build_data(run.cfg, vars(args), is_master=is_master(), barrier=barrier)
    if not run.resume:
        run.cfg = sg2hoi.config_from_meta(run.cfg, data.get("sgg", {}).get("train", (None, None))[1],
                                          data.get("hoi", {}).get("train", (None, None))[1])
    cfg = run.cfg
    teachers = eq5_teachers(args, cfg, data)
    micro, accumulation = split_batch(cfg.batch_size, world_size(), args.micro_batch)
    loader_kw = loader_settings(args, run.device)
    train_tf = sg2hoi.make_transforms(True, cfg.image_size, cfg.max_size, multi_scale=cfg.image_size > 480)
    streams = {}
    for task in data:
        records, meta = data[task]["train"]
        streams[task] = TaskStream(sg2hoi.DetectionDataset(records, meta, train_tf, teachers[task]),
                                   cfg.batch_size, micro, accumulation, args.seed + (0 if task == "sgg" else 1),
                                   loader_kw, task)
        if streams[task].steps_per_epoch == 0:  # zero steps is an error, not a silent "done"
            where = {"sgg": args.vg or os.path.join(args.toy_root, "vg"),
                     "hoi": args.hoi or os.path.join(args.toy_root, args.hoi_dataset)}[task]
            raise SystemExit(f"{task.upper()} training split ({where}): {len(records)} usable images, fewer than the "
                             f"global batch of {cfg.batch_size}: no optimiser step would run. Use a smaller "
                             f"--batch_size or more data (the loader's skip counts above say what was dropped).")
    run.schedule = make_schedule(cfg, streams)
    if run.schedule.total == 0:
        raise SystemExit(f"train.py: the schedule has no step (sgg_epochs {cfg.sgg_epochs}, joint_epochs "
                         f"{cfg.joint_epochs}, tasks {cfg.tasks})")
    run.accumulation, run.micro = accumulation, micro
    return data, streams


def eq5_teachers(args, cfg, data):
    """The teacher of Eq. 5 per task: CLIP image embeddings {file name: vector} (--clip_cache, the paper's), the
    class text embeddings of the image's objects (--text_teacher objects, the toy scenes' stand-in), or None."""
    if not cfg.use_vl_distill:
        return dict.fromkeys(data)
    if args.clip_cache:
        cache = torch.load(args.clip_cache, map_location="cpu", weights_only=True)  # GPU-saved tensors stay on CPU
        for task in data:  # a cache keyed for other images would silently switch Eq. 5 off
            try:
                sg2hoi.teacher_coverage(data[task]["train"][0], cache, f"{task} training split")
            except ValueError as e:
                raise SystemExit(f"--clip_cache {args.clip_cache}: {e}") from None
        return dict.fromkeys(data, cache)
    if args.text_teacher == "auto" and (args.vg or args.hoi):
        raise SystemExit("train.py: the VL distillation of Eq. 5 aligns with CLIP's image embeddings, and real data "
                         "(--vg / --hoi) was given without --clip_cache. Build the cache once (needs open_clip and "
                         "its weights): sg2hoi.build_clip_image_cache([train records ...], 'clip_cache.pt'), then "
                         "pass --clip_cache clip_cache.pt. Or choose another experiment explicitly: --text_teacher "
                         "objects (the mean text embedding of each image's objects) or --use_vl_distill false.")
    if args.text_teacher == "none":
        return dict.fromkeys(data)
    return {task: sg2hoi.class_text_embeddings(cfg.entity_names if task == "sgg" else cfg.hoi_object_names,
                                               cfg.text_dim, cfg.text_embeddings) for task in data}



# ------------------------------------------------------------------------------------------------ 3. model, criterion, optimiser


def make_optimizer(model, cfg):
    groups = model.parameter_groups()
    lrs = {"backbone": cfg.lr_backbone, "text_classifier": cfg.lr_text_classifier, "sgg": cfg.lr, "hoi": cfg.lr}
    # fused: one kernel for all parameters (CPU and CUDA); the per-tensor loop took 13 ms of a 0.2 s toy step
    return torch.optim.AdamW([{"params": groups[g], "lr": lrs[g], "name": g, "base_lr": lrs[g]}
                              for g in groups if groups[g]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build(run):
    """Model (DETR-initialised if asked), criterion, optimiser, training state; the resumed ones if resuming."""
    cfg, args = run.cfg, run.args
    model = sg2hoi.build_model(cfg)
    if args.init_detr and not run.resume:
        sg2hoi.load_detr_weights(model, args.init_detr, verbose=is_master())
    model = synchronise_batch_norm(model.to(run.device), run.device)
    criterion = sg2hoi.build_criterion(model).to(run.device)
    optimizer = make_optimizer(model, cfg)
    ema = make_ema(model, cfg)
    state = {"step": 0, "skipped_nonfinite": 0, "streams": {}, "best": None, "ema_updates": 0}
    if run.resume:
        model.load_state_dict(run.resume["model"])
        optimizer.load_state_dict(run.resume["optimizer"])
        state = {**state, **run.resume["state"]}
        if ema is not None:
            if "ema" not in run.resume:
                raise SystemExit(f"--resume {args.resume}: the config has ema_decay {cfg.ema_decay} but the "
                                 f"checkpoint holds no averaged weights")
            ema.module.load_state_dict(run.resume["ema"])
            ema.n_averaged.fill_(state["ema_updates"])
        restore_rng_states(run.resume["rng"])
        if is_master():
            print(f"resumed from {args.resume} at step {state['step']}")
    run.ema = ema
    return model, criterion, optimizer, state


def make_ema(model, cfg):
    """The exponential moving average of the weights (cfg.ema_decay > 0), or None. torch's AveragedModel keeps a
    copy of the model: the first update copies the parameters, every later one moves the copy towards them,
    ema = d * ema + (1 - d) * weights. Buffers are not averaged but copied (update_ema): integer tables such as
    entity_to_seg must stay exact, and BatchNorm statistics are those of the current weights."""
    if cfg.ema_decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)


@torch.no_grad()
def update_ema(ema, model):
    ema.update_parameters(model)
    for b_ema, b in zip(ema.module.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def eval_model(run, model):
    """The weights that evaluation reports: the averaged ones when the config keeps an average."""
    return run.ema.module if run.ema is not None else model


# ------------------------------------------------------------------------------------------------ 4. training


def set_learning_rates(optimizer, cfg, phase, progress, sgg_pretrained=True):
    """Phase 2 lowers the SGG part to lr_sgg_phase2 (when phase 1 trained it); lr x 0.1 after cfg.lr_drop of each
    phase."""
    factor = 0.1 if progress >= cfg.lr_drop else 1.0
    for g in optimizer.param_groups:
        lowered = phase == 2 and sgg_pretrained and g["name"] == "sgg"
        base = cfg.lr_sgg_phase2 if lowered else g["base_lr"]
        g["lr"] = base * factor


def set_trainable(model, cfg, phase, has_sgg):
    """Phase 1 freezes the HOI-only parameters (the HOI branch does not run); phase 2 with hoi_on_frozen_sgg
    freezes everything else. Modules whose parameters are all frozen run in eval mode (no BatchNorm statistics,
    no dropout)."""
    hoi_only = set(map(id, model.idle_parameters("sgg")))
    for p in model.parameters():
        if id(p) in hoi_only:
            p.requires_grad_(phase == 2 or not has_sgg)
        elif cfg.hoi_on_frozen_sgg:
            p.requires_grad_(phase == 1)


def train_mode(model):
    model.train()
    for m in model.children():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def zero_touch(params):
    """0 x the sum of every trainable parameter given: under DDP, added to the loss with the parameters the loss does
    not reach, so that DDP sees every parameter in every backward (see the module docstring)."""
    return sum(p.sum() for p in params if p.requires_grad) * 0.0


def non_finite_outputs(outputs):
    """Names of the model outputs holding NaN or Inf (the matcher cannot match them)."""
    bad = []
    for k, v in outputs.items():
        for name, t in (v.items() if isinstance(v, dict) else [(None, v)]):
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                bad.append(k if name is None else f"{k}.{name}")
    return bad


def train_step(run, ddp_model, model, criterion, optimizer, micro_batches, task, with_hoi, step):
    """One optimiser step over this process's micro-batches of the global batch.

    Returns (losses of the whole global batch: {term: float}, or None when the step was skipped)."""
    device, cfg = run.device, run.cfg
    Q = cfg.num_rel_queries if task == "sgg" else cfg.num_hoi_queries
    counts = {}
    for _, _, targets in micro_batches:  # the normalisers of the global batch (sg2hoi.batch_counts)
        for k, v in sg2hoi.batch_counts(targets, task, Q).items():
            counts[k] = counts.get(k, 0.0) + v
    norm = sg2hoi.all_reduce_mean(counts, device)
    use_amp = device.type == "cuda" and run.args.amp == "bf16"
    optimizer.zero_grad(set_to_none=True)
    summed, problem = {}, None
    for m, (images, mask, targets) in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        with gradient_sync(ddp_model, last):
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = ddp_model(images, mask, with_hoi=with_hoi)
            bad = [f"model output {name}" for name in non_finite_outputs(outputs)]
            losses = None if bad else criterion(outputs, targets, task, norm=norm)
            if losses is not None:
                bad = [f"loss term {k}" for k, v in losses.items() if not torch.isfinite(v)]
            # every process must agree before the backward (DDP reduces in the last one)
            ok = torch.tensor(0.0 if bad else 1.0, device=device)
            if dist.is_initialized():
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() < 1:  # keep DDP in step with a zero loss, then give the step up
                if dist.is_initialized():
                    zero_touch(model.parameters()).backward()
                problem = (f"step {step} ({task} batch, images {[t['image_id'] for t in targets]}): non-finite "
                           f"{'values in ' + ', '.join(bad) if bad else 'values on another process'}")
                break
            if dist.is_initialized():  # DDP: the parameters this task's loss does not reach take part too
                losses["loss"] = losses["loss"] + zero_touch(model.idle_parameters(task, losses))
            losses["loss"].backward()
            for k, v in losses.items():
                if not k[-1].isdigit():  # the last decoder layer's terms (and the total)
                    summed[k] = summed.get(k, 0.0) + v.item()
    if problem:
        optimizer.zero_grad(set_to_none=True)
        return None, problem
    for p in model.idle_parameters(task, summed):  # after DDP's reduction: AdamW must not touch the idle heads
        p.grad = None
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_max_norm)
    optimizer.step()
    return sg2hoi.all_reduce_mean(summed, device), None


def checkpoint(run, model, optimizer, state, name="ckpt.pt"):
    """Every process's RNG states are gathered (a collective); rank 0 writes."""
    rngs = rng_states()
    if is_master():
        args = {k: v for k, v in vars(run.args).items() if k != "explicit"}
        path, t = os.path.join(run.args.out, name), time.time()
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "config": dataclasses.asdict(run.cfg), "args": args, "rng": rngs}
        if run.ema is not None:  # the averaged weights, in the layout of "model" (eval.py loads either)
            ckpt["ema"] = run.ema.module.state_dict()
        save_checkpoint(path, ckpt)
        run.last_checkpoint = (os.path.getsize(path) / 2**20, time.time() - t)


def evaluate_during_training(run, model, data, state, phase, log):
    """Evaluation on every rank (eval.evaluate shards the test splits); rank 0 logs, prints, keeps best.pt."""
    metrics = evaluation.evaluate(eval_model(run, model), run.cfg, eval_tasks(data, phase), run.device,
                                  limit=run.args.eval_limit, amp=run.args.amp == "bf16")
    if not is_master() or metrics is None:
        return None
    print(evaluation.format_tables(metrics), flush=True)
    name = best_metric_name(run, phase, metrics)
    value = evaluation.lookup_metric(metrics, name)
    log.write(json.dumps({"event": "eval", "step": state["step"], "phase": phase, "metric": name, "value": value,
                          "metrics": _json_safe(metrics)}) + "\n")
    log.flush()
    best = state.get("best")
    if value is not None and (best is None or best["metric"] != name or value > best["value"]):
        state["best"] = {"metric": name, "value": value, "step": state["step"]}
        shutil.copyfile(os.path.join(run.args.out, "ckpt.pt"), os.path.join(run.args.out, "best.pt.tmp"))
        os.replace(os.path.join(run.args.out, "best.pt.tmp"), os.path.join(run.args.out, "best.pt"))
        print(f"best.pt: {name} = {100 * value:.2f} at step {state['step']}")
    return metrics


def eval_tasks(data, phase):
    """The test data a phase is evaluated on: phase 1 leaves the HOI branch untrained."""
    return {t: d for t, d in data.items() if phase == 2 or t == "sgg"}


def best_metric_name(run, phase, metrics):
    if run.args.best_metric != "auto":
        return run.args.best_metric
    if phase == 2 and "hico" in metrics:
        return "hico.default.mAP_full"
    if phase == 2 and "vcoco" in metrics:
        return "vcoco.role_mAP_S1"
    return "sgg.R@50"


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def train(run, model, criterion, optimizer, state, streams, data):
    """The schedule loop: one optimiser step per iteration, a log line per step, checkpoints, evaluations."""
    args, cfg, sched = run.args, run.cfg, run.schedule
    total = min(sched.total, args.max_steps) if args.max_steps else sched.total
    for task, s in state["streams"].items():
        streams[task].load_state(s)
    log_path = os.path.join(args.out, "log.jsonl")
    if run.resume and is_master():
        rewrite_log_for_resume(log_path, state["step"], args.resume)
    log = open(log_path, "a") if is_master() else None
    if is_master():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"SG2HOI+ {n_params / 1e6:.1f} M parameters | tasks {sorted(streams)} | {world_size()} process(es) on "
              f"{run.device} | global batch {cfg.batch_size} = {world_size()} x {run.accumulation} x {run.micro} | "
              f"phase 1: {sched.phase1_steps} steps, phase 2: {sched.phase2_steps} steps | out {args.out}", flush=True)
    has_sgg = "sgg" in streams
    ddp_model, ddp_phase, last_terms, consecutive_skips = None, None, {}, 0
    t_start, start_step = time.time(), state["step"]
    step = state["step"]
    while step < total:
        phase, task = sched.phase(step), sched.task(step)
        if ddp_phase != phase:  # the trainable set changes with the phase: wrap again so DDP sees it
            set_trainable(model, cfg, phase, has_sgg)
            ddp_model = DDP(model) if dist.is_initialized() else model
            if args.compile:
                ddp_model = torch.compile(ddp_model)
            ddp_phase = phase
        set_learning_rates(optimizer, cfg, phase, sched.progress(step), sgg_pretrained=sched.phase1_steps > 0)
        train_mode(model)
        micro_batches = [streams[task].next() for _ in range(run.accumulation)]
        terms, problem = train_step(run, ddp_model, model, criterion, optimizer, micro_batches, task,
                                    with_hoi=(task == "hoi"), step=step)
        if problem:  # non-finite outputs or loss: stop and say where, or skip the step and count it
            if args.nonfinite == "stop":
                raise SystemExit(f"{problem}; stopping (lower the learning rate, or --nonfinite skip to skip such "
                                 f"steps)")
            state["skipped_nonfinite"] += 1
            consecutive_skips += 1
            if is_master():
                print(f"{problem}: step skipped ({state['skipped_nonfinite']} so far)", flush=True)
            if consecutive_skips >= args.max_skips:
                ckpt = os.path.join(args.out, "ckpt.pt")
                raise SystemExit(f"{consecutive_skips} consecutive steps skipped for non-finite values: the model has "
                                 f"diverged; stopping (lower the learning rate; "
                                 f"{'the last good checkpoint is ' + ckpt if os.path.exists(ckpt) else 'no checkpoint was written yet'})")
        else:
            consecutive_skips = 0
            if run.ema is not None:  # every applied optimiser step; identical on every rank (DDP's weights are)
                update_ema(run.ema, model)
                state["ema_updates"] += 1
        step += 1
        state["step"] = step
        state["streams"] = {t: s.state() for t, s in streams.items()}
        if step == start_step + 1 and is_master():
            print(f"first step done {time.time() - run.t_launch:.1f} s after the start (set-up, data, model, "
                  f"one step)", flush=True)
        if is_master() and terms:
            last_terms[task] = " ".join(f"{k} {v:.3f}" for k, v in terms.items())  # the line shows both tasks
            record = {"step": step, "phase": phase, "task": task, "epoch": streams[task].epoch,
                      "lr": optimizer.param_groups[0]["lr"], "time": round(time.time() - t_start, 3),
                      **{k: round(v, 6) for k, v in terms.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
        if is_master() and (step % args.log_every == 0 or step == total):
            elapsed = time.time() - t_start
            rate = (step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
            eta = (total - step) * elapsed / max(step - start_step, 1)
            line = " | ".join(f"{t}: {last_terms[t]}" for t in ("sgg", "hoi") if t in last_terms)
            print(f"step {step}/{total} phase {phase} | {line} | {rate:.1f} img/s | ETA {eta / 60:.1f} min", flush=True)
        evaluate_now = sched.is_eval_step(step, args.eval_every) and step < total
        if step % args.ckpt_every == 0 or step == total or evaluate_now:
            checkpoint(run, model, optimizer, state)
        if evaluate_now:
            evaluate_during_training(run, model, data, state, phase, log)
            checkpoint(run, model, optimizer, state)  # the best-so-far record travels with the checkpoint
    if is_master():
        size, seconds = getattr(run, "last_checkpoint", (0.0, 0.0))
        print(f"training done: {step} steps in {(time.time() - t_start) / 60:.1f} min; non-finite steps skipped: "
              f"{state['skipped_nonfinite']}; last checkpoint {size:.0f} MiB written in {seconds:.1f} s", flush=True)
    return log


# ------------------------------------------------------------------------------------------------ 5. final evaluation


def final_evaluation(run, model, data, state, log):
    """Every rank evaluates its shard; rank 0 computes the metrics and writes metrics.json. No rank waits in a
    collective afterwards (rank 0 may need minutes for the metrics of the full test sets). With weight averaging
    (ema_decay > 0) metrics.json holds the averaged weights' metrics and metrics_raw.json the trained weights' own,
    so that every run compares the two."""
    if run.args.no_eval:
        return None
    phase = run.schedule.phase(max(state["step"] - 1, 0))
    raw = None  # with averaging, the trained weights' predictions are collected first, their metrics computed last:
    if run.ema is not None:  # every rank takes part in both gathers before rank 0 computes anything
        raw = evaluation.collect(model, run.cfg, eval_tasks(data, phase), run.device, limit=run.args.eval_limit,
                                 amp=run.args.amp == "bf16")
        if is_master():
            print(f"the averaged weights (ema_decay {run.cfg.ema_decay}; metrics.json):")
    metrics = evaluate_during_training(run, model, data, state, phase, log)
    if is_master() and metrics is not None:
        with open(os.path.join(run.args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if is_master() and raw is not None:
        raw = evaluation.metrics_from_collected(raw)
        print("the trained weights without averaging (metrics_raw.json):\n" + evaluation.format_tables(raw))
        with open(os.path.join(run.args.out, "metrics_raw.json"), "w") as f:
            json.dump(raw, f, indent=1)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    run = setup(args)                                                # 1
    run.t_launch = T_START
    data, streams = load_data(run)                                   # 2
    model, criterion, optimizer, state = build(run)                  # 3
    log = train(run, model, criterion, optimizer, state, streams, data)   # 4
    final_evaluation(run, model, data, state, log)                   # 5
    if log:
        log.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"rank {rank()}: peak resident memory {peak:.0f} MiB", flush=True)
    del streams  # stop the loader workers before the process group goes
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the ablation study (Tables V-VIII)
# `python train.py --study` trains the FULL model and every ablation row of Tables V-VIII on the toy scenes, several
# seeds each, on the toy preset's schedule, and prints the paper's table with mean +- std over the seeds beside the
# paper's numbers. Each run is an ordinary train.py run in its own folder (runs/study/<row>/seed<k>), so a finished
# run is skipped and an interrupted one resumed when the study is started again.

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


def study_parser():
    p = argparse.ArgumentParser(description="The ablation study of Tables V-VIII on the toy scenes.")
    p.add_argument("--study", action="store_true")
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
    return p


def study_run_metrics(metrics):
    """metrics.json -> the seven numbers of the paper's ablation tables, in percent (None where not trained)."""
    s, h = metrics.get("sgg"), metrics.get("hico", {}).get("default")
    row = [100 * s[k] if s else None for k in ("R@50", "R@100", "mR@50", "mR@100")]
    return row + [100 * h[k] if h else None for k in ("mAP_full", "mAP_rare", "mAP_non_rare")]


def run_study(argv):
    """Train every (row, seed) not finished yet, `jobs` at a time, then write study.json and study.md."""
    import subprocess
    import statistics

    a = study_parser().parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in STUDY_ROWS]
    if unknown:
        raise SystemExit(f"--study: unknown row(s) {unknown}; rows are {list(STUDY_ROWS)}")
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    jobs = a.jobs or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
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
            runs.append((row, seed, out, [sys.executable, os.path.abspath(__file__)] + cmd))
    print(f"study: {len(runs)} run(s) to do, {jobs} at a time with {threads} thread(s) each; out {a.out}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0, running, failed = time.time(), [], []
    if runs:  # the toy scenes are generated once, before the parallel runs
        shared = parse_args(a.run_args.split())
        sg2hoi.build_data(sg2hoi.make_config("toy", **config_overrides(shared)), vars(shared))
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
                    per_seed.append(study_run_metrics(json.load(f)))
        columns = list(zip(*per_seed)) if per_seed else [()] * len(STUDY_COLUMNS)
        mean = [statistics.fmean(c) if c and c[0] is not None else None for c in columns]
        std = [statistics.stdev(c) if len(c) > 1 and c[0] is not None else None for c in columns]
        table[row] = {"seeds": len(per_seed), "mean": mean, "std": std, "runs": per_seed, "paper": STUDY_ROWS[row][1]}
    with open(os.path.join(a.out, "study.json"), "w") as f:
        json.dump({"columns": STUDY_COLUMNS, "rows": table, "budget": a.budget, "run_args": a.run_args,
                   "minutes": (time.time() - t0) / 60}, f, indent=1)
    markdown = study_markdown(table)
    with open(os.path.join(a.out, "study.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    if failed:
        raise SystemExit(f"study: {len(failed)} run(s) failed: {failed}")
    return table


def study_markdown(table):
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


if __name__ == "__main__":
    if "--study" in sys.argv[1:]:
        run_study(sys.argv[1:])
    else:
        main()
