"""Synthetic annotations at the real datasets' size, and the data pipeline measured on them.

    python tools/fullsize.py write --root /tmp/sg2hoi_fullsize [--scale 1.0]  # 190 MB of JSON, 32 JPEGs, symlinks
    python tools/fullsize.py bench --root /tmp/sg2hoi_fullsize [--load_only]   # writes first if needed

The loaders, the data pipeline and the paper preset must be measured at the real datasets' size, but the images
cannot be downloaded here. `write` writes annotation files in the real formats (VG150: RelTR's COCO-style JSON;
HICO-DET and V-COCO: QPIC's JSON) with the real split sizes and realistic per-image counts and vocabularies; every
image entry is a symbolic link to one of a small pool of real-size JPEGs (480-1024 px), so the files exercise
exactly what the real ones do (JSON parsing, image header reads, JPEG decoding at full size) while only a few MB of
pixels are written. `bench` loads VG150 train + test and HICO-DET train + test with every check (as train.py does)
in a fresh process, then measures the paper's training transforms on the real-size JPEGs.

A tool, not part of a run: the core files (sg2hoi.py, train.py, eval.py) never import it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.io  # noqa: E402

import sg2hoi  # noqa: E402

# Split sizes: VG150 as SGB / RelTR split it, HICO-DET's annotated images, V-COCO's trainval / test (datasets.md).
FULLSIZE_SPLITS = {"vg": {"train": 57723, "val": 5000, "test": 26446},
                   "hico": {"train": 37633, "test": 9546},
                   "vcoco": {"train": 5400, "test": 4946}}


def _jpeg_pool(folder, n, rng, quality=90):
    """n real-size JPEGs (sides 480..1024 px): a toy scene scaled up, plus noise so that the JPEG has a photo's
    entropy (about 100-300 kB). Returns [(path, width, height)]."""
    os.makedirs(folder, exist_ok=True)
    pool = []
    for k in range(n):
        w, h = (int(v) for v in rng.integers(480, 1025, size=2))
        scene = sg2hoi.toy_scene(rng, "train", 128)[0]
        canvas = torch.from_numpy(scene).permute(2, 0, 1).float()[None]                    # (1, 3, 128, 128)
        image = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)[0]  # (3, h, w)
        image = image + torch.from_numpy(rng.normal(0, 12, size=(1, h, w)).astype(np.float32))
        data = torchvision.io.encode_jpeg(image.clamp(0, 255).to(torch.uint8), quality=quality)
        path = os.path.join(folder, f"{k:03d}.jpg")
        with open(path, "wb") as f:
            f.write(data.numpy().tobytes())
        pool.append((path, w, h))
    return pool


def _link_images(pool, pool_index, folder, file_names):
    """folder/file_names[i] -> a relative symbolic link to pool[pool_index[i]] (the tree can be moved as a whole)."""
    os.makedirs(folder, exist_ok=True)
    targets = [os.path.relpath(p, folder) for p, _, _ in pool]
    for name, k in zip(file_names, pool_index.tolist()):
        path = os.path.join(folder, name)
        if os.path.lexists(path):
            os.remove(path)
        os.symlink(targets[k], path)


def _write_json(path, obj):
    """json.dumps (the C encoder) then one write: json.dump streams through the pure-Python encoder, 5x slower."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(obj))


def _vg_frequencies(vocab):
    """VG150's object and predicate frequencies (VG-SGG-dicts' object counts, the GCL training predicate counts) if
    the reference data lies beside the repository (../shared/data/vg150), else uniform."""
    shared = os.path.join(HERE, "..", "shared", "data", "vg150")
    obj_p, pred_p = np.ones(150), np.ones(50)
    try:
        with open(os.path.join(shared, "VG-SGG-dicts-with-attri.json")) as f:
            obj_count = json.load(f)["object_count"]
        obj_p = np.array([obj_count.get(n, 1) for n in vocab["vg150_objects"]], np.float64)
        with open(os.path.join(shared, "predicate_stats.json")) as f:
            pred_p = np.array([p["train_count_gcl"] for p in json.load(f)["predicates"]], np.float64)
    except (OSError, KeyError, ValueError):
        pass
    return obj_p / obj_p.sum(), pred_p / pred_p.sum()


