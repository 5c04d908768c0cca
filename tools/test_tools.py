"""Tests of the scripts in tools/ (with the core tests: python -m pytest -q test_sg2hoi.py tools/test_tools.py).
Each states a property of a tool and checks it on a small worked example."""
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
import eval as ev  # noqa: E402
import bench  # noqa: E402
import bootstrap  # noqa: E402
import sg2hoi  # noqa: E402
import check_images  # noqa: E402
from test_sg2hoi import _bad_image_records, _hico_case, _synthetic_collected  # noqa: E402  (core tests' examples)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency here); they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


# ---------------------------------------------------------------- tools/bootstrap.py


def test_bootstrap_redraws_test_images_with_their_ground_truth_and_pairs_the_runs():
    """resample / bootstrap on a two-image HICO case (a TP at 0.7 in image 0, an FP at 0.95 in image 1):
    drawing image 0 twice gives AP 1, image 1 twice AP 0, one of each 3 / 11. The bootstrap's std matches
    that distribution's, and a run compared with itself differs by exactly 0 in every draw."""
    H, O = [0, 0, 99, 99], [100, 100, 199, 199]
    gt, pred = _hico_case([H, O], [0, 1], [(0, 1)], [[0.9, 0.8, 0.7]], [H, O], [0, 1], [[0, 1, 2]])
    _, fp_pred = _hico_case([H, [300, 300, 399, 399]], [0, 1], [(0, 1)], [[0, 0, 0.95]], [], [], [])
    run = {"hoi": dict(dataset="hico", gts=[gt, gt], preds=[pred, fp_pred], correct_mat=np.ones((3, 2)), rare=[],
                       non_rare=None)}
    mAP = lambda c: ev.headline(ev.metrics_from_collected(c))["HICO mAP Full"]
    assert mAP(run) == pytest.approx(300 / 11)
    for picks, expected in (([0, 0], 100.0), ([1, 1], 0.0), ([1, 0], 300 / 11), ([0, 1], 300 / 11)):
        assert mAP(bootstrap.resample(run, {"hoi": np.array(picks)})) == pytest.approx(expected), picks
    r = bootstrap.bootstrap({"a": run, "b": run}, resamples=1000, seed=0)
    value, std = r["runs"]["a"]["HICO mAP Full"]
    mean = 0.25 * 100 + 0.5 * 300 / 11
    exact = math.sqrt(0.25 * (100 - mean) ** 2 + 0.5 * (300 / 11 - mean) ** 2 + 0.25 * mean ** 2)  # 37.1
    assert value == pytest.approx(300 / 11) and std == pytest.approx(exact, abs=2)
    assert r["differences"]["b - a"]["HICO mAP Full"] == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="the same test images"):
        bootstrap.bootstrap({"a": run, "c": {"hoi": {**run["hoi"], "gts": [gt], "preds": [pred]}}}, resamples=2)

def test_bootstrap_command_reports_each_run_and_the_difference_and_refuses_a_file_given_twice(tmp_path, capsys):
    preds, same = str(tmp_path / "preds.pt"), str(tmp_path / "same.pt")
    ev.save_predictions(_synthetic_collected(), preds)
    shutil.copyfile(preds, same)
    with pytest.raises(SystemExit, match="given twice"):
        bootstrap.main([preds, preds])
    bootstrap.main([preds, same, "--resamples", "3", "--json", str(tmp_path / "boot.json")])
    assert "paired bootstrap: 3 draws" in capsys.readouterr().out
    with open(tmp_path / "boot.json") as f:
        boot = json.load(f)
    evaluated = ev.metrics_from_collected(bootstrap.load_predictions(preds))  # each run's number: the same as evaluated
    assert boot["runs"][preds]["SGDet R@50"][0] == pytest.approx(100 * evaluated["sgg"]["R@50"])
    assert boot["differences"][f"{same} - {preds}"]["HICO mAP Full"] == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(SystemExit, match="boot.json: not a predictions file"):  # a bootstrap report is not one
        bootstrap.main([preds, str(tmp_path / "boot.json")])


# ---------------------------------------------------------------- tools/bench.py


def test_metrics_benchmark_times_every_evaluator_at_a_small_size():
    out = bench.benchmark_metrics(sgdet_images=20, hico_images=10)
    names = ("sgdet", "hico_sparse_mask", "hico_dense_mask", "hico_sparse_mask_full_sort", "hico_dense_mask_full_sort")
    assert {k for k in out if k.endswith("_s")} == {f"{n}{s}" for n in names for s in ("_s", "_cpu_s")}
    assert bench.evaluation._stable_top is ev._stable_top  # the shortcut is put back after its comparison


