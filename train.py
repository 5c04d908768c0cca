"""train.py: train SG2HOI+ with the paper's two-phase, two-task schedule (Sec. III-D, IV-D).

    python train.py                                              # toy scenes on a CPU: trains, then evaluates
    torchrun --standalone --nproc_per_node=8 train.py --preset paper --vg data/vg --hoi data/hico
    python train.py --resume runs/toy/ckpt.pt                    # continue exactly where a run stopped
    python train.py --d_model 128 --use_bbseg false              # every Config field is a flag

`main` runs five steps: 1. setup (processes, seeds, config), 2. load_data (one endless batch stream per task),
3. build (model, criterion, optimiser), 4. train (the schedule loop, checkpoints), 5. final_evaluation.

The schedule: phase 1 trains the SGG part alone (sgg_epochs). Phase 2 (joint_epochs over the HOI data) alternates
SGG and HOI batches with the SGG part at a 10x lower learning rate, or trains the HOI part alone on a frozen SGG part
(--hoi_on_frozen_sgg true, Table V "HOI"). AdamW, lr 1e-4, backbone 1e-5, lr x 0.1 after 2/3 of a phase (DETR).

The same experiment on 1 or N processes: `batch_size` is the GLOBAL batch, split over the processes and into
micro-batches (--micro_batch) whose gradients accumulate. Step k gets the same images whatever the process count,
each image's augmentation is seeded, and every loss term is normalised by the counts of the global batch.

Idle heads and DDP: an SGG step does not run the HOI branch; an HOI step gives the relation heads no loss. DDP needs
every parameter in every backward: the loss gets a zero-weighted sum of the parameters it does not reach (zero_touch),
and after DDP's reduction their .grad is None, so that AdamW (momentum, weight decay) leaves the idle heads alone.
"""
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
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as evaluation
import sg2hoi

# ------------------------------------------------------------------------------------------------ command line
# Flags that say how to run, not what is computed: they may change on --resume (the rest comes from the checkpoint).
RUNTIME_FLAGS = {"out", "resume", "workers", "pin_memory", "prefetch", "log_every", "ckpt_every", "max_steps",
                 "nonfinite", "max_skips", "amp", "compile", "deterministic", "no_eval", "eval_limit", "eval_every",
                 "best_metric", "micro_batch", "dist_timeout", "bad_images"}
# Paths are stored absolute, so that a checkpoint finds its data from any working directory.
PATH_FLAGS = ("toy_root", "vg", "hoi", "clip_cache", "init_detr", "text_embeddings", "word_vectors")