def _write_vg_split(vg, split, n, first_id, first_ann_id, rng, pool, probabilities, boxes_per_image, rels_per_image,
                    categories):
    """One VG150 split as a COCO detection JSON (images first_id..first_id + n - 1) with its image links. Returns
    (its rel.json table, the next annotation id)."""
    obj_p, pred_p = probabilities
    pool_wh = np.array([(w, h) for _, w, h in pool], np.float64)              # (P, 2)
    ids = np.arange(first_id, first_id + n)
    which = rng.integers(0, len(pool), n)                                   # (n,) pool image of each entry
    wh = pool_wh[which]                                                     # (n, 2)
    nb = np.clip(rng.poisson(boxes_per_image, n), 2, 60)                    # (n,) boxes per image
    nr = np.clip(rng.poisson(rels_per_image, n), 1, None)                   # (n,) relations per image
    img_of_box = np.repeat(np.arange(n), nb)                                # (B,)
    W, H = wh[img_of_box, 0], wh[img_of_box, 1]
    bw, bh = W * rng.uniform(0.04, 0.6, len(W)), H * rng.uniform(0.04, 0.6, len(W))
    x, y = rng.uniform(0, 1, len(W)) * (W - bw), rng.uniform(0, 1, len(W)) * (H - bh)
    xywh = np.round(np.stack([x, y, bw, bh], 1), 2)                         # (B, 4) original pixels
    cats = rng.choice(150, size=len(W), p=obj_p) + 1                        # 1..150
    img_of_rel = np.repeat(np.arange(n), nr)                                # (R,)
    nb_r = nb[img_of_rel]
    s = (rng.uniform(0, 1, len(nb_r)) * nb_r).astype(np.int64)             # subject index in the image
    o = (rng.uniform(0, 1, len(nb_r)) * (nb_r - 1)).astype(np.int64)
    o += o >= s                                                             # object != subject
    preds = rng.choice(50, size=len(nb_r), p=pred_p) + 1                    # 1..50
    images = [{"file_name": f"{i}.jpg", "height": int(h), "width": int(w), "id": int(i)}
              for i, (w, h) in zip(ids.tolist(), wh.tolist())]
    box_ids = ids[img_of_box].tolist()
    annotations = [{"bbox": b, "category_id": c, "image_id": i, "id": first_ann_id + k,
                    "area": round(b[2] * b[3], 2), "iscrowd": 0, "segmentation": None}
                   for k, (b, c, i) in enumerate(zip(xywh.tolist(), cats.tolist(), box_ids))]
    triples = np.stack([s, o, preds], 1).tolist()
    ends = np.cumsum(nr).tolist()
    table = {str(i): triples[e - k:e] for i, k, e in zip(ids.tolist(), nr.tolist(), ends)}
    _write_json(os.path.join(vg, f"{split}.json"), {"images": images, "annotations": annotations,
                                                    "categories": categories})
    _link_images(pool, which, os.path.join(vg, "images"), [f"{i}.jpg" for i in ids.tolist()])
    return table, first_ann_id + len(annotations)


