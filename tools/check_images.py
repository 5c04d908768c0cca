"""Decode every image of a dataset once, before a long run, and list the bad ones.

    python tools/check_images.py --vg data/vg --hoi data/hico_20160224_det [--hoi_dataset hico|vcoco]

The loaders already read each image's header (its size) when they load a split, and training stops at an image
that cannot be decoded (or drops it with train.py --bad_images skip). A truncated JPEG passes the header check and
fails only when its turn comes, perhaps days into a run. This script decodes every image of the train and test
splits as training would (torchvision.io.decode_image, RGB), compares its size with the record's, prints the bad
ones and exits 1 if there are any (0 otherwise).
"""
import argparse
import os
import sys

import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sg2hoi  # noqa: E402


def verify_images(records, progress=None):
    """Decode every record's image once and compare its size with the record's width / height. Returns
    [(file, image_id, reason)] for the bad ones (missing, undecodable, truncated, wrong size), in record order.
    progress: optional callable(done, total), called every 1,000 images."""
    bad = []
    for k, r in enumerate(records):
        try:
            image = torchvision.io.decode_image(r["file"], mode=torchvision.io.ImageReadMode.RGB)  # (3, H, W)
        except (RuntimeError, OSError, ValueError) as e:
            bad.append((r["file"], r["image_id"], f"cannot be decoded: {sg2hoi._decoder_message(e)}"))
            continue
        h, w = image.shape[-2:]
        if r.get("width", 10 ** 9) < 10 ** 9 and (w, h) != (r["width"], r["height"]):
            bad.append((r["file"], r["image_id"], f"decoded size {w} x {h} but the record says "
                                                  f"{r['width']} x {r['height']}"))
        if progress is not None and (k + 1) % 1000 == 0:
            progress(k + 1, len(records))
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vg", default="", help="VG150 root in RelTR's layout")
    parser.add_argument("--hoi", default="", help="HICO-DET or V-COCO root in QPIC's layout")
    parser.add_argument("--hoi_dataset", default="hico", choices=["hico", "vcoco"])
    args = parser.parse_args(argv)
    if not args.vg and not args.hoi:
        parser.error("give --vg and/or --hoi")
    total_bad = 0
    for kind, root in (("vg", args.vg), (args.hoi_dataset, args.hoi)):
        for split in ("train", "test") if root else ():
            # header checks off: a bad image is listed here rather than stopping the load
            records, _ = sg2hoi.load_dataset(kind, root, split, check_images=False)
            bad = verify_images(records, lambda done, n: print(f"  {done} / {n}", flush=True))
            total_bad += len(bad)
            print(f"[check images] {kind} {split}: {len(records)} images decoded, {len(bad)} bad")
            for file, image_id, reason in bad:
                print(f"  {file} (record {image_id}): {reason}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