def make_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)

    def add(*a, **kw):
        if suppress_defaults:
            kw.pop("default", None)
        p.add_argument(*a, **kw)

    add("--preset", default="toy", choices=sorted(sg2hoi.PRESETS))
    add("--out", default=None, help="run folder (default: runs/<preset>; with --resume: the checkpoint's folder)")
    add("--resume", default="", help="checkpoint to continue from (its config, data and schedule)")
    add("--init_detr", default="", help="DETR COCO checkpoint (.pth) to initialise from (Sec. IV-D)")
    add("--toy_root", default="data/toy", help="where the toy scenes are generated / cached")
    add("--toy_train", type=int, default=3000, help="toy scene-graph (VG) training images")
    add("--toy_train_hoi", type=int, default=1000, help="toy HOI training images (HICO-DET and V-COCO each)")
    add("--toy_test", type=int, default=500, help="toy test images per task")
    add("--vg", default="", help="VG150 root, RelTR JSON layout (SGB .h5: convert with tools/vg_h5_to_json.py)")
    add("--hoi", default="", help="HICO-DET or V-COCO root (QPIC layout)")
    add("--hoi_dataset", default="hico", choices=["hico", "vcoco"])
    add("--text_teacher", default="auto", choices=["auto", "objects", "none"],
        help="Eq. 5 teacher without --clip_cache: objects, none; auto = objects on toy data, refused on real data")
    add("--clip_cache", default="", help=".pt {image file name: CLIP image embedding} for Eq. 5 (real data)")
    add("--train_subset", type=int, default=0, help="train on the first N images of each training split (0 = all)")
    add("--seed", type=int, default=0)
    add("--micro_batch", type=int, default=0, help="max images per process per forward, the rest accumulate (0: all)")
    add("--workers", type=int, default=-1, help="loader workers per process (-1 = from the CPU count)")
    add("--pin_memory", default="auto", choices=["auto", "true", "false"], help="auto = on CUDA")
    add("--prefetch", type=int, default=4, help="batches each loader worker prepares ahead")
    add("--log_every", type=int, default=50)
    add("--ckpt_every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    add("--max_steps", type=int, default=0, help="stop after this many steps (0 = the full schedule)")
    add("--nonfinite", default="stop", choices=["stop", "skip"], help="NaN/Inf: stop naming step and term, or skip")
    add("--max_skips", type=int, default=20, help="--nonfinite skip: stop after this many consecutive skipped steps")
    add("--amp", default="bf16", choices=["bf16", "none"], help="bf16 autocast (CUDA only)")
    add("--compile", action="store_true", default=False, help="torch.compile the model")
    add("--deterministic", action="store_true", default=False, help="torch.use_deterministic_algorithms(True)")
    add("--no_eval", action="store_true", default=False, help="skip the final evaluation")
    add("--eval_limit", type=int, default=0, help="evaluate on the first N test images only (0 = all)")
    add("--eval_every", type=int, default=-1, help="evaluate every N epochs, keep best.pt (0: end only; -1: preset's)")
    add("--best_metric", default="auto", help="metric for best.pt, e.g. sgg.R@50 (auto: R@50, phase 2 the HOI mAP)")
    add("--dist_timeout", type=float, default=60.0, help="minutes a collective may wait before the run fails")
    add("--bad_images", default="stop", choices=["stop", "skip"], help="an undecodable image: stop, or drop it")
    for f in dataclasses.fields(sg2hoi.Config):  # every Config field is a flag
        if f.type in ("int", "float", "str", "bool", int, float, str, bool):
            kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(f.type, f.type)
            add(f"--{f.name}", type=kind, default=None)
    return p


def parse_args(argv=None):
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
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


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


def all_reduce_mean(values: dict, device):
    """{name: float} of this process -> sum over the processes / world size (loss normalisers, logged losses)."""
    keys = sorted(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(v)
        v = v / world_size()
    return dict(zip(keys, v.tolist()))


def synchronise_batch_norm(model, device):
    """BBSeg's BatchNorm (seg_norm="batch", the paper's) normalises over all processes' images together, as one
    process would; SyncBatchNorm needs CUDA, so on CPU each process normalises over its own images."""
    if world_size() == 1 or not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state-dict names
    if is_master():
        print(f"note: BBSeg's BatchNorm normalises over each process's own images on {device.type} (SyncBatchNorm "
              f"needs CUDA): {world_size()} processes train a different model from 1 (--seg_norm group does not)")
    return model


def gradient_sync(ddp_model, last):
    """Only the last micro-batch's backward all-reduces (no_sync); look inside torch.compile's OptimizedModule."""
    ddp = getattr(ddp_model, "_orig_mod", ddp_model)
    if isinstance(ddp, DDP) and not last:
        return ddp.no_sync()
    return contextlib.nullcontext()


def make_deterministic():
    """The same numbers on the same machine: cuBLAS needs a fixed workspace, set before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path, ckpt):
    """Atomic: a temporary file, flushed to disk, renamed over the old one; a failed write says what and where."""
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


def load_checkpoint(path):
    """A train.py checkpoint, with one clear line for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or non-torch file
        raise SystemExit(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in ("model", "optimizer", "state", "config", "args", "rng")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path}: not a train.py checkpoint (missing {missing}); a bare state dict can "
                         f"initialise a model but cannot resume a run")
    try:  # a field this code does not know, a retired field with another value (RETIRED), a value it refuses
        sg2hoi.config_from_saved(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--resume {path}: its config does not fit this version of the code ({e})") from None
    return ckpt


def rng_states():
    """Each process's CPU and own-GPU RNG states (a node with fewer GPUs can resume), in rank order."""
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


def checkpoint(run, model, optimizer, state, name="ckpt.pt"):
    """Every process's RNG states are gathered (a collective); rank 0 writes."""
    rngs = rng_states()
    if is_master():
        args = {k: v for k, v in vars(run.args).items() if k != "explicit"}
        path, t = os.path.join(run.args.out, name), time.time()
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "config": dataclasses.asdict(run.cfg), "args": args, "rng": rngs}
        save_checkpoint(path, ckpt)
        run.last_checkpoint = (os.path.getsize(path) / 2**20, time.time() - t)


def open_log(run, step):
    """Rank 0's log.jsonl. A resumed run repeats the steps after its checkpoint: drop their lines, mark the resume."""
    path = os.path.join(run.args.out, "log.jsonl")
    if run.resume and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        kept.append(json.dumps({"event": "resume", "step": step, "checkpoint": run.args.resume,
                                "dropped_lines": len(lines) - len(kept)}) + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a")


# ------------------------------------------------------------------------------------------------ 1. set-up
def setup(args):
    """Processes, seeds, the config (--resume: the checkpoint's, refusing flags that would change it), the folder."""
    if args.deterministic:
        make_deterministic()
    device = evaluation.init_distributed(args.dist_timeout)
    torch.manual_seed(args.seed + rank())
    for name in PATH_FLAGS:
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume:
        saved = resume["args"]
        conflicts = []
        for name in sorted(args.explicit - RUNTIME_FLAGS):
            given, before = getattr(args, name), resume["config"].get(name, saved.get(name))
            if given != before:
                conflicts.append(f"--{name} {given} (the checkpoint has {before})")
        if conflicts:
            raise SystemExit(f"--resume {args.resume} continues that run's experiment; these flags would change it: "
                             f"{'; '.join(conflicts)}. Start a new run (--out elsewhere) to change them. Flags that "
                             f"may change on resume: {', '.join(sorted(RUNTIME_FLAGS - {'resume'}))}")
        this_invocation = {"resume", "out", "max_steps"}  # never taken from the checkpoint
        for k, v in saved.items():
            if k not in RUNTIME_FLAGS or (k not in args.explicit and k not in this_invocation):
                setattr(args, k, v)
        cfg = sg2hoi.config_from_saved(resume["config"])
        if args.out is None:  # continue in the checkpoint's own folder, never in another run's
            args.out = os.path.dirname(os.path.abspath(args.resume))
    else:
        try:
            cfg = sg2hoi.make_config(args.preset, **config_overrides(args))
        except ValueError as e:
            raise SystemExit(f"train.py: {e}") from None
        args.out = args.out or os.path.join("runs", args.preset)
    if args.eval_every < 0:
        args.eval_every = 0 if args.preset == "toy" else 1
    os.makedirs(args.out, exist_ok=True)
    if is_master():  # temporary files of checkpoint writes interrupted by a SIGKILL are useless
        for tmp in glob.glob(os.path.join(args.out, "*.pt.tmp*")):
            os.remove(tmp)
            print(f"removed the unfinished checkpoint write {tmp}")
    return argparse.Namespace(args=args, cfg=cfg, device=device, resume=resume)


# ------------------------------------------------------------------------------------------------ 2. data
class SeededDataset(torch.utils.data.Dataset):
    """Item (i, epoch) gets the same augmentation whatever the worker, the process or a resume."""
    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index_and_epoch):
        i, epoch = index_and_epoch
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a CUDA seeding (1.4 ms per image on a CPU)
            torch.default_generator.manual_seed(self.seed * 1_000_003 + epoch * 10_007 + i)
            return self.ds[i]


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler yielding (index, epoch), from position `start` of the epoch (to resume mid-epoch)."""
    start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])  # the epoch reaches persistent workers


class TaskStream:
    """An endless stream of one task's micro-batches that knows its position; its loader lives for the whole run."""
    def __init__(self, dataset, global_batch, micro_batch, accumulation, seed, loader_kw, name):
        seeded = SeededDataset(dataset, seed)
        self.sampler = EpochSampler(seeded, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                                    drop_last=True)  # every process gets the same count
        self.steps_per_epoch = len(dataset) // global_batch  # the same for any number of processes
        self.micro_per_epoch = self.steps_per_epoch * accumulation
        # its own generator: starting an iterator draws a worker base seed, which must not consume the global RNG
        # (dropout's), or a resumed run (which starts its iterator mid-epoch) would draw different dropout masks
        self.loader = torch.utils.data.DataLoader(seeded, batch_size=micro_batch, sampler=self.sampler,
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
            self.sampler.start = self.batch_in_epoch * self.loader.batch_size
            self.iterator = iter(self.loader)
        self.batch_in_epoch += 1
        return next(self.iterator)


def split_batch(global_batch, processes, micro_batch):
    """Global batch -> (images per micro-batch, micro-batches per step) of one process; equal micro-batches."""
    if global_batch % processes:
        raise SystemExit(f"train.py: batch_size {global_batch} (the global batch) is not divisible by {processes} "
                         f"processes; choose a batch_size that is")
    per_process = global_batch // processes
    steps = max(1, math.ceil(per_process / micro_batch)) if micro_batch else 1
    while per_process % steps:
        steps += 1
    return per_process // steps, steps


def load_data(run):
    """Datasets (toy scenes unless --vg / --hoi), the config's class names from them, one stream per task."""
    args = run.args
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)  # rank 0 writes the toy scenes first
    data = sg2hoi.build_data(run.cfg, vars(args), is_master=is_master(), barrier=barrier)
    if not run.resume:
        run.cfg = sg2hoi.config_from_meta(run.cfg, data.get("sgg", {}).get("train", (None, None))[1],
                                          data.get("hoi", {}).get("train", (None, None))[1])
    cfg = run.cfg
    teachers = eq5_teachers(args, cfg, data)
    micro, accumulation = split_batch(cfg.batch_size, world_size(), args.micro_batch)
    # loader workers: the cores left after one for the model; none on 2 cores (toy: 56 img/s, 46 with a worker)
    workers = args.workers
    if workers < 0:
        cores = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = 0 if cores <= 2 else min(8, cores - 1)
    pin = run.device.type == "cuda" if args.pin_memory == "auto" else args.pin_memory == "true"
    loader_kw = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                     prefetch_factor=args.prefetch if workers > 0 else None)
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
    """Eq. 5's teacher per task: CLIP image embeddings (--clip_cache), the objects' text embeddings, or None."""
    if not cfg.use_vl_distill or args.text_teacher == "none" and not args.clip_cache:
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
                         "(--vg / --hoi) was given without --clip_cache. Build the cache once (needs open_clip): "
                         "python tools/prepare_clip.py images --vg ... --hoi_root ... --out clip_cache.pt, then pass "
                         "--clip_cache clip_cache.pt. Or choose another experiment explicitly: --text_teacher objects "
                         "(the mean text embedding of each image's objects) or --use_vl_distill false.")
    return {task: sg2hoi.class_text_embeddings(cfg.entity_names if task == "sgg" else cfg.hoi_object_names,
                                               cfg.text_dim, cfg.text_embeddings) for task in data}