def _random_box(rng, w, h):
    bw, bh = int(rng.integers(w // 10, w // 2)), int(rng.integers(h // 8, int(h * 0.9)))
    x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    return [x1, y1, x1 + bw, y1 + bh]


def _hoia_entry(dataset, split, k, name, w, h, rng, vocab_tables):
    """One image of a HOIA list: 1-2 persons, 1-3 objects; HICO-DET: 2-4 HOIs among the 600 (verb, object) pairs;
    V-COCO: 1-3 actions per person, object_id -1 for agent-only verbs or when no annotated object fits the verb."""
    coco91, hico_verbs_of_object, hico_objects, corre_vcoco, agent_only = vocab_tables
    n_person, n_obj = 1 + int(rng.random() < 0.3), 1 + int(rng.integers(0, 3))
    if dataset == "hico":
        obj_cls = [int(hico_objects[j]) for j in rng.integers(0, len(hico_objects), n_obj)]
    else:
        obj_cls = [int(c) for c in rng.integers(1, 80, n_obj)]
    anns = [{"bbox": _random_box(rng, w, h), "category_id": 1} for _ in range(n_person)] + \
           [{"bbox": _random_box(rng, w, h), "category_id": coco91[c]} for c in obj_cls]
    hois = []
    if dataset == "hico":
        for _ in range(int(rng.integers(2, 5))):
            j = int(rng.integers(0, n_obj))
            verbs = hico_verbs_of_object[obj_cls[j]]
            v, hoi = verbs[int(rng.integers(0, len(verbs)))]
            hois.append({"subject_id": int(rng.integers(0, n_person)), "object_id": n_person + j,
                         "category_id": v + 1, "hoi_category_id": hoi + 1})
            if split == "test":  # the released test file has no hoi_category_id
                del hois[-1]["hoi_category_id"]
    else:
        for person in range(n_person):
            for v in rng.choice(29, size=int(rng.integers(1, 4)), replace=False).tolist():
                fits = [n_person + j for j, c in enumerate(obj_cls) if corre_vcoco[v, c] > 0]
                obj = -1 if agent_only[v] or not fits else fits[int(rng.integers(0, len(fits)))]
                hois.append({"subject_id": person, "object_id": obj, "category_id": v})
    entry = {"file_name": name, "annotations": anns, "hoi_annotation": hois}
    if dataset == "hico" and split == "train":  # only the released trainval file has img_id
        entry["img_id"] = k + 1
    return entry


def _write_hoia_split(root, dataset, split, n, rng, pool, vocab_tables):
    """One HICO-DET or V-COCO split as QPIC's per-image list, with its image links."""
    which = rng.integers(0, len(pool), n)
    if dataset == "hico":
        folder = "train2015" if split == "train" else "test2015"
        names = [f"HICO_{folder}_{k + 1:08d}.jpg" for k in range(n)]
    else:
        folder = "train2014" if split == "train" else "val2014"
        names = [f"COCO_{folder}_{k + 1:012d}.jpg" for k in range(n)]
    entries = [_hoia_entry(dataset, split, k, name, pool[p][1], pool[p][2], rng, vocab_tables)
               for k, (name, p) in enumerate(zip(names, which.tolist()))]
    ann_file = sg2hoi.HOIA_FILES[dataset][split != "train"]
    _write_json(os.path.join(root, dataset, "annotations", ann_file), entries)
    _link_images(pool, which, os.path.join(root, dataset, "images", folder), names)


def write_fullsize_annotations(root, scale=1.0, pool_size=32, seed=0, boxes_per_image=11.0, rels_per_image=6.0):
    """Write VG150 (RelTR's JSON), HICO-DET and V-COCO (QPIC's JSON) with the real split sizes times `scale`
    (FULLSIZE_SPLITS; scale < 1 for tests) under root/{vg,hico,vcoco}, images as symbolic links into root/pool.

    VG: about `boxes_per_image` boxes (Poisson, 2..60) and `rels_per_image` relations (Poisson, >= 1) per image,
    classes and predicates drawn from VG150's frequencies, COCO xywh boxes in original pixels; width / height = the
    linked JPEG's real size. HICO-DET and V-COCO: see _hoia_entry (train has img_id and hoi_category_id, test not,
    as the released files). Reuses root if root/FULLSIZE.json has the same settings.
    Returns {(dataset, split): number of images}."""
    settings = dict(scale=scale, pool_size=pool_size, seed=seed, boxes_per_image=boxes_per_image,
                    rels_per_image=rels_per_image)
    done = os.path.join(root, "FULLSIZE.json")
    if os.path.exists(done):
        with open(done) as f:
            previous = json.load(f)
        if previous["settings"] == settings:
            return {tuple(k.split("/")): n for k, n in previous["counts"].items()}
    rng = np.random.default_rng(seed)
    vocab = sg2hoi.load_vocab()
    pool = _jpeg_pool(os.path.join(root, "pool"), pool_size, rng)
    sizes = {ds: {s: max(1, round(n * scale)) for s, n in splits.items()} for ds, splits in FULLSIZE_SPLITS.items()}

    # VG150: train.json / val.json / test.json (COCO detection JSON) + rel.json
    probabilities = _vg_frequencies(vocab)
    rel_json = {"rel_categories": ["__background__"] + vocab["vg150_predicates"]}
    categories = [{"supercategory": n, "id": i + 1, "name": n} for i, n in enumerate(vocab["vg150_objects"])]
    next_image_id, next_ann_id = 1, 1
    for split in ("train", "val", "test"):
        n = sizes["vg"][split]
        rel_json[split], next_ann_id = _write_vg_split(os.path.join(root, "vg"), split, n, next_image_id, next_ann_id,
                                                       rng, pool, probabilities, boxes_per_image, rels_per_image,
                                                       categories)
        next_image_id += n
    _write_json(os.path.join(root, "vg", "rel.json"), rel_json)
    del rel_json

    # HICO-DET and V-COCO: QPIC's per-image list
    hico_verbs_of_object = {}
    for h, (v, o) in enumerate(vocab["hico_hois"]):  # (verb 0-based, COCO-80 object) -> HOI id h + 1
        hico_verbs_of_object.setdefault(o, []).append((v, h))
    corre_vcoco = sg2hoi._vocab_correct_mat("vcoco", vocab)  # (29, 80) [verb, COCO-80 object]
    vocab_tables = ([c["id"] for c in vocab["coco80"]], hico_verbs_of_object, sorted(hico_verbs_of_object),
                    corre_vcoco, [v["role"] is None for v in vocab["vcoco_verbs"]])
    for dataset in ("hico", "vcoco"):
        for split in ("train", "test"):
            _write_hoia_split(root, dataset, split, sizes[dataset][split], rng, pool, vocab_tables)
        corre = sg2hoi._vocab_correct_mat(dataset, vocab)
        np.save(os.path.join(root, dataset, "annotations", f"corre_{dataset}.npy"), corre)
    counts = {(ds, split): n for ds, splits in sizes.items() for split, n in splits.items()}
    _write_json(done, {"settings": settings, "counts": {"/".join(k): n for k, n in counts.items()}})
    return counts


# The load is measured in a fresh process: peak memory is a per-process high-water mark, and a fresh process has
# loaded nothing before.
_LOAD_PROBE = """
import json, os, resource, sys, time
sys.path.insert(0, {here!r})
import sg2hoi

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

base, t0, out = rss(), time.perf_counter(), {{}}
data = sg2hoi.build_data(sg2hoi.make_config("paper"), dict(vg=os.path.join({root!r}, "vg"),
                                                           hoi=os.path.join({root!r}, "hico"), hoi_dataset="hico"))
out["total_s"] = round(time.perf_counter() - t0, 2)
out["images"] = {{task + " " + split: len(records) for task, splits in data.items()
                 for split, (records, _) in splits.items()}}
out["peak_growth_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
out["held_mb"] = round(rss() - base)
print("PROBE" + json.dumps(out))
"""


def measure_load(root):
    """Load + check VG150 train + test and HICO-DET train + test of `root` (build_data, as train.py and eval.py
    do: every annotation check and every image header) in a fresh process. Returns {"total_s", "images",
    "peak_growth_mb" (peak resident memory minus that after importing sg2hoi), "held_mb" (after the load)}."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _LOAD_PROBE.format(here=HERE, root=root)], capture_output=True,
                         text=True, env=env)
    probe = [line for line in run.stdout.splitlines() if line.startswith("PROBE")]
    if run.returncode or not probe:
        raise RuntimeError(f"loader probe failed: {run.stderr[-2000:]}")
    return json.loads(probe[0][len("PROBE"):])


def measure_transforms(root, images=100, batch_size=4, workers=(1, 2)):
    """Images per second of one loader worker (one thread) with the paper's training transforms
    (make_transforms(True, 800, 1333): decode, flip, multi-scale resize, colour jitter, normalisation) on the VG
    val split's real-size JPEGs, in process and through a DataLoader with `workers` workers (collate included)."""
    records, meta = sg2hoi.load_dataset("vg", os.path.join(root, "vg"), "val", check_images=False)
    dataset = sg2hoi.DetectionDataset(records[:images], meta, sg2hoi.make_transforms(True, 800, 1333))
    figures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        torch.manual_seed(0)
        dataset[0]
        t = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        figures["images/s, one worker, in process"] = round(len(dataset) / (time.perf_counter() - t), 1)
        for n in workers:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=n,
                                                 collate_fn=sg2hoi.collate, prefetch_factor=4)
            it = iter(loader)
            next(it)  # workers started and warm
            t, count = time.perf_counter(), 0
            for _, _, targets in it:
                count += len(targets)
            figures[f"images/s, DataLoader, {n} worker(s)"] = round(count / (time.perf_counter() - t), 1)
    finally:
        torch.set_num_threads(threads)
    return figures


def benchmark_data(root, scale=1.0, images=100, batch_size=4, workers=(1, 2), load_only=False):
    """Write the full-size synthetic annotations into root (reused when already there), then measure the load
    (measure_load) and, unless load_only, the training transforms (measure_transforms). Prints and returns the
    figures as a dict. On a shared machine the numbers vary from run to run."""
    figures = {"counts": {"/".join(k): n for k, n in write_fullsize_annotations(root, scale=scale).items()}}
    figures["load"] = measure_load(root)
    print(f"[benchmark data] VG150 train+test and HICO-DET train+test, with image checks: {figures['load']}")
    if not load_only:
        figures.update(measure_transforms(root, images, batch_size, workers))
        print(f"[benchmark data] paper training transforms on {images} real-size JPEGs: "
              f"{ {k: v for k, v in figures.items() if k.startswith('images/s')} }")
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "bench"], help="write the annotations, or measure (writes first)")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "sg2hoi_fullsize"),
                        help="folder of the annotations (written once, reused with the same settings)")
    parser.add_argument("--scale", type=float, default=1.0, help="split sizes times this (1 = the real sizes)")
    parser.add_argument("--pool_size", type=int, default=32, help="write: number of distinct real-size JPEGs")
    parser.add_argument("--seed", type=int, default=0, help="write: random seed")
    parser.add_argument("--images", type=int, default=100, help="bench: JPEGs for the transform measurement")
    parser.add_argument("--load_only", action="store_true", help="bench: measure the load only")
    args = parser.parse_args(argv)
    if args.command == "write":
        counts = write_fullsize_annotations(args.root, scale=args.scale, pool_size=args.pool_size, seed=args.seed)
        print(json.dumps({"/".join(k): n for k, n in counts.items()}))
    else:
        figures = benchmark_data(args.root, scale=args.scale, images=args.images, load_only=args.load_only)
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
