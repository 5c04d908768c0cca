"""Figures 2-4 of the paper for test images: ground truth | the segmentation map of Eq. 1 | the predictions.

    python tools/figures.py --ckpt runs/toy/ckpt.pt --out pics [--num_images 8]

For the first num_images test images of each task of the checkpoint (the test splits it was trained for), one PNG
of three panels: the ground-truth boxes, BBSeg's predicted box-level segmentation map (Eq. 1; the argmax class of
each cell, background left as it is) and the model's relations or HOIs as eval.py --image draws them.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402


def draw_prediction(image_uint8, gt, seg_map, result, class_names, seg_names):
    """[ground-truth boxes (labels into class_names) | the predicted segmentation map of Eq. 1 (seg_map (h, w):
    0 = background, c = seg_names[c - 1]) | eval.draw_image_predictions of the result]."""
    prediction = ev.draw_image_predictions(image_uint8, result, ev.merge_entities(result))
    canvas, scale, font_px, width = ev._canvas(image_uint8)
    boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4) * scale
    truth = ev._draw_boxes(canvas.copy(), boxes.tolist(), [class_names[int(c)] for c in gt["labels"]],
                           [ev.WHITE] * len(boxes), ev._font(font_px), width)
    seg = F.interpolate(torch.as_tensor(seg_map)[None, None].float(), size=canvas.size[::-1], mode="nearest")[0, 0]
    present = [int(c) for c in seg.unique() if c > 0]
    colours = ev._palette(len(seg_names) + 1)
    segmentation = canvas if not present else TF.to_pil_image(draw_segmentation_masks(
        TF.pil_to_tensor(canvas), torch.stack([seg == c for c in present]), alpha=0.6,
        colors=[colours[c] for c in present]))
    names = ", ".join(seg_names[c - 1] for c in present) or "background only"
    segmentation = ev._with_legend(segmentation, [[(f"segmentation map: {names}", ev.BLACK)]], font_px)
    figure = Image.new("RGB", (3 * canvas.width, max(prediction.height, segmentation.height)), ev.WHITE)
    for k, panel in enumerate((truth, segmentation, prediction)):
        figure.paste(panel, (k * canvas.width, 0))
    return figure


def figures(model, cfg, data, device, out_dir, num_images=8, top=5):
    """The figure of each of the first num_images test images of each task, as PNG files in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for task, other in (("sgg", "hois"), ("hoi", "relations")):
        if task not in data:
            continue
        test, meta = data[task]["test"]
        for i, record in enumerate(test[:num_images]):
            # the frame of the record's boxes and of the evaluated predictions: no EXIF rotation (DetectionDataset's)
            image = torchvision.io.decode_image(record["file"], mode=torchvision.io.ImageReadMode.RGB)
            out, _ = ev._forward_one(model, cfg, image, device)
            result = ev.image_predictions(out, cfg, tuple(image.shape[-2:]), top, 0.0, meta.get("correct_mat"))
            result[other] = []  # the picture of one task's test image shows that task's predictions
            seg_map = out["seg_logits"][0].argmax(0).cpu() if "seg_logits" in out else torch.zeros(1, 1)
            names = meta["entity_names"] if task == "sgg" else meta["object_names"]
            stem = os.path.splitext(os.path.basename(record["file"]))[0]
            path = os.path.join(out_dir, f"{task}_{i:03d}_{stem}.png")
            draw_prediction(image, record, seg_map, result, names, model.seg_names).save(path)
            written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--out", default="pics", help="folder for the PNG files")
    parser.add_argument("--num_images", type=int, default=8, help="test images per task")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, data = ev.load_model_and_data(args.ckpt, device)
    written = figures(model, cfg, data, device, args.out, args.num_images)
    print(f"wrote {len(written)} pictures to {args.out}")


if __name__ == "__main__":
    main()