def test_scaled_down_rehearsal_of_the_paper_run_survives_a_sigkill_and_resumes(tmp_path):
    """tools/bench.py rehearsal, scaled down: full-size formats at 0.2 % of the split sizes, a small model, two
    gloo processes through phase 1 and phase 2, killed with SIGKILL after the phase-1 checkpoint, resumed, evaluated."""
    small = ["--backbone", "tiny", "--d_model", "64", "--nheads", "4", "--dim_feedforward", "128", "--enc_layers", "1",
             "--rel_dec_layers", "1", "--r2i_layers", "1", "--feat_trans_layers", "1", "--query_trans_layers", "1",
             "--hoi_dec_layers", "1", "--num_rel_queries", "8", "--num_hoi_queries", "8", "--seg_hidden", "16",
             "--text_dim", "32", "--image_size", "128", "--max_size", "192"]
    report = bench.benchmark_rehearsal(str(tmp_path / "fullsize"), str(tmp_path / "run"), processes=2, subset=4,
                                       scale=0.002, model_args=small)
    assert report["steps"] == [1, 2, 3, 4, 5, 6], "each step once, the resumed ones after the kill"
    assert report["phases"] == [1, 1, 2, 2, 2, 2]
    assert report["metrics_written"] and len(report["peak_memory_mib"]) == 2  # both ranks of the resumed run
    assert report["checkpoint"] and report["seconds_per_step"] is not None


# ---------------------------------------------------------------- tools/fullsize.py


@pytest.fixture(scope="module")
def fullsize_tiny(tmp_path_factory):
    """The full-size generator at 1/500 of the real split sizes, with a pool of 3 real-size JPEGs."""
    import fullsize

    root = str(tmp_path_factory.mktemp("fullsize"))
    counts = fullsize.write_fullsize_annotations(root, scale=0.002, pool_size=3, seed=1)
    return root, counts


def test_fullsize_generator_writes_real_formats_that_the_loaders_read_back(fullsize_tiny):
    import fullsize
    import torchvision
    from PIL import Image

    root, counts = fullsize_tiny
    expected = {("vg", "train"): 115, ("vg", "val"): 10, ("vg", "test"): 53, ("hico", "train"): 75,
                ("hico", "test"): 19, ("vcoco", "train"): 11, ("vcoco", "test"): 10}  # round(real size / 500)
    assert counts == expected
    pool = {os.path.join(root, "pool", f) for f in os.listdir(os.path.join(root, "pool"))}
    assert len(pool) == 3
    size = {f: Image.open(f).size for f in pool}  # (width, height)
    for w, h in size.values():
        assert 480 <= w <= 1024 and 480 <= h <= 1024
    n_boxes, n_rels = [], []
    for (kind, split), n in expected.items():
        records, meta = sg2hoi.load_dataset(kind, os.path.join(root, kind), split)
        assert len(records) == n, (kind, split)
        for r in records:
            assert os.path.islink(r["file"]) and os.path.realpath(r["file"]) in pool  # links, not copies
            w, h = size[os.path.realpath(r["file"])]
            assert (r["width"], r["height"]) == (w, h)
            assert (r["boxes"][:, 2] <= w).all() and (r["boxes"][:, 3] <= h).all()
            if kind == "vg":
                n_boxes.append(len(r["boxes"]))
                n_rels.append(len(r["rels"]))
            elif kind == "hico":
                assert 2 <= len(r["hois"]) <= 4 and (r["labels"][r["hois"][:, 0]] == 0).all()  # person subjects
        if kind == "vg":
            assert len(meta["entity_names"]) == 150 and len(meta["predicate_names"]) == 50
    assert 9 <= np.mean(n_boxes) <= 13 and 5 <= np.mean(n_rels) <= 7  # about 11 boxes and 6 relations per image
    first = sorted(pool)[0]
    assert torchvision.io.decode_image(first).shape == (3, *size[first][::-1])  # a real RGB JPEG of that size
    # the second call finds the files made with the same settings and writes nothing
    stamp = os.path.getmtime(os.path.join(root, "vg", "train.json"))
    assert fullsize.write_fullsize_annotations(root, scale=0.002, pool_size=3, seed=1) == expected
    assert os.path.getmtime(os.path.join(root, "vg", "train.json")) == stamp