# ------------------------------------------------------------------------------------ 3. model, criterion, optimiser
_REACH = weakref.WeakKeyDictionary()  # model -> {(task, align): names}, filled by reached_parameters


def reached_parameters(model, task, align=True):
    """Names of the parameters the loss of a `task` batch reaches (align=False: no teacher vector, no align term),
    from autograd on a blank image: reachability is a property of the graph, so it holds for every ablation."""
    if model not in _REACH:
        cfg, params = model.cfg, dict(model.named_parameters())
        flags, was_training = {n: p.requires_grad for n, p in params.items()}, model.training
        device = next(iter(params.values())).device
        reach = {}
        try:
            for p in params.values():  # for the moment: phase 1 freezes the HOI part
                p.requires_grad_(True)
            model.eval()  # no dropout, BatchNorm statistics untouched
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                out = model(torch.zeros(1, 3, 64, 64, device=device),
                            torch.zeros(1, 64, 64, dtype=torch.bool, device=device), with_hoi=True)
                for key, with_align in (("sgg", True), ("sgg", False), ("hoi", True), ("hoi", False)):
                    used = list(out.get("rel" if key == "sgg" else "hoi", {}).values())  # {}: no HOI branch
                    if cfg.use_bbseg and cfg.loss_seg > 0:
                        used.append(out["seg_logits"])
                    if cfg.use_vl_distill and cfg.loss_align > 0 and with_align:
                        used.append(out["align"])
                    grads = torch.autograd.grad(sum(t.float().sum() for t in used), list(params.values()),
                                                allow_unused=True, retain_graph=True) if used else []
                    reach[key, with_align] = {n for n, g in zip(params, grads) if g is not None}
        finally:  # the flags and the mode as they were, also when the probe fails
            for n, p in params.items():
                p.requires_grad_(flags[n])
            model.train(was_training)
        _REACH[model] = reach
    return _REACH[model][task, align]


