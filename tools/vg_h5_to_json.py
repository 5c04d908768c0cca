"""One-off converter: VG150 in the Neural-Motifs / Scene-Graph-Benchmark HDF5 files -> RelTR's COCO-style JSON.

    python tools/vg_h5_to_json.py data/vg_sgb [--out data/vg] [--images data/vg_sgb/VG_100K] [--num_val_im 5000]

sg2hoi reads VG150 in RelTR's layout only (sg2hoi.load_vg_json: train.json, val.json, test.json, rel.json and
images/{image_id}.jpg). Who has the SGB / BGNN files instead (VG-SGG-with-attri.h5, VG-SGG-dicts-with-attri.json,
image_data.json in one folder; the images in its images/ or in --images) runs this once, where h5py is installed
(pip install h5py); the core files never need h5py. The .h5 is read as SGB's load_graphs reads it
(shared/specs/datasets.md 2.4):

  * image_data.json, in order, without the 4 corrupted images, gives row i's image id and size;
  * split 0 = train (train and val), 2 = test; only images with boxes and relations (filter_empty_rels);
    val = the first num_val_im training images in file order, train = the rest (SGB: 5,000);
  * boxes: int (cx, cy, w, h) with the longer side = 1024 -> xyxy (the halves truncated in int32, as SGB), scaled
    to the image and clipped to (width - 1, height - 1); labels 1..150 and predicates 1..50 stay 1-based, as in
    RelTR's files; relations index the image's boxes in file order.
  * the size: image_data.json's, unless the image file's header says otherwise (SGB warns that some entries are
    wrong, and RelTR's files take the size from the image): then the header's size decodes the boxes.
  * load_vg_json then drops a box that is empty after the clip, with its relations (the former in-core reader
    kept it); only a box at the image's right or bottom edge, under a pixel wide, can be.

Every label, predicate and relation index is checked; a bad one is a sg2hoi.DataError naming the file, the image and
the field. The output goes to --out (default: the input folder); where out/images is not the images' folder and
does not exist, it becomes a symbolic link to it, so that load_vg_json finds the images.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sg2hoi  # noqa: E402

VG_CORRUPTED = {1592, 1722, 4616, 4617}  # image ids SGB and Neural-Motifs skip in image_data.json
H5_FIELDS = ("split", "img_to_first_box", "img_to_last_box", "img_to_first_rel", "img_to_last_rel", "labels",
             "boxes_1024", "relationships", "predicates")


def read_sgb(root):
    """(arrays of the .h5, image_data.json without the corrupted images, entity names, predicate names)."""
    try:
        import h5py  # only this converter needs it
    except ImportError:
        raise SystemExit("tools/vg_h5_to_json.py needs h5py: pip install h5py") from None
    dicts = sg2hoi._read_json(os.path.join(root, "VG-SGG-dicts-with-attri.json"))
    info = [x for x in sg2hoi._read_json(os.path.join(root, "image_data.json")) if x["image_id"] not in VG_CORRUPTED]
    entity_names = [dicts["idx_to_label"][str(i)] for i in range(1, len(dicts["idx_to_label"]) + 1)]
    predicate_names = [dicts["idx_to_predicate"][str(i)] for i in range(1, len(dicts["idx_to_predicate"]) + 1)]
    h5_path = os.path.join(root, "VG-SGG-with-attri.h5")
    if not os.path.exists(h5_path):
        raise sg2hoi.DataError(f"{h5_path}: file not found")
    with h5py.File(h5_path, "r") as h5:
        data = {k: h5[k][:] for k in H5_FIELDS}
    if len(info) != len(data["split"]):
        raise sg2hoi.DataError(f"{h5_path}: {len(data['split'])} images but image_data.json lists {len(info)} "
                               f"(after removing the 4 corrupted ones)")
    return data, info, entity_names, predicate_names


def split_rows(data, split, num_val_im, h5_path):
    """The .h5 rows of one split, in file order (SGB's load_graphs and its num_val_im)."""
    if num_val_im < 0:
        raise ValueError(f"num_val_im must be >= 0, got {num_val_im}")
    mask = data["split"] == (2 if split == "test" else 0)
    mask &= (data["img_to_first_box"] >= 0) & (data["img_to_first_rel"] >= 0)  # images with boxes and relations
    rows = np.where(mask)[0].tolist()
    if split == "val":
        return rows[:num_val_im]
    if split == "train":
        if len(rows) and len(rows) <= num_val_im:
            raise sg2hoi.DataError(f"{h5_path}: the file has {len(rows)} training images with relations and the "
                                   f"first num_val_im = {num_val_im} of them form the validation split, so none is "
                                   f"left for training: lower --num_val_im")
        return rows[num_val_im:]
    return rows


def image_annotations(data, i, size, num_entities, num_predicates, where):
    """Row i -> (boxes (N, 4) float32 xyxy in pixels, labels (N,) 1..150, relations (R, 3) [subject, object,
    predicate 1..50] with the subject and object indexing the image's boxes). size: the image's (width, height)."""
    a, b = int(data["img_to_first_box"][i]), int(data["img_to_last_box"][i])
    ra, rb = int(data["img_to_first_rel"][i]), int(data["img_to_last_rel"][i])
    if not 0 <= a <= b < len(data["labels"]) or not 0 <= ra <= rb < len(data["predicates"]):
        raise sg2hoi.DataError(f"{where}: fields 'img_to_first_box'..'img_to_last_box' = {a}..{b} or "
                               f"'img_to_first_rel'..'img_to_last_rel' = {ra}..{rb} outside the file's arrays")
    labels = data["labels"][a:b + 1, 0].astype(np.int64)               # (N,) 1..150
    bad = np.where((labels < 1) | (labels > num_entities))[0]
    if len(bad):
        raise sg2hoi.DataError(f"{where}: field 'labels' row {a + bad[0]} = {labels[bad[0]]}, outside "
                               f"1..{num_entities} (0 is background)")
    predicates = data["predicates"][ra:rb + 1, 0].astype(np.int64)     # (R,) 1..50
    bad = np.where((predicates < 1) | (predicates > num_predicates))[0]
    if len(bad):
        raise sg2hoi.DataError(f"{where}: field 'predicates' row {ra + bad[0]} = {predicates[bad[0]]}, outside "
                               f"1..{num_predicates} (0 is background)")
    pairs = data["relationships"][ra:rb + 1].astype(np.int64)          # (R, 2) rows of the whole file's boxes
    bad = np.where(((pairs < a) | (pairs > b)).any(1))[0]
    if len(bad):
        raise sg2hoi.DataError(f"{where}: field 'relationships' row {ra + bad[0]} = {pairs[bad[0]].tolist()} but "
                               f"the image's boxes are rows {a}..{b}")
    w, h = size
    boxes = data["boxes_1024"][a:b + 1].astype(np.int32).copy()        # (N, 4) cx, cy, w, h
    boxes[:, :2] = boxes[:, :2] - boxes[:, 2:] / 2  # float written back into int32: truncated, as SGB
    boxes[:, 2:] = boxes[:, :2] + boxes[:, 2:]
    boxes = boxes.astype(np.float32) / 1024 * max(w, h)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h - 1)
    return boxes, labels, np.column_stack([pairs - a, predicates])


