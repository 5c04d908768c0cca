"""SG2HOI+: one transformer that generates scene graphs and detects human-object interactions from them.

Paper: "SG2HOI+: Human-Object Interaction Detection with Scene Graphs" (arXiv 2311.01755), Section III. Read this
file beside it: the sections follow the paper's order, every equation is marked with its number (Eq. 1 ... Eq. 10)
and tensor shapes are written where they change: B = batch, H x W = feature map, d = width, Q = queries, L = layers.

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

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError  # torchvision's own dependency
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
    seg_norm: str = "batch"  # FCN_seg's norm: batch (the paper) | group (toy: the same for any split of a batch)
    text_dim: int = 512  # CLIP ViT-B/32 embedding width (Sec. IV-D)
    # vocabularies, set from the datasets. The paper's N_o is both these entity classes and BBSeg's N_seg (see III-A)
    num_entity_classes: int = 150  # N_o for the relation decoder (VG150 objects)
    num_predicates: int = 50  # N_r
    num_hoi_objects: int = 80  # HOI object classes (COCO-80; 81 for V-COCO with "no object")
    num_verbs: int = 117  # HICO-DET verbs (29 for V-COCO)
    entity_names: list = field(default_factory=list)  # names of the relation decoder's classes
    predicate_names: list = field(default_factory=list)
    hoi_object_names: list = field(default_factory=list)
    verb_names: list = field(default_factory=list)
    text_embeddings: str = ""  # .pt file {name: (text_dim,) tensor} (tools/prepare_clip.py); "" = seeded stand-ins
    word_vectors: str = ""  # GloVe-format .txt for semantic_embedding="glove" (HSSG); its width comes from the file
    # Ablations (Tables V-VIII). The paper's four variants are the PRESETS below, not these field defaults.
    tasks: str = "both"  # both | sgg (Table V "SGG") | hoi (HOI data only: relation part trained by the HOI loss)
    hoi_on_frozen_sgg: bool = False  # True = Table V "HOI": phase 1 SGG as usual, phase 2 HOI batches only, SGG frozen
    use_bbseg: bool = True  # False = "-HSS" (Table VI)
    semantic_embedding: str = "clip"  # clip | discrete ("HSSD") | glove ("HSSG") (Table VI)
    use_vl_distill: bool = True  # False = "-VLpool" (Table VII)
    align_feature: str = "cls"  # cls = SG2HOI+cls | pool = SG2HOI+pool (Table VII, Eq. 5)
    align_loss: str = "l1"  # l1 | l2 ("VLl2", Table VII): mean absolute | squared error (the "l2 norm" read as MSE)
    classifier_init: str = "random"  # random | text (CLIP text embeddings as classifier weights, Sec. III-B)
    use_feature_transform: bool = True  # False = "-FETR" (Table VIII)
    use_query_transform: bool = True  # False = "-QUTR" (Table VIII)
    use_r2i: bool = True  # False = "-R2ITR" (Table VIII)
    hoi_queries_from_rel: bool = False  # True = "RELQ": relation queries are the HOI queries (Table VIII)
    # matching and losses: Eq. 9's alpha_1..3 (cost_*) also weight the same terms of L_rel / L_hoi (SetCriterion)
    cost_box: float = 1.0  # alpha_1 in Eq. 9 (box cost = box_l1 * L1 - box_giou * GIoU); also the box loss weight
    box_l1: float = 2.5  # inside the box cost and loss: L1 weight (QPIC / CDN / GEN-VLKT; not given in the paper)
    box_giou: float = 1.0  # inside the box cost and loss: GIoU weight (QPIC / CDN / GEN-VLKT)
    cost_class: float = 2.0  # alpha_2 (subject/object labels); also their loss weight
    cost_rel: float = 4.0  # alpha_3 (predicate / verbs); also their loss weight
    loss_seg: float = 2.0  # lambda_1 in Eq. 10
    loss_align: float = 4.0  # lambda_2 in Eq. 10
    eos_coef: float = 0.1  # weight of the "no object" / "no relation" class (DETR)
    aux_loss: bool = True  # deep supervision of every decoder layer (DETR, QPIC, RelTR; not in the paper)
    # optimisation (used by train.py; saved with checkpoints)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_text_classifier: float = 1e-5
    lr_sgg_phase2: float = 1e-5  # SGG part's learning rate once the HOI part joins (Sec. IV-D)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: float = 2 / 3  # lr x 0.1 after this fraction of each phase (not given in the paper; DETR / QPIC practice)
    batch_size: int = 8  # the GLOBAL batch ("8 on 8 GPUs"): images per step, all processes and accumulations
    sgg_epochs: int = 20  # phase 1: SGG alone
    joint_epochs: int = 20  # phase 2: SGG and HOI alternate
    image_size: int = 800  # shorter side at test time (multi-scale 480..800 at training)
    max_size: int = 1333

    def __post_init__(self):
        """Every value is checked where it is set: a bad one fails naming the field, not steps later in the model."""
        for f in dataclasses.fields(self):
            _check_field(f.name, f.type, getattr(self, f.name))
        if self.d_model % self.nheads or self.d_model % 2:
            raise ValueError(f"Config.d_model={self.d_model} must be even and divisible by nheads={self.nheads}")
        if self.hoi_on_frozen_sgg and self.tasks != "both":
            raise ValueError("Config.hoi_on_frozen_sgg (Table V 'HOI') needs tasks='both': phase 1 trains the SGG part")
        if self.hoi_queries_from_rel and self.num_hoi_queries != self.num_rel_queries:
            raise ValueError("Config.hoi_queries_from_rel (RELQ) needs num_hoi_queries == num_rel_queries")
        for kind, count in (("entity", self.num_entity_classes), ("predicate", self.num_predicates),
                            ("hoi_object", self.num_hoi_objects), ("verb", self.num_verbs)):
            names = getattr(self, f"{kind}_names")
            if names and len(names) != count:
                raise ValueError(f"Config.{kind}_names has {len(names)} names but the class count is {count}")

    @property
    def sgg(self):
        return self.tasks in ("both", "sgg")

    @property
    def hoi(self):
        return self.tasks in ("both", "hoi")


CHOICES = dict(backbone=("resnet50", "resnet101", "tiny"), seg_norm=("batch", "group"), tasks=("both", "sgg", "hoi"),
               semantic_embedding=("clip", "discrete", "glove"), align_feature=("cls", "pool"), align_loss=("l1", "l2"),
               classifier_init=("random", "text"))


def _check_field(name, kind, v):
    """One Config value: ints >= 1 (epochs >= 0), floats >= 0 (dropout < 1, lr_drop in (0, 1]), booleans, CHOICES."""
    low = 0 if name in ("sgg_epochs", "joint_epochs") else 1  # epochs may be 0; every other integer counts something
    if kind == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise ValueError(f"Config.{name}: must be an integer >= {low}, got {v!r}")
    if kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
        raise ValueError(f"Config.{name}: must be a finite number >= 0, got {v!r}")
    if name == "dropout" and not v < 1:
        raise ValueError(f"Config.dropout: must be in [0, 1), got {v!r}")
    if name == "lr_drop" and not 0 < v <= 1:
        raise ValueError(f"Config.lr_drop: the fraction of a phase before lr x 0.1, in (0, 1] (1 = never), got {v!r}")
    if kind == "bool" and not isinstance(v, bool):
        raise ValueError(f"Config.{name}: must be true or false, got {v!r}")
    if name in CHOICES and v not in CHOICES[name]:
        raise ValueError(f"Config.{name}: {v!r} is not one of {CHOICES[name]}")


# The paper's four variants (Sec. IV-E) at its settings (Sec. IV-D): +rand (random classifiers), +clip (classifiers
# initialised with CLIP text embeddings), +cls and +pool (also align [CLS] / the pooled f_en with CLIP, Eq. 5). Read as
# steps that add one piece each, so +rand and +clip align nothing. All four keep the CLIP semantic map of Eq. 3.
# Without --text_embeddings (tools/prepare_clip.py) the classifiers start from seeded stand-ins, not CLIP.
VARIANTS = {
    "rand": dict(classifier_init="random", use_vl_distill=False),  # SG2HOI+rand
    "clip": dict(classifier_init="text", use_vl_distill=False),  # SG2HOI+clip
    "cls": dict(classifier_init="text", align_feature="cls"),  # SG2HOI+cls
    "pool": dict(classifier_init="text", align_feature="pool"),  # SG2HOI+pool
}

PRESETS = {
    **VARIANTS,
    "paper": VARIANTS["cls"],  # Sec. IV-D: "In default, we choose f_en[CLS] to align with the ... CLIP feature"
    "full": VARIANTS["pool"],  # the FULL row of Tables V-VIII, "our full model (SG2HOI+pool)"
    # A model a 2-core CPU trains in minutes on the toy scenes (128 px images)
    "toy": dict(backbone="tiny", d_model=64, nheads=4, dim_feedforward=256, dropout=0.0, enc_layers=2,
                rel_dec_layers=2, r2i_layers=1, feat_trans_layers=1, query_trans_layers=1, hoi_dec_layers=2,
                num_rel_queries=16, num_hoi_queries=16, seg_hidden=32, seg_norm="group", text_dim=64, batch_size=16,
                lr=4e-4, lr_backbone=4e-4, lr_text_classifier=4e-4, lr_sgg_phase2=1e-4, clip_max_norm=0.1,
                sgg_epochs=8, joint_epochs=12, lr_drop=0.9, image_size=128, max_size=128),
}


RETIRED = {"ema_decay": 0.0, "query_transform_memory": "decoded", "relq_queries": "decoded", "unmatched_loss": True}


def config_from_saved(saved: dict) -> Config:
    """A checkpoint's config -> Config. A field of an earlier version (RETIRED) is dropped when it holds the one value
    this code computes; any other value is refused: that model was trained by code that is gone (git history has it)."""
    for name, value in RETIRED.items():
        if name in saved and saved[name] != value:
            raise ValueError(f"Config.{name} = {saved[name]!r} is retired: this code always runs {name} = {value!r}")
    return Config(**{k: v for k, v in saved.items() if k not in RETIRED})


def make_config(preset="paper", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
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


# ----------------------------------------------------------------------------------------- Backbone + position encoding
class TinyBackbone(nn.Module):
    """A 4-layer CNN of stride 8 for the toy preset: 128 px images give a 16 x 16 feature map. GroupNorm normalises
    each image on its own, so 1 or N processes (or accumulation steps) train the same model (BatchNorm would not)."""

    def __init__(self, channels=128):
        super().__init__()
        chans, layers = [3, 32, 64, channels], []
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


def sine_position_encoding(mask, d_model, temperature=10000.0):
    """DETR's 2-D sine encoding of the normalised coordinates of the un-padded region.
    mask: (B, H, W) True on padding -> (B, H, W, d_model): d/2 channels for y, d/2 for x."""
    not_mask = (~mask).float()
    y, x = not_mask.cumsum(1), not_mask.cumsum(2)  # (B, H, W): row and column numbers, 1-based, of the image
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
# DETR's layers, written out because nn.Transformer cannot add positions to queries and keys (never values) in
# every layer or return every decoder layer's output. Parameter names follow DETR, so its COCO checkpoint loads.
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


class BoxMLP(nn.Module):
    """DETR's 3-layer MLP (Sec. IV-D: "3 non-linear project layers") + sigmoid -> (cx, cy, w, h) in [0, 1] of the
    un-padded image. Always float32: bf16 rounds coordinates in [0.5, 1) by up to 2^-9, 2.6 px of 1333, too coarse."""

    def __init__(self, d, num_layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, 4 if i == num_layers - 1 else d) for i in range(num_layers))

    def forward(self, x):  # (..., d) -> (..., 4) float32
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for layer in self.layers[:-1]:
                x = F.relu(layer(x))
            return self.layers[-1](x).sigmoid()


PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # sigmoid(b) = 0.01: multi-label heads start "mostly negative" (RetinaNet)


class TextClassifier(nn.Module):
    """A classifier whose weights start as the classes' text embeddings (Sec. III-B, as GEN-VLKT):
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