def idle_parameters(model, task, losses=None):
    """Parameters a `task` batch's loss (`losses`, if known) does not reach; for "sgg": the HOI-only part (III-C)."""
    reached = reached_parameters(model, task, losses is None or "align" in losses)
    return [p for n, p in model.named_parameters() if n not in reached]


def parameter_groups(model):
    """Sec. IV-D's learning-rate groups: backbone, text_classifier (GEN-VLKT's small rate), hoi-only, sgg = the rest."""
    groups = {"backbone": [], "text_classifier": [], "sgg": [], "hoi": []}
    hoi_only = {id(p) for p in idle_parameters(model, "sgg")}
    text = {id(m.weight) for m in model.modules() if isinstance(m, sg2hoi.TextClassifier)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif id(p) in text:
            groups["text_classifier"].append(p)
        elif id(p) in hoi_only:
            groups["hoi"].append(p)
        else:
            groups["sgg"].append(p)
    return groups


def make_optimizer(model, cfg):
    groups = parameter_groups(model)
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
    state = {"step": 0, "skipped_nonfinite": 0, "streams": {}, "best": None}
    if run.resume:
        model.load_state_dict(run.resume["model"])
        optimizer.load_state_dict(run.resume["optimizer"])
        state = {**state, **run.resume["state"]}
        restore_rng_states(run.resume["rng"])
        if is_master():
            print(f"resumed from {args.resume} at step {state['step']}")
    return model, criterion, optimizer, state


# ------------------------------------------------------------------------------------------------ 4. training
@dataclasses.dataclass
class Schedule:
    """Which phase and task each optimiser step belongs to. Phase 2: SGG, HOI, SGG, ... or HOI alone."""
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

    def progress(self, step):  # fraction of the current phase done (for the learning-rate drop)
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
    if "hoi" not in streams:  # SGG-only training (Table V "SGG"): every epoch is phase 1
        return Schedule((cfg.sgg_epochs + cfg.joint_epochs) * sgg_spe, 0, (), {1: sgg_spe, 2: 0})
    if "sgg" not in streams:  # HOI from HOI data only (--tasks hoi)
        return Schedule(0, cfg.joint_epochs * hoi_spe, ("hoi",), {1: 0, 2: hoi_spe})
    if cfg.hoi_on_frozen_sgg:  # Table V "HOI": SGG first, then the HOI part alone on a frozen SGG part
        return Schedule(cfg.sgg_epochs * sgg_spe, cfg.joint_epochs * hoi_spe, ("hoi",), {1: sgg_spe, 2: hoi_spe})
    return Schedule(cfg.sgg_epochs * sgg_spe, 2 * cfg.joint_epochs * hoi_spe, ("sgg", "hoi"),
                    {1: sgg_spe, 2: 2 * hoi_spe})


def set_learning_rates(optimizer, cfg, phase, progress, sgg_pretrained=True):
    """Phase 2 lowers the SGG part to lr_sgg_phase2 (if phase 1 trained it); lr x 0.1 after cfg.lr_drop of a phase."""
    factor = 0.1 if progress >= cfg.lr_drop else 1.0
    for g in optimizer.param_groups:
        lowered = phase == 2 and sgg_pretrained and g["name"] == "sgg"
        base = cfg.lr_sgg_phase2 if lowered else g["base_lr"]
        g["lr"] = base * factor


def set_trainable(model, cfg, phase, has_sgg):
    """Phase 1 freezes the HOI-only part, phase 2 with hoi_on_frozen_sgg the rest; all-frozen modules run in eval."""
    hoi_only = set(map(id, idle_parameters(model, "sgg")))
    for p in model.parameters():
        if id(p) in hoi_only:
            p.requires_grad_(phase == 2 or not has_sgg)
        elif cfg.hoi_on_frozen_sgg:
            p.requires_grad_(phase == 1)
    model.train()
    for m in model.children():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def zero_touch(params):
    """0 x the trainable parameters given: under DDP, every parameter takes part in every backward (module doc)."""
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
    """One optimiser step -> (the global batch's losses {term: float}, None), or (None, what was non-finite)."""
    device, cfg = run.device, run.cfg
    Q = cfg.num_rel_queries if task == "sgg" else cfg.num_hoi_queries
    counts = {}
    for _, _, targets in micro_batches:  # the normalisers of the global batch (sg2hoi.batch_counts)
        for k, v in sg2hoi.batch_counts(targets, task, Q).items():
            counts[k] = counts.get(k, 0.0) + v
    norm = all_reduce_mean(counts, device)
    use_amp = device.type == "cuda" and run.args.amp == "bf16"
    optimizer.zero_grad(set_to_none=True)
    summed = {}
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
            # all processes agree before the backward (DDP reduces in the last one): the mean is 1 if all are finite
            if all_reduce_mean({"finite": 0.0 if bad else 1.0}, device)["finite"] < 1:
                if dist.is_initialized():  # keep DDP in step with a zero loss, then give the step up
                    zero_touch(model.parameters()).backward()
                optimizer.zero_grad(set_to_none=True)
                return None, (f"step {step} ({task} batch, images {[t['image_id'] for t in targets]}): non-finite "
                              f"{'values in ' + ', '.join(bad) if bad else 'values on another process'}")
            if dist.is_initialized():  # DDP: the parameters this task's loss does not reach take part too
                losses["loss"] = losses["loss"] + zero_touch(idle_parameters(model, task, losses))
            losses["loss"].backward()
            for k, v in losses.items():
                if not k[-1].isdigit():  # the last decoder layer's terms (and the total)
                    summed[k] = summed.get(k, 0.0) + v.item()
    for p in idle_parameters(model, task, summed):  # after DDP's reduction: AdamW must not touch the idle heads
        p.grad = None
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_max_norm)
    optimizer.step()
    return all_reduce_mean(summed, device), None


