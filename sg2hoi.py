"""SG2HOI+: one transformer that generates scene graphs and detects human-object interactions from them.

Paper: "SG2HOI+: Human-Object Interaction Detection with Scene Graphs" (arXiv 2311.01755), Section III.
Read this file beside the paper: the sections below follow the paper's order and every equation is marked
with its number (Eq. 1 ... Eq. 10). Tensor shapes are written on the lines where they change, with
B = batch, H x W = feature map, d = model width, Q = number of queries, L = decoder layers.

The idea in five lines:
  1. A CNN turns the image into features V; a small FCN paints a box-level segmentation map s (Eq. 1, 2),
     whose argmax classes are replaced by text embeddings and concatenated with V (Eq. 3).
  2. A transformer encoder with a [CLS] token encodes them (Eq. 4), distilled towards CLIP (Eq. 5).
  3. A DETR-style relation decoder turns 100 queries into <subject, predicate, object> 5-tuples (Eq. 6).
  4. R2ITrans re-encodes the predicted relations (Eq. 7); HOI queries attend to the relation queries and
     the image features attend to the relation features; an HOI decoder predicts <human, verb, object> (Eq. 8).
  5. Hungarian matching (Eq. 9) and a weighted sum of losses (Eq. 10) train everything end to end.
"""
from __future__ import annotations

import array
import concurrent.futures
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import re
import types
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torchvision import tv_tensors
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import v2

# ------------------------------------------------------------------------------------------------ Config