def image_size(path, listed):
    """The image's (width, height) from its header when the file is there (SGB warns that image_data.json has wrong
    sizes, and load_vg_json checks them against the header), else image_data.json's `listed` size."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except OSError:  # missing or unreadable: load_vg_json names it when it loads the split
        return listed


def convert(root, out=None, num_val_im=5000, images=None):
    """Write out/{train,val,test}.json and out/rel.json (RelTR's layout) from the SGB files in root, with the images
    {image_id}.jpg in `images` (default root/images). Returns {split: number of images}."""
    out, images = out or root, images or os.path.join(root, "images")
    data, info, entity_names, predicate_names = read_sgb(root)
    h5_path = os.path.join(root, "VG-SGG-with-attri.h5")
    categories = [{"supercategory": n, "id": k + 1, "name": n} for k, n in enumerate(entity_names)]
    rel_json, counts, ann_id = {"rel_categories": ["__background__"] + predicate_names}, {}, 0
    os.makedirs(out, exist_ok=True)
    for split in ("train", "val", "test"):
        coco, rel_json[split] = {"images": [], "annotations": [], "categories": categories}, {}
        for i in split_rows(data, split, num_val_im, h5_path):
            image_id, file_name = int(info[i]["image_id"]), f"{info[i]['image_id']}.jpg"
            w, h = image_size(os.path.join(images, file_name), (info[i]["width"], info[i]["height"]))
            where = f"{h5_path}: image {image_id} (row {i})"
            boxes, labels, rels = image_annotations(data, i, (w, h), len(entity_names), len(predicate_names), where)
            coco["images"].append({"file_name": file_name, "height": h, "width": w, "id": image_id})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                ann_id += 1
                coco["annotations"].append({"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": label,
                                            "image_id": image_id, "id": ann_id, "area": (x2 - x1) * (y2 - y1),
                                            "iscrowd": 0, "segmentation": None})
            rel_json[split][str(image_id)] = rels.tolist()
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(coco, f)
        counts[split] = len(coco["images"])
    with open(os.path.join(out, "rel.json"), "w") as f:
        json.dump(rel_json, f)
    link = os.path.join(out, "images")
    if os.path.abspath(link) != os.path.abspath(images) and not os.path.lexists(link):
        os.symlink(os.path.abspath(images), link)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert VG150 from the SGB / Neural-Motifs HDF5 files "
                                            "(VG-SGG-with-attri.h5, VG-SGG-dicts-with-attri.json, image_data.json, "
                                            "images/) to RelTR's COCO-style JSON that train.py --vg reads.")
    p.add_argument("root", help="folder with the three SGB files")
    p.add_argument("--images", default="", help="folder of the {image_id}.jpg files (default: root/images)")
    p.add_argument("--out", default="", help="where to write train.json, val.json, test.json, rel.json "
                                             "(default: root; elsewhere, out/images links to root/images)")
    p.add_argument("--num_val_im", type=int, default=5000,
                   help="the first N training images (file order) form val.json, as SGB (default 5000)")
    args = p.parse_args(argv)
    counts = convert(args.root, args.out or None, args.num_val_im, args.images or None)
    print(f"wrote {args.out or args.root}: " + ", ".join(f"{s} {n} images" for s, n in counts.items()))


if __name__ == "__main__":
    main()