# ---------------------------------------------------------------------------- III-A  Holistic semantic-spatial features
class BBSeg(nn.Module):
    """FCN_seg of Eq. 1: five 3x3 conv + BN + ReLU layers, a 1x1 classifier over N_seg + 1 classes (0: background)."""

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
    """Box-filled multi-label targets y of Eq. 2 at the feature resolution -> (B, N_seg + 1, H, W) float.

    Every pixel inside a ground-truth box is labelled with that box's class (channel 1 + class), a pixel in several
    boxes with several; uncovered pixels are background (channel 0). The paper labels image pixels and downsamples
    y to the size of s: here, nearest, at the cell centres of the feature grid. A box smaller than one cell still
    marks the cell holding its centre. boxes: xyxy pixels of the padded batch canvas; labels: 0-based."""
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
        small = ~inside.flatten(1).any(1)  # (N,) boxes that cover no cell centre mark the cell holding their centre
        row = (((y1 + y2) / 2) // stride).long().clamp(0, H - 1)
        col = (((x1 + x2) / 2) // stride).long().clamp(0, W - 1)
        inside[small, row[small], col[small]] = True
        y.index_put_((image, 1 + labels), inside.float(), accumulate=True)  # boxes of one class may overlap
        y.clamp_(max=1.0)
    y[:, 0] = (y[:, 1:].sum(1) == 0).float()
    return y


def loss_bbseg(seg_logits, seg_targets, feat_mask):
    """Eq. 2 per image: sum over the N_seg + 1 channels of the BCE averaged over the un-padded positions -> (B,).
    In float32 under any autocast, as every loss term: a sum of N_seg x H x W bf16 values keeps three digits."""
    with torch.autocast(seg_logits.device.type, enabled=False):
        bce = F.binary_cross_entropy_with_logits(seg_logits.float(), seg_targets.float(), reduction="none")
        valid = (~feat_mask).unsqueeze(1).float()  # (B, 1, H, W)
        return (bce * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)


def downsample_mask(mask, feat_hw, stride):
    """Padding mask (B, H, W) of the canvas -> (B, h, w) at the given stride: a cell is padding when its whole block
    is. (DETR's nearest F.interpolate drifts when H is no multiple of the stride: 1,199 px gives a scale of 31.55.)"""
    valid = F.max_pool2d((~mask).float()[:, None], stride, stride, ceil_mode=True)[:, 0] > 0  # (B, h, w)
    if tuple(valid.shape[-2:]) != tuple(feat_hw):
        raise ValueError(f"downsample_mask: a {tuple(mask.shape[-2:])} canvas at stride {stride} gives "
                         f"{tuple(valid.shape[-2:])} cells, the feature map has {tuple(feat_hw)}")
    return ~valid


# ------------------------------------------------------------------------------------------- The model (III-A to III-C)
class SG2HOI(nn.Module):
    """The whole model of Fig. 1: BBSeg -> encoder with [CLS] -> relation decoder -> R2ITrans -> HOI decoder."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        tiny = cfg.backbone == "tiny"  # the toy preset's small CNN, or torchvision's ResNet (the paper's)
        self.backbone = TinyBackbone() if tiny else ResNetBackbone(cfg.backbone, cfg.pretrained_backbone)
        # V -> C' = d channels. The paper's "5 convolutional layers with the kernel size 1 x 1", with no non-linearity
        # named between them, are one linear map: DETR's single 1x1 conv (DETR's input_proj weights load into it).
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, 1)

        # III-A: classes of the segmentation map = the union of the relation and HOI object vocabularies
        entity = cfg.entity_names or [f"entity {i}" for i in range(cfg.num_entity_classes)]
        hoi_obj = cfg.hoi_object_names or [f"object {i}" for i in range(cfg.num_hoi_objects)]
        self.seg_names = list(dict.fromkeys((entity if cfg.sgg else []) + (hoi_obj if cfg.hoi else [])))
        index = {n: i for i, n in enumerate(self.seg_names)}
        self.register_buffer("entity_to_seg", torch.tensor([index.get(n, 0) for n in entity]), persistent=False)
        self.register_buffer("hoi_object_to_seg", torch.tensor([index.get(n, 0) for n in hoi_obj]), persistent=False)
        if cfg.use_bbseg:
            self.bbseg = BBSeg(d, cfg.seg_hidden, len(self.seg_names) + 1, cfg.seg_norm)  # N_seg + 1 classes
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

        # III-B: encoder with [CLS], VL distillation head, relation decoder and its branches (always: HOIs need them)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))  # the [CLS] token's own (learned) position
        self.encoder = Encoder(cfg.enc_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        if cfg.use_vl_distill:
            self.align_proj = nn.Linear(d, cfg.text_dim)  # f_en (d) -> CLIP image space
        self.rel_query_embed = nn.Embedding(cfg.num_rel_queries, d)  # Q_rel
        self.rel_decoder = Decoder(cfg.rel_dec_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.rel_sub = Branch(cfg, cfg.entity_names, cfg.num_entity_classes)
        self.rel_obj = Branch(cfg, cfg.entity_names, cfg.num_entity_classes)
        self.rel_pred = Branch(cfg, cfg.predicate_names, cfg.num_predicates)
        self.rel_sub_box = BoxMLP(d)
        self.rel_obj_box = BoxMLP(d)

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
            self.hoi_human_box = BoxMLP(d)
            self.hoi_obj_box = BoxMLP(d)

        for name, p in self.named_parameters():  # DETR's init for the transformer
            if p.dim() > 1 and any(s in name for s in ("encoder", "decoder", "r2i", "_transform")) \
                    and "in_proj" not in name:
                nn.init.xavier_uniform_(p)

    # -------------------------------------------------------------------- forward, in the paper's three stages
    def forward(self, images, mask, with_hoi=True):
        """images (B, 3, H, W) normalised; mask (B, H, W) True on padding -> a dict of outputs. with_hoi=False skips
        Sec. III-C: training runs it on HOI batches only (an SGG batch has no HOI loss)."""
        out, enc = self.encode(images, mask)  # Eq. 1-5: backbone, BBSeg, encoder with [CLS], VL alignment
        out["rel"], sg = self.decode_relations(enc)  # Eq. 6: the scene graph
        if self.cfg.hoi and with_hoi:
            out["hoi"] = self.decode_hois(enc, sg)  # Eq. 7-8: HOIs from the scene graph
        return out

    def encode(self, images, mask):
        """Sec. III-A and Eq. 4-5. Returns (outputs the losses read, features the decoders read)."""
        cfg = self.cfg
        feat = self.backbone(images)  # (B, C, h, w)
        fmask = downsample_mask(mask, feat.shape[-2:], self.backbone.stride)  # (B, h, w), True on padding
        pos = sine_position_encoding(fmask, cfg.d_model).flatten(1, 2)  # (B, h*w, d)
        v = self.input_proj(feat)  # V: (B, d, h, w)
        out = {"feat_mask": fmask, "canvas_hw": images.shape[-2:]}

        # Eq. 1 and 3: box-level segmentation s, semantic map E_s, aggregation f_agg = [W_v V, W_s E_s]
        if cfg.use_bbseg:
            seg_logits = self.bbseg(v)  # s: (B, N_seg + 1, h, w)
            e_s = self.semantic_table[seg_logits.argmax(1)]  # E_s: (B, h, w, E); background -> 0
            f_agg = torch.cat([self.w_v(v), self.w_s(e_s.permute(0, 3, 1, 2).contiguous())], dim=1)  # (B, d, h, w)
            out["seg_logits"] = seg_logits
        else:  # -HSS (Table VI): the visual features alone
            f_agg = v

        # Eq. 4: f_en = Encoder([GAP(V), f_agg_1 ... f_agg_HW], p); the [CLS] token starts as the pooled V
        valid = (~fmask).flatten(1).unsqueeze(-1).float()  # (B, h*w, 1)
        gap = (v.flatten(2).transpose(1, 2) * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)  # (B, 1, d)
        tokens = torch.cat([gap, f_agg.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + h*w, d)
        tok_pos = torch.cat([self.cls_pos.expand(len(images), -1, -1), pos], dim=1)  # (B, 1 + h*w, d)
        tok_mask = torch.cat([fmask.new_zeros(len(images), 1), fmask.flatten(1)], dim=1)  # [CLS] never masked
        f_en = self.encoder(tokens, tok_pos, tok_mask)  # (B, 1 + h*w, d)

        # Eq. 5: the feature aligned with CLIP's image embedding: the [CLS] output (+cls) or the pooled output (+pool)
        if cfg.use_vl_distill:  # off = "-VLpool" (Table VII)
            if cfg.align_feature == "cls":
                f_vl = f_en[:, 0]  # (B, d)
            else:
                f_vl = (f_en[:, 1:] * valid).sum(1) / valid.sum(1)  # (B, d)
            out["align"] = self.align_proj(f_vl)  # (B, text_dim)
        enc = {"f_en": f_en, "tok_pos": tok_pos, "tok_mask": tok_mask, "pos": pos, "fmask": fmask}
        return out, enc

    def decode_relations(self, enc):
        """Eq. 6: f_sg = RelDecoder(f_en, Q_rel) and its five branches on every decoder layer (the last is the scene
        graph, the others auxiliary outputs). Returns (outputs, what Sec. III-C reads: Q_rel, last-layer features)."""
        B = len(enc["f_en"])
        q_rel = self.rel_query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # Q_rel: (B, N_rel, d)
        f_sg = self.rel_decoder(q_rel, enc["f_en"], enc["tok_pos"], enc["tok_mask"])  # (L, B, N_rel, d)
        sub_logits, f_s = self.rel_sub(f_sg)  # (L, B, N_rel, N_o + 1), hidden f_s: (L, B, N_rel, d)
        obj_logits, f_o = self.rel_obj(f_sg)
        pred_logits, f_r = self.rel_pred(f_sg)  # (L, B, N_rel, N_r + 1); last column = "no relation"
        out = dict(sub_logits=sub_logits, obj_logits=obj_logits, pred_logits=pred_logits,
                   sub_boxes=self.rel_sub_box(f_sg), obj_boxes=self.rel_obj_box(f_sg))  # boxes: (L, B, N_rel, 4)
        sg = {"q_rel": q_rel, "f_sg": f_sg[-1], "f_s": f_s[-1], "f_r": f_r[-1], "f_o": f_o[-1]}  # last layer
        return out, sg

    def decode_hois(self, enc, sg):
        """Sec. III-C: the HOI decoder reads the image features transformed by the relation features (Eq. 7),
        with HOI queries transformed by the relation queries; Eq. 8's five branches on every layer."""
        memory, mem_pos, mem_mask = self.hoi_memory(enc, sg)  # F_hoi: (B, h*w, d) by default
        q_hoi = self.hoi_queries(sg)  # (B, N_hoi, d)
        h_hoi = self.hoi_decoder(q_hoi, memory, mem_pos, mem_mask)  # Eq. 8: (L, B, N_hoi, d)
        obj_logits, _ = self.hoi_obj(h_hoi)
        verb_logits, _ = self.hoi_verb(h_hoi)
        return dict(human_logits=self.hoi_human(h_hoi), obj_logits=obj_logits, verb_logits=verb_logits,
                    human_boxes=self.hoi_human_box(h_hoi), obj_boxes=self.hoi_obj_box(h_hoi))

    def hoi_memory(self, enc, sg):
        """What the HOI decoder reads: (features, their positions, their padding mask)."""
        if not self.cfg.use_r2i:  # -R2ITR (Table VIII): the encoder features themselves
            return enc["f_en"], enc["tok_pos"], enc["tok_mask"]
        # Eq. 7: f_r2i = R2ITrans([W_t [f_s, f_r, f_o]]_k, p): one token per relation query, Q_rel as its position
        f_tilde = self.w_t(torch.cat([sg["f_s"], sg["f_r"], sg["f_o"]], dim=-1))  # (B, N_rel, d)
        f_r2i = self.r2i(f_tilde, sg["q_rel"])  # (B, N_rel, d)
        if not self.cfg.use_feature_transform:  # -FETR (Table VIII): the HOI decoder reads f_r2i alone
            return f_r2i, sg["q_rel"], None
        # feature transformation: the encoder features (queries) attend to f_r2i (keys / values) -> F_hoi
        f_hoi = enc["f_en"]
        for layer in self.feature_transform:
            f_hoi = layer(f_hoi, enc["tok_pos"], f_r2i, sg["q_rel"])  # (B, 1 + h*w, d)
        return f_hoi[:, 1:], enc["pos"], enc["fmask"].flatten(1)  # F_hoi: the h*w image positions

    def hoi_queries(self, sg):
        """The HOI queries Q_hoi, transformed by the relation queries (query transformation, Sec. III-C)."""
        if self.cfg.hoi_queries_from_rel:  # RELQ (Table VIII): the decoded relation queries f_sg[-1] are Q_hoi
            return sg["f_sg"]  # (B, N_rel, d)
        q_hoi = self.hoi_query_embed.weight.unsqueeze(0).expand(len(sg["q_rel"]), -1, -1)  # (B, N_hoi, d)
        if not self.cfg.use_query_transform:  # -QUTR (Table VIII)
            return q_hoi
        # keys / values: the decoded relation queries of this image (the relation cues to transfer), with Q_rel as
        # their position. The paper's words, "the relation queries Q_rel", would give every image the same HOI queries.
        kv, kv_pos = sg["f_sg"], sg["q_rel"]
        for layer in self.query_transform:
            q_hoi = layer(q_hoi, torch.zeros_like(q_hoi), kv, kv_pos)
        return q_hoi


def build_model(cfg: Config) -> SG2HOI:
    return SG2HOI(cfg)


# ------------------------------------------------------------------------------------------- III-D  Matching and losses
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
    """An image's HOIs as 5-tuples, the verbs of one (human, object) pair as one multi-hot vector (QPIC). Object -1
    (V-COCO: none) gets a zero box, left out of box losses and costs, and QPIC's "no object" label."""
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
    """(P, 4), (T, 4) -> L1 cost (P, T) and GIoU (P, T): Eq. 9's box cost is box_l1 * L1 - box_giou * GIoU."""
    l1 = torch.cdist(pred_cxcywh, tgt_cxcywh, p=1)
    giou = generalized_box_iou(box_convert(pred_cxcywh, "cxcywh", "xyxy"), box_convert(tgt_cxcywh, "cxcywh", "xyxy"))
    return l1, giou


def _assign(cost, sizes, what):
    """cost (B, Q, sum(sizes)) -> per image (query indices, target indices) of the minimum-cost matching. Non-finite
    costs (a diverged model) raise a FloatingPointError that says so, not scipy's "invalid numeric entries"."""
    if not torch.isfinite(cost).all():
        raise FloatingPointError(f"non-finite matching cost: model outputs contain NaN/Inf ({what} matching, "
                                 f"{int((~torch.isfinite(cost)).sum())} of {cost.numel()} costs)")
    out = []
    for b, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[b].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


class HungarianMatcher:
    """Eq. 9: L_cost = alpha_1 L_box + alpha_2 L_cls + alpha_3 L_cls^r, solved by linear_sum_assignment. Our choices:
      * the box cost "encompasses a box regression loss L1 and an IoU loss": inside alpha_1, QPIC's box_l1 * L1 (on
        normalised cxcywh) - box_giou * GIoU, with 2.5 and 1 (as CDN, GEN-VLKT; DETR, RelTR: 5 and 2, same ratio);
      * the star means "subject or object": the subject and object terms are added (RelTR), so that a 5-tuple pays
        for both of its boxes; for HOIs the human takes the subject's place;
      * classification costs are -p(class), as DETR (the log of CE dropped: it is monotone);
      * the multi-label verb cost is QPIC's: -(mean p on the positive verbs + mean (1 - p) on the negative ones) / 2.
    The costs are built for the whole batch in one pass and split per image (DETR)."""

    def __init__(self, cost_box=1.0, cost_class=2.0, cost_rel=4.0, box_l1=2.5, box_giou=1.0):
        self.a1, self.a2, self.a3 = cost_box, cost_class, cost_rel
        self.box_l1, self.box_giou = box_l1, box_giou

    @torch.no_grad()
    def match_relations(self, out, tgts):
        """out: one decoder layer's relation outputs (B, Q, ...); tgts: list of relation_targets()."""
        B, Q = out["sub_logits"].shape[:2]
        sizes = [len(t["preds"]) for t in tgts]  # no targets at all: every image gets an empty matching
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
        sizes = [len(t["verbs"]) for t in tgts]  # no targets at all: every image gets an empty matching
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
    """The loss normalisers of one (micro-)batch, as counts (DETR: the number of targets). train.py adds them over a
    step's micro-batches and averages them over the processes: the same global count for 1 or N processes."""
    if task == "sgg":
        n = [len(t["rels"]) for t in targets]
        with_object, positive = 0, 0
    else:
        pairs = [{(h, o) for h, o, _ in t["hois"].tolist()} for t in targets]
        n = [len(p) for p in pairs]
        with_object = sum(min(sum(o >= 0 for _, o in p), num_queries) for p in pairs)
        positive = sum(len(t["hois"]) for t in targets)  # verb labels (QPIC's focal-loss normaliser)
    return dict(images=float(len(targets)), teachers=float(sum(t.get("clip") is not None for t in targets)),
                matched=float(sum(min(k, num_queries) for k in n)), with_object=float(with_object),
                positive_verbs=float(positive))


class SetCriterion(nn.Module):
    """Eq. 10: L = lambda_1 L_seg + lambda_2 L_algn + L_rel + L_hoi, one method per term, with deep supervision.

    L_rel (and likewise L_hoi) is the matched cost of Eq. 9 written as losses: alpha_1 (L1 + GIoU loss) on both
    boxes + alpha_2 CE on both labels + alpha_3 on the predicate (CE) or the verbs (focal). The paper computes no
    loss for unmatched queries; then nothing teaches a query to say "no relation", all queries stay confident and
    the ranking at test time is noise. As in DETR, unmatched queries learn the no-object / no-relation class, with
    weight eos_coef = 0.1, and no verb. Every term is a sum over the batch divided by a count of the global batch
    (`norm`, from batch_counts), so the gradients of micro-batches and processes add up to the global batch's."""

    def __init__(self, cfg: Config, entity_to_seg, hoi_object_to_seg, num_seg_classes, stride):
        super().__init__()
        self.cfg, self.stride = cfg, stride
        self.matcher = HungarianMatcher(cfg.cost_box, cfg.cost_class, cfg.cost_rel, cfg.box_l1, cfg.box_giou)
        self.register_buffer("entity_to_seg", entity_to_seg.clone())
        self.register_buffer("hoi_object_to_seg", hoi_object_to_seg.clone())
        self.num_seg_classes = num_seg_classes

    def forward(self, outputs, targets, task, norm=None):
        """outputs: SG2HOI.forward(); targets: one dict per image; task: "sgg" or "hoi"; norm: the global batch's counts
        (from train.py) or None: this batch's (one process, no accumulation) -> {term: weighted value, "loss": sum}."""
        cfg, device = self.cfg, outputs["feat_mask"].device
        if norm is None:
            norm = batch_counts(targets, task, cfg.num_rel_queries if task == "sgg" else cfg.num_hoi_queries)
        for t in targets:
            _check_target_boxes(t)
        losses = {}
        if cfg.use_bbseg:
            losses["seg"] = cfg.loss_seg * self.loss_seg(outputs, targets, task, norm)
        if cfg.use_vl_distill and norm["teachers"] > 0:  # some image of the global batch has a teacher vector
            losses["align"] = cfg.loss_align * self.loss_align(outputs, targets, norm)
        if task == "sgg":
            tgts = [{k: v.to(device) for k, v in relation_targets(t).items()} for t in targets]
            layer_loss, head = self.loss_rel, outputs["rel"]
        else:  # a missing object (index -1) gets the last HOI object class: V-COCO's "no object" (QPIC)
            tgts = [{k: v.to(device) for k, v in hoi_targets(t, cfg.num_verbs, cfg.num_hoi_objects - 1).items()}
                    for t in targets]
            layer_loss, head = self.loss_hoi, outputs["hoi"]
        num_layers = next(iter(head.values())).shape[0]
        for layer in range(num_layers):  # deep supervision: every layer is matched again (DETR)
            if layer < num_layers - 1 and not cfg.aux_loss:
                continue
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for k, v in layer_loss({k: v[layer] for k, v in head.items()}, tgts, norm).items():
                losses[k + suffix] = v
        losses["loss"] = sum(losses.values())
        return losses

    def loss_seg(self, outputs, targets, task, norm):
        """L_seg of Eq. 2 against the box-filled targets y, per image (summed over the batch / images)."""
        y = self.seg_targets(outputs, targets, task)
        return loss_bbseg(outputs["seg_logits"], y, outputs["feat_mask"]).sum() / max(norm["images"], 1.0)

    def loss_align(self, outputs, targets, norm):
        """L_algn of Eq. 5: l1 (or l2, "VLl2") between the aligned feature and the CLIP image embedding, averaged over
        the components and the images with a teacher vector; zero without one, so every process has the same terms."""
        has = [i for i, t in enumerate(targets) if t.get("clip") is not None]
        if not has:
            return outputs["align"].float().sum() * 0.0
        teacher = torch.stack([targets[i]["clip"].float() for i in has]).to(outputs["align"].device)
        student = outputs["align"][has].float()
        distance = F.l1_loss if self.cfg.align_loss == "l1" else F.mse_loss  # l2 = MSE (see Config.align_loss)
        return distance(student, teacher, reduction="sum") / (norm["teachers"] * student.shape[1])

    def loss_rel(self, out, tgts, norm):
        """L_rel for one decoder layer: the matched cost of Eq. 9 as weighted losses."""
        idx, matched = self._match(self.matcher.match_relations(out, tgts), tgts)
        num, cfg = max(norm["matched"], 1.0), self.cfg
        return {
            "rel_box": cfg.cost_box * (self._box_losses(out["sub_boxes"][idx], matched["sub_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num)),
            "rel_cls": cfg.cost_class * (self._ce(out["sub_logits"], matched["sub_labels"], idx, norm)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx, norm)),
            "rel_pred": cfg.cost_rel * self._ce(out["pred_logits"], matched["preds"], idx, norm),
        }

    def loss_hoi(self, out, tgts, norm):
        """L_hoi for one decoder layer: the same for <human, verbs, object> (no object box loss without an object)."""
        idx, matched = self._match(self.matcher.match_hois(out, tgts), tgts)
        cfg = self.cfg
        num, num_obj = max(norm["matched"], 1.0), max(norm["with_object"], 1.0)
        human = torch.zeros_like(matched["obj_labels"])  # class 0 of the binary human head = "a human"
        return {
            "hoi_box": cfg.cost_box * (self._box_losses(out["human_boxes"][idx], matched["human_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num_obj,
                                                          keep=matched["has_obj"])),
            "hoi_cls": cfg.cost_class * (self._ce(out["human_logits"], human, idx, norm)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx, norm)),
            "hoi_verb": cfg.cost_rel * self._verb_loss(out["verb_logits"], matched["verbs"], idx, norm),
        }

    @staticmethod
    def _match(indices, tgts):
        """Matcher indices -> ((batch index, query index) of the matched queries, their targets concatenated)."""
        idx = (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
               torch.cat([q for q, _ in indices]))
        matched = {k: torch.cat([t[k][j] for t, (_, j) in zip(tgts, indices)]) for k in tgts[0]}
        return idx, matched

    def _ce(self, logits, matched_labels, idx, norm):
        """CE over all queries, unmatched -> the last class ("no object" / "no relation") with weight eos_coef. A sum
        divided by the global batch's total weight: on one process, no accumulation, F.cross_entropy's weighted mean."""
        B, Q, C = logits.shape
        target = torch.full((B, Q), C - 1, dtype=torch.long, device=logits.device)  # (B, Q)
        target[idx] = matched_labels
        weight = torch.ones(C, device=logits.device)
        weight[-1] = self.cfg.eos_coef
        unmatched = norm["images"] * Q - norm["matched"]
        # over (B * Q, C) rows: the form with a deterministic CUDA kernel (nll_loss2d has none: --deterministic)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), weight=weight, reduction="sum")
        return loss / (norm["matched"] + self.cfg.eos_coef * unmatched)

    def _box_losses(self, pred, tgt, num, keep=None):
        """box_l1 * L1 + box_giou * (1 - GIoU), summed over the matched boxes / num."""
        if keep is not None:
            pred, tgt = pred[keep], tgt[keep]
        l1 = F.l1_loss(pred.float(), tgt, reduction="sum") / num
        giou = generalized_box_iou_loss(box_convert(pred.float(), "cxcywh", "xyxy"),
                                        box_convert(tgt, "cxcywh", "xyxy"), reduction="sum") / num
        return self.cfg.box_l1 * l1 + self.cfg.box_giou * giou

    def _verb_loss(self, logits, matched_verbs, idx, norm):
        """The paper's "standard cross-entropy loss", but a person's verbs are multi-label (hold and ride a bicycle): as
        QPIC, a sigmoid focal loss (gamma 2, no alpha) summed over all queries (unmatched: none) / positive labels."""
        target = torch.zeros_like(logits, dtype=torch.float)  # (B, Q, V)
        target[idx] = matched_verbs
        return sigmoid_focal_loss(logits.float(), target, alpha=-1, gamma=2.0, reduction="sum") \
            / max(norm["positive_verbs"], 1)

    def seg_targets(self, outputs, targets, task):
        """The BBSeg targets y of Eq. 2 (B, N_seg + 1, h, w): cell i centred at (i + 0.5) * stride pixels of the padded
        canvas, stride = the backbone's (canvas / cells is not, for a canvas no multiple of it: 1,199 px: 31.55)."""
        to_seg = self.entity_to_seg if task == "sgg" else self.hoi_object_to_seg
        fm = outputs["feat_mask"]
        return bbseg_targets([t["boxes"].float().cpu() for t in targets],
                             [to_seg[t["labels"].long()].cpu() for t in targets],
                             fm.shape[1:], self.stride, self.num_seg_classes).to(fm.device)


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


# ------------------------------------------------------------------------------------- Inference: triplets from queries
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


@torch.no_grad()
def hoi_predictions(hoi_out, sizes, person_label=0):
    """Last decoder layer -> per image QPIC's PostProcessHOI output (the input of eval.hico_map): boxes (2Q, 4) =
    human boxes then object boxes, labels (person_label for humans), scores (2Q,) = P(human) then the object class's
    probability, sub_ids, obj_ids, verb_scores (Q, V) = sigmoid(verb) x object score x human score."""
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
                        obj_ids=np.arange(Q, 2 * Q), scores=torch.cat([p_human[b], s_obj[b]]).cpu().numpy(),
                        verb_scores=(verbs[b] * (s_obj[b] * p_human[b])[:, None]).cpu().numpy()))
    return out


# --------------------------------------------------------------------------------------------- Initialisation from DETR
# The paper initialises from DETR trained on COCO (Sec. IV-D, as QPIC): detr-r50-e632da11.pth, {"model": state dict}.
# DETR prefix -> the prefixes it initialises here (GEN-VLKT copies DETR's decoder into both of its decoders; R2ITrans
# takes the encoder's first layers, every box MLP DETR's bbox_embed, each query embedding its first N rows).
DETR_PREFIXES = {
    "backbone.0.body.": ["backbone.body."],
    "input_proj.": ["input_proj."],
    "transformer.encoder.layers.": ["encoder.layers.", "r2i.layers."],
    "transformer.decoder.layers.": ["rel_decoder.layers.", "hoi_decoder.layers."],
    "transformer.decoder.norm.": ["rel_decoder.norm.", "hoi_decoder.norm."],
    "bbox_embed.": ["rel_sub_box.", "rel_obj_box.", "hoi_human_box.", "hoi_obj_box."],
    "query_embed.": ["rel_query_embed.", "hoi_query_embed."],
}
CLASS_EMBED_NOTE = ("class_embed (COCO-91 classifier) not used: every class branch here has a randomly initialised "
                    "hidden layer before its classifier, so DETR's classifier would read untrained features")


def detr_key_map(model: SG2HOI, detr_keys):
    """{our key: DETR key} for every DETR tensor that has a place in `model`."""
    ours, mapping = set(model.state_dict()), {}
    for k in detr_keys:
        for prefix, targets in DETR_PREFIXES.items():
            if k.startswith(prefix):
                rest = re.sub(r"\.(linear[12])\.", r".ffn.\1.", k[len(prefix):])  # DETR's FFN -> FeedForward
                mapping.update({t + rest: k for t in targets if t + rest in ours})
    return mapping


def load_detr_checkpoint(path):
    """DETR's state dict from a released file or a DETR main.py checkpoint, read with weights_only=True; the
    argparse.Namespace that main.py saves beside the weights is the one class allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: cannot be read safely (torch.load weights_only=True): {str(e).splitlines()[0]}. "
                         f"If you trust the file, re-save its weights alone: torch.save({{'model': torch.load(path, "
                         f"weights_only=False)['model']}}, 'detr_model.pth'), and pass that file") from None
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors or {{'model': state dict, ...}}")
    return sd


def load_detr_weights(model: SG2HOI, state_dict_or_path, verbose=True):
    """Copy DETR's weights (a file, a state dict, {"model": sd}) where names and shapes fit -> (loaded, skipped)."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        sd = load_detr_checkpoint(sd)
    sd = sd.get("model", sd)
    own, mapping = model.state_dict(), detr_key_map(model, sd)
    loaded, skipped = [], []
    for ours, theirs in mapping.items():
        src = sd[theirs]
        if ours.endswith("query_embed.weight"):
            src = src[: len(own[ours])]  # the first N queries
        if src.shape == own[ours].shape:
            own[ours] = src.to(own[ours].dtype)
            loaded.append(ours)
        else:
            skipped.append(f"{ours} <- {theirs}: shape {tuple(src.shape)} vs {tuple(own[ours].shape)}")
    skipped += [f"{k}: {CLASS_EMBED_NOTE}" if k.startswith("class_embed.") else f"{k}: no place in SG2HOI+"
                for k in sd if k not in set(mapping.values())]
    model.load_state_dict(own)
    if verbose:
        print(f"DETR init: loaded {len(loaded)} tensors, skipped {len(skipped)}; {CLASS_EMBED_NOTE}")
        print("  skipped " + "\n  skipped ".join(skipped))
    return loaded, skipped


# -------------------------------------------------------------------------------- Class text and CLIP image files
# The paper embeds "A photo of a [class]" with CLIP's frozen text encoder (Sec. III-A, IV-D) and aligns f_en with
# CLIP's image embedding (Eq. 5); both come from files made once by tools/prepare_clip.py. Without the text file every
# name gets a fixed, seeded unit vector: distinct but without linguistic meaning (like HSSD of Table VI).

def class_text_embeddings(names, dim, path="") -> torch.Tensor:
    """(len(names), dim) unit text embeddings: from `path` ({name: tensor}), or seeded by each class name's CRC."""
    if not path:
        seeded = [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) for n in names]
        return F.normalize(torch.stack(seeded), dim=-1) if names else torch.zeros(0, dim)
    table = torch.load(path, map_location="cpu", weights_only=True)  # a file saved from GPU tensors stays on the CPU
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(f"{path}: no text embedding for class name(s) {missing[:5]}")
    emb = torch.stack([table[n].float().flatten() for n in names])
    if emb.shape[1] != dim:
        raise ValueError(f"{path}: embeddings have width {emb.shape[1]}, Config.text_dim is {dim}")
    return F.normalize(emb, dim=-1)


def load_word_vectors(path, names, dim=None) -> torch.Tensor:
    """GloVe-format text file (word v1 ... vD per line) -> (len(names), D); multi-word names are averaged. The width
    D is the file's own (GloVe: 300; W_s of Eq. 3 adapts to it); `dim`, when given, is checked."""
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


def clip_image_key(path: str) -> str:
    """An image's key in the CLIP image cache: its file name, unique in each dataset (tools/prepare_clip.py checks)."""
    return os.path.basename(path)


def teacher_coverage(records, cache, name, min_fraction=0.99):
    """The fraction of a training split's images that have a teacher vector in the CLIP image cache; below
    min_fraction a ValueError with the counts (a cache of another dataset would silently switch Eq. 5 off)."""
    found = sum(clip_image_key(r["file"]) in cache for r in records)
    fraction = found / max(len(records), 1)
    if records and fraction < min_fraction:
        raise ValueError(f"CLIP image cache: only {found} of {len(records)} images of {name} ({100 * fraction:.1f} %) "
                         f"have a teacher vector (needs >= {100 * min_fraction:g} %); keys are image file names, e.g. "
                         f"{clip_image_key(records[0]['file'])!r}; cache keys look like {next(iter(cache), None)!r}. "
                         f"Rebuild the cache with tools/prepare_clip.py for these images")
    return fraction


# ---------------------------------------------------------------------------------------------- Data: one internal form
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


# Plain loaders: json.load, a loop over the images (full-size figures: docs/results.md). check_images=True reads each
# image's header: a missing or non-image file is a DataError (or a counted skip); VG's size must be the JSON's,
# HICO-DET / V-COCO take it. Training decodes the pixels; tools/check_images.py decodes all, on request.


def _read_json(path):
    """json.load, with the two failures a user meets named: a missing file and a malformed or truncated one."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed or truncated JSON ({e})") from None


def _numbers(value, n):
    """Is `value` a JSON list of n numbers (a box)?"""
    return type(value) is list and len(value) == n and all(type(v) in (int, float) for v in value)


def _image_size(file, where, bad_images, skips, expected=None):
    """(width, height) from the image file's header. DataErrors naming `where`: a missing file, a size other than
    `expected` (VG's JSON size, its boxes' frame), a file that is not an image (bad_images="skip": None, counted)."""
    try:
        with Image.open(file) as image:
            size = image.size
    except FileNotFoundError:
        raise DataError(f"{where}: image file {file} not found") from None
    except (UnidentifiedImageError, OSError) as e:  # text named .jpg, a folder, no permission
        if bad_images != "skip":
            raise DataError(f"{where}: image file {file}: not a readable image ({e}) (--bad_images skip drops such "
                            f"records; tools/check_images.py lists them all)") from None
        skips["records with an unreadable image header skipped"] += 1
        return None
    if expected is not None and tuple(size) != tuple(expected):
        fields = [f"'{name}' = {v}" for name, v, real in zip(("width", "height"), expected, size) if v != real]
        raise DataError(f"{where}: field {' and '.join(fields)} but the image file {file} is {size[0]} x {size[1]} "
                        f"(width x height): the annotations do not belong to this image")
    return size


def _make_record(file, image_id, width, height, boxes, labels, pairs, key, what, skips):
    """One record of the internal form (key "rels" or "hois"), its boxes clamped to the image; degenerate ones are
    dropped with their pairs, the other pairs re-numbered (RelTR does not re-number: its labels shift)."""
    boxes = np.array(boxes, np.float32).reshape(-1, 4)                  # (N, 4)
    if not np.isfinite(boxes).all():
        raise DataError(f"{file} (image {image_id}): field 'bbox' holds a non-finite value")
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])     # (N,)
    pairs = np.array(pairs, np.int64).reshape(-1, 3)                    # (P, 3)
    kept_pairs = _drop_boxes(keep, pairs)                               # (P', 3)
    skips["degenerate boxes dropped"] += int((~keep).sum())
    skips[f"{what} on dropped boxes"] += len(pairs) - len(kept_pairs)
    return {"file": file, "image_id": image_id, "width": width, "height": height, "boxes": boxes[keep],
            "labels": np.array(labels, np.int64).reshape(-1)[keep], key: kept_pairs}


def _drop_boxes(keep, pairs):
    """The pairs (P, 3) whose boxes are all kept (keep: (N,) bool), re-numbered among the kept boxes (-1 stays -1)."""
    new_index = np.cumsum(keep) - 1                                     # (N,) index among the kept boxes
    has_object = pairs[:, 1] >= 0
    usable = keep[pairs[:, 0]] & (~has_object | keep[pairs[:, 1].clip(0)])
    pairs, has_object = pairs[usable], has_object[usable]               # a copy: the caller's pairs stay as they are
    pairs[:, 0] = new_index[pairs[:, 0]]
    pairs[has_object, 1] = new_index[pairs[has_object, 1]]
    return pairs


def report_skips(name, skips):
    for what, n in skips.items():
        if n:
            print(f"[{name}] {what}: {n}")


# ---------------------------------------------------------------- VG150, RelTR's COCO-style JSON
# train.json / val.json / test.json are COCO detection files (images with width and height; annotations with an
# xywh bbox, a 1-based category_id and an image_id); rel.json holds every split's relations by image id:
# [subject, object, predicate 1..50], subject and object indexing the image's annotations in file order.

def _vg_relations(rel_json, rel_path, split):
    """One split of rel.json -> {image id: [[subject, object, predicate 1..50], ...]}, every entry checked."""
    if not isinstance(rel_json, dict) or split not in rel_json:
        raise DataError(f"{rel_path}: expected an object with the key {split!r} and 'rel_categories'")
    relations = {}
    for key, rows in rel_json[split].items():
        if not key.lstrip("-").isdigit():
            raise DataError(f"{rel_path}: {split}/{key!r}: key is not an image id")
        for j, row in enumerate(rows):
            if type(row) is not list or len(row) != 3 or not all(type(v) is int for v in row):
                raise DataError(f"{rel_path}: {split}/{key}: entry {j} = {row!r}: expected 3 numbers "
                                f"[subject, object, predicate]")
        relations[int(key)] = rows
    return relations


def _vg_images(coco, ann_path):
    """[(image, its annotations in file order)] of a COCO detection JSON, every field the loader uses checked."""
    seen = set()
    for i, image in enumerate(coco["images"]):
        where = f"{ann_path}: image {image.get('id', '?')} ({image.get('file_name')}, entry {i} of 'images')"
        for name in ("file_name", "id", "width", "height"):
            if name not in image:
                raise DataError(f"{where}: field {name!r} missing")
        if type(image["id"]) is not int or image["id"] in seen:
            raise DataError(f"{where}: field 'id' = {image['id']!r} is not an integer or not unique in 'images'")
        for name in ("width", "height"):
            if type(image[name]) not in (int, float) or not image[name] > 0:
                raise DataError(f"{where}: field {name!r} = {image[name]!r} is not a positive number")
        seen.add(image["id"])
    annotations = {}
    for k, ann in enumerate(coco["annotations"]):
        image_id = ann.get("image_id")
        where = f"{ann_path}: annotation id {ann.get('id', '?')} (image {image_id}, entry {k} of 'annotations')"
        if not _numbers(ann.get("bbox"), 4):
            raise DataError(f"{where}: field 'bbox' = {ann.get('bbox')!r}: expected 4 numbers [x, y, w, h]")
        if type(image_id) is not int:
            raise DataError(f"{where}: field 'image_id' = {image_id!r}: missing or not an integer")
        annotations.setdefault(image_id, []).append(ann)
    return [(image, annotations.get(image["id"], [])) for image in coco["images"]]


def _vg_record(root, paths, image, anns, rels, category_index, num_predicates, skips):
    """One VG image -> a record (labels and predicates 0-based, xyxy boxes), every category and relation checked."""
    ann_path, rel_where = paths
    boxes, labels = [], []
    for j, ann in enumerate(anns):
        category = ann.get("category_id")
        if type(category) is not int or category not in category_index:
            raise DataError(f"{ann_path}: image {image['id']}, annotation {j}: field 'category_id' = {category!r} "
                            f"is not a category of the file")
        x, y, w, h = ann["bbox"]
        boxes.append([x, y, x + w, y + h])
        labels.append(category_index[category])
    for j, (subject, object_, predicate) in enumerate(rels):
        entry = f"{rel_where}/{image['id']}: entry {j} has"
        if not (0 <= subject < len(boxes) and 0 <= object_ < len(boxes)):
            raise DataError(f"{entry} [subject, object] = ({subject}, {object_}) but the image has {len(boxes)} boxes")
        if num_predicates and not 1 <= predicate <= num_predicates:
            raise DataError(f"{entry} predicate {predicate}, outside 1..{num_predicates}")
    pairs = [[subject, object_, predicate - 1] for subject, object_, predicate in rels]
    return _make_record(os.path.join(root, "images", image["file_name"]), image["id"], image["width"],
                        image["height"], boxes, labels, pairs, "rels", "relations", skips)


def load_vg_json(root, split, check_images=True, bad_images="stop"):
    """VG150 in RelTR's layout: root/{train,val,test}.json (COCO detection JSON), root/images/, root/rel.json (above).
    Images without relations are skipped (SGB's filter_empty_rels)."""
    ann_path, rel_path = os.path.join(root, f"{split}.json"), os.path.join(root, "rel.json")
    coco = _read_json(ann_path)
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= coco.keys():
        raise DataError(f"{ann_path}: expected a COCO detection JSON object with 'images', 'annotations' and "
                        f"'categories'")
    rel_json = _read_json(rel_path)
    relations = _vg_relations(rel_json, rel_path, split)
    predicate_names = [n for n in rel_json.get("rel_categories", []) if n != "__background__"]
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    category_index = {c["id"]: k for k, c in enumerate(categories)}  # VG150 id 1..150 -> label 0..149
    records, skips = [], Counter()
    for image, anns in _vg_images(coco, ann_path):
        rels = relations.get(image["id"], [])
        record = _vg_record(root, (ann_path, f"{rel_path}: {split}"), image, anns, rels, category_index,
                            len(predicate_names), skips) if rels else None
        if record is None or len(record["rels"]) == 0:  # none, or none left after dropping degenerate boxes
            skips["images without relations skipped"] += 1
        elif not check_images or _image_size(record["file"], f"{ann_path}: image {image['id']}", bad_images, skips,
                                             expected=(record["width"], record["height"])):
            records.append(record)
    report_skips(f"VG {split}", skips)
    return records, dict(task="sgg", entity_names=[c["name"] for c in categories], predicate_names=predicate_names)


# ---------------------------------------------------------------- HICO-DET and V-COCO, the QPIC / CDN JSON
# One JSON list per split, one entry per image: {"file_name", "img_id" (train only), "annotations": [{"bbox" xyxy
# in pixels, "category_id" COCO-91}], "hoi_annotation": [{"subject_id", "object_id", "category_id" = the verb}]}.

HOIA_FILES = {"hico": ("trainval_hico.json", "test_hico.json"), "vcoco": ("trainval_vcoco.json", "test_vcoco.json")}
# (train, test) image folders, number of verbs, the files' first verb id, whether an object may be -1 (V-COCO)
HOIA_FORMS = {"hico": (("train2015", "test2015"), 117, 1, False), "vcoco": (("train2014", "val2014"), 29, 0, True)}


def _hoia_annotations(where, entry, coco91_to_80, dataset, train, skips):
    """One entry of a HOIA list, every field checked -> (boxes xyxy, labels COCO-80, hois [subject, object or -1, verb
    0-based]); None for a training image with an out-of-range subject / object id (QPIC skips them; test: an error)."""
    _, num_verbs, verb_base, allow_no_object = HOIA_FORMS[dataset]
    for key in ("annotations", "hoi_annotation"):
        if key not in entry:
            raise DataError(f"{where}: missing field {key!r}")
    if type(entry.get("img_id", 0)) is not int:
        raise DataError(f"{where}: field 'img_id' = {entry['img_id']!r} is not an integer")
    boxes, labels, hois = [], [], []
    for j, ann in enumerate(entry["annotations"]):
        box, category = (ann.get("bbox"), ann.get("category_id")) if isinstance(ann, dict) else (None, None)
        if not _numbers(box, 4):
            raise DataError(f"{where}, annotation {j}: field 'bbox' = {box!r}: expected 4 numbers [x1, y1, x2, y2]")
        if type(category) is not int or category not in coco91_to_80:
            raise DataError(f"{where}, annotation {j}: field 'category_id' = {category!r} is not a COCO category id")
        boxes.append(box)
        labels.append(coco91_to_80[category])
    lowest_object = -1 if allow_no_object else 0  # V-COCO: object -1 = the action has no role object
    for j, hoi in enumerate(entry["hoi_annotation"]):
        for key in ("subject_id", "object_id", "category_id"):
            if not isinstance(hoi, dict) or type(hoi.get(key)) is not int:
                raise DataError(f"{where}, hoi_annotation {j}: field {key!r} missing or not an integer")
        subject, object_, verb = hoi["subject_id"], hoi["object_id"], hoi["category_id"] - verb_base
        if not (0 <= subject < len(boxes) and lowest_object <= object_ < len(boxes)):
            if train:
                skips["images with out-of-range subject/object ids skipped"] += 1
                return None
            raise DataError(f"{where}, hoi_annotation {j}: field 'subject_id'/'object_id' = ({subject}, {object_}) "
                            f"but the image has {len(boxes)} boxes")
        if not 0 <= verb < num_verbs:
            raise DataError(f"{where}, hoi_annotation {j}: field 'category_id' = {hoi['category_id']} is not a verb id")
        hois.append([subject, object_, verb])
    return boxes, labels, hois


def _load_hoia(root, dataset, split, check_images, bad_images):
    """The PPDM/QPIC "HOIA" JSON -> (records, meta): COCO-91 ids -> COCO-80 labels, 0-based verbs, headers' sizes."""
    train, vocab = split == "train", load_vocab()
    ann_file, image_dir = HOIA_FILES[dataset][not train], HOIA_FORMS[dataset][0][not train]
    coco91_to_80 = {c["id"]: k for k, c in enumerate(vocab["coco80"])}
    path = os.path.join(root, "annotations", ann_file)
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of images, got {type(entries).__name__}")
    records, skips = [], Counter()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise DataError(f"{path}: record {i}: missing field 'file_name' (expected a JSON list of image records)")
        where = f"{path}: record {i} ({entry['file_name']})"
        annotations = _hoia_annotations(where, entry, coco91_to_80, dataset, train, skips)
        if annotations is None:
            continue
        file = os.path.join(root, "images", image_dir, entry["file_name"])
        size = _image_size(file, where, bad_images, skips) if check_images else (10 ** 9, 10 ** 9)  # no size: no clamp
        if size is None:
            continue
        image_id = entry.get("img_id", i)  # trainval has it; the test files do not (the record's number then)
        records.append(_make_record(file, image_id, *size, *annotations, "hois", "HOIs", skips))
    report_skips(ann_file, skips)
    objects = [c["name"] for c in vocab["coco80"]]
    meta = dict(task="hoi", dataset=dataset, correct_mat=_correct_mat(root, dataset, vocab), person_label=0)
    if dataset == "hico":
        meta.update(object_names=objects, verb_names=vocab["hico_verbs"])
    else:  # the 81st object class "no object"; the verbs' actions and roles serve eval.vcoco_role_ap
        meta.update(object_names=objects + ["no object"], verb_names=[v["name"] for v in vocab["vcoco_verbs"]],
                    verbs=vocab["vcoco_verbs"], actions=vocab["vcoco_actions"])
    return records, meta


def rare_triplets_from_training(records, threshold=10):
    """QPIC's rare set: (subject label, object label, verb) triplets with fewer than `threshold` training HOIs."""
    counts = Counter((int(r["labels"][s]), int(r["labels"][o]), v)  # (subject label, object label, verb) -> HOIs
                     for r in records for s, o, v in r["hois"].tolist() if o >= 0)
    return sorted(t for t, c in counts.items() if c < threshold), counts


def _correct_mat(root, dataset, vocab):
    """The [verb, object label] 0/1 matrix of the HOI classes: root/annotations/corre_{dataset}.npy, or vocab.json's
    if absent (or root is None); V-COCO's gets a column of ones for its 81st object class, "no object" (QPIC)."""
    m = _vocab_correct_mat(dataset, vocab)
    path = os.path.join(root, "annotations", f"corre_{dataset}.npy") if root is not None else None
    if path and os.path.exists(path):
        shape = m.shape
        try:
            m = np.load(path)  # allow_pickle=False: a pickled or corrupt file is an error, never executed
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable numpy .npy matrix ({e}); delete it to use vocab.json's") from None
        if m.shape != shape or not np.issubdtype(m.dtype, np.number):
            raise DataError(f"{path}: shape {m.shape} dtype {m.dtype}, expected a numeric {shape} matrix")
    return m if dataset == "hico" else np.concatenate([m, np.ones((len(m), 1), m.dtype)], 1)


def _vocab_correct_mat(dataset, vocab):
    """vocab.json's [verb, COCO-80 object] 0/1 matrix as corre_{dataset}.npy holds it (HICO-DET: its 600 classes)."""
    if dataset == "vcoco":
        return np.array(vocab["corre_vcoco"], np.float32)
    m = np.zeros((117, 80), np.float32)
    for v, o in vocab["hico_hois"]:
        m[v, o] = 1
    return m


def load_hico(root, split, check_images=True, bad_images="stop"):
    """HICO-DET in the QPIC layout: root/annotations/{trainval,test}_hico.json, corre_hico.npy; root/images/."""
    return _load_hoia(root, "hico", split, check_images, bad_images)


def load_vcoco(root, split, check_images=True, bad_images="stop"):
    """V-COCO in the QPIC layout (as load_hico): the 29 action_role verbs, 0-based; object_id -1 = no role object."""
    return _load_hoia(root, "vcoco", split, check_images, bad_images)


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
# Small images with a person and eight other objects drawn as distinct shapes and colours. Each person takes part in
# one "scenario": a few relations from which the HOIs follow, as in the paper's motivation (fly kite = kite above
# person + person holding the kite). With the real vocabularies' names, the files are tiny real-format datasets.

TOY_COCO = {"bike": "bicycle", "table": "dining table"}  # VG150 name -> COCO name where they differ
TOY_COLORS = {"person": (200, 40, 40), "kite": (240, 200, 0), "horse": (120, 70, 20), "chair": (40, 80, 200),
              "bike": (30, 30, 30), "umbrella": (150, 40, 200), "dog": (230, 130, 40), "cup": (40, 170, 60),
              "table": (110, 110, 110)}
TOY_SIZES = {"person": (14, 34), "kite": (16, 16), "horse": (40, 24), "chair": (16, 24), "bike": (32, 18),
             "umbrella": (30, 14), "dog": (20, 12), "cup": (8, 10), "table": (44, 20)}  # (w, h) in pixels

# scenario: (weight in train, weight in test, object, relations, HICO verbs, V-COCO verbs); relations (subject,
# predicate, object), "P" = the person, "O" = the object. Weights set the long tail: the two rare HOIs (walk bicycle,
# sit_at dining table) get a few training instances and more in the test split.
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
# object-object extras: (weight in train, weight in test, subject, predicate, object); the last two: zero-shot
TOY_EXTRAS = [(1.0, 1.0, "cup", "on", "table"), (0.3, 0.3, "dog", "under", "chair"),
              (0.3, 0.3, "dog", "behind", "chair"), (0.0, 0.3, "dog", "under", "table"),
              (0.0, 0.3, "cup", "on", "chair")]
# The scene-graph training set sees the relation cues of the two rare HOIs often, the HOI training set only a handful
# of those HOIs: as in the real data, the SGG data carries knowledge the HOI data lacks (Table V asks if it helps).
TOY_SGG_TRAIN_WEIGHTS = {"walk_bike": 1.0, "sit_at_table": 1.0}  # scenario -> weight in the VG training set


def _draw(canvas, name, x, y, variant=0):
    """Paint entity `name` with its top-left corner at (x, y) on an (H, W, 3) uint8 canvas; returns its box."""
    w, h = TOY_SIZES[name]
    h = 26 if name == "person" and variant == 1 else h  # variant 1 of a person: seated, shorter
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
        held_y = ground - ph + 14 if obj != "bike" else ground - oh
        draw = [("person", px, ground - ph, 0), (obj, px + pw - 3, held_y, 0)]
    elif name == "drink_cup":
        draw = [("person", px, ground - ph, 0), (obj, px + pw // 2 - 1, ground - ph + 3, 0)]
    elif name in ("ride_horse", "ride_bike"):
        draw = [(obj, px - (ow - pw) // 2, ground - oh, 0), ("person", px, ground - oh - ph + 12, 0)]
    elif name in ("near_horse", "near_dog", "walk_dog", "look_dog"):
        draw = [("person", px, ground - ph, 0), (obj, px + pw + rng.integers(14, 24), ground - oh, 0)]
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
    seated = [("P", "sitting on", "chair")] if name == "sit_at_table" else []
    return ents, list(TOY_SCENARIOS[name][3]) + seated


def toy_scene(rng, split, size=128, scene_graph=False):
    """One image with one or two person scenarios and maybe an object-object extra (scene_graph: VG's training set)
    -> (uint8 (H, W, 3) image, [(name, box)], relations [(s, o, predicate)], HOIs [(person, object, HICO verb)],
    V-COCO actions [(person, object or -1, V-COCO verb)])."""
    tint = rng.integers(200, 246, size=3, dtype=np.uint8).astype(np.int16)  # a light background colour, then noise
    canvas = np.clip(tint + rng.integers(-8, 9, size=(size, size, 1)), 0, 255).astype(np.uint8)  # (H, W, 3)
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
        rels += [(index[s], index[o], r) for s, r, o in scen_rels]
        obj = index["O"]
        hois += [(index["P"], obj, v) for v in TOY_SCENARIOS[scen][4]]
        actions += [(index["P"], -1 if v in ("stand", "walk") else obj, v) for v in TOY_SCENARIOS[scen][5]]
    if has_extra:
        sub, pred, obj = TOY_EXTRAS[rng.choice(len(TOY_EXTRAS), p=extra_w / extra_w.sum())][2:]
        ground = int(rng.integers(size - 30, size - 2))
        x = slots[1] + int(rng.integers(0, 8))
        base_box = _draw(canvas, obj, x, ground - TOY_SIZES[obj][1])
        sh = TOY_SIZES[sub][1]
        if pred == "on":
            sub_box = _draw(canvas, sub, x + 6, base_box[1] - sh + (12 if obj == "chair" else 0))
        else:  # under or behind (3 px higher): the subject, then the object again, which stays in front of it
            dx, dy = (4, 0) if pred == "under" else (8, 3)
            sub_box = _draw(canvas, sub, x + dx, ground - sh - dy)
            base_box = _draw(canvas, obj, x, ground - TOY_SIZES[obj][1])
        b = len(entities)
        entities += [(obj, base_box), (sub, sub_box)]
        rels.append((b + 1, b, pred))
    return canvas, entities, rels, hois, actions


def _save_png(canvas, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.io.write_png(torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), path, compression_level=1)


def _write_toy_vg(vg, splits, size, rng, vocab):
    """The VG150 part of write_toy_datasets: RelTR's {split}.json and rel.json, images 1.png, 2.png, ..."""
    vg_index = {n: i + 1 for i, n in enumerate(vocab["vg150_objects"])}  # 1-based VG150 ids
    pred_index = {n: i + 1 for i, n in enumerate(vocab["vg150_predicates"])}
    rel_json = {"rel_categories": ["__background__"] + vocab["vg150_predicates"]}
    categories = [{"supercategory": n, "id": i + 1, "name": n} for i, n in enumerate(vocab["vg150_objects"])]
    image_id, ann_id = 0, 0
    for split, n in splits:
        coco = {"images": [], "annotations": [], "categories": categories}
        rel_json[split] = {}
        for _ in range(n):
            image_id += 1
            canvas, ents, rels, _, _ = toy_scene(rng, "test" if split != "train" else "train", size, scene_graph=True)
            _save_png(canvas, os.path.join(vg, "images", f"{image_id}.png"))
            coco["images"].append({"file_name": f"{image_id}.png", "height": size, "width": size, "id": image_id})
            for name, (x1, y1, x2, y2) in ents:
                ann_id += 1
                coco["annotations"].append({"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": vg_index[name],
                                            "image_id": image_id, "id": ann_id, "area": (x2 - x1) * (y2 - y1),
                                            "iscrowd": 0, "segmentation": None})
            rel_json[split][str(image_id)] = [[s, o, pred_index[r]] for s, o, r in rels]
        with open(os.path.join(vg, f"{split}.json"), "w") as f:
            json.dump(coco, f)
    with open(os.path.join(vg, "rel.json"), "w") as f:
        json.dump(rel_json, f)


def _write_toy_hoia(ds_root, dataset, splits, size, rng, vocab):
    """write_toy_datasets' HICO-DET (verb ids 1..117) or V-COCO (action ids 0..28): QPIC's JSON, corre_{dataset}.npy."""
    coco_id = {c["name"]: c["id"] for c in vocab["coco80"]}
    if dataset == "hico":  # written independently of the readers' HOIA_FORMS, so the round trip tests them
        folders, prefix = ("train2015", "test2015"), "HICO_{}2015_{:08d}.png"
        verb_id = {n: i + 1 for i, n in enumerate(vocab["hico_verbs"])}
    else:
        folders, prefix = ("train2014", "val2014"), "COCO_{}2014_{:012d}.png"
        verb_id = {v["name"]: i for i, v in enumerate(vocab["vcoco_verbs"])}
    os.makedirs(os.path.join(ds_root, "annotations"), exist_ok=True)
    for split, n in splits:
        images = []
        for k in range(n):
            canvas, ents, _, hois, actions = toy_scene(rng, split, size)
            pairs = hois if dataset == "hico" else actions
            tag = "train" if split == "train" else ("test" if dataset == "hico" else "val")
            file_name = prefix.format(tag, k + 1)
            _save_png(canvas, os.path.join(ds_root, "images", folders[split != "train"], file_name))
            anns = [{"bbox": box, "category_id": coco_id[TOY_COCO.get(name, name)]} for name, box in ents]
            hoi_ann = [{"subject_id": s, "object_id": o, "category_id": verb_id[v]} for s, o, v in pairs]
            images.append({"file_name": file_name, "annotations": anns, "hoi_annotation": hoi_ann})
        with open(os.path.join(ds_root, "annotations", HOIA_FILES[dataset][split != "train"]), "w") as f:
            json.dump(images, f)
    np.save(os.path.join(ds_root, "annotations", f"corre_{dataset}.npy"), _vocab_correct_mat(dataset, vocab))


def write_toy_datasets(root, num_train=3000, num_test=500, size=128, seed=0, num_train_hoi=None):
    """Generate the toy scenes and write them as VG150 (RelTR JSON), HICO-DET and V-COCO (QPIC JSON) datasets:
    num_train VG training images, num_train_hoi (default: num_train) per HOI dataset, num_test test images each, all
    from one random stream in this order: VG train, test, val; HICO-DET train, test; V-COCO train, test (replayable)."""
    vocab = load_vocab()
    rng = np.random.default_rng(seed)
    vg_splits = [("train", num_train), ("test", num_test), ("val", num_test // 5)]
    _write_toy_vg(os.path.join(root, "vg"), vg_splits, size, rng, vocab)
    hoi_splits = [("train", num_train if num_train_hoi is None else num_train_hoi), ("test", num_test)]
    for dataset in ("hico", "vcoco"):
        _write_toy_hoia(os.path.join(root, dataset), dataset, hoi_splits, size, rng, vocab)
    with open(os.path.join(root, "DONE"), "w") as f:
        f.write(json.dumps(dict(num_train=num_train, num_test=num_test, size=size, seed=seed,
                                num_train_hoi=num_train_hoi)))


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


# ---------------------------------------------------------------- Transforms and batching
def make_transforms(train, image_size=800, max_size=1333, multi_scale=True):
    """The paper's augmentation (Sec. IV-D, as QPIC): flip p = 0.5, brightness, contrast; for real data a multi-scale
    resize of the shorter side (480..image_size, step 32, longer <= max_size, DETR); test: shorter side = image_size;
    ImageNet's mean / std. Boxes are tv_tensors.BoundingBoxes, moved by the geometric steps, which run first (uint8)."""
    steps = []
    if train:
        sizes = list(range(min(480, image_size), image_size + 1, 32)) if multi_scale else [image_size]
        steps += [v2.RandomHorizontalFlip(0.5), v2.RandomShortestSize(min_size=sizes, max_size=max_size),
                  v2.ColorJitter(brightness=0.4, contrast=0.4)]
    else:
        steps += [v2.Resize(image_size, max_size=max_size if max_size > image_size else None)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    return v2.Compose(steps)


class BadImageWarning(UserWarning):
    """An image that cannot be decoded was dropped from its batch (bad_images="skip")."""


def _decoder_message(e):
    """torchvision's decoder errors start with 'function, source file:line, ': keep the message."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(e))


class DetectionDataset(torch.utils.data.Dataset):
    """Records -> (image (3, H, W) normalised, target): the record's fields as tensors + size, orig_size, image_id
    and, with a teacher, "clip", Eq. 5's target. teacher: None, {clip_image_key(file): (text_dim,) tensor} (CLIP
    image embeddings), or a (C, text_dim) table of class text embeddings: the normalised mean of those of the image's
    object classes (the toy scenes' stand-in). bad_images (None = meta["bad_images"] or "stop"), for an image that
    cannot be decoded: "stop" = a DataError naming file and record; "skip" = None with a BadImageWarning (counted in
    self.skipped), which `collate` leaves out: that batch is one image smaller, the sampler's order stays exact."""

    def __init__(self, records, meta, transforms, teacher=None, bad_images=None):
        self.records, self.transforms, self.teacher = records, transforms, teacher
        self.key = "rels" if meta["task"] == "sgg" else "hois"
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
            raise DataError(f"{message}; --bad_images skip drops such images, tools/check_images.py lists them") \
                from None
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(r["boxes"]).reshape(-1, 4), format="XYXY", canvas_size=(h, w))
        image, boxes = self.transforms(tv_tensors.Image(image), boxes)
        # a geometric transform may shrink boxes to nothing: drop them and keep the relation indices right
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)       # (N,)
        pairs = torch.as_tensor(_drop_boxes(keep.numpy(), np.asarray(r[self.key]).reshape(-1, 3)))  # (P', 3)
        labels = torch.as_tensor(r["labels"])[keep]
        target = {"boxes": boxes[keep].as_subclass(torch.Tensor).float(), "labels": labels, self.key: pairs,
                  "size": torch.tensor(image.shape[-2:]), "orig_size": torch.tensor([h, w]), "image_id": r["image_id"]}
        if isinstance(self.teacher, dict):
            target["clip"] = self.teacher.get(clip_image_key(r["file"]))
        elif self.teacher is not None and len(labels):
            target["clip"] = F.normalize(self.teacher[labels].mean(0), dim=0)
        return image.as_subclass(torch.Tensor), target


def collate(batch):
    """Pad images to the batch's largest height and width (bottom / right) with a padding mask (DETR); None items
    (unreadable images under bad_images="skip") are left out: the batch is that much smaller."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise DataError(f"all {len(batch)} images of a batch are unreadable (see the BadImageWarning lines above); "
                        f"tools/check_images.py lists every bad image")
    images, targets = zip(*kept)
    H, W = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), 3, H, W)                     # (B, 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)              # (B, H, W), True = padding
    for i, im in enumerate(images):
        h, w = im.shape[1:]
        out[i, :, :h, :w] = im
        mask[i, :h, :w] = False
    return out, mask, list(targets)


def load_dataset(kind, root, split, check_images=True, bad_images="stop"):
    """kind: vg | hico | vcoco -> (records, meta). SGB's VG150 .h5 files: convert them once, tools/vg_h5_to_json.py."""
    loaders = {"vg": load_vg_json, "hico": load_hico, "vcoco": load_vcoco}
    if kind not in loaders:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(loaders)}")
    if bad_images not in ("stop", "skip"):
        raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
    return loaders[kind](root, split, check_images=check_images, bad_images=bad_images)


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
DATA_ARGS = dict(toy_root="data/toy", toy_train=3000, toy_train_hoi=1000, toy_test=500, vg="", hoi="",
                 hoi_dataset="hico", bad_images="stop", train_subset=0)


def build_data(cfg: Config, data_args: dict, is_master=True, barrier=lambda: None):
    """{"sgg": {"train": (records, meta), "test": ...}, "hoi": {...}} for cfg's tasks, from DATA_ARGS's keys. Without
    --vg and --hoi, the master process writes the toy scenes once (the others wait at `barrier`); all read them."""
    a = {**DATA_ARGS, **{k: v for k, v in data_args.items() if k in DATA_ARGS}}
    vg_root, hoi_root = a["vg"], a["hoi"]
    if not vg_root and not hoi_root:
        if is_master:
            ensure_toy_datasets(a["toy_root"], num_train=a["toy_train"], num_test=a["toy_test"], size=cfg.image_size,
                                num_train_hoi=a["toy_train_hoi"])
        barrier()
        vg_root, hoi_root = os.path.join(a["toy_root"], "vg"), os.path.join(a["toy_root"], a["hoi_dataset"])
    data = {}
    for task, kind, root, wanted in (("sgg", "vg", vg_root, cfg.sgg), ("hoi", a["hoi_dataset"], hoi_root, cfg.hoi)):
        if not (wanted and root):
            continue
        data[task] = {}
        for split in ("train", "test"):
            records, meta = load_dataset(kind, root, split, bad_images=a["bad_images"])
            meta["bad_images"] = a["bad_images"]
            if split == "train" and a["train_subset"]:  # the first N training images only (rehearsals)
                records = records[:a["train_subset"]]
            data[task][split] = (records, meta)
    if not data:
        raise SystemExit("no training data: give --vg and/or --hoi, or neither for the toy scenes")
    if "sgg" in data and not a["vg"]:  # the toy scenes use VG150's names, not its long tail:
        data["sgg"]["test"][1]["toy"] = True  # eval derives the groups
    return data