def train(run, model, criterion, optimizer, state, streams, data):
    """The schedule loop: one optimiser step per iteration, a log line per step, checkpoints, evaluations."""
    args, cfg, sched = run.args, run.cfg, run.schedule
    total = min(sched.total, args.max_steps) if args.max_steps else sched.total
    for task, s in state["streams"].items():
        streams[task].load_state(s)
    log = open_log(run, state["step"]) if is_master() else None
    if is_master():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"SG2HOI+ {n_params / 1e6:.1f} M parameters | tasks {sorted(streams)} | {world_size()} process(es) on "
              f"{run.device} | global batch {cfg.batch_size} = {world_size()} x {run.accumulation} x {run.micro} | "
              f"phase 1: {sched.phase1_steps} steps, phase 2: {sched.phase2_steps} steps | out {args.out}", flush=True)
    ddp_model, ddp_phase, last_terms, consecutive_skips = None, None, {}, 0
    t_start, start_step, step = time.time(), state["step"], state["step"]
    while step < total:
        phase, task = sched.phase(step), sched.task(step)  # task: "sgg" or "hoi", alternating in phase 2
        set_trainable(model, cfg, phase, has_sgg="sgg" in streams)  # every step: evaluations leave eval mode
        if ddp_phase != phase:  # the trainable set changes with the phase: wrap again so DDP sees it
            ddp_model = DDP(model) if dist.is_initialized() else model
            if args.compile:
                ddp_model = torch.compile(ddp_model)
            ddp_phase = phase
        set_learning_rates(optimizer, cfg, phase, sched.progress(step), sgg_pretrained=sched.phase1_steps > 0)
        micro_batches = [streams[task].next() for _ in range(run.accumulation)]
        terms, problem = train_step(run, ddp_model, model, criterion, optimizer, micro_batches, task,
                                    with_hoi=(task == "hoi"), step=step)
        if problem and args.nonfinite == "stop":  # non-finite outputs or loss: stop and say where
            raise SystemExit(f"{problem}; stopping (lower the learning rate, or --nonfinite skip to skip such steps)")
        consecutive_skips = consecutive_skips + 1 if problem else 0  # --nonfinite skip: count the skipped steps
        if problem:
            state["skipped_nonfinite"] += 1
            if is_master():
                print(f"{problem}: step skipped ({state['skipped_nonfinite']} so far)", flush=True)
        if consecutive_skips >= args.max_skips:  # that many skipped steps in a row: the model has diverged
            ckpt = os.path.join(args.out, "ckpt.pt")
            last = f"the last good checkpoint is {ckpt}" if os.path.exists(ckpt) else "no checkpoint was written yet"
            raise SystemExit(f"{consecutive_skips} consecutive steps skipped for non-finite values: the model has "
                             f"diverged; stopping (lower the learning rate; {last})")
        step += 1
        state["step"] = step
        state["streams"] = {t: s.state() for t, s in streams.items()}
        if step == start_step + 1 and is_master():
            print(f"first step done {time.time() - T_START:.1f} s after the start (set-up, data, model, "
                  f"one step)", flush=True)
        if is_master() and terms:
            last_terms[task] = " ".join(f"{k} {v:.3f}" for k, v in terms.items())  # the line shows both tasks
            record = {"step": step, "phase": phase, "task": task, "epoch": streams[task].epoch,
                      "lr": optimizer.param_groups[0]["lr"], "time": round(time.time() - t_start, 3),
                      **{k: round(v, 6) for k, v in terms.items()}}
            print(json.dumps(record), file=log, flush=True)
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