def test_fullsize_load_measurement_reports_time_memory_and_the_images_of_the_four_splits(fullsize_tiny, capsys):
    """What `python tools/fullsize.py bench --load_only` (and tools/bench.py data) measures, on the tiny files."""
    import fullsize

    root, _ = fullsize_tiny
    load = fullsize.measure_load(root)
    assert load["images"] == {"sgg train": 115, "sgg test": 53, "hoi train": 75, "hoi test": 19}
    assert load["total_s"] > 0 and load["peak_growth_mb"] >= 0 and "held_mb" in load
    with pytest.raises(SystemExit) as done:
        fullsize.main(["--help"])
    assert done.value.code == 0 and "bench" in capsys.readouterr().out


# ---------------------------------------------------------------- tools/vg_h5_to_json.py


def _sgb_fixture(root, h5py, sizes, split, first_box, last_box, first_rel, last_rel, labels, boxes, relationships,
                 predicates):
    """The SGB files as datasets.md 2.4 describes them (int32 (cx, cy, w, h) at 1024, global relation indices, -1
    for an image without boxes or relations), with the corrupted image 1592 listed in image_data.json."""
    from test_sg2hoi import _png

    vocab = sg2hoi.load_vocab()
    dicts = {"idx_to_label": {str(i + 1): n for i, n in enumerate(vocab["vg150_objects"])},
             "idx_to_predicate": {str(i + 1): n for i, n in enumerate(vocab["vg150_predicates"])}}
    with open(f"{root}/VG-SGG-dicts-with-attri.json", "w") as f:
        json.dump(dicts, f)
    info = [{"image_id": i + 1, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    with open(f"{root}/image_data.json", "w") as f:
        json.dump(info[:1] + [{"image_id": 1592, "width": 1, "height": 1}] + info[1:], f)
    arrays = dict(split=split, img_to_first_box=first_box, img_to_last_box=last_box, img_to_first_rel=first_rel,
                  img_to_last_rel=last_rel, boxes_1024=boxes, relationships=relationships)
    with h5py.File(f"{root}/VG-SGG-with-attri.h5", "w") as h5:
        for name, values in arrays.items():
            h5[name] = np.array(values, np.int32)
        h5["labels"], h5["predicates"] = np.array(labels), np.array(predicates)  # (N, 1) and (R, 1) int64
    for i, (w, h) in enumerate(sizes):
        _png(f"{root}/images/{i + 1}.jpg", w, h)


def test_vg_h5_converter_decodes_sgb_boxes_and_load_vg_json_reads_the_result(tmp_path):
    """Image 1 (512 x 256) has two boxes and a relation; image 2 no relations, image 3 no boxes: both are left out
    (filter_empty_rels). (cx, cy, w, h) = (100, 50, 40, 21) at 1024: x1 = 100 - 20 = 80, y1 = int(50 - 10.5) = 39,
    x2 = 80 + 40 = 120, y2 = 39 + 21 = 60, times 512 / 1024. These are the records the former sg2hoi.load_vg_h5
    returned for the same files."""
    h5py = pytest.importorskip("h5py")
    import vg_h5_to_json

    root = str(tmp_path)
    _sgb_fixture(root, h5py, [(512, 256), (100, 100), (100, 100)], [2, 2, 2], [0, 2, -1], [1, 2, -1], [0, -1, -1],
                 [0, -1, -1], [[5], [7], [9]], [[100, 50, 40, 21], [300, 200, 100, 100], [10, 10, 4, 4]], [[0, 1]],
                 [[31]])
    assert vg_h5_to_json.convert(root) == {"train": 0, "val": 0, "test": 1}
    records, meta = sg2hoi.load_vg_json(root, "test")
    assert [(r["file"], r["image_id"], r["width"], r["height"]) for r in records] == [(f"{root}/images/1.jpg", 1,
                                                                                       512, 256)]
    np.testing.assert_array_equal(records[0]["boxes"], [[40, 19.5, 60, 30], [125, 75, 175, 125]])
    assert records[0]["labels"].tolist() == [4, 6] and records[0]["rels"].tolist() == [[0, 1, 30]]
    assert meta["entity_names"] == sg2hoi.load_vocab()["vg150_objects"] and len(meta["predicate_names"]) == 50
    with pytest.raises(SystemExit) as done:
        vg_h5_to_json.main(["--help"])
    assert done.value.code == 0


def _sgb_reference(root, h5py, num_val_im):
    """A plain reading of SGB's load_graphs (datasets.md 2.4), one box at a time: {split: [(image id, boxes,
    0-based labels, 0-based rels)]}, to compare the converter's round trip with."""
    info = [x for x in json.load(open(f"{root}/image_data.json")) if x["image_id"] != 1592]
    with h5py.File(f"{root}/VG-SGG-with-attri.h5", "r") as h5:
        d = {k: h5[k][:] for k in h5}
    rows = {s: [i for i in range(len(info)) if d["split"][i] == (2 if s == "test" else 0)
                and d["img_to_first_box"][i] >= 0 and d["img_to_first_rel"][i] >= 0] for s in ("train", "test")}
    rows["val"], rows["train"] = rows["train"][:num_val_im], rows["train"][num_val_im:]
    out = {}
    for split, index in rows.items():
        out[split] = []
        for i in index:
            a, b, ra, rb = (int(d[k][i]) for k in ("img_to_first_box", "img_to_last_box", "img_to_first_rel",
                                                   "img_to_last_rel"))
            w, h = info[i]["width"], info[i]["height"]
            boxes = []
            for cx, cy, bw, bh in d["boxes_1024"][a:b + 1].tolist():
                x1, y1 = int(cx - bw / 2), int(cy - bh / 2)  # truncated toward zero, as int32 assignment does
                corners = np.float32([x1, y1, x1 + bw, y1 + bh]) / np.float32(1024) * np.float32(max(w, h))
                boxes.append(np.minimum(np.maximum(corners, 0), np.float32([w - 1, h - 1, w - 1, h - 1])))
            rels = [[s - a, o - a, p - 1] for (s, o), (p,) in zip(d["relationships"][ra:rb + 1].tolist(),
                                                                    d["predicates"][ra:rb + 1].tolist())]
            out[split].append((info[i]["image_id"], np.array(boxes), d["labels"][a:b + 1, 0] - 1, rels))
    return out


def test_vg_h5_converter_round_trip_equals_a_plain_reading_of_sgb_on_random_files(tmp_path):
    """Twelve random images (some without boxes or relations, train and test rows mixed, num_val_im = 2): every
    split load_vg_json reads from the converted files holds the images, boxes, labels and relations of a plain
    one-box-at-a-time reading of the .h5, in the same order."""
    h5py = pytest.importorskip("h5py")
    import vg_h5_to_json

    rng, root = np.random.default_rng(0), str(tmp_path)
    sizes = [(int(rng.integers(200, 900)), int(rng.integers(200, 900))) for _ in range(12)]
    first_box, last_box, first_rel, last_rel, boxes, labels, relationships, predicates = [], [], [], [], [], [], [], []
    for k in range(12):
        n = int(rng.integers(0, 5)) if k % 5 else 0
        r = int(rng.integers(1, 4)) if n and k % 3 else 0
        first_box.append(len(boxes) if n else -1)
        last_box.append(len(boxes) + n - 1 if n else -1)
        first_rel.append(len(predicates) if r else -1)
        last_rel.append(len(predicates) + r - 1 if r else -1)
        relationships += [[first_box[-1] + int(rng.integers(0, n)), first_box[-1] + int(rng.integers(0, n))]
                          for _ in range(r)]
        predicates += [[int(rng.integers(1, 51))] for _ in range(r)]
        frame_w, frame_h = (1024 * v // max(sizes[k]) for v in sizes[k])  # the image in the 1024 frame
        for _ in range(n):  # boxes inside the image, as vg_to_roidb.py writes them (none degenerate once scaled)
            w, h = int(rng.integers(8, frame_w // 2)), int(rng.integers(8, frame_h // 2))
            cx, cy = int(rng.integers(w // 2 + 1, frame_w - w // 2)), int(rng.integers(h // 2 + 1, frame_h - h // 2))
            boxes.append([cx, cy, w, h])
            labels.append([int(rng.integers(1, 151))])
    split = [int(v) for v in rng.choice([0, 2], 12, p=[0.7, 0.3])]  # SGB: 70 % train, no 1 (val)
    _sgb_fixture(root, h5py, sizes, split, first_box, last_box, first_rel, last_rel, labels, boxes, relationships,
                 predicates)
    vg_h5_to_json.main([root, "--out", str(tmp_path / "json"), "--num_val_im", "2"])
    expected = _sgb_reference(root, h5py, num_val_im=2)
    assert [len(expected[s]) > 0 for s in ("train", "val", "test")] == [True] * 3
    for split, images in expected.items():
        records, _ = sg2hoi.load_vg_json(str(tmp_path / "json"), split)
        assert [r["image_id"] for r in records] == [image_id for image_id, *_ in images], split
        for r, (image_id, boxes, labels, rels) in zip(records, images):
            np.testing.assert_array_equal(r["boxes"], boxes)
            assert r["labels"].tolist() == labels.tolist() and r["rels"].tolist() == rels, image_id
            assert os.path.realpath(r["file"]) == os.path.realpath(f"{root}/images/{image_id}.jpg")


def test_vg_h5_converter_checks_labels_predicates_indices_and_num_val_im(tmp_path):
    """A label or predicate 0 (background) or a relation to another image's box is a DataError naming the file,
    the image, its row and the field; val = the first num_val_im training images, and num_val_im that leaves no
    training image is an error."""
    h5py = pytest.importorskip("h5py")
    import vg_h5_to_json

    def fixture(root, labels=((5,), (7,)), predicates=((31,),), relationships=((0, 1),), split=(2,)):
        n = len(split)
        root.mkdir()
        _sgb_fixture(str(root), h5py, [(512, 256)] * n, split, [0] * n, [1] * n, [0] * n, [0] * n, labels,
                     [[100, 50, 40, 21], [300, 200, 100, 100]], relationships, predicates)
        return str(root)

    for name, kw, pattern in [("label", dict(labels=((5,), (0,))), r"field 'labels' row 1 = 0, outside 1..150"),
                              ("pred", dict(predicates=((0,),)), r"field 'predicates' row 0 = 0, outside 1..50"),
                              ("index", dict(relationships=((0, 2),)), r"field 'relationships' row 0 = \[0, 2\] but "
                                                                       r"the image's boxes are rows 0..1")]:
        root = fixture(tmp_path / name, **kw)
        with pytest.raises(sg2hoi.DataError, match=r"VG-SGG-with-attri.h5: image 1 \(row 0\): " + pattern):
            vg_h5_to_json.convert(root)
    root = fixture(tmp_path / "split", split=(0, 0, 0))
    assert vg_h5_to_json.convert(root, num_val_im=1) == {"train": 2, "val": 1, "test": 0}
    assert [r["image_id"] for r in sg2hoi.load_vg_json(root, "val")[0]] == [1]
    assert [r["image_id"] for r in sg2hoi.load_vg_json(root, "train")[0]] == [2, 3]
    with pytest.raises(sg2hoi.DataError, match=r"3 training images .* num_val_im = 5000 .* --num_val_im"):
        vg_h5_to_json.convert(root)


# ---------------------------------------------------------------- tools/check_images.py


def test_verify_images_finds_a_truncated_jpeg_a_text_file_and_a_wrong_size(tmp_path):
    records = _bad_image_records(tmp_path)
    records.append(dict(records[0], image_id=3, width=65))  # the record's size is not the image's
    bad = check_images.verify_images(records)
    assert [(os.path.basename(f), i) for f, i, _ in bad] == [("truncated.jpg", 1), ("text.jpg", 2), ("good.png", 3)]
    assert "truncated" in bad[0][2] and "decoded size 64 x 48 but the record says 65 x 48" in bad[2][2]


def test_check_images_lists_the_bad_images_and_exits_1(tmp_path, capsys):
    root = str(tmp_path / "toy")
    sg2hoi.write_toy_datasets(root, num_train=6, num_test=4, num_train_hoi=5)
    victim = sorted(os.listdir(f"{root}/hico/images/test2015"))[3]
    with open(f"{root}/hico/images/test2015/{victim}", "w") as f:
        f.write("text")  # an image that is not one: the loaders' header check is off in this mode
    assert check_images.main(["--vg", f"{root}/vg"]) == 0
    assert "[check images] vg train: 6 images decoded, 0 bad" in capsys.readouterr().out
    assert check_images.main(["--vg", f"{root}/vg", "--hoi", f"{root}/hico"]) == 1
    out = capsys.readouterr().out
    assert "[check images] hico test: 4 images decoded, 1 bad" in out and f"{victim} (record 3)" in out