@dataclass
class Config:
    """Every hyper-parameter and every ablation of the paper is one field (defaults = Sec. IV-D)."""

    # backbone and widths
    backbone: str = "resnet50"  # resnet50 | resnet101 (paper) | tiny (toy preset, CPU)
    pretrained_backbone: bool = False  # ImageNet weights via torchvision (needs the file in the torch cache)
    d_model: int = 256  # d in Eq. 3
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    enc_layers: int = 6  # Eq. 4 encoder
    rel_dec_layers: int = 6  # Eq. 6 relation decoder
    r2i_layers: int = 3  # Eq. 7 R2ITrans
    feat_trans_layers: int = 2  # feature transformation (cross-attention)
    query_trans_layers: int = 2  # query transformation (cross-attention)
    hoi_dec_layers: int = 6  # Eq. 8 HOI decoder
    num_rel_queries: int = 100  # N_rel
    num_hoi_queries: int = 100  # N_hoi
    seg_hidden: int = 128  # channels of the five 3x3 conv layers of FCN_seg (not given in the paper)
    # normalisation in FCN_seg: "batch" = BatchNorm, the paper's (Sec. IV-D); "group" = GroupNorm, which does not
    # depend on the micro-batch, so 1 or N processes train the same function (the toy preset; see TinyBackbone)
    seg_norm: str = "batch"
    text_dim: int = 512  # CLIP ViT-B/32 embedding width (Sec. IV-D)
    # vocabularies (set from the datasets; defaults = VG150 and HICO-DET)
    # N_o has two meanings in the paper: the relation decoder's N_o = the 150 VG entity classes (here), and BBSeg's
    # N_o = the classes of the segmentation map = the union of entity and HOI object names (VG150 + COCO-80: 191
    # distinct names; SG2HOI.seg_names), written N_seg in this file.
    num_entity_classes: int = 150  # N_o for the relation decoder (VG150 objects)
    num_predicates: int = 50  # N_r
    num_hoi_objects: int = 80  # HOI object classes (COCO-80; 81 for V-COCO with "no object")
    num_verbs: int = 117  # HICO-DET verbs (29 for V-COCO)
    entity_names: list = field(default_factory=list)  # names of the relation decoder's classes
    predicate_names: list = field(default_factory=list)
    hoi_object_names: list = field(default_factory=list)
    verb_names: list = field(default_factory=list)
    text_embeddings: str = ""  # .pt file {name: (text_dim,) tensor} (build_clip_embeddings); "" = seeded stand-in
    #                            (see class_text_embeddings)
    word_vectors: str = ""  # GloVe-format .txt for semantic_embedding="glove" (HSSG); its width comes from the file
    # Ablations (Tables V-VIII). These field defaults align [CLS] (Sec. IV-D) with randomly initialised classifiers,
    # which is none of the paper's four variants: the presets below (PRESETS) are the variants, "paper" = SG2HOI+cls
    # and "full" = SG2HOI+pool, the FULL row of Tables V-VIII.
    tasks: str = "both"  # both | sgg (Table V "SGG") | hoi (HOI data only: relation part trained by the HOI loss)
    hoi_on_frozen_sgg: bool = False  # True = Table V "HOI": phase 1 SGG as usual, phase 2 HOI batches only, SGG frozen
    use_bbseg: bool = True  # False = "-HSS" (Table VI)
    semantic_embedding: str = "clip"  # clip | discrete ("HSSD") | glove ("HSSG") (Table VI)
    use_vl_distill: bool = True  # False = "-VLpool" (Table VII)
    align_feature: str = "cls"  # cls = SG2HOI+cls | pool = SG2HOI+pool (Table VII, Eq. 5)
    # l1 | l2 ("VLl2", Table VII). Both are element-wise losses averaged over the text_dim components: l1 = mean
    # absolute error (F.l1_loss), l2 = mean squared error (F.mse_loss). The paper's "l2 norm strategy" is read as the
    # L2 counterpart of its element-wise l1 default (the L1Loss / MSELoss pair of feature distillation), not as the
    # unsquared Euclidean distance ||s - t||_2. Both have the same minimiser (MSE = ||s - t||_2^2 / text_dim); they
    # differ in the gradient: MSE's shrinks with the error, the distance's has constant length.
    align_loss: str = "l1"
    classifier_init: str = "random"  # random | text (CLIP text embeddings as classifier weights, Sec. III-B)
    use_feature_transform: bool = True  # False = "-FETR" (Table VIII)
    use_query_transform: bool = True  # False = "-QUTR" (Table VIII)
    use_r2i: bool = True  # False = "-R2ITR" (Table VIII)
    hoi_queries_from_rel: bool = False  # True = "RELQ": relation queries are the HOI queries (Table VIII)
    # Two literal variants of Sec. III-C (defaults = this implementation's choice; the comparison is an ablation run):
    # keys/values of the query transformation: "decoded" = the relation decoder's last-layer output f_sg[-1] (the
    # relation queries after they read this image), "learnable" = the learnable relation queries Q_rel themselves
    # (the paper's words: "the relation queries Q_rel, which serve as both keys and values"; then the transformed
    # HOI queries are the same for every image).
    query_transform_memory: str = "decoded"
    # RELQ's HOI queries: "decoded" = f_sg[-1], "learnable" = the learnable relation queries Q_rel (the paper's "the
    # relation query is used for the HOI queries" read literally). Only used with hoi_queries_from_rel.
    relq_queries: str = "decoded"
    # matching and losses. The cost_* weights are used twice: as the matching costs alpha_1..3 of Eq. 9 AND as the
    # weights of the same terms in the losses L_rel / L_hoi (SetCriterion): the paper writes L_rel with Eq. 9's terms.
    cost_box: float = 1.0  # alpha_1 in Eq. 9 (box cost = box_l1 * L1 - box_giou * GIoU); also the box loss weight
    box_l1: float = 2.5  # inside the box cost and loss: L1 weight (QPIC / CDN / GEN-VLKT; not given in the paper)
    box_giou: float = 1.0  # inside the box cost and loss: GIoU weight (QPIC / CDN / GEN-VLKT)
    cost_class: float = 2.0  # alpha_2 (subject/object labels); also their loss weight
    cost_rel: float = 4.0  # alpha_3 (predicate / verbs); also their loss weight
    loss_seg: float = 2.0  # lambda_1 in Eq. 10
    loss_align: float = 4.0  # lambda_2 in Eq. 10
    eos_coef: float = 0.1  # weight of the "no object" / "no relation" class (DETR)
    unmatched_loss: bool = True  # False = the paper's literal "no loss for unmatched queries" (see SetCriterion)
    # deep supervision: every decoder layer's outputs are matched and trained (DETR, QPIC, RelTR, SGTR); the paper does
    # not mention it. False = the last layer only.
    aux_loss: bool = True
    # optimisation (used by train.py; saved with checkpoints)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_text_classifier: float = 1e-5
    lr_sgg_phase2: float = 1e-5  # SGG part's learning rate once the HOI part joins (Sec. IV-D)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: float = 2 / 3  # lr x 0.1 after this fraction of each phase (not given in the paper; DETR / QPIC practice)
    # Exponential moving average of the weights, updated after every optimiser step (not in the paper; DINO, RT-DETR
    # practice): 0 = off; d > 0 keeps ema = d * ema + (1 - d) * weights, averaging over about 1 / (1 - d) steps.
    # Evaluation, best.pt and eval.py then use the averaged weights (train.py's final evaluation reports both).
    ema_decay: float = 0.0
    batch_size: int = 8  # the GLOBAL batch: images per optimiser step, over all processes and accumulation steps
    # (the paper: "a batch size of 8 on 8 GPUs", read as 8 images per step, one per GPU, as QPIC / CDN count theirs)
    sgg_epochs: int = 20  # phase 1: SGG alone
    joint_epochs: int = 20  # phase 2: SGG and HOI alternate
    image_size: int = 800  # shorter side at test time (multi-scale 480..800 at training)
    max_size: int = 1333

    # value checks of __post_init__ (a bad value fails where it is set, naming the field, not steps later)
    _AT_LEAST_ONE = ("d_model", "nheads", "dim_feedforward", "enc_layers", "rel_dec_layers", "r2i_layers",
                     "feat_trans_layers", "query_trans_layers", "hoi_dec_layers", "num_rel_queries", "num_hoi_queries",
                     "seg_hidden", "text_dim", "num_entity_classes", "num_predicates", "num_hoi_objects", "num_verbs",
                     "batch_size", "image_size", "max_size")
    _AT_LEAST_ZERO_INT = ("sgg_epochs", "joint_epochs")
    _AT_LEAST_ZERO_FLOAT = ("cost_box", "box_l1", "box_giou", "cost_class", "cost_rel", "loss_seg", "loss_align",
                            "eos_coef", "lr", "lr_backbone", "lr_text_classifier", "lr_sgg_phase2", "weight_decay",
                            "clip_max_norm")

    def __post_init__(self):
        for name in self._AT_LEAST_ONE + self._AT_LEAST_ZERO_INT:
            v, low = getattr(self, name), 1 if name in self._AT_LEAST_ONE else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Config.{name}: must be an integer >= {low}, got {v!r}")
        for name in self._AT_LEAST_ZERO_FLOAT + ("dropout", "lr_drop", "ema_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Config.{name}: must be a finite number >= 0, got {v!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"Config.dropout: must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"Config.ema_decay: must be in [0, 1) (0 = no weight averaging), got {self.ema_decay!r}")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"Config.lr_drop: the fraction of each phase after which lr drops must be in (0, 1] "
                             f"(1 = never), got {self.lr_drop!r}")
        for name in ("pretrained_backbone", "use_bbseg", "use_vl_distill", "use_feature_transform",
                     "use_query_transform", "use_r2i", "hoi_queries_from_rel", "unmatched_loss", "aux_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Config.{name}: must be true or false, got {getattr(self, name)!r}")
        if self.backbone not in ("resnet50", "resnet101", "tiny"):
            raise ValueError(f"Config.backbone: unknown backbone {self.backbone!r} (resnet50 | resnet101 | tiny)")
        choices = dict(tasks=("both", "sgg", "hoi"), semantic_embedding=("clip", "discrete", "glove"),
                       align_feature=("cls", "pool"), align_loss=("l1", "l2"), classifier_init=("random", "text"),
                       query_transform_memory=("decoded", "learnable"), relq_queries=("decoded", "learnable"),
                       seg_norm=("batch", "group"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.d_model % self.nheads or self.d_model % 2:
            raise ValueError(f"Config.d_model={self.d_model} must be even and divisible by nheads={self.nheads}")
        if self.hoi_on_frozen_sgg and self.tasks != "both":
            raise ValueError("Config.hoi_on_frozen_sgg (Table V 'HOI') needs tasks='both': phase 1 trains the SGG part")
        if self.hoi_queries_from_rel and self.num_hoi_queries != self.num_rel_queries:
            raise ValueError("Config.hoi_queries_from_rel (RELQ) needs num_hoi_queries == num_rel_queries")
        for name in ("entity_names", "predicate_names", "hoi_object_names", "verb_names"):
            names, count = getattr(self, name), {"entity_names": self.num_entity_classes,
                                                 "predicate_names": self.num_predicates,
                                                 "hoi_object_names": self.num_hoi_objects,
                                                 "verb_names": self.num_verbs}[name]
            if names and len(names) != count:
                raise ValueError(f"Config.{name} has {len(names)} names but the class count is {count}")

    @property
    def sgg(self):
        return self.tasks in ("both", "sgg")

    @property
    def hoi(self):
        return self.tasks in ("both", "hoi")


# The paper's four variants (Sec. IV-E), at the paper's sizes and settings (Sec. IV-D). The paper names what each
# adds: "+rand, where the object and predicate classifiers are initialized randomly; +clip, utilizing embeddings
# from CLIP for initialization of these classifiers; +cls, aligning the output feature [CLS] with the CLIP feature
# for VL feature alignment; and +pool, employing the pooled feature from Eq. (4)", and "the latter three variants
# employ embeddings from CLIP to initialize their object and predicate classifiers". Read here as steps that add one
# piece each: +rand and +clip have no VL alignment (Eq. 5 off: the alignment is what +cls and +pool add), and the
# classifiers are those of every branch (objects, predicates, HOI objects, verbs). All four keep the CLIP semantic
# map of Eq. 3. Give the CLIP-initialised ones the text embeddings (--text_embeddings, build_clip_embeddings), or
# their classifiers start from seeded stand-ins (fine for tests and CPUs; not the paper's model).
VARIANTS = {
    "rand": dict(classifier_init="random", use_vl_distill=False),  # SG2HOI+rand
    "clip": dict(classifier_init="text", use_vl_distill=False),  # SG2HOI+clip
    "cls": dict(classifier_init="text", align_feature="cls"),  # SG2HOI+cls
    "pool": dict(classifier_init="text", align_feature="pool"),  # SG2HOI+pool
}

PRESETS = {
    **VARIANTS,
    # Sec. IV-D's default ("In default, we choose f_en[CLS] to align with the corresponding CLIP feature"): +cls
    "paper": VARIANTS["cls"],
    # The FULL row of Tables V-VIII, "our full model (SG2HOI+pool)"
    "full": VARIANTS["pool"],
    # A model a 2-core CPU trains in minutes on the toy scenes (128 px images).
    # 8 SGG + 12 joint epochs: with 5 + 9, SGDet R@50 moved by 7-8 points between seeds; with 10 + 9 the HOI part,
    # 558 HOI steps, still moved by about 10 points of mAP. 8 + 12 has the same number of steps (README, toy results).
    "toy": dict(backbone="tiny", d_model=64, nheads=4, dim_feedforward=256, dropout=0.0, enc_layers=2,
                rel_dec_layers=2, r2i_layers=1, feat_trans_layers=1, query_trans_layers=1, hoi_dec_layers=2,
                num_rel_queries=16, num_hoi_queries=16, seg_hidden=32, seg_norm="group", text_dim=64, batch_size=16,
                lr=4e-4, lr_backbone=4e-4, lr_text_classifier=4e-4, lr_sgg_phase2=1e-4, clip_max_norm=0.1,
                sgg_epochs=8, joint_epochs=12, lr_drop=0.9, image_size=128, max_size=128),
}


def make_config(preset="paper", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown Config field(s): {sorted(unknown)}")
    return Config(**{**PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------------ Box helpers
# Boxes inside the model are (cx, cy, w, h) normalised by the un-padded image size (DETR); datasets and
# metrics use (x1, y1, x2, y2) in pixels. torchvision.ops does the conversions and the GIoU.


def boxes_to_model(boxes_xyxy, size_hw):
    """(N, 4) xyxy pixels -> (N, 4) cxcywh in [0, 1] of an image of size (h, w)."""
    h, w = float(size_hw[0]), float(size_hw[1])
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_convert(boxes_xyxy / scale, "xyxy", "cxcywh")


def boxes_to_pixels(boxes_cxcywh, size_hw):
    """(..., 4) normalised cxcywh -> xyxy pixels of an image of size (h, w)."""
    h, w = float(size_hw[0]), float(size_hw[1])
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * boxes_cxcywh.new_tensor([w, h, w, h])


# ------------------------------------------------------------------------------------------------ Class text
# The paper embeds "A photo of a [class]" with CLIP's frozen text encoder (Sec. III-A, IV-D). CLIP weights
# cannot be downloaded everywhere, so the embeddings come from a file made once by `build_clip_embeddings`
# (needs open_clip and its weights). Without that file every name gets a fixed, seeded unit vector:
# distinct and reproducible but without linguistic meaning, i.e. the HSSD-like stand-in of Table VI.


def standin_embedding(name: str, dim: int) -> torch.Tensor:
    """A unit vector seeded by the class name (stable across runs and machines)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    v = torch.randn(dim, generator=g)
    return v / v.norm()


def class_text_embeddings(names, dim, path="") -> torch.Tensor:
    """(len(names), dim) text embeddings: from `path` ({name: tensor}) or the seeded stand-in."""
    if not path:
        return torch.stack([standin_embedding(n, dim) for n in names]) if names else torch.zeros(0, dim)
    table = torch.load(path, map_location="cpu", weights_only=True)  # a file saved from GPU tensors stays on the CPU
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(f"{path}: no text embedding for class name(s) {missing[:5]}")
    emb = torch.stack([table[n].float().flatten() for n in names])
    if emb.shape[1] != dim:
        raise ValueError(f"{path}: embeddings have width {emb.shape[1]}, Config.text_dim is {dim}")
    return F.normalize(emb, dim=-1)


def load_word_vectors(path, names, dim=None) -> torch.Tensor:
    """GloVe-format text file (word v1 ... vD per line) -> (len(names), D); multi-word names are averaged.

    The width D is the file's own (GloVe: 300); W_s of Eq. 3 adapts to it, so it is independent of Config.text_dim
    (the CLIP width of Eq. 5 and of the text classifiers). `dim`, when given, is checked."""
    if not path:
        raise ValueError("Config.word_vectors: semantic_embedding='glove' (HSSG) needs a GloVe .txt file")
    wanted = {w for n in names for w in n.replace("_", " ").split()}
    vectors = {}
    with open(path, encoding="utf8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if parts[0] in wanted:
                dim = dim or len(parts) - 1  # the first word read fixes the width
                if len(parts) - 1 != dim:
                    raise ValueError(f"{path}:{line_no}: word {parts[0]!r} has {len(parts) - 1} values, "
                                     f"the file's other vectors have {dim}")
                vectors[parts[0]] = torch.tensor([float(x) for x in parts[1:]])
    out = []
    for n in names:
        words = n.replace("_", " ").split()
        missing = [w for w in words if w not in vectors]
        if missing:
            raise KeyError(f"{path}: no word vector for {missing} (class {n!r})")
        out.append(F.normalize(torch.stack([vectors[w] for w in words]).mean(0), dim=0))
    return torch.stack(out)


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
    v = vocab or load_vocab()
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


def clip_image_key(path: str) -> str:
    """The key of an image in the CLIP image cache: its file name without folders. It does not depend on where the
    dataset lies (another machine, another data root) and is unique within each real dataset (VG ids "2343.jpg",
    HICO-DET "HICO_train2015_00000001.jpg", COCO "COCO_train2014_000000000009.jpg"); build_clip_image_cache checks
    that it is unique among the images it encodes."""
    return os.path.basename(path)


def build_clip_image_cache(records_list, out_path, model_name="ViT-B-32", pretrained="openai"):
    """Optional helper: the CLIP image embedding of every training image, saved as {clip_image_key(file): (512,)
    tensor}, the file train.py --clip_cache reads (the teacher of Eq. 5). records_list: lists of records."""
    encode = clip_image_teacher(model_name, pretrained)
    cache, source = {}, {}
    for records in records_list:
        for r in records:
            key = clip_image_key(r["file"])
            if key in source and source[key] != r["file"]:
                raise ValueError(f"build_clip_image_cache: {source[key]} and {r['file']} have the same file name "
                                 f"{key!r}; the cache is keyed by file name")
            source[key] = r["file"]
            cache[key] = encode(torchvision.io.decode_image(r["file"], mode=torchvision.io.ImageReadMode.RGB))
    torch.save(cache, out_path)
    return out_path


def teacher_coverage(records, cache, name, min_fraction=0.99):
    """Check that the CLIP image cache holds a teacher vector for at least min_fraction of a training split's images;
    return the fraction covered. Below it Eq. 5's `align` term would silently vanish from (most) batches, e.g. with a
    cache built from another dataset; so this raises a ValueError with the counts (the choice here: a clear error
    rather than a warning, since a run without its distillation term is not the experiment asked for)."""
    found = sum(clip_image_key(r["file"]) in cache for r in records)
    fraction = found / max(len(records), 1)
    if records and fraction < min_fraction:
        example = clip_image_key(records[0]["file"])
        raise ValueError(f"CLIP image cache: only {found} of {len(records)} images of {name} ({100 * fraction:.1f} %) "
                         f"have a teacher vector (needs >= {100 * min_fraction:g} %); keys are image file names, e.g. "
                         f"{example!r}; cache keys look like {next(iter(cache), None)!r}. Rebuild the cache with "
                         f"build_clip_image_cache for these images")
    return fraction


# ------------------------------------------------------------------------------------------------ Backbone + position encoding


class TinyBackbone(nn.Module):
    """A 4-layer CNN of stride 8 for the toy preset: 128 px images give a 16 x 16 feature map.

    Normalisation is GroupNorm, not BatchNorm: it normalises each image on its own, so the function the model
    computes does not depend on how many images share a forward pass. The same global batch split over 1 or N
    processes (or accumulation steps) then trains the same model; with BatchNorm the statistics would be those of
    each process's micro-batch, and SyncBatchNorm (which would share them) does not run on CPU. 32 groups (1, 2, 4
    channels each): on the overfit-one-batch check, 8 groups learned about 4x slower than BatchNorm, 32 did not."""

    def __init__(self, channels=128):
        super().__init__()
        chans = [3, 32, 64, channels]
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(32, chans[i + 1]),
                       nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.num_channels, self.stride = channels, 8

    def forward(self, x):
        return self.body(x)


class ResNetBackbone(nn.Module):
    """torchvision ResNet-50/101 with frozen BatchNorm, stem and layer1 frozen, stride-32 C5 output (DETR)."""

    def __init__(self, name, pretrained=False):
        super().__init__()
        weights = {"resnet50": "IMAGENET1K_V1", "resnet101": "IMAGENET1K_V1"}[name] if pretrained else None
        net = getattr(torchvision.models, name)(weights=weights, norm_layer=FrozenBatchNorm2d)
        for pname, p in net.named_parameters():
            if not any(pname.startswith(layer) for layer in ("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        self.body = torchvision.models._utils.IntermediateLayerGetter(net, return_layers={"layer4": "0"})
        self.num_channels, self.stride = 2048, 32

    def forward(self, x):
        return self.body(x)["0"]


def build_backbone(cfg: Config) -> nn.Module:
    if cfg.backbone == "tiny":
        return TinyBackbone()
    return ResNetBackbone(cfg.backbone, cfg.pretrained_backbone)


def sine_position_encoding(mask, d_model, temperature=10000.0):
    """DETR's 2-D sine encoding of normalised coordinates of the un-padded region.

    mask: (B, H, W) True on padding -> (B, H, W, d_model): d/2 channels for y, d/2 for x."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    n = d_model // 2
    dim_t = temperature ** (2 * (torch.arange(n, device=mask.device) // 2) / n)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t  # (B, H, W, n)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)


# ------------------------------------------------------------------------------------------------ Transformer layers
# DETR's layers, written out because nn.Transformer cannot: (1) add positions to queries and keys (never
# values) inside every layer, (2) return every decoder layer's output for the auxiliary losses. Parameter
# names follow DETR (self_attn.in_proj_weight, linear1, norm1, ...) so its COCO checkpoint loads.
# Layout is batch-first: (B, sequence, d). Post-norm, as DETR.


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, on F.scaled_dot_product_attention."""

    def __init__(self, d, nheads, dropout):
        super().__init__()
        self.nheads, self.dropout = nheads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, k, v, key_padding_mask=None):
        B, Lq, d = q.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x, w, b):  # (B, L, d) -> (B, heads, L, d/heads)
            return F.linear(x, w, b).view(B, x.shape[1], self.nheads, d // self.nheads).transpose(1, 2)

        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv),
                                             attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))


class FeedForward(nn.Module):
    def __init__(self, d, dim_ff, dropout):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention + FFN; positions added to queries and keys."""

    def __init__(self, d, nheads, dim_ff, dropout):
        super().__init__()
        self.self_attn = Attention(d, nheads, dropout)
        self.ffn = FeedForward(d, dim_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, mask):
        qk = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(qk, qk, x, mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class CrossAttentionLayer(nn.Module):
    """Cross-attention + FFN (no self-attention): the feature and query transformations of Sec. III-C."""

    def __init__(self, d, nheads, dim_ff, dropout):
        super().__init__()
        self.multihead_attn = Attention(d, nheads, dropout)
        self.ffn = FeedForward(d, dim_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, x_pos, memory, memory_pos, memory_mask=None):
        x = self.norm1(x + self.dropout(self.multihead_attn(x + x_pos, memory + memory_pos, memory, memory_mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN (DETR)."""

    def __init__(self, d, nheads, dim_ff, dropout):
        super().__init__()
        self.self_attn = Attention(d, nheads, dropout)
        self.multihead_attn = Attention(d, nheads, dropout)
        self.ffn = FeedForward(d, dim_ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, memory, memory_pos, memory_mask):
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt)))
        tgt = self.norm2(tgt + self.dropout(self.multihead_attn(tgt + query_pos, memory + memory_pos, memory,
                                                                memory_mask)))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class Encoder(nn.Module):
    def __init__(self, num_layers, d, nheads, dim_ff, dropout):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, nheads, dim_ff, dropout) for _ in range(num_layers))

    def forward(self, x, pos, mask=None):
        for layer in self.layers:
            x = layer(x, pos, mask)
        return x


class Decoder(nn.Module):
    """Queries start at zero; the learned query embedding is their position (DETR). Returns every layer."""

    def __init__(self, num_layers, d, nheads, dim_ff, dropout):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, nheads, dim_ff, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, query_pos, memory, memory_pos, memory_mask):
        tgt, outputs = torch.zeros_like(query_pos), []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, memory_pos, memory_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)  # (L, B, Q, d)


class MLP(nn.Module):
    """The 3-layer box MLP of DETR (Sec. IV-D: "3 non-linear project layers")."""

    def __init__(self, d_in, d_hidden, d_out, num_layers):
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class BoxMLP(MLP):
    """A box branch: the 3-layer MLP and a sigmoid -> (cx, cy, w, h) in [0, 1] of the un-padded image.

    Always computed in float32, also under bf16 autocast (train.py --amp bf16 on CUDA): bf16 keeps 8 bits of
    mantissa, a step of 2^-8 for coordinates in [0.5, 1), about 2.6 px of a 1333 px image, which is too coarse
    for the L1 / GIoU losses and for the IoU >= 0.5 tests of the metrics on VG's small objects."""

    def forward(self, x):  # (..., d) -> (..., 4) float32
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).sigmoid()


PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # sigmoid(b) = 0.01: multi-label heads start "mostly negative" (RetinaNet)


class TextClassifier(nn.Module):
    """A classifier whose weights start as the classes' text embeddings (Sec. III-B, as GEN-VLKT).

    logits = exp(t) * <norm(W h), norm(e_c)>, with a learnable temperature t (init ln(1/0.07)) and a learnable
    extra row for "no object" / "no relation" when with_background."""

    def __init__(self, d, text_emb, with_background=True):
        super().__init__()
        self.proj = nn.Linear(d, text_emb.shape[1])
        self.weight = nn.Parameter(F.normalize(text_emb.clone(), dim=-1))
        self.background = nn.Parameter(F.normalize(torch.randn(1, text_emb.shape[1]), dim=-1)) \
            if with_background else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # a multi-label (sigmoid) head needs a bias to start at the prior; a softmax head does not
        self.bias = None if with_background else nn.Parameter(torch.full((len(text_emb),), PRIOR_BIAS))

    def forward(self, h):
        w = self.weight if self.background is None else torch.cat([self.weight, self.background])
        logits = self.logit_scale.exp() * F.normalize(self.proj(h), dim=-1) @ F.normalize(w, dim=-1).t()
        return logits if self.bias is None else logits + self.bias


def make_classifier(cfg, names, num_classes, with_background=True):
    """Random (Linear) or text-initialised classifier over num_classes (+1 background)."""
    if cfg.classifier_init == "text":
        names = names or [f"class {i}" for i in range(num_classes)]
        return TextClassifier(cfg.d_model, class_text_embeddings(names, cfg.text_dim, cfg.text_embeddings),
                              with_background)
    linear = nn.Linear(cfg.d_model, num_classes + int(with_background))
    if not with_background:
        nn.init.constant_(linear.bias, PRIOR_BIAS)
    return linear


class Branch(nn.Module):
    """One classification branch: a hidden layer (whose output is f_s / f_r / f_o of Eq. 7) + a classifier."""

    def __init__(self, cfg, names, num_classes, with_background=True):
        super().__init__()
        self.hidden = nn.Linear(cfg.d_model, cfg.d_model)
        self.classifier = make_classifier(cfg, names, num_classes, with_background)

    def forward(self, x):
        h = F.relu(self.hidden(x))
        return self.classifier(h), h


# ------------------------------------------------------------------------------------------------ III-A  Holistic semantic-spatial features


class BBSeg(nn.Module):
    """FCN_seg of Eq. 1: five 3x3 conv + BN + ReLU layers and a 1x1 classifier over N_seg + 1 classes
    (N_seg = entity and HOI object names together, 191 for VG150 + COCO-80; channel 0 = background)."""

    def __init__(self, in_channels, hidden, num_classes_with_bg, norm="batch"):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(5):
            # "group": 8 groups (or fewer when hidden is not a multiple of 8); see Config.seg_norm
            bn = nn.BatchNorm2d(hidden) if norm == "batch" else nn.GroupNorm(math.gcd(8, hidden), hidden)
            layers += [nn.Conv2d(c, hidden, 3, padding=1, bias=False), bn, nn.ReLU(inplace=True)]
            c = hidden
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(hidden, num_classes_with_bg, 1)
        nn.init.constant_(self.classifier.bias, PRIOR_BIAS)  # most classes are absent at most pixels

    def forward(self, v):  # (B, C', H, W) -> (B, N_seg + 1, H, W)
        return self.classifier(self.convs(v))


def bbseg_targets(boxes_list, labels_list, feat_hw, stride, num_classes_with_bg):
    """Box-filled multi-label targets y of Eq. 2 at the feature resolution.

    Every pixel inside a ground-truth box is labelled with that box's class (channel 1 + class); a pixel
    covered by several boxes has several labels; uncovered pixels are background (channel 0). The paper
    labels image pixels and downsamples y to the size of s; taking the cell centres of the feature grid
    is that downsampling (nearest). A box smaller than one cell still marks the cell holding its centre,
    so small objects do not vanish. boxes: xyxy pixels of the padded batch canvas; labels: 0-based.
    Returns (B, N_seg + 1, H, W) float."""
    H, W = feat_hw
    y = torch.zeros(len(boxes_list), num_classes_with_bg, H, W)
    boxes = torch.cat([b.reshape(-1, 4).float().cpu() for b in boxes_list])  # (N, 4) every box of the batch
    if len(boxes):
        labels = torch.cat([lab.reshape(-1).cpu() for lab in labels_list])  # (N,)
        image = torch.repeat_interleave(torch.arange(len(boxes_list)), torch.tensor([len(b) for b in boxes_list]))
        cy = (torch.arange(H, dtype=torch.float32) + 0.5) * stride  # cell centres in pixels
        cx = (torch.arange(W, dtype=torch.float32) + 0.5) * stride
        x1, y1, x2, y2 = boxes.unbind(1)
        inside = (((cy >= y1[:, None]) & (cy <= y2[:, None]))[:, :, None]
                  & ((cx >= x1[:, None]) & (cx <= x2[:, None]))[:, None, :])  # (N, H, W)
        # a box that covers no cell centre marks the cell holding its centre
        small = ~inside.flatten(1).any(1)
        row = (((y1 + y2) / 2) // stride).long().clamp(0, H - 1)
        col = (((x1 + x2) / 2) // stride).long().clamp(0, W - 1)
        inside[small, row[small], col[small]] = True
        y.index_put_((image, 1 + labels), inside.float(), accumulate=True)  # boxes of one class may overlap
        y.clamp_(max=1.0)
    y[:, 0] = (y[:, 1:].sum(1) == 0).float()
    return y


def loss_bbseg(seg_logits, seg_targets, feat_mask):
    """Eq. 2 per image: sum over the N_seg + 1 channels of the BCE averaged over the un-padded positions -> (B,).
    (The criterion averages it over the images of the global batch.)

    Computed in float32 whatever the autocast state (the logits come in bf16 under bf16 autocast), as every other
    loss term: summing N_seg + 1 channels x H x W bf16 values would keep about three significant digits."""
    with torch.autocast(seg_logits.device.type, enabled=False):
        bce = F.binary_cross_entropy_with_logits(seg_logits.float(), seg_targets.float(), reduction="none")
        valid = (~feat_mask).unsqueeze(1).float()  # (B, 1, H, W)
        return (bce * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)


def downsample_mask(mask, feat_hw, stride):
    """Padding mask (B, H, W) of the canvas -> (B, h, w) of a feature map of the given stride: a cell is padding when
    every pixel of its stride x stride block is padding. For the backbones here (h, w) = ceil(H / stride),
    ceil(W / stride), and the un-padded image alone would give exactly its ceil(height / stride) rows, so the valid
    cells are those the image's own feature map has. DETR's F.interpolate(mask, size) (nearest) samples pixel
    floor(i * H / h) instead, which is the same when H is a multiple of the stride and drifts otherwise (a 1,199 px
    canvas gives a scale of 31.55, not 32)."""
    valid = F.max_pool2d((~mask).float()[:, None], stride, stride, ceil_mode=True)[:, 0] > 0  # (B, h, w)
    if tuple(valid.shape[-2:]) != tuple(feat_hw):
        raise ValueError(f"downsample_mask: a {tuple(mask.shape[-2:])} canvas at stride {stride} gives "
                         f"{tuple(valid.shape[-2:])} cells, the feature map has {tuple(feat_hw)}")
    return ~valid


# ------------------------------------------------------------------------------------------------ The model (III-A to III-C)


class SG2HOI(nn.Module):
    """The whole model of Fig. 1: BBSeg -> encoder with [CLS] -> relation decoder -> R2ITrans -> HOI decoder."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = build_backbone(cfg)
        # V -> C' = d channels. The paper "deploy[s] 5 convolutional layers with the kernel size 1 x 1" here,
        # following DETR and HOI-Trans, which use one; five 1x1 convs with no non-linearity named between them are
        # one linear map, so this is DETR's single 1x1 conv (and DETR's input_proj weights load into it).
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, 1)

        # III-A: classes of the segmentation map = the union of the relation and HOI object vocabularies
        entity = cfg.entity_names or [f"entity {i}" for i in range(cfg.num_entity_classes)]
        hoi_obj = cfg.hoi_object_names or [f"object {i}" for i in range(cfg.num_hoi_objects)]
        self.seg_names = list(dict.fromkeys((entity if cfg.sgg else []) + (hoi_obj if cfg.hoi else [])))
        index = {n: i for i, n in enumerate(self.seg_names)}
        self.register_buffer("entity_to_seg", torch.tensor([index.get(n, 0) for n in entity]), persistent=False)
        self.register_buffer("hoi_object_to_seg", torch.tensor([index.get(n, 0) for n in hoi_obj]),
                             persistent=False)
        if cfg.use_bbseg:
            num_seg = len(self.seg_names) + 1
            self.bbseg = BBSeg(d, cfg.seg_hidden, num_seg, cfg.seg_norm)
            if cfg.semantic_embedding == "clip":
                table = class_text_embeddings(self.seg_names, cfg.text_dim, cfg.text_embeddings)
            elif cfg.semantic_embedding == "glove":
                table = load_word_vectors(cfg.word_vectors, self.seg_names)  # width from the file (GloVe: 300)
            else:  # HSSD: discrete labels, i.e. one-hot class vectors
                table = torch.eye(len(self.seg_names))
            # row 0 = background -> the zero vector (Sec. III-A); frozen, as CLIP is
            self.register_buffer("semantic_table", torch.cat([torch.zeros(1, table.shape[1]), table]))
            self.w_v = nn.Conv2d(d, d // 2, 1)  # W_v of Eq. 3
            self.w_s = nn.Conv2d(table.shape[1], d // 2, 1)  # W_s of Eq. 3

        # III-B: encoder with a [CLS] token, VL distillation head, relation decoder and its five branches
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))  # the [CLS] token's own (learned) position
        self.encoder = Encoder(cfg.enc_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        if cfg.use_vl_distill:
            self.align_proj = nn.Linear(d, cfg.text_dim)  # f_en (d) -> CLIP image space
        self.rel_query_embed = nn.Embedding(cfg.num_rel_queries, d)  # Q_rel
        # (built for HOI-only training too: the HOIs are predicted from the scene graph)
        self.rel_decoder = Decoder(cfg.rel_dec_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.rel_sub = Branch(cfg, cfg.entity_names, cfg.num_entity_classes)
        self.rel_obj = Branch(cfg, cfg.entity_names, cfg.num_entity_classes)
        self.rel_pred = Branch(cfg, cfg.predicate_names, cfg.num_predicates)
        self.rel_sub_box = BoxMLP(d, d, 4, 3)
        self.rel_obj_box = BoxMLP(d, d, 4, 3)

        # III-C: R2ITrans, feature / query transformation, HOI decoder and its five branches
        if cfg.hoi:
            if cfg.use_r2i:
                self.w_t = nn.Linear(3 * d, d)  # W_t of Eq. 7
                self.r2i = Encoder(cfg.r2i_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                if cfg.use_feature_transform:
                    self.feature_transform = nn.ModuleList(
                        CrossAttentionLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                        for _ in range(cfg.feat_trans_layers))
            if not cfg.hoi_queries_from_rel:
                self.hoi_query_embed = nn.Embedding(cfg.num_hoi_queries, d)  # Q_hoi
                if cfg.use_query_transform:
                    self.query_transform = nn.ModuleList(
                        CrossAttentionLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                        for _ in range(cfg.query_trans_layers))
            self.hoi_decoder = Decoder(cfg.hoi_dec_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
            self.hoi_human = nn.Linear(d, 2)  # binary human score: [human, no-human]
            self.hoi_obj = Branch(cfg, cfg.hoi_object_names, cfg.num_hoi_objects)
            self.hoi_verb = Branch(cfg, cfg.verb_names, cfg.num_verbs, with_background=False)  # multi-label
            self.hoi_human_box = BoxMLP(d, d, 4, 3)
            self.hoi_obj_box = BoxMLP(d, d, 4, 3)

        for name, p in self.named_parameters():  # DETR's init for the transformer
            if p.dim() > 1 and any(s in name for s in ("encoder", "decoder", "r2i", "_transform")) \
                    and "in_proj" not in name:
                nn.init.xavier_uniform_(p)
        self._reach = None  # {(task, with align term): parameter names its loss reaches}, see loss_reach()

    # -------------------------------------------------------------------- forward
    def forward(self, images, mask, with_hoi=True):
        """images (B, 3, H, W) normalised; mask (B, H, W) True on padding. Returns a dict of outputs.

        with_hoi=False skips Sec. III-C: training runs it on HOI batches only (an SGG batch has no HOI loss);
        idle_parameters("sgg") lists the parameters that then must not move."""
        cfg, out = self.cfg, {}
        feat = self.backbone(images)  # (B, C, h, w)
        fmask = downsample_mask(mask, feat.shape[-2:], self.backbone.stride)  # (B, h, w)
        pos = sine_position_encoding(fmask, cfg.d_model).flatten(1, 2)  # (B, h*w, d)
        v = self.input_proj(feat)  # V: (B, d, h, w)
        out["feat_mask"], out["canvas_hw"] = fmask, images.shape[-2:]

        # Eq. 1 and 3: box-level segmentation, semantic map, aggregation
        if cfg.use_bbseg:
            seg_logits = self.bbseg(v)  # s: (B, N_seg + 1, h, w)
            e_s = self.semantic_table[seg_logits.argmax(1)]  # E_s: (B, h, w, E); background -> 0
            f_agg = torch.cat([self.w_v(v), self.w_s(e_s.permute(0, 3, 1, 2).contiguous())], dim=1)  # (B, d, h, w)
            out["seg_logits"] = seg_logits
        else:  # -HSS
            f_agg = v

        # Eq. 4: f_en = Encoder([GAP(V), f_agg_1 ... f_agg_HW], p)
        valid = (~fmask).flatten(1).unsqueeze(-1).float()  # (B, h*w, 1)
        gap = (v.flatten(2).transpose(1, 2) * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)  # (B,1,d)
        tokens = torch.cat([gap, f_agg.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + h*w, d)
        tok_pos = torch.cat([self.cls_pos.expand(len(images), -1, -1), pos], dim=1)
        tok_mask = torch.cat([fmask.new_zeros(len(images), 1), fmask.flatten(1)], dim=1)  # [CLS] never masked
        f_en = self.encoder(tokens, tok_pos, tok_mask)  # (B, 1 + h*w, d)

        # Eq. 5: the feature aligned with CLIP: the [CLS] output or the pooled encoder output
        if cfg.use_vl_distill:
            if cfg.align_feature == "cls":
                f_vl = f_en[:, 0]  # (B, d)
            else:
                f_vl = (f_en[:, 1:] * valid).sum(1) / valid.sum(1)  # (B, d)
            out["align"] = self.align_proj(f_vl)  # (B, text_dim)

        # Eq. 6: f_sg = RelDecoder(f_en, Q_rel) and the five branches, on every decoder layer
        B = len(images)
        q_rel = self.rel_query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, N_rel, d)
        f_sg = self.rel_decoder(q_rel, f_en, tok_pos, tok_mask)  # (L, B, N_rel, d)
        sub_logits, f_s = self.rel_sub(f_sg)  # (L, B, N_rel, N_o + 1), hidden f_s (L, B, N_rel, d)
        obj_logits, f_o = self.rel_obj(f_sg)
        pred_logits, f_r = self.rel_pred(f_sg)  # (L, B, N_rel, N_r + 1); last column = "no relation"
        out["rel"] = dict(sub_logits=sub_logits, obj_logits=obj_logits, pred_logits=pred_logits,
                          sub_boxes=self.rel_sub_box(f_sg), obj_boxes=self.rel_obj_box(f_sg))  # (L, B, N_rel, 4)

        if cfg.hoi and with_hoi:
            # Eq. 7: f_r2i = R2ITrans([W_t [f_s, f_r, f_o]]_k, p), from the last relation-decoder layer
            if cfg.use_r2i:
                f_tilde = self.w_t(torch.cat([f_s[-1], f_r[-1], f_o[-1]], dim=-1))  # (B, N_rel, d)
                f_r2i = self.r2i(f_tilde, q_rel)  # (B, N_rel, d)
                if cfg.use_feature_transform:  # f_en attends to f_r2i -> F_hoi
                    f_hoi = f_en
                    for layer in self.feature_transform:
                        f_hoi = layer(f_hoi, tok_pos, f_r2i, q_rel)  # (B, 1 + h*w, d)
                    memory, mem_pos, mem_mask = f_hoi[:, 1:], pos, fmask.flatten(1)  # F_hoi: H*W vectors
                else:  # -FETR: the HOI decoder reads f_r2i alone
                    memory, mem_pos, mem_mask = f_r2i, q_rel, None
            else:  # -R2ITR: the HOI decoder reads the encoder features
                memory, mem_pos, mem_mask = f_en, tok_pos, tok_mask
            # query transformation: HOI queries attend to the relation queries
            if cfg.hoi_queries_from_rel:  # RELQ: decoded f_sg[-1] (default) or the learnable Q_rel (literal)
                q_hoi = f_sg[-1] if cfg.relq_queries == "decoded" else q_rel  # (B, N_rel, d)
            else:
                q_hoi = self.hoi_query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, N_hoi, d)
                if cfg.use_query_transform:
                    # keys/values: by default the decoded relation queries of this image (the relation cues to
                    # transfer), with Q_rel as their position; "learnable" = Q_rel itself (the paper's words)
                    if cfg.query_transform_memory == "decoded":
                        kv, kv_pos = f_sg[-1], q_rel
                    else:
                        kv, kv_pos = q_rel, torch.zeros_like(q_rel)
                    for layer in self.query_transform:
                        q_hoi = layer(q_hoi, torch.zeros_like(q_hoi), kv, kv_pos)
            # Eq. 8: h_hoi = HOIDecoder(F_hoi, Q_hoi) and its five branches
            h_hoi = self.hoi_decoder(q_hoi, memory, mem_pos, mem_mask)  # (L, B, N_hoi, d)
            obj_logits, _ = self.hoi_obj(h_hoi)
            verb_logits, _ = self.hoi_verb(h_hoi)
            out["hoi"] = dict(human_logits=self.hoi_human(h_hoi), obj_logits=obj_logits, verb_logits=verb_logits,
                              human_boxes=self.hoi_human_box(h_hoi), obj_boxes=self.hoi_obj_box(h_hoi))
        return out

    # -------------------------------------------------------------------- which task trains which parameter
    def task_outputs(self, out, task, align=True):
        """The outputs that the loss of a `task` batch ("sgg" | "hoi") reads in SetCriterion.forward: the
        segmentation logits and the alignment vector when their terms are on (weight > 0; align=False: a batch in
        which no image has a teacher vector, so the criterion has no `align` term), and the task's decoder outputs
        (all layers: the auxiliary losses read them and the last layer depends on the others anyway)."""
        cfg, used = self.cfg, []
        if cfg.use_bbseg and cfg.loss_seg > 0:
            used.append(out["seg_logits"])
        if cfg.use_vl_distill and cfg.loss_align > 0 and align:
            used.append(out["align"])
        return used + list(out.get("rel" if task == "sgg" else "hoi", {}).values())

    def loss_reach(self):
        """{(task, with align term): names of the parameters the task's loss reaches}, found once by autograd.

        One forward of a blank 64 x 64 image with the HOI branch on, in eval mode (no dropout, BatchNorm statistics
        untouched, no random numbers drawn) and with every parameter temporarily requiring grad (phase 1 freezes the
        HOI part); then torch.autograd.grad of the sum of task_outputs with allow_unused=True: a parameter whose
        gradient is None has no path to that task's loss in this configuration. Reachability is a property of the
        graph, not of the image, so this holds for every batch (an argmax, as the semantic map's class lookup of
        Eq. 3, is a cut in the graph as it is in training). It replaces hand-kept prefix lists that went wrong under
        -R2ITR, where the relation branches' hidden layers reach nothing on HOI steps."""
        if self._reach is None:
            params = dict(self.named_parameters())
            flags, was_training = {n: p.requires_grad for n, p in params.items()}, self.training
            device = next(iter(params.values())).device
            try:
                for p in params.values():
                    p.requires_grad_(True)
                self.eval()
                with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    out = self(torch.zeros(1, 3, 64, 64, device=device),
                               torch.zeros(1, 64, 64, dtype=torch.bool, device=device), with_hoi=True)
                    reach = {}
                    for task in ("sgg", "hoi"):
                        for align in (True, False):
                            used = self.task_outputs(out, task, align)
                            grads = torch.autograd.grad(sum(t.float().sum() for t in used), list(params.values()),
                                                        allow_unused=True, retain_graph=True) if used else []
                            reach[task, align] = {n for n, g in zip(params, grads) if g is not None}
            finally:
                for n, p in params.items():
                    p.requires_grad_(flags[n])
                self.train(was_training)
            self._reach = reach
        return self._reach

    def idle_parameters(self, task, losses=None):
        """Parameters that receive no gradient from a batch of `task` ("sgg" or "hoi"): those loss_reach() does not
        list for it. losses: the criterion's output for the batch, if known; when it has no "align" term (no image of
        the batch has a teacher vector) the alignment head is idle too. idle_parameters("sgg") is also the HOI-only
        part (frozen in phase 1, trained at lr in phase 2).

        train.py sets their .grad to None after the (DDP-synchronised) backward, so AdamW neither moves nor
        decays them during the other task's steps."""
        reached = self.loss_reach()[task, losses is None or "align" in losses]
        return [p for n, p in self.named_parameters() if n not in reached]

    def parameter_groups(self):
        """Parameter lists for the optimiser: backbone; text_classifier = the class-weight tensors initialised from
        text embeddings (TextClassifier.weight: GEN-VLKT gives the small rate only to the CLIP-initialised weights;
        the random projection, background row, temperature and bias train at lr with their branch); hoi = the
        HOI-only part (III-C, idle_parameters("sgg")); sgg = the rest (III-A, III-B). Frozen parameters are left out."""
        groups = {"backbone": [], "text_classifier": [], "sgg": [], "hoi": []}
        hoi_only = {id(p) for p in self.idle_parameters("sgg")}
        text = {id(m.weight) for m in self.modules() if isinstance(m, TextClassifier)}
        for name, p in self.named_parameters():
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


def build_model(cfg: Config) -> SG2HOI:
    return SG2HOI(cfg)


# ------------------------------------------------------------------------------------------------ III-D  Matching and losses
# Targets, one dict per image, in the project's internal form (see the data section):
#   boxes (N, 4) xyxy pixels of the transformed image, labels (N,) 0-based, size (2,) = (h, w) of that image,
#   SGG: rels (R, 3) = [subject index, object index, predicate (0-based)];
#   HOI: hois (K, 3) = [human index, object index or -1 (V-COCO: no object), verb (0-based)];
#   optional clip (text_dim,) = the CLIP image embedding (teacher of Eq. 5).


def relation_targets(t):
    """An image's relations as 5-tuples (b_s, l_s, r, b_o, l_o), boxes in the model's normalised cxcywh."""
    boxes, r = boxes_to_model(t["boxes"].float(), t["size"]), t["rels"].long()
    return dict(sub_boxes=boxes[r[:, 0]], obj_boxes=boxes[r[:, 1]], sub_labels=t["labels"][r[:, 0]].long(),
                obj_labels=t["labels"][r[:, 1]].long(), preds=r[:, 2])


def hoi_targets(t, num_verbs, missing_object_label):
    """An image's HOIs as 5-tuples; the verbs of one (human, object) pair are merged into a multi-hot vector
    (QPIC). An object index of -1 (V-COCO action without object) gets a zero box, which is excluded from
    the box losses and costs, and the label `missing_object_label` (QPIC's extra "no object" class)."""
    boxes, hois = boxes_to_model(t["boxes"].float(), t["size"]), t["hois"].long().tolist()
    pairs = list(dict.fromkeys((h, o) for h, o, _ in hois))  # unique pairs, in order of first appearance
    verbs = torch.zeros(len(pairs), num_verbs)
    for h, o, v in hois:
        verbs[pairs.index((h, o)), v] = 1.0
    has_obj = torch.tensor([o >= 0 for _, o in pairs], dtype=torch.bool)
    human = torch.tensor([h for h, _ in pairs], dtype=torch.long)
    obj = torch.tensor([max(o, 0) for _, o in pairs], dtype=torch.long)
    obj_boxes = boxes[obj] * has_obj[:, None] if pairs else boxes.new_zeros(0, 4)
    obj_labels = torch.where(has_obj, t["labels"][obj].long(), torch.full_like(obj, missing_object_label))
    return dict(human_boxes=boxes[human], obj_boxes=obj_boxes, obj_labels=obj_labels, verbs=verbs.to(boxes),
                has_obj=has_obj.to(boxes.device))


def _box_costs(pred_cxcywh, tgt_cxcywh):
    """(P, 4), (T, 4) -> L1 cost (P, T) and GIoU (P, T); the matchers combine them into the "box cost" of Eq. 9,
    box_l1 * L1 - box_giou * GIoU (2.5 L1 - GIoU by default)."""
    l1 = torch.cdist(pred_cxcywh, tgt_cxcywh, p=1)
    giou = generalized_box_iou(box_convert(pred_cxcywh, "cxcywh", "xyxy"), box_convert(tgt_cxcywh, "cxcywh", "xyxy"))
    return l1, giou


def _assign(cost, sizes, what):
    """cost (B, Q, sum(sizes)) -> per image (query indices, target indices) of the minimum-cost matching.

    Non-finite costs (a diverged model) raise FloatingPointError, which train.py's --nonfinite handling catches,
    instead of scipy's ValueError "matrix contains invalid numeric entries"."""
    if not torch.isfinite(cost).all():
        raise FloatingPointError(f"non-finite matching cost: model outputs contain NaN/Inf ({what} matching, "
                                 f"{int((~torch.isfinite(cost)).sum())} of {cost.numel()} costs)")
    out = []
    for b, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[b].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


class HungarianMatcher:
    """Eq. 9: L_cost = alpha_1 L_box + alpha_2 L_cls + alpha_3 L_cls^r, solved by linear_sum_assignment.

    What the paper leaves open, and what we chose:
      * the box cost "encompasses a box regression loss L1 and an IoU loss": we use QPIC's weighting inside
        alpha_1, box_l1 * L1 (on normalised cxcywh) - box_giou * GIoU with 2.5 and 1 (CDN and GEN-VLKT
        keep them; DETR and RelTR use 5 and 2, the same ratio);
      * the star means "subject or object": we add the subject and the object terms (RelTR), so that a
        5-tuple pays for both of its boxes; for HOIs the human takes the subject's place;
      * classification costs are -p(class), as DETR (the log of CE is dropped in the cost; monotone);
      * the multi-label verb cost of an HOI is QPIC's: -(mean p on the positive verbs + mean (1 - p) on the
        negative verbs) / 2.
    The costs are built for the whole batch in one pass and split per image (DETR)."""

    def __init__(self, cost_box=1.0, cost_class=2.0, cost_rel=4.0, box_l1=2.5, box_giou=1.0):
        self.a1, self.a2, self.a3 = cost_box, cost_class, cost_rel
        self.box_l1, self.box_giou = box_l1, box_giou

    @torch.no_grad()
    def match_relations(self, out, tgts):
        """out: one decoder layer's relation outputs (B, Q, ...); tgts: list of relation_targets()."""
        B, Q = out["sub_logits"].shape[:2]
        sizes = [len(t["preds"]) for t in tgts]
        if sum(sizes) == 0:
            return [(torch.zeros(0, dtype=torch.long),) * 2 for _ in range(B)]
        cat = {k: torch.cat([t[k] for t in tgts]) for k in tgts[0]}
        p_sub = out["sub_logits"].flatten(0, 1).float().softmax(-1)  # (B*Q, N_o + 1)
        p_obj = out["obj_logits"].flatten(0, 1).float().softmax(-1)
        p_rel = out["pred_logits"].flatten(0, 1).float().softmax(-1)
        l1_s, giou_s = _box_costs(out["sub_boxes"].flatten(0, 1).float(), cat["sub_boxes"])
        l1_o, giou_o = _box_costs(out["obj_boxes"].flatten(0, 1).float(), cat["obj_boxes"])
        c_box = self.box_l1 * (l1_s + l1_o) - self.box_giou * (giou_s + giou_o)  # (B*Q, T)
        c_cls = -(p_sub[:, cat["sub_labels"]] + p_obj[:, cat["obj_labels"]])
        c_rel = -p_rel[:, cat["preds"]]
        cost = self.a1 * c_box + self.a2 * c_cls + self.a3 * c_rel
        return _assign(cost.view(B, Q, -1).cpu(), sizes, "relation")

    @torch.no_grad()
    def match_hois(self, out, tgts):
        """out: one decoder layer's HOI outputs (B, Q, ...); tgts: list of hoi_targets()."""
        B, Q = out["human_logits"].shape[:2]
        sizes = [len(t["verbs"]) for t in tgts]
        if sum(sizes) == 0:
            return [(torch.zeros(0, dtype=torch.long),) * 2 for _ in range(B)]
        cat = {k: torch.cat([t[k] for t in tgts]) for k in tgts[0]}
        p_human = out["human_logits"].flatten(0, 1).float().softmax(-1)[:, 0]  # (B*Q,)
        p_obj = out["obj_logits"].flatten(0, 1).float().softmax(-1)
        p_verb = out["verb_logits"].flatten(0, 1).float().sigmoid()  # (B*Q, V)
        l1_h, giou_h = _box_costs(out["human_boxes"].flatten(0, 1).float(), cat["human_boxes"])
        l1_o, giou_o = _box_costs(out["obj_boxes"].flatten(0, 1).float(), cat["obj_boxes"])
        has_obj = cat["has_obj"].float()[None]  # (1, T): no object box -> no object box cost
        c_box = self.box_l1 * l1_h - self.box_giou * giou_h + (self.box_l1 * l1_o - self.box_giou * giou_o) * has_obj
        c_cls = -(p_human[:, None] + p_obj[:, cat["obj_labels"]])
        y = cat["verbs"]  # (T, V)
        c_verb = -0.5 * (p_verb @ y.t() / (y.sum(1)[None] + 1e-4)
                         + (1 - p_verb) @ (1 - y).t() / ((1 - y).sum(1)[None] + 1e-4))
        cost = self.a1 * c_box + self.a2 * c_cls + self.a3 * c_verb
        return _assign(cost.view(B, Q, -1).cpu(), sizes, "HOI")


def batch_counts(targets, task, num_queries):
    """The loss normalisers of one (micro-)batch, as counts (DETR normalises by the number of targets).

    train.py adds them over the micro-batches of an optimiser step and over the processes, so that every loss term is
    normalised by the counts of the whole *global* batch: then 1 process, N processes and gradient accumulation give
    the same gradient (see SetCriterion). A matched query is one per target, at most num_queries per image."""
    n_images = len(targets)
    teachers = sum(t.get("clip") is not None for t in targets)
    if task == "sgg":
        n = [len(t["rels"]) for t in targets]
        with_object, positive = 0, 0
    else:
        pairs = [{(h, o) for h, o, _ in t["hois"].tolist()} for t in targets]
        n = [len(p) for p in pairs]
        with_object = sum(min(sum(o >= 0 for _, o in p), num_queries) for p in pairs)
        positive = sum(len(t["hois"]) for t in targets)  # verb labels (QPIC's focal-loss normaliser)
    matched = sum(min(k, num_queries) for k in n)
    return dict(images=float(n_images), teachers=float(teachers), matched=float(matched),
                with_object=float(with_object), positive_verbs=float(positive),
                # sum of the CE weights over all queries: 1 for a matched query, eos_coef for the others
                unmatched=float(n_images * num_queries - matched))


def all_reduce_mean(values: dict, device):
    """{name: float} of this process -> the sum over all processes / world size: the per-process share of the
    global batch's counts (loss normalisers), or the global batch's value of per-process loss terms (train.py)."""
    keys = sorted(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
        v = v / torch.distributed.get_world_size()
    return dict(zip(keys, v.tolist()))


class SetCriterion(nn.Module):
    """Eq. 10: L = lambda_1 L_seg + lambda_2 L_algn + L_rel + L_hoi, with deep supervision.

    L_rel (and likewise L_hoi) is the matched cost of Eq. 9 written as losses: alpha_1 (L1 + GIoU loss)
    on both boxes + alpha_2 CE on both labels + alpha_3 on the predicate (CE) or the verbs (focal).
    Unmatched queries: the paper says it computes no loss for them; then nothing ever teaches a query to
    say "no relation", all 100 queries stay confident and the ranking at test time is noise. We therefore
    follow DETR by default: unmatched queries are trained towards the no-object / no-relation class with
    weight eos_coef = 0.1 (and towards all-zero verbs). unmatched_loss=False gives the paper's literal rule."""

    def __init__(self, cfg: Config, entity_to_seg, hoi_object_to_seg, num_seg_classes, stride):
        """stride: the backbone's real stride (model.backbone.stride), at which the BBSeg targets are drawn."""
        super().__init__()
        self.cfg, self.stride = cfg, stride
        self.matcher = HungarianMatcher(cfg.cost_box, cfg.cost_class, cfg.cost_rel, cfg.box_l1, cfg.box_giou)
        self.register_buffer("entity_to_seg", entity_to_seg.clone())
        self.register_buffer("hoi_object_to_seg", hoi_object_to_seg.clone())
        self.num_seg_classes = num_seg_classes

    def _ce(self, logits, matched_labels, idx, norm, background_weight_index=-1):
        """CE over all queries, unmatched -> the last class with weight eos_coef (or matched queries only).

        A sum divided by the batch's total weight: with one process and no accumulation this is exactly
        F.cross_entropy's weighted mean; with several it is the weighted mean over the global batch."""
        B, Q, C = logits.shape
        target = torch.full((B, Q), C - 1, dtype=torch.long, device=logits.device)
        target[idx] = matched_labels
        if not self.cfg.unmatched_loss:
            return F.cross_entropy(logits[idx].float(), matched_labels, reduction="sum") / max(norm["matched"], 1)
        weight = torch.ones(C, device=logits.device)
        weight[background_weight_index] = self.cfg.eos_coef
        total_weight = norm["matched"] + self.cfg.eos_coef * norm["unmatched"]
        # over (B * Q, C) rows: the same sum as the (B, C, Q) form, and the form that has a deterministic CUDA
        # kernel (nll_loss2d has none: train.py --deterministic would refuse it)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), weight=weight, reduction="sum")
        return loss / total_weight

    def _box_losses(self, pred, tgt, num, keep=None):
        if keep is not None:
            pred, tgt = pred[keep], tgt[keep]
        l1 = F.l1_loss(pred.float(), tgt, reduction="sum") / num
        giou = generalized_box_iou_loss(box_convert(pred.float(), "cxcywh", "xyxy"),
                                        box_convert(tgt, "cxcywh", "xyxy"), reduction="sum") / num
        return self.cfg.box_l1 * l1 + self.cfg.box_giou * giou

    def relation_losses(self, out, tgts, norm):
        """L_rel for one decoder layer: dict of weighted terms."""
        indices = self.matcher.match_relations(out, tgts)
        idx = (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
               torch.cat([q for q, _ in indices]))
        matched = {k: torch.cat([t[k][j] for t, (_, j) in zip(tgts, indices)]) for k in tgts[0]}
        num, cfg = max(norm["matched"], 1.0), self.cfg
        return {
            "rel_box": cfg.cost_box * (self._box_losses(out["sub_boxes"][idx], matched["sub_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num)),
            "rel_cls": cfg.cost_class * (self._ce(out["sub_logits"], matched["sub_labels"], idx, norm)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx, norm)),
            "rel_pred": cfg.cost_rel * self._ce(out["pred_logits"], matched["preds"], idx, norm),
        }

    def hoi_losses(self, out, tgts, norm):
        """L_hoi for one decoder layer: dict of weighted terms."""
        indices = self.matcher.match_hois(out, tgts)
        idx = (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
               torch.cat([q for q, _ in indices]))
        matched = {k: torch.cat([t[k][j] for t, (_, j) in zip(tgts, indices)]) for k in tgts[0]}
        cfg = self.cfg
        num, num_obj = max(norm["matched"], 1.0), max(norm["with_object"], 1.0)
        # verbs: the paper calls its classification losses "a standard cross-entropy loss", but a person's verbs are
        # multi-label (hold and ride the same bicycle), which a softmax cannot express. As the HOI transformers it
        # follows: a sigmoid focal loss (gamma 2, no alpha: QPIC's CornerNet-style form), normalised by the positives
        if cfg.unmatched_loss:
            verb_target = torch.zeros_like(out["verb_logits"], dtype=torch.float)
            verb_target[idx] = matched["verbs"]
            verb_logits = out["verb_logits"].float()
        else:
            verb_target, verb_logits = matched["verbs"], out["verb_logits"][idx].float()
        verb = sigmoid_focal_loss(verb_logits, verb_target, alpha=-1, gamma=2.0, reduction="sum") \
            / max(norm["positive_verbs"], 1.0)
        return {
            "hoi_box": cfg.cost_box * (self._box_losses(out["human_boxes"][idx], matched["human_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num_obj,
                                                          keep=matched["has_obj"])),
            "hoi_cls": cfg.cost_class * (self._ce(out["human_logits"], torch.zeros_like(matched["obj_labels"]), idx,
                                                  norm)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx, norm)),
            "hoi_verb": cfg.cost_rel * verb,
        }

    def seg_targets(self, outputs, targets, task):
        """The BBSeg targets y of Eq. 2 (B, N_seg + 1, h, w) on the feature grid, cell i centred at (i + 0.5) * stride
        pixels of the padded canvas, stride = the backbone's (not canvas / cells, which is not the stride when the
        canvas is not a multiple of it: 1,199 px gives 31.55)."""
        to_seg = self.entity_to_seg if task == "sgg" else self.hoi_object_to_seg
        fm = outputs["feat_mask"]
        return bbseg_targets([t["boxes"].float().cpu() for t in targets],
                             [to_seg[t["labels"].long()].cpu() for t in targets],
                             fm.shape[1:], self.stride, self.num_seg_classes).to(fm.device)

    def forward(self, outputs, targets, task, norm=None):
        """outputs: SG2HOI.forward(); targets: one dict per image; task: "sgg" or "hoi"; norm: the loss
        normalisers of the whole global batch (per-process share, see batch_counts; train.py computes them over
        its micro-batches), or None: this batch's counts, averaged over the processes (DETR).

        Every term is a sum over this batch divided by a count of the global batch, so the gradients of the
        micro-batches and processes add up to the gradient of the global batch.
        Returns {term: value} with every term already weighted, and "loss" = their sum (Eq. 10)."""
        cfg, losses = self.cfg, {}
        device = outputs["feat_mask"].device
        if norm is None:
            Q = cfg.num_rel_queries if task == "sgg" else cfg.num_hoi_queries
            norm = all_reduce_mean(batch_counts(targets, task, Q), device)
        for t in targets:
            _check_target_boxes(t)
        if cfg.use_bbseg:
            y = self.seg_targets(outputs, targets, task)
            losses["seg"] = cfg.loss_seg * loss_bbseg(outputs["seg_logits"], y, outputs["feat_mask"]).sum() \
                / max(norm["images"], 1.0)
        if cfg.use_vl_distill and norm["teachers"] > 0:  # some image of the global batch has a teacher vector
            has = [i for i, t in enumerate(targets) if t.get("clip") is not None]
            if has:
                teacher = torch.stack([targets[i]["clip"].float() for i in has]).to(device)
                student = outputs["align"][has].float()
                dist = F.l1_loss if cfg.align_loss == "l1" else F.mse_loss  # Eq. 5; l2 = MSE (see Config.align_loss)
                losses["align"] = cfg.loss_align * dist(student, teacher, reduction="sum") \
                    / (norm["teachers"] * student.shape[1])
            else:  # none in this micro-batch: a zero term, so that every process and micro-batch has the same terms
                losses["align"] = outputs["align"].float().sum() * 0.0
        if task == "sgg":
            tgts = [{k: v.to(device) for k, v in relation_targets(t).items()} for t in targets]
            layer_fn, head = self.relation_losses, outputs["rel"]
        else:
            # the label of a missing object (index -1) is the last HOI object class: V-COCO's "no object" (QPIC).
            # HICO-DET has no HOI without an object (its loader rejects them), so there it is never used.
            tgts = [{k: v.to(device) for k, v in
                     hoi_targets(t, cfg.num_verbs, cfg.num_hoi_objects - 1).items()} for t in targets]
            layer_fn, head = self.hoi_losses, outputs["hoi"]
        num_layers = next(iter(head.values())).shape[0]
        for layer in range(num_layers):  # deep supervision: every layer is matched again (DETR)
            if layer < num_layers - 1 and not cfg.aux_loss:
                continue
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for k, v in layer_fn({k: v[layer] for k, v in head.items()}, tgts, norm).items():
                losses[k + suffix] = v
        losses["loss"] = sum(losses.values())
        return losses


def _check_target_boxes(t):
    """Degenerate target boxes would make the GIoU meaningless (DETR asserts): fail with a clear message."""
    boxes = t["boxes"]
    bad = ~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(boxes).all(1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"target {t.get('image_id', '?')}: box {i} = {boxes[i].tolist()} is degenerate "
                         f"(needs x2 > x1 and y2 > y1); the data pipeline should have dropped it")


def build_criterion(model: SG2HOI) -> SetCriterion:
    return SetCriterion(model.cfg, model.entity_to_seg, model.hoi_object_to_seg, len(model.seg_names) + 1,
                        model.backbone.stride)


# ------------------------------------------------------------------------------------------------ Inference: triplets from queries
# Scores follow RelTR / SGTR for relations (subject x object x predicate) and QPIC / HOTR for HOIs
# (human x object x verb). Boxes are returned as xyxy pixels of the image size given (the original image).


@torch.no_grad()
def relation_predictions(rel_out, sizes):
    """Last decoder layer -> per image the evaluator's SGDet input (eval.sgdet_metrics):
    boxes (2Q, 4) = the Q subject boxes then the Q object boxes, labels, scores, rel_pairs (Q, 2) ranked by
    s_sub * s_obj * max_r p_r, rel_scores (Q, N_r + 1) with column 0 = "no relation", predicates 1..N_r."""
    out = []
    p_sub = rel_out["sub_logits"][-1].float().softmax(-1)[..., :-1]  # (B, Q, N_o) without "no object"
    p_obj = rel_out["obj_logits"][-1].float().softmax(-1)[..., :-1]
    p_rel = rel_out["pred_logits"][-1].float().softmax(-1)  # (B, Q, N_r + 1), last = no relation
    for b, size in enumerate(sizes):
        s_sub, l_sub = p_sub[b].max(-1)
        s_obj, l_obj = p_obj[b].max(-1)
        Q = len(s_sub)
        rel_scores = torch.cat([p_rel[b, :, -1:], p_rel[b, :, :-1]], dim=1)  # (Q, N_r + 1), col 0 = none
        order = torch.argsort(s_sub * s_obj * rel_scores[:, 1:].max(1).values, descending=True, stable=True)
        boxes = torch.cat([boxes_to_pixels(rel_out["sub_boxes"][-1][b].float(), size),
                           boxes_to_pixels(rel_out["obj_boxes"][-1][b].float(), size)])
        out.append(dict(boxes=boxes.cpu().numpy(), labels=torch.cat([l_sub, l_obj]).cpu().numpy(),
                        scores=torch.cat([s_sub, s_obj]).cpu().numpy(),
                        rel_pairs=torch.stack([order, order + Q], 1).cpu().numpy(),
                        rel_scores=rel_scores[order].cpu().numpy()))
    return out


def relation_triplets(pred, graph_constraint=True, top_k=100):
    """One image's relation_predictions() -> ranked triplets [(sub, predicate 1..N_r, obj, score)], where
    sub/obj index pred["boxes"]. With the graph constraint each query (pair) gives one triplet, its best
    predicate; without it every (query, predicate) is a candidate (Sec. IV-C, [58])."""
    s_pair = pred["scores"][pred["rel_pairs"][:, 0]] * pred["scores"][pred["rel_pairs"][:, 1]]  # (Q,)
    if graph_constraint:
        r = pred["rel_scores"][:, 1:].argmax(1)
        scores = s_pair * pred["rel_scores"][np.arange(len(r)), 1 + r]
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(pred["rel_pairs"][q, 0]), int(r[q]) + 1, int(pred["rel_pairs"][q, 1]), float(scores[q]))
                for q in order]
    scores = s_pair[:, None] * pred["rel_scores"][:, 1:]  # (Q, N_r)
    flat = np.argsort(-scores.ravel(), kind="stable")[:top_k]
    q, r = np.unravel_index(flat, scores.shape)
    return [(int(pred["rel_pairs"][a, 0]), int(b) + 1, int(pred["rel_pairs"][a, 1]), float(scores[a, b]))
            for a, b in zip(q, r)]


@torch.no_grad()
def hoi_predictions(hoi_out, sizes, person_label=0):
    """Last decoder layer -> per image QPIC's PostProcessHOI output (the input of eval.hico_map):
    boxes (2Q, 4) = human boxes then object boxes, labels (person_label for humans), sub_ids, obj_ids,
    verb_scores (Q, V) = sigmoid(verb) x object score x human score."""
    out = []
    p_human = hoi_out["human_logits"][-1].float().softmax(-1)[..., 0]  # (B, Q)
    s_obj, l_obj = hoi_out["obj_logits"][-1].float().softmax(-1)[..., :-1].max(-1)  # (B, Q)
    verbs = hoi_out["verb_logits"][-1].float().sigmoid()  # (B, Q, V)
    for b, size in enumerate(sizes):
        Q = len(s_obj[b])
        boxes = torch.cat([boxes_to_pixels(hoi_out["human_boxes"][-1][b].float(), size),
                           boxes_to_pixels(hoi_out["obj_boxes"][-1][b].float(), size)])
        labels = torch.cat([torch.full_like(l_obj[b], person_label), l_obj[b]])
        out.append(dict(boxes=boxes.cpu().numpy(), labels=labels.cpu().numpy(), sub_ids=np.arange(Q),
                        obj_ids=np.arange(Q, 2 * Q),
                        verb_scores=(verbs[b] * (s_obj[b] * p_human[b])[:, None]).cpu().numpy()))
    return out


def hoi_triplets(pred, correct_mat=None, top_k=100):
    """One image's hoi_predictions() -> the top-k (human, object, verb, score) after the verb-object validity
    mask correct_mat (V, O), enumerated pair-major and sorted stably (QPIC's evaluator)."""
    scores = pred["verb_scores"].astype(np.float32)
    if correct_mat is not None:
        scores = scores * correct_mat[:, pred["labels"][pred["obj_ids"]]].T.astype(np.float32)
    flat = np.argsort(-scores.ravel(), kind="stable")[:top_k]
    p, v = np.unravel_index(flat, scores.shape)
    return [(int(pred["sub_ids"][a]), int(pred["obj_ids"][a]), int(b), float(scores[a, b])) for a, b in zip(p, v)]


# ------------------------------------------------------------------------------------------------ Initialisation from DETR
# The paper initialises from DETR trained on COCO (Sec. IV-D, as QPIC). DETR's checkpoint
# (detr-r50-e632da11.pth / detr-r101-2c7b67e5.pth, {"model": state_dict}) maps onto this model as:
#   backbone.0.body.*        -> backbone.body.*          (ResNet)
#   input_proj.*             -> input_proj.*             (2048 -> 256 1x1 conv, when d_model = 256)
#   transformer.encoder.*    -> encoder.*                (and r2i.* for its first layers: same layer type)
#   transformer.decoder.*    -> rel_decoder.*, hoi_decoder.*   (GEN-VLKT copies the decoder into both)
#   bbox_embed.*             -> every box MLP
#   query_embed.weight       -> rel_query_embed / hoi_query_embed (first N rows)
# DETR's MultiheadAttention keeps its out_proj name; its FFN is linear1/linear2 where ours is ffn.linear1/ffn.linear2.
#
# DETR's class_embed (a Linear d -> 92 over COCO-91 ids + "no object") is NOT used. QPIC maps it onto its COCO-80 HOI
# object classifier because there the classifier reads the decoder output directly, as in DETR. Here every class
# branch has a hidden layer first (Branch: Linear + ReLU, whose output is f_s / f_r / f_o of Eq. 7), which starts
# random: a classifier copied behind it would read features it was never trained on, so its COCO knowledge would not
# transfer (and VG150's relation branches have other classes anyway). The branches start from their own init.
#
# Checkpoints: DETR's released files hold {"model": ...}; a checkpoint written by DETR's main.py during training also
# holds "optimizer", "lr_scheduler", "epoch" and "args", an argparse.Namespace, which torch.load(weights_only=True)
# refuses. We allow-list exactly argparse.Namespace (torch.serialization.safe_globals) and never unpickle anything
# else: a file that needs other classes fails with a message saying what to do.

DETR_CLASS_EMBED_NOTE = ("class_embed (COCO-91 classifier) not used: every class branch here has a randomly "
                         "initialised hidden layer before its classifier, so DETR's classifier would read untrained "
                         "features (see the comment above detr_key_map)")


def detr_key_map(model: SG2HOI, detr_keys):
    """{our key: DETR key} for every DETR tensor that has a place in `model`."""
    ours = set(model.state_dict())
    mapping = {}

    def layers(prefix, rest):  # "3.linear1.weight" -> prefix + "3.ffn.linear1.weight"
        i, sub = rest.split(".", 1)
        return f"{prefix}{i}.{'ffn.' if sub.startswith(('linear1', 'linear2')) else ''}{sub}"

    for k in detr_keys:
        targets = []
        if k.startswith("backbone.0.body."):
            targets = ["backbone.body." + k[len("backbone.0.body."):]]
        elif k.startswith("input_proj."):
            targets = [k]
        elif k.startswith("transformer.encoder.layers."):
            rest = k[len("transformer.encoder.layers."):]
            targets = [layers("encoder.layers.", rest), layers("r2i.layers.", rest)]
        elif k.startswith("transformer.decoder.layers."):
            rest = k[len("transformer.decoder.layers."):]
            targets = [layers("rel_decoder.layers.", rest), layers("hoi_decoder.layers.", rest)]
        elif k.startswith("transformer.decoder.norm."):
            rest = k[len("transformer.decoder."):]
            targets = ["rel_decoder." + rest, "hoi_decoder." + rest]
        elif k.startswith("bbox_embed."):
            rest = k[len("bbox_embed."):]
            targets = [f"{box}.{rest}" for box in ("rel_sub_box", "rel_obj_box", "hoi_human_box", "hoi_obj_box")]
        elif k == "query_embed.weight":
            targets = ["rel_query_embed.weight", "hoi_query_embed.weight"]
        for t in targets:
            if t in ours:
                mapping[t] = k
    return mapping


def load_detr_checkpoint(path):
    """DETR's state dict from a released file ({"model": ...}) or a DETR main.py training checkpoint (with "args",
    an argparse.Namespace, beside "model"), read with weights_only=True and only argparse.Namespace allow-listed."""
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: cannot be read safely (torch.load weights_only=True, with argparse.Namespace "
                         f"allowed): {str(e).splitlines()[0]}. If you trust the file, re-save its weights alone: "
                         f"torch.save({{'model': torch.load(path, weights_only=False)['model']}}, 'detr_model.pth'), "
                         f"and pass that file") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or {{'model': state dict, ...}}), got {type(ckpt)}")
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: its 'model' entry is not a state dict of tensors")
    return sd


def load_detr_weights(model: SG2HOI, state_dict_or_path, verbose=True):
    """Copy DETR's COCO weights into `model` where names and shapes fit; returns (loaded, skipped).
    state_dict_or_path: a file (load_detr_checkpoint), a state dict or {"model": state dict}."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        sd = load_detr_checkpoint(sd)
    sd = sd.get("model", sd)
    own = model.state_dict()
    loaded, skipped = [], []
    for ours, theirs in detr_key_map(model, sd).items():
        src = sd[theirs]
        if ours.endswith("query_embed.weight") and src.shape[1:] == own[ours].shape[1:] \
                and src.shape[0] >= own[ours].shape[0]:
            src = src[: own[ours].shape[0]]  # first N queries
        if src.shape == own[ours].shape:
            own[ours] = src.to(own[ours].dtype)
            loaded.append(ours)
        else:
            skipped.append(f"{ours} <- {theirs}: shape {tuple(src.shape)} vs {tuple(own[ours].shape)}")
    used = set(detr_key_map(model, sd).values())
    skipped += [f"{k}: {DETR_CLASS_EMBED_NOTE}" if k.startswith("class_embed.") else f"{k}: no place in SG2HOI+"
                for k in sd if k not in used]
    model.load_state_dict(own)
    if verbose:
        print(f"DETR init: loaded {len(loaded)} tensors, skipped {len(skipped)}; {DETR_CLASS_EMBED_NOTE}")
        for s in skipped:
            print("  skipped", s)
    return loaded, skipped


# ------------------------------------------------------------------------------------------------ Data: one internal form
# Every loader returns (records, meta). A record is one image in ORIGINAL pixels:
#   {"file": path, "image_id": id, "width": W, "height": H, "boxes": float32 (N, 4) xyxy, "labels": int64 (N,) 0-based,
#    "rels": int64 (R, 3) [subject index, object index, predicate 0-based]        (scene-graph datasets)
#    "hois": int64 (K, 3) [subject index, object index or -1, verb 0-based]}     (HOI datasets)
# meta holds the vocabularies: {"task", "entity_names" | "object_names", "predicate_names" | "verb_names", ...}.
# Conventions converted here, once: COCO xywh -> xyxy, 1-based VG labels/predicates -> 0-based, COCO-91 category ids
# -> COCO-80 indices, HICO verbs 1..117 -> 0..116, V-COCO verbs stay 0..28 and object_id -1 stays -1.

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab.json")


def load_vocab(path=VOCAB_FILE):
    """The real vocabularies (VG150, COCO-80, HICO-DET, V-COCO) shipped in vocab.json."""
    with open(path) as f:
        return json.load(f)


class DataError(ValueError):
    """Bad input: the message names the file, the record and the field."""


# What is checked when (check_images=True, the default):
#   load time, every record: the image file exists (symbolic links followed) and its header gives the image size,
#     read from the first bytes of the file (JPEG: the SOF marker; PNG: IHDR; other formats: PIL's header parser),
#     never decoding pixels. VG: that size must equal the JSON's width / height (a mismatch is a DataError naming
#     file, record and field: the boxes are in the JSON's frame, so a wrong size would silently clip them). HICO-DET
#     / V-COCO have no size in the JSON: the header's size is the record's size. A file whose header is not an image
#     (e.g. text named .jpg) is a DataError, or a counted skip with bad_images="skip".
#   training time (DetectionDataset.__getitem__): the pixels are decoded; a failure (e.g. a truncated JPEG) is a
#     DataError naming file and record, or with bad_images="skip" the item is dropped from its batch (counted).
#   on request (verify_images, train.py --check_images_only): every image is decoded once and compared with its
#     record's size; the bad ones are listed, so that a run can be started knowing they are fine.


def _read_json(path, object_hook=None):
    """json.loads of the whole file with the garbage collector paused (the parse allocates millions of containers;
    a collection pass every 700 allocations made the VG parse 30 % slower). object_hook: see the loaders."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, object_hook=object_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed or truncated JSON ({e})") from None
    finally:
        if gc_was_enabled:
            gc.enable()


# Parsed-annotation cache. Parsing VG's 77 MB train.json takes 5-10 s on a loaded 2-core machine however it is done
# in Python, and every run (every DDP rank) would pay it again. So the compact arrays a reader makes from a large
# annotation file (>= CACHE_MIN_BYTES; small files parse in milliseconds) are saved as an .npz in the cache folder
# ($SG2HOI_CACHE, else ~/.cache/sg2hoi), stamped with the file's size, modification time, inode and a SHA-1 of its
# first and last MB; a later load with the same stamp reads the arrays instead (about 0.1 s) and then runs every
# check of the loader on them, exactly as after a parse. A file with errors is never cached (the errors are raised
# first); a folder that cannot be written just means no cache. build_data lets the master rank fill the cache
# before the other ranks load.
CACHE_MIN_BYTES = 4 << 20
_CACHE_VERSION = 1


def _cache_folder():
    return os.environ.get("SG2HOI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sg2hoi")


def _file_stamp(path, kind):
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(st.st_size - (1 << 20), len(head)))
        tail = f.read()
    digest = hashlib.sha1(head + tail).hexdigest()
    return f"{kind}-v{_CACHE_VERSION}-{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{digest}"


def _cache_file(path):
    return os.path.join(_cache_folder(), hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:20] + ".npz")


def _read_cache(path, stamp, members=True):
    """The cached arrays of `path` if the cache holds them for the file's `stamp` (_file_stamp), else None
    (members=False: just True instead of the arrays)."""
    try:
        with np.load(_cache_file(path), allow_pickle=False) as z:
            if str(z["__stamp__"]) == stamp:
                return {k: z[k] for k in z.files if k != "__stamp__"} if members else True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or a stale / damaged one
    return None


def _cached_parse(path, kind, parse):
    """parse(path) -> {name: numpy array}, through the .npz cache for large files (see above)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return parse(path)  # the parser names the missing file
    if size < CACHE_MIN_BYTES:
        return parse(path)
    stamp = _file_stamp(path, kind)  # before parsing: a file that changes meanwhile is parsed again next time
    cached = _read_cache(path, stamp)
    if cached is not None:
        return cached
    arrays = parse(path)
    cache = _cache_file(path)
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, __stamp__=np.array(stamp), **arrays)
        os.replace(tmp, cache)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arrays


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def image_header_size(path):
    """(width, height) of an image file from its header, without decoding: about 10 us for a JPEG or PNG (PIL's
    Image.open took 67 us). JPEG: walk the marker segments from the start to the first SOFn segment, whose payload
    is [precision (1 byte), height (2), width (2), ...] big-endian; PNG: the IHDR chunk at byte 16; other formats
    through PIL. Raises FileNotFoundError for a missing file, ValueError when the header is not an image's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, 4096)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if head[:2] == b"\xff\xd8":
            offset, pos = 0, 2  # offset: file position of head[0]
            while True:
                if pos + 9 > len(head):  # the next segment header lies beyond what was read: read from there
                    offset += pos
                    os.lseek(fd, offset, os.SEEK_SET)
                    head, pos = os.read(fd, 4096), 0
                    if len(head) < 9:
                        raise ValueError("JPEG ends before its frame header")
                if head[pos] != 0xFF:
                    raise ValueError(f"corrupt JPEG marker at byte {offset + pos}")
                marker = head[pos + 1]
                if marker == 0xFF:  # fill byte
                    pos += 1
                elif marker in _JPEG_SOF:
                    return int.from_bytes(head[pos + 7:pos + 9], "big"), int.from_bytes(head[pos + 5:pos + 7], "big")
                elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
                    pos += 2
                elif marker == 0xD9 or marker == 0xDA:  # end of image / start of scan before any frame header
                    raise ValueError("JPEG without a frame header")
                else:
                    pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    finally:
        os.close(fd)
    from PIL import Image, UnidentifiedImageError  # other formats (torchvision's dependency)

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image ({e})") from None


def _read_headers(files):
    """[(width, height) or the exception] for each file (for the thread pool of _check_image_files)."""
    out = []
    for file in files:
        try:
            out.append(image_header_size(file))
        except (FileNotFoundError, ValueError) as e:
            out.append(e)
        except OSError as e:  # a folder, no permission, an I/O error
            out.append(ValueError(f"cannot be read ({e.strerror or e})"))
    return out


def _check_image_files(files, where, bad_images, skips, expected=None):
    """Header sizes of `files` (see "What is checked when"). where(i) names record i for messages. expected:
    optional (n, 2) [width, height] from the annotation file, which must match. Returns (sizes (n, 2) int64,
    ok (n,) bool); ok is False only for unreadable headers with bad_images="skip" (counted in skips)."""
    sizes, ok = np.zeros((len(files), 2), np.int64), np.ones(len(files), bool)
    # Reading headers waits on the file system: 8 threads over chunks of 1,000 files (the GIL is released during
    # open / read). Measured on a local, page-cached disk: no gain and no loss (1.1 s for 57,723 files either way);
    # on a network file system the waits overlap. Results come back in file order, so the first bad record is named.
    chunks = [files[i:i + 1000] for i in range(0, len(files), 1000)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = itertools.chain.from_iterable(pool.map(_read_headers, chunks))
        for i, (file, result) in enumerate(zip(files, results)):
            if isinstance(result, tuple):
                sizes[i] = result
                continue
            if isinstance(result, FileNotFoundError):
                raise DataError(f"{where(i)}: image file {file} not found")
            e = result
            if bad_images != "skip":
                raise DataError(f"{where(i)}: image file {file}: {e} (--bad_images skip drops such records; "
                                f"--check_images_only lists them all)")
            ok[i] = False
            skips["records with an unreadable image header skipped"] += 1
    if expected is not None:
        bad = ok & (sizes != expected).any(1)
        if bad.any():
            i = int(np.where(bad)[0][0])
            fields = [f"'{name}' = {int(expected[i, k])}" for k, name in enumerate(("width", "height"))
                      if sizes[i, k] != expected[i, k]]
            raise DataError(f"{where(i)}: field {' and '.join(fields)} but the image file {files[i]} is "
                            f"{sizes[i, 0]} x {sizes[i, 1]} (width x height): the annotations do not belong to "
                            f"this image")
    return sizes, ok


def _segment_ids(counts):
    """counts (n,) -> (starts (n,), id (sum,)): where each segment starts, and the segment of every element."""
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
    return starts, np.repeat(np.arange(len(counts)), counts)


def _build_records(files, image_ids, sizes, box_counts, boxes, labels, pair_counts, pairs, key, what, skips,
                   drop_empty):
    """Vectorised over all images of a split (a Python loop did the same in 100 us per image):
    clamp the xyxy boxes to their image, drop the degenerate ones (x2 <= x1 or y2 <= y1) and the pairs that use
    them, re-number the remaining box indices, and cut the results into one record per image (views into a few
    big arrays: about 400 bytes per record besides the numbers themselves).

    sizes (n, 2) [width, height]; box_counts (n,), boxes (B, 4) xyxy, labels (B,) in image order; pair_counts
    (n,), pairs (P, 3) [subject, object or -1, class] with per-image box indices (already range-checked).
    drop_empty: images left without a pair are skipped (VG: SGB's filter_empty_rels)."""
    n = len(files)
    box_start, box_img = _segment_ids(box_counts)                    # (n,), (B,)
    pair_start, pair_img = _segment_ids(pair_counts)                 # (n,), (P,)
    boxes = np.array(boxes, np.float32).reshape(-1, 4)               # (B, 4) a copy, clamped in place
    if not np.isfinite(boxes).all():
        i = int(box_img[np.where(~np.isfinite(boxes).all(1))[0][0]])
        raise DataError(f"{files[i]} (image {image_ids[i]}): field 'bbox' holds a non-finite value")
    wh = np.asarray(sizes, np.float32)[box_img]                      # (B, 2)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, wh[:, :1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, wh[:, 1:])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (B,)
    skips["degenerate boxes dropped"] += int((~keep).sum())
    kept_before = np.concatenate([[0], np.cumsum(keep)])             # (B + 1,) kept boxes before each position
    new_index = kept_before[1:] - 1 - kept_before[box_start][box_img]  # (B,) index among the image's kept boxes
    pairs = np.asarray(pairs, np.int64).reshape(-1, 3)
    g_sub = box_start[pair_img] + pairs[:, 0]                          # (P,) global box row of the subject
    g_obj = box_start[pair_img] + np.maximum(pairs[:, 1], 0)
    ok = keep[g_sub] & ((pairs[:, 1] < 0) | keep[g_obj])              # (P,)
    skips[f"{what} on dropped boxes"] += int((~ok).sum())
    out_pairs = np.stack([new_index[g_sub], np.where(pairs[:, 1] < 0, -1, new_index[g_obj]), pairs[:, 2]], 1)[ok]
    kept_boxes = np.ascontiguousarray(boxes[keep])
    kept_labels = np.asarray(labels, np.int64)[keep]
    nb = np.bincount(box_img[keep], minlength=n)                     # (n,) boxes kept per image
    npair = np.bincount(pair_img[ok], minlength=n)                   # (n,) pairs kept per image
    b_end, p_end = np.cumsum(nb).tolist(), np.cumsum(npair).tolist()
    records = []
    for i, (file, image_id, (w, h), b1, kb, p1, kp) in enumerate(zip(files, image_ids, np.asarray(sizes).tolist(),
                                                                     b_end, nb.tolist(), p_end, npair.tolist())):
        if drop_empty and kp == 0:
            skips["images without relations skipped"] += 1
            continue
        records.append({"file": file, "image_id": image_id, "width": w, "height": h, "boxes": kept_boxes[b1 - kb:b1],
                        "labels": kept_labels[b1 - kb:b1], key: out_pairs[p1 - kp:p1]})
    return records


def report_skips(name, skips):
    for what, n in skips.items():
        if n:
            print(f"[{name}] {what}: {n}")


# ---------------------------------------------------------------- VG150, RelTR's COCO-style JSON (primary path)
# Speed and memory at full size (VG train.json: 57,723 images, 635,000 annotations): the parse hands every
# annotation dict to a hook that appends its numbers to flat arrays and returns None, so the JSON objects never
# accumulate (they were 500 MB of Python objects for a 77 MB file); rel.json is parsed once per process for all
# three splits, into arrays (cached by path, modification time and size); all checks and conversions are vectorised.


class _CocoReader:
    """object_hook for a COCO detection JSON: annotations -> flat arrays, images -> lists of their fields."""

    def __init__(self, path):
        self.path = path
        self.ann_image, self.ann_cat, self.ann_box = array.array("q"), array.array("q"), array.array("d")
        self.im_id, self.im_file, self.im_w, self.im_h = [], [], [], []

    def __call__(self, d):
        box = d.get("bbox")
        if box is not None:  # an annotation: the common case first, with as few operations as possible
            image = d.get("image_id")
            if type(box) is not list or len(box) != 4 or type(image) is not int:
                self._bad_annotation(d)
            try:
                self.ann_box.extend(box)
            except TypeError:
                self._bad_annotation(d)
            self.ann_image.append(image)
            cat = d.get("category_id")
            self.ann_cat.append(cat if type(cat) is int else -(10 ** 9))  # not an int: reported with its record
            return None
        if "file_name" in d:  # an image
            for k in ("id", "width", "height"):
                v = d.get(k)
                if type(v) is not int and (k == "id" or type(v) is not float) or (k != "id" and not v > 0):
                    raise DataError(f"{self.path}: image {d.get('id', '?')} ({d['file_name']}, entry "
                                    f"{len(self.im_id)} of 'images'): field {k!r} " +
                                    ("missing" if v is None else f"= {v!r} is not a positive number"))
            self.im_id.append(d["id"])
            self.im_file.append(d["file_name"])
            self.im_w.append(d["width"])
            self.im_h.append(d["height"])
            return None
        return d  # categories, info, the top level

    def _bad_annotation(self, d):
        where = (f"{self.path}: annotation id {d.get('id', '?')} (image {d.get('image_id', '?')}, entry "
                 f"{len(self.ann_cat)} of 'annotations')")
        box, image = d.get("bbox"), d.get("image_id")
        if type(box) is not list or len(box) != 4 or not all(type(v) in (int, float) for v in box):
            raise DataError(f"{where}: field 'bbox' = {box!r}: expected 4 numbers [x, y, w, h]")
        raise DataError(f"{where}: field 'image_id' = {image!r}: missing or not an integer")


class _RelSplit:
    """One split of rel.json as arrays: image ids (n,) sorted, their rows' starts and counts, rows (R, 3)."""

    def __init__(self, d):
        self.error = None
        try:
            ids = np.array([int(k) for k in d], np.int64)
        except ValueError:
            bad = next(k for k in d if not k.lstrip("-").isdigit())
            ids, self.error = np.zeros(0, np.int64), f"{bad!r}: key is not an image id"
        lists = list(d.values())
        counts = np.fromiter(map(len, lists), np.int64, len(lists))
        rows = list(itertools.chain.from_iterable(lists))
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        if self.error is None and (lengths != 3).any():
            r = int(np.where(lengths != 3)[0][0])
            i = int(np.searchsorted(np.cumsum(counts), r, side="right"))
            self.error = (f"{list(d)[i]}: entry {r - int(counts[:i].sum())} = {rows[r]!r}: expected 3 numbers "
                          f"[subject, object, predicate]")
        if self.error is not None:
            ids, counts, flat = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, 3 * len(rows)).reshape(-1, 3)
        order = np.argsort(ids, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        self.ids, self.starts, self.counts, self.rows = ids[order], starts[order], counts[order], flat


def _parse_rel_json(rel_path):
    rels_all = _read_json(rel_path, object_hook=_rel_hook)
    if not isinstance(rels_all, dict) or isinstance(rels_all, _RelSplit):
        raise DataError(f"{rel_path}: expected an object with the splits and 'rel_categories'")
    out = {"rel_categories": np.array([str(n) for n in rels_all.get("rel_categories", [])], dtype=str)}
    for split, r in rels_all.items():
        if isinstance(r, _RelSplit):
            out.update({f"{split}/ids": r.ids, f"{split}/starts": r.starts, f"{split}/counts": r.counts,
                        f"{split}/rows": r.rows, f"{split}/error": np.array(r.error or "")})
    return out


def _rel_hook(d):
    """object_hook for rel.json: every split ({str(image_id): [[s, o, p], ...]}) becomes a _RelSplit at once."""
    if "rel_categories" in d or any(isinstance(v, _RelSplit) for v in d.values()):
        return d  # the top level
    return _RelSplit(d)


_REL_CACHE = {}  # rel.json path -> ((mtime_ns, size), parsed): all three splits from one parse per process


def _read_rel_json(rel_path):
    try:
        st = os.stat(rel_path)
    except FileNotFoundError:
        raise DataError(f"{rel_path}: file not found") from None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _REL_CACHE.get(os.path.abspath(rel_path))
    if cached is None or cached[0] != stamp:
        arrays = _cached_parse(rel_path, "rel", _parse_rel_json)
        rels_all = {"rel_categories": arrays["rel_categories"].tolist()}
        for key in arrays:
            if key.endswith("/ids"):
                split = key[:-4]
                rels_all[split] = types.SimpleNamespace(
                    ids=arrays[f"{split}/ids"], starts=arrays[f"{split}/starts"], counts=arrays[f"{split}/counts"],
                    rows=arrays[f"{split}/rows"], error=str(arrays[f"{split}/error"]))
        cached = _REL_CACHE[os.path.abspath(rel_path)] = (stamp, rels_all)
    return cached[1]


def _parse_coco_json(ann_path):
    reader = _CocoReader(ann_path)
    coco = _read_json(ann_path, object_hook=reader)
    if not isinstance(coco, dict):
        raise DataError(f"{ann_path}: expected a COCO detection JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"{ann_path}: missing top-level field {key!r}")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    return dict(ann_image=np.frombuffer(reader.ann_image, np.int64), ann_cat=np.frombuffer(reader.ann_cat, np.int64),
                ann_box=np.frombuffer(reader.ann_box, np.float64).reshape(-1, 4),
                im_id=np.array(reader.im_id, np.int64), im_file=np.array(reader.im_file, dtype=str),
                im_w=np.array(reader.im_w), im_h=np.array(reader.im_h),
                cat_ids=np.array([c["id"] for c in categories], np.int64),
                cat_names=np.array([c["name"] for c in categories], dtype=str))


def load_vg_json(root, split, check_images=True, bad_images="stop"):
    """VG150 in RelTR's layout: root/{train,val,test}.json (COCO detection JSON) + root/rel.json + root/images/.

    rel.json[split][str(image_id)] = [[subject, object, predicate 1..50], ...], indices into the image's annotations
    in file order. Degenerate boxes are dropped with their relations (RelTR drops the boxes without re-indexing,
    which silently shifts labels: we re-index); images without relations are skipped (SGB's filter_empty_rels).
    check_images / bad_images: see "What is checked when" above."""
    ann_path, rel_path = os.path.join(root, f"{split}.json"), os.path.join(root, "rel.json")
    coco = _cached_parse(ann_path, "coco", _parse_coco_json)  # compact arrays, see _CocoReader
    rels_all = _read_rel_json(rel_path)
    if split not in rels_all:
        raise DataError(f"{rel_path}: no key {split!r} (has {sorted(rels_all)})")
    rel = rels_all[split]
    if rel.error:
        raise DataError(f"{rel_path}: {split}/{rel.error}")
    cat_ids = coco["cat_ids"]
    predicate_names = [n for n in rels_all.get("rel_categories", []) if n != "__background__"]
    im_id = coco["im_id"]                                                     # (n,)
    unique, seen = np.unique(im_id, return_counts=True)
    if (seen > 1).any():
        raise DataError(f"{ann_path}: image id {int(unique[seen > 1][0])} appears more than once in 'images'")
    skips = Counter()

    # annotations grouped by image, in file order within an image (a stable sort)
    ann_image = coco["ann_image"]                                             # (A,)
    order = np.argsort(ann_image, kind="stable")
    sorted_image = ann_image[order]
    first = np.searchsorted(sorted_image, im_id, "left")                      # (n,)
    nbox = np.searchsorted(sorted_image, im_id, "right") - first              # (n,) annotations per image
    # relations of every image (an image missing from rel.json has none)
    pos = np.minimum(np.searchsorted(rel.ids, im_id), max(len(rel.ids) - 1, 0))
    found = (rel.ids[pos] == im_id) if len(rel.ids) else np.zeros(len(im_id), bool)
    nrel = np.where(found, rel.counts[pos] if len(rel.ids) else 0, 0)         # (n,)
    with_rels = np.where(nrel > 0)[0]
    skips["images without relations skipped"] += len(im_id) - len(with_rels)
    im_sel, nbox, nrel = with_rels, nbox[with_rels], nrel[with_rels]
    box_start, box_img = _segment_ids(nbox)
    ann_rows = order[np.repeat(first[im_sel] - box_start, nbox) + np.arange(int(nbox.sum()))]  # (B,) file rows
    rel_start, rel_img = _segment_ids(nrel)
    rel_rows = np.repeat(rel.starts[pos[im_sel]] - rel_start, nrel) + np.arange(int(nrel.sum()))
    rels = rel.rows[rel_rows].copy()                                          # (R, 3) [s, o, predicate 1..50]

    def image_where(i):  # i: index into im_sel
        return f"{ann_path}: image {int(im_id[im_sel[i]])}"

    # checks, each naming the first offending record
    cat = coco["ann_cat"][ann_rows]
    cat_pos = np.minimum(np.searchsorted(cat_ids, cat), len(cat_ids) - 1)
    bad = cat_ids[cat_pos] != cat
    if bad.any():
        b = int(np.where(bad)[0][0])
        i, j = int(box_img[b]), b - int(box_start[box_img[b]])
        value = int(cat[b]) if cat[b] != -(10 ** 9) else "missing or not an integer"
        raise DataError(f"{image_where(i)}, annotation {j}: field 'category_id' = {value!r} is not a category of "
                        f"the file")
    num_boxes = nbox[rel_img]
    bad = (rels[:, 0] < 0) | (rels[:, 0] >= num_boxes) | (rels[:, 1] < 0) | (rels[:, 1] >= num_boxes)
    if bad.any():
        r = int(np.where(bad)[0][0])
        i = int(rel_img[r])
        raise DataError(f"{rel_path}: {split}/{int(im_id[im_sel[i]])}: entry {r - int(rel_start[i])} has "
                        f"[subject, object] = ({rels[r, 0]}, {rels[r, 1]}) but the image has {nbox[i]} boxes")
    if predicate_names:
        bad = (rels[:, 2] < 1) | (rels[:, 2] > len(predicate_names))
        if bad.any():
            r = int(np.where(bad)[0][0])
            i = int(rel_img[r])
            raise DataError(f"{rel_path}: {split}/{int(im_id[im_sel[i]])}: entry {r - int(rel_start[i])} has "
                            f"predicate {rels[r, 2]}, outside 1..{len(predicate_names)}")
    rels[:, 2] -= 1  # predicates 1..50 -> 0..49

    xywh = coco["ann_box"][ann_rows]                                          # (B, 4) COCO xywh
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)         # (B, 4) xyxy
    sizes = np.stack([coco["im_w"][im_sel], coco["im_h"][im_sel]], 1)         # (n', 2) [width, height]
    files = [os.path.join(root, "images", f) for f in coco["im_file"][im_sel].tolist()]
    records = _build_records(files, im_id[im_sel].tolist(), sizes, nbox, boxes, cat_pos, nrel, rels, "rels",
                             "relations", skips, drop_empty=True)
    if check_images and records:
        files = [r["file"] for r in records]
        expected = np.array([[r["width"], r["height"]] for r in records])
        _, ok = _check_image_files(files, lambda k: f"{ann_path}: image {records[k]['image_id']}", bad_images, skips,
                                   expected)
        records = [r for r, good in zip(records, ok.tolist()) if good]
    report_skips(f"VG {split}", skips)
    meta = dict(task="sgg", entity_names=coco["cat_names"].tolist(), predicate_names=predicate_names)
    return records, meta


# ---------------------------------------------------------------- VG150, the Neural-Motifs / SGB HDF5 (optional)

VG_CORRUPTED = {1592, 1722, 4616, 4617}


def load_vg_h5(root, split, num_val_im=5000, check_images=True, bad_images="stop"):
    """VG150 from VG-SGG-with-attri.h5 + VG-SGG-dicts-with-attri.json + image_data.json (SGB's load_graphs).

    split values in the file: 0 = train (train and val), 2 = test; val = the first num_val_im train images
    (SGB: 5,000; train.py --num_val_im). Boxes are int (cx, cy, w, h) at longest side 1024, decoded as SGB does and
    scaled to the original image with image_data.json's sizes, as SGB's load_graphs (the 1024-px boxes were made from
    those sizes, so they are not replaced by the image header's). The same checks as the JSON reader: labels 1..150
    and predicates 1..50 (0 is background, never an annotation), relation indices inside the image's box range;
    check_images: every image file exists and has a readable image header."""
    try:
        import h5py  # optional extra
    except ImportError:
        raise ImportError("load_vg_h5 needs h5py (pip install h5py); or use the RelTR JSON with load_vg_json") \
            from None
    if num_val_im < 0:
        raise ValueError(f"num_val_im must be >= 0, got {num_val_im}")
    dicts = _read_json(os.path.join(root, "VG-SGG-dicts-with-attri.json"))
    info = [x for x in _read_json(os.path.join(root, "image_data.json")) if x["image_id"] not in VG_CORRUPTED]
    entity_names = [dicts["idx_to_label"][str(i)] for i in range(1, len(dicts["idx_to_label"]) + 1)]
    predicate_names = [dicts["idx_to_predicate"][str(i)] for i in range(1, len(dicts["idx_to_predicate"]) + 1)]
    h5_path = os.path.join(root, "VG-SGG-with-attri.h5")
    with h5py.File(h5_path, "r") as h5:
        data = {k: h5[k][:] for k in ("split", "img_to_first_box", "img_to_last_box", "img_to_first_rel",
                                      "img_to_last_rel", "labels", "boxes_1024", "relationships", "predicates")}
    if len(info) != len(data["split"]):
        raise DataError(f"{h5_path}: {len(data['split'])} images but image_data.json lists {len(info)} "
                        f"(after removing the 4 corrupted ones)")
    mask = data["split"] == (2 if split == "test" else 0)
    mask &= (data["img_to_first_box"] >= 0) & (data["img_to_first_rel"] >= 0)
    index = np.where(mask)[0]
    if split == "val":
        index = index[:num_val_im]
    elif split == "train":
        if len(index) and len(index) <= num_val_im:
            raise DataError(f"{h5_path}: the file has {len(index)} training images with relations and the first "
                            f"num_val_im = {num_val_im} of them form the validation split, so none is left for "
                            f"training: lower --num_val_im")
        index = index[num_val_im:]
    records, skips = [], Counter()
    paths = [os.path.join(root, "images", f"{info[i]['image_id']}.jpg") for i in index.tolist()]
    readable = np.ones(len(paths), bool)
    if check_images:  # every file exists and has an image header; its size is not compared (see the docstring)
        _, readable = _check_image_files(paths, lambda k: f"{h5_path}: image {info[index[k]]['image_id']} "
                                                          f"(row {index[k]})", bad_images, skips)
    for i, path, ok in zip(index.tolist(), paths, readable.tolist()):
        if not ok:
            continue
        where = f"{h5_path}: image {info[i]['image_id']} (row {i})"
        a, b = int(data["img_to_first_box"][i]), int(data["img_to_last_box"][i])
        ra, rb = int(data["img_to_first_rel"][i]), int(data["img_to_last_rel"][i])
        if not 0 <= a <= b < len(data["labels"]) or not 0 <= ra <= rb < len(data["predicates"]):
            raise DataError(f"{where}: fields 'img_to_first_box'..'img_to_last_box' = {a}..{b} or "
                            f"'img_to_first_rel'..'img_to_last_rel' = {ra}..{rb} outside the file's arrays")
        labels = data["labels"][a:b + 1, 0].astype(np.int64)
        if ((labels < 1) | (labels > len(entity_names))).any():
            j = int(np.where((labels < 1) | (labels > len(entity_names)))[0][0])
            raise DataError(f"{where}: field 'labels' row {a + j} = {labels[j]}, outside 1..{len(entity_names)} "
                            f"(0 is background)")
        predicates = data["predicates"][ra:rb + 1, 0].astype(np.int64)
        if ((predicates < 1) | (predicates > len(predicate_names))).any():
            j = int(np.where((predicates < 1) | (predicates > len(predicate_names)))[0][0])
            raise DataError(f"{where}: field 'predicates' row {ra + j} = {predicates[j]}, outside "
                            f"1..{len(predicate_names)} (0 is background)")
        pairs = data["relationships"][ra:rb + 1].astype(np.int64)  # global box rows
        bad = (pairs < a) | (pairs > b)
        if bad.any():
            j = int(np.where(bad.any(1))[0][0])
            raise DataError(f"{where}: field 'relationships' row {ra + j} = {pairs[j].tolist()} but the image's "
                            f"boxes are rows {a}..{b}")
        w, h = info[i]["width"], info[i]["height"]
        boxes = data["boxes_1024"][a:b + 1].astype(np.int32).copy()
        boxes[:, :2] = boxes[:, :2] - boxes[:, 2:] / 2  # float written back into int32: truncated, as SGB
        boxes[:, 2:] = boxes[:, :2] + boxes[:, 2:]
        boxes = boxes.astype(np.float32) / 1024 * max(w, h)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h - 1)
        rels = np.column_stack([pairs - a, predicates - 1])
        records.append(dict(file=path, image_id=int(info[i]["image_id"]), width=w, height=h, boxes=boxes,
                            labels=labels - 1, rels=rels.astype(np.int64)))
    report_skips(f"VG h5 {split}", skips)
    return records, dict(task="sgg", entity_names=entity_names, predicate_names=predicate_names)


# ---------------------------------------------------------------- HICO-DET and V-COCO, the QPIC / CDN JSON


class _HoiaReader:
    """object_hook for the HOIA list: the dicts inside an image come first (annotations -> flat arrays, returning
    their serial number k >= 0; HOIs -> flat arrays, returning -(k + 1)), then the image dict, which checks that
    its two lists hold what they should and keeps its counts. A bad field is remembered and reported by the
    enclosing image's hook, which knows the record's number and file name."""

    def __init__(self, path):
        self.path = path
        self.box, self.cat = array.array("d"), array.array("q")                       # (4 A,), (A,)
        self.hoi = array.array("q")                                             # (3 H,) [subject, object, category_id]
        self.files, self.img_ids, self.nbox, self.nhoi = [], [], [], []
        self.pending = None  # (kind, serial, message) of the first bad field inside the current image

    def __call__(self, d):
        box = d.get("bbox")
        if box is not None:  # an object annotation
            k = len(self.cat)
            if type(box) is list and len(box) == 4:
                try:
                    self.box.extend(box)
                except TypeError:
                    box = None
            else:
                box = None
            if box is None:
                self.box.extend((0.0, 0.0, 0.0, 0.0))
                if self.pending is None:
                    self.pending = ("annotations", k, f"field 'bbox' = {d['bbox']!r}: expected 4 numbers "
                                                      f"[x1, y1, x2, y2]")
            cat = d.get("category_id")
            self.cat.append(cat if type(cat) is int else -(10 ** 9))
            return k
        if "file_name" in d:  # an image: its lists hold the serial numbers returned above
            n = len(self.files)
            where = f"{self.path}: record {n} ({d['file_name']})"
            for key in ("annotations", "hoi_annotation"):
                if key not in d:
                    raise DataError(f"{where}: missing field {key!r}")
            anns, hois = d["annotations"], d["hoi_annotation"]
            if not all(type(a) is int and a >= 0 for a in anns):
                j = next(j for j, a in enumerate(anns) if not (type(a) is int and a >= 0))
                raise DataError(f"{where}, annotation {j}: missing field 'bbox'")
            if not all(type(h) is int and h < 0 for h in hois):
                j = next(j for j, h in enumerate(hois) if not (type(h) is int and h < 0))
                raise DataError(f"{where}, hoi_annotation {j}: not an HOI (a dict with 'subject_id', 'object_id', "
                                f"'category_id')")
            if self.pending is not None:
                kind, serial, message = self.pending
                first = anns[0] if kind == "annotations" else -hois[0] - 1
                raise DataError(f"{where}, {'annotation' if kind == 'annotations' else 'hoi_annotation'} "
                                f"{serial - first}: {message}")
            img_id = d.get("img_id", n)  # trainval has it; the test files do not (the record's number then)
            if type(img_id) is not int:
                raise DataError(f"{where}: field 'img_id' = {img_id!r} is not an integer")
            self.files.append(d["file_name"])
            self.img_ids.append(img_id)
            self.nbox.append(len(anns))
            self.nhoi.append(len(hois))
            return None
        if "annotations" in d or "hoi_annotation" in d:
            raise DataError(f"{self.path}: record {len(self.files)}: missing field 'file_name'")
        # an HOI
        k = len(self.hoi) // 3
        values = []
        for key in ("subject_id", "object_id", "category_id"):
            v = d.get(key)
            if type(v) is not int:
                if self.pending is None:
                    self.pending = ("hoi_annotation", k, f"field {key!r} " + ("missing" if v is None else
                                                                                f"= {v!r} is not an integer"))
                v = 0
            values.append(v)
        self.hoi.extend(values)
        return -(k + 1)


def _parse_hoia_json(path):
    reader = _HoiaReader(path)
    data = _read_json(path, object_hook=reader)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
    if len(data) != len(reader.files):
        raise DataError(f"{path}: expected a JSON list of image records (dicts with 'file_name')")
    return dict(box=np.frombuffer(reader.box, np.float64).reshape(-1, 4), cat=np.frombuffer(reader.cat, np.int64),
                hoi=np.frombuffer(reader.hoi, np.int64).reshape(-1, 3), files=np.array(reader.files, dtype=str),
                img_ids=np.array(reader.img_ids, np.int64), nbox=np.array(reader.nbox, np.int64),
                nhoi=np.array(reader.nhoi, np.int64))


def _load_hoia(root, ann_file, image_dir, train, num_verbs, verb_base, allow_no_object, check_images,
               bad_images="stop"):
    """Shared reader of the PPDM/QPIC "HOIA" JSON (a list of {file_name, annotations, hoi_annotation}).
    The sizes come from the image headers (the files have none); see "What is checked when"."""
    vocab = load_vocab()
    coco91_to_80 = np.full(max(c["id"] for c in vocab["coco80"]) + 1, -1, np.int64)
    for i, c in enumerate(vocab["coco80"]):
        coco91_to_80[c["id"]] = i
    path = os.path.join(root, "annotations", ann_file)
    hoia = _cached_parse(path, "hoia", _parse_hoia_json)  # compact arrays, see _HoiaReader
    names, img_ids = hoia["files"].tolist(), hoia["img_ids"].tolist()
    n = len(names)
    skips = Counter()
    nbox, nhoi = hoia["nbox"], hoia["nhoi"]                                          # (n,)
    box_start, box_img = _segment_ids(nbox)
    hoi_start, hoi_img = _segment_ids(nhoi)
    cat = hoia["cat"]                                                                # (A,) COCO-91 ids
    labels = np.where((cat >= 0) & (cat < len(coco91_to_80)), coco91_to_80[np.clip(cat, 0, len(coco91_to_80) - 1)], -1)
    if (labels < 0).any():
        b = int(np.where(labels < 0)[0][0])
        i = int(box_img[b])
        value = int(cat[b]) if cat[b] != -(10 ** 9) else "missing or not an integer"
        raise DataError(f"{path}: record {i} ({names[i]}), annotation {b - box_start[i]}: field "
                        f"'category_id' = {value!r} is not a COCO category id")
    triples = hoia["hoi"].copy()                                                     # (H, 3)
    triples[:, 2] -= verb_base
    num_boxes = nbox[hoi_img]
    bad = (triples[:, 0] < 0) | (triples[:, 0] >= num_boxes) | (triples[:, 1] >= num_boxes) | \
          (triples[:, 1] < (-1 if allow_no_object else 0))
    keep_image = np.ones(n, bool)
    if bad.any():
        if train:  # QPIC skips these training images (the released file has some)
            keep_image[hoi_img[bad]] = False
            skips["images with out-of-range subject/object ids skipped"] += int((~keep_image).sum())
        else:
            h = int(np.where(bad)[0][0])
            i = int(hoi_img[h])
            raise DataError(f"{path}: record {i} ({names[i]}), hoi_annotation {h - hoi_start[i]}: field "
                            f"'subject_id'/'object_id' = ({triples[h, 0]}, {triples[h, 1]}) but the image has "
                            f"{nbox[i]} boxes")
    bad = keep_image[hoi_img] & ((triples[:, 2] < 0) | (triples[:, 2] >= num_verbs))
    if bad.any():
        h = int(np.where(bad)[0][0])
        i = int(hoi_img[h])
        raise DataError(f"{path}: record {i} ({names[i]}), hoi_annotation {h - hoi_start[i]}: field "
                        f"'category_id' = {triples[h, 2] + verb_base} is not a verb id")
    files = [os.path.join(root, "images", image_dir, f) for f in names]
    if check_images:
        kept = np.where(keep_image)[0]
        sizes = np.zeros((n, 2), np.int64)
        sizes[kept], ok = _check_image_files([files[i] for i in kept.tolist()],
                                             lambda k: f"{path}: record {kept[k]} ({names[kept[k]]})",
                                             bad_images, skips)
        keep_image[kept[~ok]] = False
    else:
        sizes = np.full((n, 2), 10 ** 9, np.int64)  # no image, no clamping
    sel = np.where(keep_image)[0]
    box_rows = np.repeat(box_start[sel] - _segment_ids(nbox[sel])[0], nbox[sel]) + np.arange(int(nbox[sel].sum()))
    hoi_rows = np.repeat(hoi_start[sel] - _segment_ids(nhoi[sel])[0], nhoi[sel]) + np.arange(int(nhoi[sel].sum()))
    boxes = hoia["box"][box_rows]                                                  # (B, 4) xyxy pixels
    records = _build_records([files[i] for i in sel.tolist()], [img_ids[i] for i in sel.tolist()],
                             sizes[sel], nbox[sel], boxes, labels[box_rows], nhoi[sel], triples[hoi_rows], "hois",
                             "HOIs", skips, drop_empty=False)
    report_skips(ann_file, skips)
    return records


def rare_triplets_from_training(records, threshold=10):
    """QPIC's rare set: (subject label, object label, verb) triplets with fewer than `threshold` training HOIs."""
    counts = {}
    for r in records:
        for s, o, v in r["hois"].tolist():
            if o >= 0:
                trip = (int(r["labels"][s]), int(r["labels"][o]), int(v))
                counts[trip] = counts.get(trip, 0) + 1
    return sorted(t for t, c in counts.items() if c < threshold), counts


def _load_correct_mat(path, shape, default):
    """corre_*.npy ([verb, COCO-80 object] 0/1 matrix), or `default` (from vocab.json) when the file is absent."""
    if not os.path.exists(path):
        return default
    try:
        m = np.load(path)  # allow_pickle=False: a pickled or corrupt file is an error, never executed
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable numpy .npy matrix ({e}); delete it to use the built-in "
                        f"{shape[0]} x {shape[1]} matrix from vocab.json") from None
    if m.shape != shape or not np.issubdtype(m.dtype, np.number):
        raise DataError(f"{path}: shape {m.shape} dtype {m.dtype}, expected a numeric {shape} matrix "
                        f"[verb, COCO-80 object]")
    return m


HOIA_FILES = {"hico": ("trainval_hico.json", "test_hico.json"), "vcoco": ("trainval_vcoco.json", "test_vcoco.json")}


def load_hico(root, split, check_images=True, bad_images="stop"):
    """HICO-DET in the QPIC layout: root/annotations/{trainval,test}_hico.json, corre_hico.npy; root/images/."""
    train = split == "train"
    records = _load_hoia(root, HOIA_FILES["hico"][not train],
                         "train2015" if train else "test2015", train, 117, 1, False, check_images, bad_images)
    vocab = load_vocab()
    correct_mat = _load_correct_mat(os.path.join(root, "annotations", "corre_hico.npy"), (117, 80),
                                    _hico_correct_mat(vocab))
    meta = dict(task="hoi", dataset="hico", object_names=[c["name"] for c in vocab["coco80"]],
                verb_names=vocab["hico_verbs"], correct_mat=correct_mat, person_label=0)
    return records, meta


def _hico_correct_mat(vocab):
    m = np.zeros((117, 80), np.float32)
    for v, o in vocab["hico_hois"]:
        m[v, o] = 1
    return m


def load_vcoco(root, split, check_images=True, bad_images="stop"):
    """V-COCO in the QPIC layout: root/annotations/{trainval,test}_vcoco.json, corre_vcoco.npy; root/images/.

    Verbs are the 29 action_role classes (0-based); object_id -1 = no role object (agent-only actions, or the
    object is absent). The model gets an 81st object class for "no object" (QPIC)."""
    train = split == "train"
    records = _load_hoia(root, HOIA_FILES["vcoco"][not train],
                         "train2014" if train else "val2014", train, 29, 0, True, check_images, bad_images)
    vocab = load_vocab()
    correct_mat = _load_correct_mat(os.path.join(root, "annotations", "corre_vcoco.npy"), (29, 80),
                                    np.array(vocab["corre_vcoco"], np.float32))
    correct_mat = np.concatenate([correct_mat, np.ones((29, 1))], 1)  # the "no object" column (QPIC)
    meta = dict(task="hoi", dataset="vcoco", object_names=[c["name"] for c in vocab["coco80"]] + ["no object"],
                verb_names=[v["name"] for v in vocab["vcoco_verbs"]], correct_mat=correct_mat, person_label=0,
                verbs=vocab["vcoco_verbs"], actions=vocab["vcoco_actions"])
    return records, meta


def vcoco_ground_truth(record, verbs, actions):
    """A V-COCO record -> the input of eval.vcoco_role_ap: actions (N, A) and role_ids (N, A, 2).

    The QPIC JSON keeps only positive labels, so every person counts as annotated (0 = does not do the action);
    the official numbers need vsrl_eval's own files, which also mark unannotated persons (-1)."""
    N, A = len(record["labels"]), len(actions)
    act, role_ids = np.zeros((N, A), np.int64), np.full((N, A, 2), -1, np.int64)
    names = [a["name"] for a in actions]
    for s, o, v in record["hois"].tolist():
        a = names.index(verbs[v]["action"])
        act[s, a] = 1
        if verbs[v]["role"] is not None:
            r = actions[a]["roles"].index(verbs[v]["role"]) - 1
            role_ids[s, a, r] = o
    return dict(boxes=record["boxes"], labels=record["labels"], actions=act, role_ids=role_ids)


# ---------------------------------------------------------------- Toy scenes, written in the three real formats
# Small images with a person and eight other objects drawn as distinct shapes and colours. Each person takes part
# in one "scenario": a few relations between the person and an object, from which the HOIs follow as in the
# paper's motivation (e.g. fly kite = kite above person + person holding the kite; sit at table = person sitting on
# a chair + person in front of the table). Class names are real VG150 / COCO / HICO-DET / V-COCO names, so the toy
# files are tiny instances of the real formats and the default run goes through the real loaders.

TOY_ENTITIES = ["person", "kite", "horse", "chair", "bike", "umbrella", "dog", "cup", "table"]  # VG150 names
TOY_COCO = {"bike": "bicycle", "table": "dining table"}  # VG150 name -> COCO name where they differ
TOY_COLORS = {"person": (200, 40, 40), "kite": (240, 200, 0), "horse": (120, 70, 20), "chair": (40, 80, 200),
              "bike": (30, 30, 30), "umbrella": (150, 40, 200), "dog": (230, 130, 40), "cup": (40, 170, 60),
              "table": (110, 110, 110)}
TOY_SIZES = {"person": (14, 34), "kite": (16, 16), "horse": (40, 24), "chair": (16, 24), "bike": (32, 18),
             "umbrella": (30, 14), "dog": (20, 12), "cup": (8, 10), "table": (44, 20)}  # (w, h) in pixels

# scenario: (weight in train, weight in test, object, relations, HICO verbs, V-COCO verbs). Relations are
# (subject, predicate, object) with "P" = the person and "O" = the object. Weights set the long tail; the two
# rare HOIs (walk bicycle, sit_at dining table) get a few training instances and more in the test split.
TOY_SCENARIOS = {
    "fly_kite": (3.0, 3.0, "kite", [("O", "above", "P"), ("P", "holding", "O")], ["fly"], ["hold_obj", "stand"]),
    "hold_kite": (1.0, 1.0, "kite", [("P", "holding", "O")], ["hold"], ["hold_obj", "stand"]),
    "ride_horse": (2.0, 2.0, "horse", [("P", "riding", "O"), ("P", "on", "O")], ["ride"], ["ride_instr"]),
    "near_horse": (1.0, 1.0, "horse", [("P", "near", "O")], ["no_interaction"], ["stand"]),
    "ride_bike": (2.0, 2.0, "bike", [("P", "riding", "O"), ("P", "on", "O")], ["ride", "sit_on"], ["ride_instr"]),
    "walk_bike": (0.03, 0.4, "bike", [("P", "holding", "O"), ("P", "near", "O")], ["walk"], ["hold_obj", "walk"]),
    "sit_chair": (2.0, 2.0, "chair", [("P", "sitting on", "O")], ["sit_on"], ["sit_instr"]),
    "hold_umbrella": (2.0, 2.0, "umbrella", [("O", "above", "P"), ("P", "holding", "O")], ["hold", "stand_under"],
                      ["hold_obj", "stand"]),
    "under_umbrella": (0.5, 0.5, "umbrella", [("O", "above", "P")], ["stand_under"], ["stand"]),
    "walk_dog": (1.5, 1.5, "dog", [("P", "holding", "O"), ("O", "near", "P")], ["walk"], ["hold_obj", "walk"]),
    "near_dog": (1.5, 1.5, "dog", [("O", "near", "P")], ["no_interaction"], ["stand"]),
    "look_dog": (0.4, 0.4, "dog", [("P", "looking at", "O"), ("O", "near", "P")], ["no_interaction"],
                 ["look_obj", "stand"]),
    "drink_cup": (1.0, 1.0, "cup", [("P", "holding", "O"), ("O", "in front of", "P")], ["drink_with", "hold"],
                  ["drink_instr", "hold_obj", "stand"]),
    "hold_cup": (1.0, 1.0, "cup", [("P", "holding", "O")], ["hold"], ["hold_obj", "stand"]),
    "at_table": (1.5, 1.5, "table", [("P", "in front of", "O")], ["no_interaction"], ["stand"]),
    "sit_at_table": (0.03, 0.4, "table", [("P", "in front of", "O")], ["sit_at"], ["sit_instr"]),
}
# object-object extras: (weight in train, weight in test, subject, predicate, object); the last two occur only in
# the test split, so their triplets are zero-shot.
TOY_EXTRAS = [(1.0, 1.0, "cup", "on", "table"), (0.3, 0.3, "dog", "under", "chair"),
              (0.3, 0.3, "dog", "behind", "chair"), (0.0, 0.3, "dog", "under", "table"),
              (0.0, 0.3, "cup", "on", "chair")]
# The scene-graph training set sees the relation cues of the two rare HOIs often (a person holding and near a bike, a
# person sitting on a chair in front of a table), while the HOI training set has only a handful of those HOIs: as in
# the real data, where VG annotates far more relations than HICO-DET annotates interactions, the SGG data carries
# knowledge the HOI data alone lacks, so joint training *can* help the rare HOIs (Table V asks whether it does).
TOY_SGG_TRAIN_WEIGHTS = {"walk_bike": 1.0, "sit_at_table": 1.0}  # scenario -> weight in the VG training set
TOY_PREDICATES = ["near", "holding", "above", "on", "riding", "sitting on", "in front of", "under", "behind",
                  "looking at"]


def _draw(canvas, name, x, y, variant=0):
    """Paint entity `name` with its top-left corner at (x, y) on an (H, W, 3) uint8 canvas; returns its box."""
    w, h = TOY_SIZES[name]
    if name == "person" and variant == 1:  # seated: shorter
        h = 26
    H, W = canvas.shape[:2]
    x, y = int(np.clip(x, 0, W - w)), int(np.clip(y, 0, H - h))
    c = np.array(TOY_COLORS[name], np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    if name == "person":  # head disc + body + legs
        m = ((xx - w / 2) ** 2 + (yy - 4) ** 2 <= 16) | ((yy >= 8) & (np.abs(xx - w / 2) <= 4)) | \
            ((yy >= h - 10) & ((np.abs(xx - w / 2 + 3) <= 1.5) | (np.abs(xx - w / 2 - 3) <= 1.5)))
    elif name == "kite":
        m = np.abs(xx - w / 2) / (w / 2) + np.abs(yy - h / 2) / (h / 2) <= 1
    elif name == "horse":
        m = ((yy >= 4) & (yy <= 14)) | ((yy > 14) & ((xx % 12) < 3)) | ((xx >= w - 8) & (yy < 8))
    elif name == "chair":
        m = (xx < 4) | ((yy >= 12) & (yy <= 15)) | ((yy > 15) & ((xx >= w - 3) | (xx < 3)))
    elif name == "bike":
        m = ((xx - 7) ** 2 + (yy - 11) ** 2 <= 40) & ((xx - 7) ** 2 + (yy - 11) ** 2 >= 16) | \
            ((xx - w + 7) ** 2 + (yy - 11) ** 2 <= 40) & ((xx - w + 7) ** 2 + (yy - 11) ** 2 >= 16) | \
            ((yy >= 3) & (yy <= 5) & (xx > 6) & (xx < w - 6))
    elif name == "umbrella":
        m = ((xx - w / 2) ** 2 / (w / 2) ** 2 + (yy - h) ** 2 / h ** 2 <= 1) & (yy < h - 2) | \
            ((np.abs(xx - w / 2) <= 1) & (yy >= h - 3))
    elif name == "dog":
        m = ((xx - 8) ** 2 / 64 + (yy - 7) ** 2 / 16 <= 1) | ((xx - w + 4) ** 2 + (yy - 4) ** 2 <= 12) | \
            ((yy > 9) & ((xx % 8) < 2))
    elif name == "cup":
        m = (xx >= 1) & (xx <= w - 2) | ((yy >= 3) & (yy <= 6))
    else:  # table
        m = (yy <= 4) | ((yy > 4) & ((xx < 3) | (xx >= w - 3)))
    canvas[y:y + h, x:x + w][m] = c
    return [float(x), float(y), float(x + w), float(y + h)]


def _line(canvas, p, q, color=(20, 20, 20)):
    """A one-pixel line (a kite string, a leash, an umbrella handle)."""
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    xs = np.linspace(p[0], q[0], n).round().astype(int).clip(0, canvas.shape[1] - 1)
    ys = np.linspace(p[1], q[1], n).round().astype(int).clip(0, canvas.shape[0] - 1)
    canvas[ys, xs] = color


def _place_scenario(canvas, rng, name, x0, ground):
    """Draw one scenario in the slot starting at x0 with its feet on `ground`; returns entities and relations."""
    obj = TOY_SCENARIOS[name][2]
    pw, ph = TOY_SIZES["person"]
    ow, oh = TOY_SIZES[obj]
    px = x0 + rng.integers(0, 6)
    ents, draw = {}, []  # draw order matters for occlusion
    if name in ("fly_kite", "hold_umbrella", "under_umbrella"):
        oy = ground - ph - oh - (rng.integers(8, 20) if name == "fly_kite" else rng.integers(0, 3))
        ox = px + pw / 2 - ow / 2 + (rng.integers(4, 14) if name == "fly_kite" else 0)
        draw = [("person", px, ground - ph, 0), (obj, ox, oy, 0)]
    elif name in ("hold_kite", "hold_cup", "walk_bike"):
        draw = [("person", px, ground - ph, 0), (obj, px + pw - 3, ground - ph + 14 if obj != "bike" else ground - oh, 0)]
    elif name == "drink_cup":
        draw = [("person", px, ground - ph, 0), (obj, px + pw // 2 - 1, ground - ph + 3, 0)]
    elif name in ("ride_horse", "ride_bike"):
        draw = [(obj, px - (ow - pw) // 2, ground - oh, 0), ("person", px, ground - oh - ph + 12, 0)]
    elif name in ("near_horse", "near_dog", "walk_dog", "look_dog"):
        side = rng.integers(14, 24)
        draw = [("person", px, ground - ph, 0), (obj, px + pw + side, ground - oh, 0)]
    elif name in ("sit_chair", "sit_at_table"):
        draw = [("chair", px, ground - TOY_SIZES["chair"][1], 0), ("person", px + 3, ground - 34, 1)]
        if name == "sit_at_table":
            draw.append(("table", px + 12, ground - oh, 0))
    elif name == "at_table":
        draw = [("table", px, ground - oh, 0), ("person", px + 14, ground - ph + 4, 0)]
    for ent, x, y, variant in draw:
        ents[ent if ent != "chair" or obj == "chair" else "chair_extra"] = _draw(canvas, ent, x, y, variant)
    if name == "sit_at_table":  # the chair is the object of "sitting on"; the table the object of the HOI
        ents["chair"] = ents.pop("chair_extra")
    p, o = ents["person"], ents[obj]
    hand = (p[2] - 2, p[1] + 16)
    if name == "fly_kite":
        _line(canvas, hand, ((o[0] + o[2]) / 2, o[3]))
    elif name == "hold_umbrella":
        _line(canvas, (hand[0] - 4, hand[1]), ((o[0] + o[2]) / 2, o[3]))
    elif name == "walk_dog":
        _line(canvas, hand, (o[0] + 1, o[1] + 4))
    elif name == "look_dog":  # eyes on the dog's side
        canvas[int(p[1]) + 3, int(p[2]) - 5:int(p[2]) - 3] = 255
    rels = [(s, r, o_) for s, r, o_ in TOY_SCENARIOS[name][3]]
    if name == "sit_at_table":
        rels = rels + [("P", "sitting on", "chair")]
    return ents, rels


def toy_scene(rng, split, size=128, scene_graph=False):
    """One image: a background, one or two person scenarios and maybe an object-object extra. scene_graph: an image
    of the VG training set (TOY_SGG_TRAIN_WEIGHTS).

    Returns (uint8 (H, W, 3) image, entities [(name, box)], relations [(s, o, predicate)], HOIs
    [(person, object, HICO verb)], V-COCO actions [(person, object or -1, V-COCO verb)])."""
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = rng.integers(200, 246, size=3, dtype=np.uint8)
    canvas[:] = np.clip(canvas.astype(np.int16) + rng.integers(-8, 9, size=(size, size, 1)), 0, 255).astype(np.uint8)
    col = 1 if split == "test" else 0
    names = list(TOY_SCENARIOS)
    weights = np.array([TOY_SCENARIOS[n][col] for n in names])
    if scene_graph and split == "train":
        weights = np.array([TOY_SGG_TRAIN_WEIGHTS.get(n, w) for n, w in zip(names, weights)])
    n_people = 1 if rng.random() < 0.55 else 2
    extra_w = np.array([e[col] for e in TOY_EXTRAS])
    has_extra = n_people == 1 and rng.random() < 0.5
    slots = [4, 66] if n_people == 2 or has_extra else [int(rng.integers(4, 60))]
    entities, rels, hois, actions = [], [], [], []
    for k in range(n_people):
        scen = names[rng.choice(len(names), p=weights / weights.sum())]
        ground = int(rng.integers(size - 40, size - 2))
        ents, scen_rels = _place_scenario(canvas, rng, scen, slots[k], ground)
        base = len(entities)
        entities += list(ents.items())
        index = {("P" if n == "person" else "O" if n == TOY_SCENARIOS[scen][2] else n): base + i
                 for i, n in enumerate(ents)}
        for s, r, o in scen_rels:
            rels.append((index[s], index[o], r))
        obj = index["O"]
        hois += [(index["P"], obj, v) for v in TOY_SCENARIOS[scen][4]]
        actions += [(index["P"], -1 if v in ("stand", "walk") else obj, v) for v in TOY_SCENARIOS[scen][5]]
    if has_extra:
        sub, pred, obj = TOY_EXTRAS[rng.choice(len(TOY_EXTRAS), p=extra_w / extra_w.sum())][2:]
        ground = int(rng.integers(size - 30, size - 2))
        x = slots[1] + int(rng.integers(0, 8))
        base_box = _draw(canvas, obj, x, ground - TOY_SIZES[obj][1])
        sw, sh = TOY_SIZES[sub]
        if pred == "on":
            sub_box = _draw(canvas, sub, x + 6, base_box[1] - sh + (12 if obj == "chair" else 0))
        elif pred == "under":
            sub_box = _draw(canvas, sub, x + 4, ground - sh)
            base_box = _draw(canvas, obj, x, ground - TOY_SIZES[obj][1])  # the object stays on top
        else:  # behind: drawn first, then the occluding object again
            sub_box = _draw(canvas, sub, x + 8, ground - sh - 3)
            base_box = _draw(canvas, obj, x, ground - TOY_SIZES[obj][1])
        b = len(entities)
        entities += [(obj, base_box), (sub, sub_box)]
        rels.append((b + 1, b, pred))
    return canvas, entities, rels, hois, actions


def write_toy_datasets(root, num_train=3000, num_test=500, size=128, seed=0, num_train_hoi=None):
    """Generate the toy scenes and write them as VG150 (RelTR JSON), HICO-DET and V-COCO (QPIC JSON) datasets.

    num_train VG training images, num_train_hoi (default: num_train) training images for each HOI dataset, num_test
    test images each. Three disjoint image sets (the datasets never share an image, as in the paper). Returns what
    was generated,
    {(dataset, split): {file: (boxes, labels, rels or hois)}} in the internal form, for round-trip tests."""
    import torchvision.io

    vocab = load_vocab()
    vg_index = {n: i + 1 for i, n in enumerate(vocab["vg150_objects"])}  # 1-based VG150 ids
    pred_index = {n: i + 1 for i, n in enumerate(vocab["vg150_predicates"])}
    coco_id = {c["name"]: c["id"] for c in vocab["coco80"]}
    hico_verb = {n: i + 1 for i, n in enumerate(vocab["hico_verbs"])}
    vcoco_verb = {v["name"]: i for i, v in enumerate(vocab["vcoco_verbs"])}
    rng = np.random.default_rng(seed)
    splits = [("train", num_train), ("test", num_test)]
    generated = {}
    coco80 = {c["name"]: i for i, c in enumerate(vocab["coco80"])}

    def save(canvas, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torchvision.io.write_png(torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), path, compression_level=1)

    # VG150-style split: relations
    vg = os.path.join(root, "vg")
    rel_json = {"rel_categories": ["__background__"] + vocab["vg150_predicates"]}
    categories = [{"supercategory": n, "id": i + 1, "name": n} for i, n in enumerate(vocab["vg150_objects"])]
    image_id, ann_id = 0, 0
    for split, n in splits + [("val", num_test // 5)]:
        coco = {"images": [], "annotations": [], "categories": categories}
        rel_json[split] = {}
        for _ in range(n):
            image_id += 1
            canvas, ents, rels, _, _ = toy_scene(rng, "test" if split != "train" else "train", size, scene_graph=True)
            path = os.path.join(vg, "images", f"{image_id}.png")
            save(canvas, path)
            coco["images"].append({"file_name": f"{image_id}.png", "height": size, "width": size, "id": image_id})
            for name, (x1, y1, x2, y2) in ents:
                ann_id += 1
                coco["annotations"].append({"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": vg_index[name],
                                            "image_id": image_id, "id": ann_id, "area": (x2 - x1) * (y2 - y1),
                                            "iscrowd": 0, "segmentation": None})
            rel_json[split][str(image_id)] = [[s, o, pred_index[r]] for s, o, r in rels]
            generated.setdefault(("vg", split), {})[path] = (
                np.array([b for _, b in ents], np.float32), np.array([vg_index[n] - 1 for n, _ in ents]),
                np.array([[s, o, pred_index[r] - 1] for s, o, r in rels]).reshape(-1, 3))
        with open(os.path.join(vg, f"{split}.json"), "w") as f:
            json.dump(coco, f)
    with open(os.path.join(vg, "rel.json"), "w") as f:
        json.dump(rel_json, f)

    # HICO-DET-style and V-COCO-style splits: HOIs
    for dataset, (dir_train, dir_test), prefix in (("hico", ("train2015", "test2015"), "HICO_{}2015_{:08d}.png"),
                                                   ("vcoco", ("train2014", "val2014"), "COCO_{}2014_{:012d}.png")):
        ds_root = os.path.join(root, dataset)
        os.makedirs(os.path.join(ds_root, "annotations"), exist_ok=True)
        verb_id = (lambda v: hico_verb[v] - 1) if dataset == "hico" else vcoco_verb.get  # 0-based, internal form
        for split, n in splits:
            n = num_train_hoi if (split == "train" and num_train_hoi is not None) else n
            images = []
            for k in range(n):
                canvas, ents, _, hois, actions = toy_scene(rng, split, size)
                tag = "train" if split == "train" else ("test" if dataset == "hico" else "val")
                file_name = prefix.format(tag, k + 1)
                path = os.path.join(ds_root, "images", dir_train if split == "train" else dir_test, file_name)
                save(canvas, path)
                anns = [{"bbox": box, "category_id": coco_id[TOY_COCO.get(name, name)]} for name, box in ents]
                if dataset == "hico":
                    hoi_ann = [{"subject_id": s, "object_id": o, "category_id": hico_verb[v]} for s, o, v in hois]
                else:
                    hoi_ann = [{"subject_id": s, "object_id": o, "category_id": vcoco_verb[v]} for s, o, v in actions]
                images.append({"file_name": file_name, "annotations": anns, "hoi_annotation": hoi_ann})
                pairs = hois if dataset == "hico" else actions
                generated.setdefault((dataset, split), {})[path] = (
                    np.array([b for _, b in ents], np.float32),
                    np.array([coco80[TOY_COCO.get(n, n)] for n, _ in ents]),
                    np.array([[s, o, verb_id(v)] for s, o, v in pairs]).reshape(-1, 3))
            ann = HOIA_FILES[dataset][split != "train"]
            with open(os.path.join(ds_root, "annotations", ann), "w") as f:
                json.dump(images, f)
        corre = _hico_correct_mat(vocab) if dataset == "hico" else np.array(vocab["corre_vcoco"], np.float32)
        np.save(os.path.join(ds_root, "annotations", f"corre_{dataset}.npy"), corre)
    with open(os.path.join(root, "DONE"), "w") as f:
        f.write(json.dumps(dict(num_train=num_train, num_test=num_test, size=size, seed=seed,
                                num_train_hoi=num_train_hoi)))
    return generated


def ensure_toy_datasets(root, **kwargs):
    """Generate the toy datasets once; reuse them if `root/DONE` says they were made with the same settings."""
    settings = dict(dict(num_train=3000, num_test=500, size=128, seed=0, num_train_hoi=None), **kwargs)
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == settings:
                return root
    print(f"generating the toy scenes into {os.path.abspath(root)} ({settings})", flush=True)
    write_toy_datasets(root, **settings)
    return root


# ---------------------------------------------------------------- Full-size synthetic annotations (benchmarks, tests)
# The loaders, the data pipeline and the paper preset must be measured at the real datasets' size, but the images
# cannot be downloaded here. write_fullsize_annotations writes annotation files in the real formats with the real
# split sizes and realistic per-image counts and vocabularies; every image entry is a symbolic link to one of a small
# pool of real-size JPEGs (480-1024 px), so the files exercise exactly what the real ones do (JSON parsing, header
# reads, JPEG decoding at full size) while only a few MB of pixels are written.

# Split sizes: VG150 as SGB / RelTR split it, HICO-DET's annotated images, V-COCO's trainval / test (datasets.md).
FULLSIZE_SPLITS = {"vg": {"train": 57723, "val": 5000, "test": 26446},
                   "hico": {"train": 37633, "test": 9546},
                   "vcoco": {"train": 5400, "test": 4946}}


def _jpeg_pool(folder, n, rng, quality=90):
    """n real-size JPEGs (sides 480..1024 px): a toy scene scaled up, plus noise so that the JPEG has a photo's
    entropy (about 100-300 kB). Returns [(path, width, height)]."""
    import torchvision.io

    os.makedirs(folder, exist_ok=True)
    pool = []
    for k in range(n):
        w, h = (int(v) for v in rng.integers(480, 1025, size=2))
        canvas = torch.from_numpy(toy_scene(rng, "train", 128)[0]).permute(2, 0, 1).float()[None]  # (1, 3, 128, 128)
        image = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)[0]      # (3, h, w)
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


def write_fullsize_annotations(root, scale=1.0, pool_size=32, seed=0, boxes_per_image=11.0, rels_per_image=6.0):
    """Write VG150 (RelTR's JSON), HICO-DET and V-COCO (QPIC's JSON) with the real split sizes times `scale`
    (FULLSIZE_SPLITS; scale < 1 for tests) under root/{vg,hico,vcoco}, images as symbolic links into root/pool.

    VG: about `boxes_per_image` boxes (Poisson, 2..60) and `rels_per_image` relations (Poisson, >= 1) per image,
    classes and predicates drawn from VG150's frequencies (VG-SGG-dicts' object counts, the GCL training predicate
    counts), COCO xywh boxes in original pixels; width / height = the linked JPEG's real size. HICO-DET: 1-2 persons,
    1-3 objects, 2-4 HOIs among the 600 (verb, object) pairs (train has img_id and hoi_category_id, test not, as the
    released files). V-COCO: 1-2 persons, 1-3 objects, 1-3 actions per person, object_id -1 for agent-only verbs or
    when no annotated object fits the verb (corre_vcoco). Reuses root if root/FULLSIZE.json has the same settings.
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
    vocab = load_vocab()
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.path.join(here, "..", "shared", "data", "vg150")  # frequencies, if the reference data is beside us
    pool = _jpeg_pool(os.path.join(root, "pool"), pool_size, rng)
    pool_wh = np.array([(w, h) for _, w, h in pool], np.float64)  # (P, 2)
    counts = {}
    sizes = {ds: {s: max(1, round(n * scale)) for s, n in splits.items()} for ds, splits in FULLSIZE_SPLITS.items()}

    # ---- VG150: train.json / val.json / test.json (COCO detection JSON) + rel.json
    obj_p, pred_p = np.ones(150), np.ones(50)  # uniform unless the real frequencies are available
    try:
        with open(os.path.join(shared, "VG-SGG-dicts-with-attri.json")) as f:
            obj_count = json.load(f)["object_count"]
        obj_p = np.array([obj_count.get(n, 1) for n in vocab["vg150_objects"]], np.float64)
        with open(os.path.join(shared, "predicate_stats.json")) as f:
            pred_p = np.array([p["train_count_gcl"] for p in json.load(f)["predicates"]], np.float64)
    except (OSError, KeyError, ValueError):
        pass
    obj_p, pred_p = obj_p / obj_p.sum(), pred_p / pred_p.sum()
    vg = os.path.join(root, "vg")
    categories = [{"supercategory": n, "id": i + 1, "name": n} for i, n in enumerate(vocab["vg150_objects"])]
    rel_json = {"rel_categories": ["__background__"] + vocab["vg150_predicates"]}
    next_image_id, next_ann_id = 1, 1
    for split in ("train", "val", "test"):
        n = sizes["vg"][split]
        ids = np.arange(next_image_id, next_image_id + n)
        next_image_id += n
        which = rng.integers(0, pool_size, n)                                   # (n,) pool image of each entry
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
        annotations = [{"bbox": b, "category_id": c, "image_id": i, "id": next_ann_id + k,
                        "area": round(b[2] * b[3], 2), "iscrowd": 0, "segmentation": None}
                       for k, (b, c, i) in enumerate(zip(xywh.tolist(), cats.tolist(), box_ids))]
        next_ann_id += len(annotations)
        triples = np.stack([s, o, preds], 1).tolist()
        ends = np.cumsum(nr).tolist()
        rel_json[split] = {str(i): triples[e - k:e] for i, k, e in zip(ids.tolist(), nr.tolist(), ends)}
        _write_json(os.path.join(vg, f"{split}.json"), {"images": images, "annotations": annotations,
                                                        "categories": categories})
        del images, annotations, triples
        _link_images(pool, which, os.path.join(vg, "images"), [f"{i}.jpg" for i in ids.tolist()])
        counts[("vg", split)] = n
    _write_json(os.path.join(vg, "rel.json"), rel_json)
    del rel_json

    # ---- HICO-DET and V-COCO: QPIC's per-image list
    coco91 = [c["id"] for c in vocab["coco80"]]
    hico_verbs_of_object = {}
    for h, (v, o) in enumerate(vocab["hico_hois"]):  # (verb 0-based, COCO-80 object) -> HOI id h + 1
        hico_verbs_of_object.setdefault(o, []).append((v, h))
    hico_objects = sorted(hico_verbs_of_object)
    corre_vcoco = np.array(vocab["corre_vcoco"], np.float32)  # (29, 80) [verb, COCO-80 object]
    agent_only = [v["role"] is None for v in vocab["vcoco_verbs"]]

    def box(w, h):
        bw, bh = int(rng.integers(w // 10, w // 2)), int(rng.integers(h // 8, int(h * 0.9)))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        return [x1, y1, x1 + bw, y1 + bh]

    for dataset in ("hico", "vcoco"):
        ds_root = os.path.join(root, dataset)
        for split in ("train", "test"):
            n = sizes[dataset][split]
            which = rng.integers(0, pool_size, n)
            if dataset == "hico":
                tag, folder = ("train2015", "train2015") if split == "train" else ("test2015", "test2015")
                names = [f"HICO_{tag}_{k + 1:08d}.jpg" for k in range(n)]
                ann_file = "trainval_hico.json" if split == "train" else "test_hico.json"
            else:
                tag, folder = ("train2014", "train2014") if split == "train" else ("val2014", "val2014")
                names = [f"COCO_{tag}_{k + 1:012d}.jpg" for k in range(n)]
                ann_file = "trainval_vcoco.json" if split == "train" else "test_vcoco.json"
            entries = []
            for k, (name, p) in enumerate(zip(names, which.tolist())):
                w, h = pool[p][1], pool[p][2]
                n_person, n_obj = 1 + int(rng.random() < 0.3), 1 + int(rng.integers(0, 3))
                if dataset == "hico":
                    obj_cls = [int(hico_objects[j]) for j in rng.integers(0, len(hico_objects), n_obj)]
                else:
                    obj_cls = [int(c) for c in rng.integers(1, 80, n_obj)]
                anns = [{"bbox": box(w, h), "category_id": 1} for _ in range(n_person)] + \
                       [{"bbox": box(w, h), "category_id": coco91[c]} for c in obj_cls]
                hois = []
                if dataset == "hico":
                    for _ in range(int(rng.integers(2, 5))):
                        j = int(rng.integers(0, n_obj))
                        verbs = hico_verbs_of_object[obj_cls[j]]
                        v, hoi = verbs[int(rng.integers(0, len(verbs)))]
                        hois.append({"subject_id": int(rng.integers(0, n_person)), "object_id": n_person + j,
                                     "category_id": v + 1, "hoi_category_id": hoi + 1})
                        if split == "test":
                            del hois[-1]["hoi_category_id"]
                else:
                    for person in range(n_person):
                        for v in rng.choice(29, size=int(rng.integers(1, 4)), replace=False).tolist():
                            fits = [n_person + j for j, c in enumerate(obj_cls) if corre_vcoco[v, c] > 0]
                            obj = -1 if agent_only[v] or not fits else fits[int(rng.integers(0, len(fits)))]
                            hois.append({"subject_id": person, "object_id": obj, "category_id": v})
                entry = {"file_name": name, "annotations": anns, "hoi_annotation": hois}
                if dataset == "hico" and split == "train":
                    entry["img_id"] = k + 1
                entries.append(entry)
            _write_json(os.path.join(ds_root, "annotations", ann_file), entries)
            _link_images(pool, which, os.path.join(ds_root, "images", folder), names)
            counts[(dataset, split)] = n
        corre = _hico_correct_mat(vocab) if dataset == "hico" else corre_vcoco
        np.save(os.path.join(ds_root, "annotations", f"corre_{dataset}.npy"), corre)
    _write_json(done, {"settings": settings, "counts": {"/".join(k): n for k, n in counts.items()}})
    return counts


# ---------------------------------------------------------------- Transforms and batching

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_transforms(train, image_size=800, max_size=1333, multi_scale=True):
    """The paper's augmentation (Sec. IV-D, as QPIC): flip with p = 0.5, brightness and contrast; for real data a
    multi-scale resize of the shorter side (480..image_size, step 32, longer side <= max_size, as DETR); test:
    shorter side = image_size. Boxes travel as tv_tensors.BoundingBoxes so every geometric step moves them.

    Training order, chosen for speed on the CPU workers: flip and resize the uint8 image first (torchvision's fast
    uint8 bilinear kernel; the colour steps then work on the final number of pixels), then brightness and contrast,
    which are per pixel (contrast uses the image's mean grey, which resizing leaves nearly unchanged), so the order
    changes no semantics."""
    steps = []
    if train:
        sizes = list(range(min(480, image_size), image_size + 1, 32)) if multi_scale else [image_size]
        steps += [v2.RandomHorizontalFlip(0.5), v2.RandomShortestSize(min_size=sizes, max_size=max_size),
                  v2.ColorJitter(brightness=0.4, contrast=0.4)]
    else:
        steps += [v2.Resize(image_size, max_size=max_size if max_size > image_size else None)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class BadImageWarning(UserWarning):
    """An image that cannot be decoded was dropped from its batch (bad_images="skip")."""


def _decoder_message(e):
    """torchvision's decoder errors start with 'function, source file:line, ': keep the message."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(e))


class DetectionDataset(torch.utils.data.Dataset):
    """Records -> (image (3, H, W) normalised, target). target = record's fields as tensors + size, orig_size,
    image_id and, when a teacher is given, "clip": the CLIP image embedding of Eq. 5.

    teacher: None, a dict {file: (text_dim,) tensor} (made by build_clip_image_cache), or a (C, text_dim) table
    of class text embeddings: then the target is the normalised mean embedding of the image's object classes, the
    stand-in teacher for the toy scenes (whose "CLIP" would describe exactly those objects).

    bad_images: what an image that cannot be decoded (truncated JPEG, text named .jpg, deleted file) does:
    "stop" = DataError naming file and record (the default); "skip" = the item becomes None with a BadImageWarning
    naming the file and the number dropped so far by this process (each DataLoader worker counts its own; the
    total is in self.skipped of each), and `collate` leaves it out, so that batch is one image smaller (the
    losses are normalised per batch as usual; nothing replaces the image, so the sampler's order and a resume stay
    exact). None takes meta["bad_images"] (set by build_data from train.py --bad_images), else "stop"."""

    def __init__(self, records, meta, transforms, teacher=None, bad_images=None):
        self.records, self.meta, self.transforms, self.teacher = records, meta, transforms, teacher
        self.task = meta["task"]
        self.key = "rels" if self.task == "sgg" else "hois"
        self.bad_images = bad_images or meta.get("bad_images", "stop")
        if self.bad_images not in ("stop", "skip"):
            raise ValueError(f"bad_images must be 'stop' or 'skip', got {self.bad_images!r}")
        self.skipped = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            image = torchvision.io.decode_image(r["file"], mode=torchvision.io.ImageReadMode.RGB)  # (3, H, W) uint8
        except (RuntimeError, OSError) as e:
            message = f"{r['file']}: cannot read image of record {r['image_id']} ({_decoder_message(e)})"
            if self.bad_images == "skip":
                self.skipped += 1
                warnings.warn(f"{message}: dropped from its batch (bad_images='skip'; {self.skipped} dropped by "
                              f"this process so far)", BadImageWarning)
                return None
            raise DataError(f"{message}; --bad_images skip drops such images, --check_images_only lists them") \
                from None
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(r["boxes"]).reshape(-1, 4), format="XYXY", canvas_size=(h, w))
        image, boxes = self.transforms(tv_tensors.Image(image), boxes)
        # a geometric transform may shrink boxes to nothing: drop them and keep the relation indices right
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)       # (N,)
        pairs = torch.as_tensor(r[self.key]).reshape(-1, 3)                                   # (P, 3)
        if not keep.all():
            new_index = keep.cumsum(0) - 1                                                   # (N,)
            obj = pairs[:, 1].clamp(min=0)
            pairs = pairs[keep[pairs[:, 0]] & ((pairs[:, 1] < 0) | keep[obj])]
            obj = pairs[:, 1].clamp(min=0)
            pairs = torch.stack([new_index[pairs[:, 0]], torch.where(pairs[:, 1] < 0, -1, new_index[obj]),
                                 pairs[:, 2]], 1)
        labels = torch.as_tensor(r["labels"])[keep]
        target = {"boxes": boxes[keep].as_subclass(torch.Tensor).float(), "labels": labels, self.key: pairs,
                  "size": torch.tensor(image.shape[-2:]), "orig_size": torch.tensor([h, w]), "image_id": r["image_id"]}
        if isinstance(self.teacher, dict):
            target["clip"] = self.teacher.get(clip_image_key(r["file"]))
        elif self.teacher is not None and len(labels):
            target["clip"] = F.normalize(self.teacher[labels].mean(0), dim=0)
        return image.as_subclass(torch.Tensor), target


def collate(batch):
    """Pad images to the batch's largest height and width (bottom / right) with a padding mask (DETR).
    Items that are None (unreadable images under bad_images="skip") are left out: the batch is that much smaller."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise DataError(f"all {len(batch)} images of a batch are unreadable (see the BadImageWarning lines above); "
                        f"train.py --check_images_only lists every bad image")
    images, targets = zip(*kept)
    H, W = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    shape = (len(images), 3, H, W)
    if torch.utils.data.get_worker_info() is not None:
        # in a DataLoader worker the batch is written straight into shared memory, as torch's default_collate does:
        # sending it to the main process would otherwise copy it there (25-50 MB per batch at the paper's sizes)
        storage = images[0]._typed_storage()._new_shared(math.prod(shape), device=images[0].device)
        out = images[0].new(storage).resize_(shape)
    else:
        out = images[0].new_empty(shape)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for i, im in enumerate(images):  # every element written once: the image, then zeros below and to the right
        h, w = im.shape[1:]
        out[i, :, :h, :w] = im
        out[i, :, h:] = 0
        out[i, :, :h, w:] = 0
        mask[i, :h, :w] = False
    return out, mask, list(targets)


def verify_images(records, progress=None):
    """Decode every record's image once, as training would (torchvision.io.decode_image, RGB), and compare its size
    with the record's width / height. Returns [(file, image_id, reason)] for the bad ones (missing, undecodable,
    truncated, wrong size), in record order. progress: optional callable(done, total), called every 1,000 images."""
    bad = []
    for k, r in enumerate(records):
        try:
            image = torchvision.io.decode_image(r["file"], mode=torchvision.io.ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as e:
            bad.append((r["file"], r["image_id"], f"cannot be decoded: {_decoder_message(e)}"))
            continue
        h, w = image.shape[-2:]
        if r.get("width", 10 ** 9) < 10 ** 9 and (w, h) != (r["width"], r["height"]):
            bad.append((r["file"], r["image_id"], f"decoded size {w} x {h} but the record says "
                                                  f"{r['width']} x {r['height']}"))
        if progress is not None and (k + 1) % 1000 == 0:
            progress(k + 1, len(records))
    return bad


def load_dataset(kind, root, split, check_images=True, bad_images="stop", num_val_im=5000):
    """kind: vg | vg_h5 | hico | vcoco -> (records, meta). num_val_im: SGB's validation images (vg_h5 only; the
    RelTR JSON has its own val.json)."""
    loaders = {"vg": load_vg_json, "vg_h5": load_vg_h5, "hico": load_hico, "vcoco": load_vcoco}
    if kind not in loaders:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(loaders)}")
    if bad_images not in ("stop", "skip"):
        raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
    extra = dict(num_val_im=num_val_im) if kind == "vg_h5" else {}
    return loaders[kind](root, split, check_images=check_images, bad_images=bad_images, **extra)


def config_from_meta(cfg: Config, sgg_meta=None, hoi_meta=None) -> Config:
    """Set the class counts and names of `cfg` from the datasets' vocabularies."""
    updates = {}
    if sgg_meta:
        updates.update(num_entity_classes=len(sgg_meta["entity_names"]), entity_names=sgg_meta["entity_names"],
                       num_predicates=len(sgg_meta["predicate_names"]), predicate_names=sgg_meta["predicate_names"])
    if hoi_meta:
        updates.update(num_hoi_objects=len(hoi_meta["object_names"]), hoi_object_names=hoi_meta["object_names"],
                       num_verbs=len(hoi_meta["verb_names"]), verb_names=hoi_meta["verb_names"])
    return dataclasses.replace(cfg, **updates)


# Where each dataset comes from, as train.py's and eval.py's command lines give it (and checkpoints record it).
# bad_images: "stop" | "skip" (see DetectionDataset); num_val_im: SGB's validation split of the .h5; check_images_only:
# decode every image of the train and test splits once, list the bad ones and exit (verify_images).
DATA_ARGS = dict(toy_root="data/toy", toy_train=3000, toy_train_hoi=1000, toy_test=500, vg="", vg_format="json",
                 hoi="", hoi_dataset="hico", bad_images="stop", num_val_im=5000, check_images_only=False, train_subset=0)


def _annotation_files(kind, root, split):
    """The large annotation files a loader parses through the cache, with their cache tag and parser. VG's rel.json
    holds the relations of all three splits: every VG split lists it (one parse serves them all, _read_rel_json)."""
    if kind == "vg":
        return [(os.path.join(root, f"{split}.json"), "coco", _parse_coco_json),
                (os.path.join(root, "rel.json"), "rel", _parse_rel_json)]
    if kind in HOIA_FILES:
        return [(os.path.join(root, "annotations", HOIA_FILES[kind][split != "train"]), "hoia", _parse_hoia_json)]
    return []  # vg_h5: read with h5py, not cached


def _parse_into_cache(path, tag, parse):
    try:
        _cached_parse(path, tag, parse)
    except Exception:  # noqa: BLE001  the loader meets the same error in the parent and names it
        pass


def start_cache_warming(splits):
    """Parse the large annotation files of `splits` [(kind, root, split)] that the cache does not hold yet into it
    (_cached_parse), each in a forked child process of its own, all at the same time. Returns {file path: child}
    (join a file's child before loading a split that reads it); empty when there is nothing to parse (files small
    or cached already) or no fork (the loaders then parse as usual). Why children: a first run's parse is
    single-threaded Python, so the parses of several files share the cores, and the loading process only ever
    reads the cache: its memory is that of a load from a filled cache (the README's "Real data at full size" has
    the figures). The children's errors are ignored: the loader parses the file again and reports them, naming it."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return {}
    fork, children = multiprocessing.get_context("fork"), {}
    for path, tag, parse in {f[0]: f for job in splits for f in _annotation_files(*job)}.values():
        if (os.path.isfile(path) and os.path.getsize(path) >= CACHE_MIN_BYTES
                and not _read_cache(path, _file_stamp(path, tag), members=False)):
            children[path] = fork.Process(target=_parse_into_cache, args=(path, tag, parse), daemon=True)
            children[path].start()
    return children


def build_data(cfg: Config, data_args: dict, is_master=True, barrier=lambda: None):
    """{"sgg": {"train": (records, meta), "test": ...}, "hoi": {...}} for the tasks of cfg.

    data_args: the keys of DATA_ARGS (missing ones take those defaults). Without --vg and --hoi the toy scenes are
    generated once into toy_root (by the master process; the others wait at `barrier`) and read back through the
    real loaders. meta["bad_images"] carries the bad_images mode to DetectionDataset. With check_images_only the
    splits are read without the header checks, every image is decoded once (verify_images), the bad ones are
    listed, and SystemExit ends the program (exit code 0 when all are good, 1 otherwise)."""
    a = {**DATA_ARGS, **{k: v for k, v in data_args.items() if k in DATA_ARGS}}
    if not a["vg"] and not a["hoi"]:
        if is_master:
            ensure_toy_datasets(a["toy_root"], num_train=a["toy_train"], num_test=a["toy_test"], size=cfg.image_size,
                                num_train_hoi=a["toy_train_hoi"])
        barrier()
        vg_root, vg_kind = os.path.join(a["toy_root"], "vg"), "vg"
        hoi_root, hoi_kind = os.path.join(a["toy_root"], a["hoi_dataset"]), a["hoi_dataset"]  # toy HICO or V-COCO
    else:
        vg_root, vg_kind = a["vg"], "vg" if a["vg_format"] == "json" else "vg_h5"
        hoi_root, hoi_kind = a["hoi"], a["hoi_dataset"]
    check_only = bool(a["check_images_only"])
    load = lambda kind, root, split: load_dataset(kind, root, split, check_images=not check_only,  # noqa: E731
                                                  bad_images=a["bad_images"], num_val_im=a["num_val_im"])

    splits = ([("sgg", vg_kind, vg_root, s) for s in ("train", "test")] if cfg.sgg and vg_root else []) + \
             ([("hoi", hoi_kind, hoi_root, s) for s in ("train", "test")] if cfg.hoi and hoi_root else [])

    def annotation_bytes(job):
        return sum(os.path.getsize(f[0]) for f in _annotation_files(*job[1:]) if os.path.isfile(f[0]))

    def load_all(warm):
        # the annotation files the cache lacks are parsed into it by forked children, one per file, at the same
        # time (start_cache_warming); this process reads each split from the cache as soon as that split's files
        # are in. Largest first: a split's load has a transient peak (the cached arrays beside the records built
        # from them) that is smallest when no other split is held yet (VG150 train last: +80 MB of peak)
        children = start_cache_warming([job[1:] for job in splits]) if warm else {}
        loaded = {}
        for job in sorted(splits, key=annotation_bytes, reverse=True):
            for path, _, _ in _annotation_files(*job[1:]):
                if path in children:
                    children.pop(path).join()
            loaded[job] = load(*job[1:])
        data = {}
        for task, kind, root, split in splits:
            data.setdefault(task, {})[split] = loaded[task, kind, root, split]
        if "sgg" in data and not a["vg"]:  # the toy scenes use VG150's names, not its long tail:
            data["sgg"]["test"][1]["toy"] = True  # eval derives the groups
        return data

    # the master parses first and fills the annotation cache (_cached_parse); the other ranks then read the cache
    # instead of each parsing every file at the same time
    data = load_all(warm=not check_only) if is_master or check_only else None
    if not check_only:
        barrier()
    if data is None:
        data = load_all(warm=False)
    if not data:
        raise SystemExit("no training data: give --vg and/or --hoi, or neither for the toy scenes")
    for splits in data.values():
        for _, meta in splits.values():
            meta["bad_images"] = a["bad_images"]
        if a["train_subset"]:  # the first N training images only (rehearsals; the test splits stay whole)
            records, meta = splits["train"]
            splits["train"] = (records[:a["train_subset"]], meta)
    if check_only:
        total_bad = 0
        for task, splits in data.items():
            for split, (records, _) in splits.items():
                bad = verify_images(records)
                total_bad += len(bad)
                if is_master:
                    print(f"[check images] {task} {split}: {len(records)} images decoded, {len(bad)} bad")
                    for file, image_id, reason in bad:
                        print(f"  {file} (record {image_id}): {reason}")
        raise SystemExit(1 if total_bad else 0)
    return data


# ---------------------------------------------------------------- Data benchmark at full size
# python -c "import sg2hoi; sg2hoi.benchmark_data('/tmp/sg2hoi_fullsize')": the figures of the README's "Real data at
# full size" section. Loader figures come from fresh processes (peak memory is a per-process high-water mark).

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


def benchmark_data(root, scale=1.0, images=100, batch_size=4, workers=(1, 2)):
    """Write the full-size synthetic annotations into root (reused when already there), then measure
    (1) loading + checking VG150 train + test and HICO-DET train + test (build_data, as train.py and eval.py do) in a
    fresh process with an empty annotation cache and again with the cache filled: seconds and peak resident-memory
    growth of the loading process (the children that parse into the cache, start_cache_warming, are not counted);
    (2) images per second of one loader worker (one thread) with the paper's training transforms
    (make_transforms(True, 800, 1333): decode, flip, multi-scale resize, colour jitter, normalisation) on the VG val
    split's real-size JPEGs, in process and through a DataLoader with `workers` workers (batch_size, collate
    included). Prints and returns the figures. On a shared machine the numbers vary from run to run."""
    import subprocess
    import sys
    import tempfile
    import time

    figures = {"counts": {"/".join(k): n for k, n in write_fullsize_annotations(root, scale=scale).items()}}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SG2HOI_CACHE=cache, OMP_NUM_THREADS="1")
        code = _LOAD_PROBE.format(here=os.path.dirname(os.path.abspath(__file__)), root=root)
        for label in ("cold cache", "warm cache"):
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            probe = [line for line in run.stdout.splitlines() if line.startswith("PROBE")]
            if run.returncode or not probe:
                raise RuntimeError(f"loader probe failed: {run.stderr[-2000:]}")
            figures[f"load ({label})"] = json.loads(probe[0][5:])
            print(f"[benchmark data] VG150 train+test and HICO-DET train+test, {label}: {figures[f'load ({label})']}")
    records, meta = load_dataset("vg", os.path.join(root, "vg"), "val", check_images=False)
    dataset = DetectionDataset(records[:images], meta, make_transforms(True, 800, 1333))
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
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=n, collate_fn=collate,
                                                 prefetch_factor=4)
            it = iter(loader)
            next(it)  # workers started and warm
            t, count = time.perf_counter(), 0
            for _, _, targets in it:
                count += len(targets)
            figures[f"images/s, DataLoader, {n} worker(s)"] = round(count / (time.perf_counter() - t), 1)
    finally:
        torch.set_num_threads(threads)
    print(f"[benchmark data] paper training transforms on {len(dataset)} real-size JPEGs: "
          f"{ {k: v for k, v in figures.items() if k.startswith('images/s')} }")
    return figures