# ------------------------------------------------------------------------------------------------ 5. evaluation
def evaluate_during_training(run, model, data, state, phase, log):
    """Every rank evaluates its shard (phase 1: SGG only, HOI is untrained); rank 0 logs, prints, keeps best.pt."""
    tasks = {t: d for t, d in data.items() if phase == 2 or t == "sgg"}
    metrics = evaluation.evaluate(model, run.cfg, tasks, run.device, limit=run.args.eval_limit,
                                  amp=run.args.amp == "bf16")
    if not is_master() or metrics is None:
        return None
    print(evaluation.format_tables(metrics), flush=True)
    name = run.args.best_metric
    if name == "auto":  # SGDet R@50 in phase 1, the HOI mAP in phase 2
        name = "sgg.R@50"
        if phase == 2 and "hico" in metrics:
            name = "hico.default.mAP_full"
        elif phase == 2 and "vcoco" in metrics:
            name = "vcoco.role_mAP_S1"
    value = evaluation.lookup_metric(metrics, name)
    print(json.dumps({"event": "eval", "step": state["step"], "phase": phase, "metric": name, "value": value,
                      "metrics": _json_safe(metrics)}), file=log, flush=True)
    best = state.get("best")
    if value is not None and (best is None or best["metric"] != name or value > best["value"]):
        state["best"] = {"metric": name, "value": value, "step": state["step"]}
        shutil.copyfile(os.path.join(run.args.out, "ckpt.pt"), os.path.join(run.args.out, "best.pt.tmp"))
        os.replace(os.path.join(run.args.out, "best.pt.tmp"), os.path.join(run.args.out, "best.pt"))
        print(f"best.pt: {name} = {100 * value:.2f} at step {state['step']}")
    return metrics


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def final_evaluation(run, model, data, state, log):
    """Rank 0 writes metrics.json; no rank waits in a collective afterwards (the full test sets take minutes)."""
    if run.args.no_eval:
        return None
    phase = run.schedule.phase(max(state["step"] - 1, 0))
    metrics = evaluate_during_training(run, model, data, state, phase, log)
    if is_master() and metrics is not None:
        with open(os.path.join(run.args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    run = setup(parse_args(argv))                                         # 1
    data, streams = load_data(run)                                        # 2
    model, criterion, optimizer, state = build(run)                       # 3
    log = train(run, model, criterion, optimizer, state, streams, data)   # 4
    final_evaluation(run, model, data, state, log)                        # 5
    if log:
        log.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"rank {rank()}: peak resident memory {peak:.0f} MiB", flush=True)
    del streams  # stop the loader workers before the process group goes
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
