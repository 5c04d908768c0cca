"""The CLIP files of a real run, made once (needs the optional `open_clip` package and its weights; nothing else does).

    python tools/prepare_clip.py text --sgg vg --hoi hico --out clip_text_hico.pt
    python tools/prepare_clip.py images --vg data/vg --hoi_root data/hico --out clip_images_hico.pt

text:   CLIP text embeddings of "A photo of a [class]" for every class name of the datasets (Sec. III-A, IV-D), the
        file train.py --text_embeddings reads (semantic map of Eq. 3, text-initialised classifiers).
images: the CLIP image embedding of every training image (224 x 224, Sec. IV-D), keyed by file name, the file
        train.py --clip_cache reads: the teacher of the VL distillation of Eq. 5.
Like nanoGPT's data/*/prepare.py, this is data preparation: train.py only reads the files.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sg2hoi  # noqa: E402

# V-COCO's 81st object class "no object" (QPIC) labels an HOI whose role object is absent (agent-only actions such
# as stand, smile, run, or an object outside the image). "A photo of a no object" is not an English phrase; the
# class is embedded as CLIP's text for the absence of any object, "A photo of nothing". It is a real CLIP text
# vector (unit norm, like the others), so a text-initialised classifier and the semantic map treat it as any class.
CLIP_PROMPTS = {"no object": "A photo of nothing"}


def clip_prompt(name: str) -> str:
    """The text CLIP embeds for a class name (Sec. IV-D: "A photo of a [class]")."""
    return CLIP_PROMPTS.get(name, f"A photo of a {name.replace('_', ' ')}")


def class_names_for(sgg="vg", hoi="hico", vocab=None):
    """Every class name a dataset combination looks up in the text-embedding file, once each, in a fixed order:
    sgg="vg" (or None): VG150 entities + predicates; hoi="hico" | "vcoco" (or None): COCO-80 objects (+ "no object"
    for V-COCO) + the verbs (HICO-DET's 117, V-COCO's 29 action_role names). The segmentation map's classes are the
    union of entities and HOI objects (SG2HOI.seg_names), so they are covered. The names are those the loaders put in
    the metas (load_vg_json, load_hico, load_vcoco), i.e. those config_from_meta gives the model."""
    v = vocab or sg2hoi.load_vocab()
    names = []
    if sgg == "vg":
        names += v["vg150_objects"] + v["vg150_predicates"]
    elif sgg is not None:
        raise ValueError(f"class_names_for: unknown scene-graph dataset {sgg!r} (vg or None)")
    if hoi == "hico":
        names += [c["name"] for c in v["coco80"]] + v["hico_verbs"]
    elif hoi == "vcoco":
        names += [c["name"] for c in v["coco80"]] + ["no object"] + [x["name"] for x in v["vcoco_verbs"]]
    elif hoi is not None:
        raise ValueError(f"class_names_for: unknown HOI dataset {hoi!r} (hico, vcoco or None)")
    return list(dict.fromkeys(names))


def build_clip_embeddings(names, out_path, model_name="ViT-B-32", pretrained="openai"):
    """Optional helper: CLIP text embeddings of clip_prompt(name) saved as {name: tensor}, the file
    --text_embeddings reads. names: class_names_for(...) for the datasets to train on.

    Needs the `open_clip` package and its weights (not in requirements; never called by default)."""
    import open_clip  # lazy: an optional extra

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        emb = model.encode_text(tokenizer([clip_prompt(n) for n in names])).float()
    torch.save({n: e for n, e in zip(names, F.normalize(emb, dim=-1))}, out_path)


def clip_image_teacher(model_name="ViT-B-32", pretrained="openai"):
    """Optional helper: a frozen CLIP image encoder, f(uint8 image (3,H,W)) -> (512,) unit vector (Eq. 5).

    The image is resized to 224 x 224 as in the paper (Sec. IV-D). Needs `open_clip` and its weights."""
    import open_clip  # lazy: an optional extra

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    to_pil = torchvision.transforms.v2.ToPILImage()

    @torch.no_grad()
    def encode(image_uint8):
        x = preprocess(to_pil(image_uint8)).unsqueeze(0)
        return F.normalize(model.encode_image(x).float(), dim=-1)[0]
    return encode


def build_clip_image_cache(records_list, out_path, model_name="ViT-B-32", pretrained="openai"):
    """Optional helper: the CLIP image embedding of every training image, saved as {clip_image_key(file): (512,)
    tensor}, the file train.py --clip_cache reads (the teacher of Eq. 5). records_list: lists of records."""
    encode = clip_image_teacher(model_name, pretrained)
    cache, source = {}, {}
    for records in records_list:
        for r in records:
            key = sg2hoi.clip_image_key(r["file"])
            if key in source and source[key] != r["file"]:
                raise ValueError(f"build_clip_image_cache: {source[key]} and {r['file']} have the same file name "
                                 f"{key!r}; the cache is keyed by file name")
            source[key] = r["file"]
            cache[key] = encode(torchvision.io.decode_image(r["file"], mode=torchvision.io.ImageReadMode.RGB))
    torch.save(cache, out_path)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["text", "images"])
    p.add_argument("--out", required=True, help="the .pt file to write")
    p.add_argument("--sgg", default="vg", help="text: the scene-graph vocabulary (vg, or none)")
    p.add_argument("--hoi", default="hico", help="text: the HOI vocabulary, hico | vcoco | none")
    p.add_argument("--hoi_root", default="", help="images: the HICO-DET / V-COCO root (QPIC layout)")
    p.add_argument("--vg", default="", help="images: the VG150 root (RelTR JSON layout)")
    p.add_argument("--hoi_dataset", default="hico", choices=["hico", "vcoco"], help="images: the kind of --hoi")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="openai")
    args = p.parse_args(argv)
    if args.what == "text":
        names = class_names_for(None if args.sgg == "none" else args.sgg, None if args.hoi == "none" else args.hoi)
        build_clip_embeddings(names, args.out, args.model, args.pretrained)
    else:
        splits = ([sg2hoi.load_dataset("vg", args.vg, "train")[0]] if args.vg else []) + \
                 ([sg2hoi.load_dataset(args.hoi_dataset, args.hoi_root, "train")[0]] if args.hoi_root else [])
        if not splits:
            p.error("images: give --vg and / or --hoi_root")
        build_clip_image_cache(splits, args.out, args.model, args.pretrained)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
