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

import dataclasses
import json
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d

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
    text_dim: int = 512  # CLIP ViT-B/32 embedding width (Sec. IV-D)
    # vocabularies (set from the datasets; defaults = VG150 and HICO-DET)
    num_entity_classes: int = 150  # N_o for the relation decoder (VG150 objects)
    num_predicates: int = 50  # N_r
    num_hoi_objects: int = 80  # HOI object classes (COCO-80; 81 for V-COCO with "no object")
    num_verbs: int = 117  # HICO-DET verbs (29 for V-COCO)
    entity_names: list = field(default_factory=list)  # names of the relation decoder's classes
    predicate_names: list = field(default_factory=list)
    hoi_object_names: list = field(default_factory=list)
    verb_names: list = field(default_factory=list)
    text_embeddings: str = ""  # .pt file {name: (text_dim,) tensor}; "" = seeded stand-in (see ClassText)
    word_vectors: str = ""  # GloVe-format .txt for semantic_embedding="glove" (HSSG)
    # ablations (Tables V-VIII); the paper's full model is the default
    tasks: str = "both"  # both | sgg (Table V "SGG") | hoi (Table V "HOI")
    use_bbseg: bool = True  # False = "-HSS" (Table VI)
    semantic_embedding: str = "clip"  # clip | discrete ("HSSD") | glove ("HSSG") (Table VI)
    use_vl_distill: bool = True  # False = "-VLpool" (Table VII)
    align_feature: str = "cls"  # cls = SG2HOI+cls | pool = SG2HOI+pool (Table VII, Eq. 5)
    align_loss: str = "l1"  # l1 | l2 ("VLl2", Table VII)
    classifier_init: str = "random"  # random | text (CLIP text embeddings as classifier weights, Sec. III-B)
    use_feature_transform: bool = True  # False = "-FETR" (Table VIII)
    use_query_transform: bool = True  # False = "-QUTR" (Table VIII)
    use_r2i: bool = True  # False = "-R2ITR" (Table VIII)
    hoi_queries_from_rel: bool = False  # True = "RELQ": relation queries are the HOI queries (Table VIII)
    # matching and losses
    cost_box: float = 1.0  # alpha_1 in Eq. 9 (L1 + GIoU)
    cost_class: float = 2.0  # alpha_2 (subject/object labels)
    cost_rel: float = 4.0  # alpha_3 (predicate / verbs)
    loss_seg: float = 2.0  # lambda_1 in Eq. 10
    loss_align: float = 4.0  # lambda_2 in Eq. 10
    eos_coef: float = 0.1  # weight of the "no object" / "no relation" class (DETR)
    unmatched_loss: bool = True  # False = the paper's literal "no loss for unmatched queries" (see SetCriterion)
    aux_loss: bool = True  # deep supervision on every decoder layer
    # optimisation (used by train.py; saved with checkpoints)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_text_classifier: float = 1e-5
    lr_sgg_phase2: float = 1e-5  # SGG part's learning rate once the HOI part joins (Sec. IV-D)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    batch_size: int = 8
    sgg_epochs: int = 20  # phase 1: SGG alone
    joint_epochs: int = 20  # phase 2: SGG and HOI alternate
    image_size: int = 800  # shorter side at test time (multi-scale 480..800 at training)
    max_size: int = 1333

    def __post_init__(self):
        if self.backbone not in ("resnet50", "resnet101", "tiny"):
            raise ValueError(f"Config.backbone: unknown backbone {self.backbone!r} (resnet50 | resnet101 | tiny)")
        choices = dict(tasks=("both", "sgg", "hoi"), semantic_embedding=("clip", "discrete", "glove"),
                       align_feature=("cls", "pool"), align_loss=("l1", "l2"), classifier_init=("random", "text"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.d_model % self.nheads or self.d_model % 2:
            raise ValueError(f"Config.d_model={self.d_model} must be even and divisible by nheads={self.nheads}")
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


PRESETS = {
    # The paper's model (Sec. IV-D).
    "paper": dict(),
    # A model a 2-core CPU trains in minutes on the toy scenes (128 px images).
    "toy": dict(backbone="tiny", d_model=64, nheads=4, dim_feedforward=256, dropout=0.0, enc_layers=2,
                rel_dec_layers=2, r2i_layers=1, feat_trans_layers=1, query_trans_layers=1, hoi_dec_layers=2,
                num_rel_queries=16, num_hoi_queries=16, seg_hidden=32, text_dim=64, batch_size=16,
                lr=4e-4, lr_backbone=4e-4, lr_text_classifier=4e-4, lr_sgg_phase2=1e-4, clip_max_norm=0.1,
                sgg_epochs=3, joint_epochs=6, image_size=128, max_size=128),
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
    table = torch.load(path, weights_only=True)
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(f"{path}: no text embedding for class name(s) {missing[:5]}")
    emb = torch.stack([table[n].float().flatten() for n in names])
    if emb.shape[1] != dim:
        raise ValueError(f"{path}: embeddings have width {emb.shape[1]}, Config.text_dim is {dim}")
    return F.normalize(emb, dim=-1)


def load_word_vectors(path, names, dim) -> torch.Tensor:
    """GloVe-format text file (word v1 ... vD per line) -> (len(names), dim); multi-word names are averaged."""
    if not path:
        raise ValueError("Config.word_vectors: semantic_embedding='glove' (HSSG) needs a GloVe .txt file")
    wanted = {w for n in names for w in n.replace("_", " ").split()}
    vectors = {}
    with open(path, encoding="utf8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if parts[0] in wanted:
                if len(parts) - 1 != dim:
                    raise ValueError(f"{path}:{line_no}: word {parts[0]!r} has {len(parts) - 1} values, "
                                     f"Config.text_dim is {dim}")
                vectors[parts[0]] = torch.tensor([float(x) for x in parts[1:]])
    out = []
    for n in names:
        words = n.replace("_", " ").split()
        missing = [w for w in words if w not in vectors]
        if missing:
            raise KeyError(f"{path}: no word vector for {missing} (class {n!r})")
        out.append(F.normalize(torch.stack([vectors[w] for w in words]).mean(0), dim=0))
    return torch.stack(out)


def build_clip_embeddings(names, out_path, model_name="ViT-B-32", pretrained="openai"):
    """Optional helper: CLIP text embeddings of "A photo of a [name]" saved as {name: tensor}.

    Needs the `open_clip` package and its weights (not in requirements; never called by default)."""
    import open_clip  # lazy: an optional extra

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        emb = model.encode_text(tokenizer([f"A photo of a {n.replace('_', ' ')}" for n in names])).float()
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


# ------------------------------------------------------------------------------------------------ Backbone + position encoding


class TinyBackbone(nn.Module):
    """A 4-layer CNN of stride 8 for the toy preset: 128 px images give a 16 x 16 feature map."""

    def __init__(self, channels=128):
        super().__init__()
        chans = [3, 32, 64, channels]
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
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
    """FCN_seg of Eq. 1: five 3x3 conv + BN + ReLU layers and a 1x1 classifier over N_o + 1 classes."""

    def __init__(self, in_channels, hidden, num_classes_with_bg):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(5):
            layers += [nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
            c = hidden
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(hidden, num_classes_with_bg, 1)
        nn.init.constant_(self.classifier.bias, PRIOR_BIAS)  # most classes are absent at most pixels

    def forward(self, v):  # (B, C', H, W) -> (B, N_o + 1, H, W)
        return self.classifier(self.convs(v))


def bbseg_targets(boxes_list, labels_list, feat_hw, stride, num_classes_with_bg):
    """Box-filled multi-label targets y of Eq. 2 at the feature resolution.

    Every pixel inside a ground-truth box is labelled with that box's class (channel 1 + class); a pixel
    covered by several boxes has several labels; uncovered pixels are background (channel 0). The paper
    labels image pixels and downsamples y to the size of s; taking the cell centres of the feature grid
    is that downsampling (nearest). A box smaller than one cell still marks the cell holding its centre,
    so small objects do not vanish. boxes: xyxy pixels of the padded batch canvas; labels: 0-based.
    Returns (B, N_o + 1, H, W) float."""
    H, W = feat_hw
    B = len(boxes_list)
    y = torch.zeros(B, num_classes_with_bg, H, W)
    cy = (torch.arange(H, dtype=torch.float32) + 0.5) * stride  # cell centres in pixels
    cx = (torch.arange(W, dtype=torch.float32) + 0.5) * stride
    for b, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            inside = ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
            if not inside.any():
                inside[min(int((y1 + y2) / 2 // stride), H - 1), min(int((x1 + x2) / 2 // stride), W - 1)] = True
            y[b, 1 + label][inside] = 1.0
        y[b, 0] = (y[b, 1:].sum(0) == 0).float()
    return y


def loss_bbseg(seg_logits, seg_targets, feat_mask):
    """Eq. 2: sum over the N_o + 1 channels of the BCE averaged over the un-padded positions, mean over images."""
    bce = F.binary_cross_entropy_with_logits(seg_logits, seg_targets.to(seg_logits), reduction="none")
    valid = (~feat_mask).unsqueeze(1).float()  # (B, 1, H, W)
    per_image = (bce * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)
    return per_image.mean()


# ------------------------------------------------------------------------------------------------ The model (III-A to III-C)


class SG2HOI(nn.Module):
    """The whole model of Fig. 1: BBSeg -> encoder with [CLS] -> relation decoder -> R2ITrans -> HOI decoder."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = build_backbone(cfg)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, 1)  # V -> C' = d channels (DETR's 1x1 conv)

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
            self.bbseg = BBSeg(d, cfg.seg_hidden, num_seg)
            if cfg.semantic_embedding == "clip":
                table = class_text_embeddings(self.seg_names, cfg.text_dim, cfg.text_embeddings)
            elif cfg.semantic_embedding == "glove":
                table = load_word_vectors(cfg.word_vectors, self.seg_names, cfg.text_dim)
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
        self.rel_sub_box = MLP(d, d, 4, 3)
        self.rel_obj_box = MLP(d, d, 4, 3)

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
            self.hoi_human_box = MLP(d, d, 4, 3)
            self.hoi_obj_box = MLP(d, d, 4, 3)

        for name, p in self.named_parameters():  # DETR's init for the transformer
            if p.dim() > 1 and any(s in name for s in ("encoder", "decoder", "r2i", "_transform")) \
                    and "in_proj" not in name:
                nn.init.xavier_uniform_(p)

    # -------------------------------------------------------------------- forward
    def forward(self, images, mask):
        """images (B, 3, H, W) normalised; mask (B, H, W) True on padding. Returns a dict of outputs."""
        cfg, out = self.cfg, {}
        feat = self.backbone(images)  # (B, C, h, w)
        fmask = F.interpolate(mask[None].float(), size=feat.shape[-2:])[0].bool()  # (B, h, w)
        pos = sine_position_encoding(fmask, cfg.d_model).flatten(1, 2)  # (B, h*w, d)
        v = self.input_proj(feat)  # V: (B, d, h, w)
        out["feat_mask"], out["canvas_hw"] = fmask, images.shape[-2:]

        # Eq. 1 and 3: box-level segmentation, semantic map, aggregation
        if cfg.use_bbseg:
            seg_logits = self.bbseg(v)  # s: (B, N_o + 1, h, w)
            e_s = self.semantic_table[seg_logits.argmax(1)]  # E_s: (B, h, w, E); background -> 0
            f_agg = torch.cat([self.w_v(v), self.w_s(e_s.permute(0, 3, 1, 2))], dim=1)  # (B, d, h, w)
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
                          sub_boxes=self.rel_sub_box(f_sg).sigmoid(), obj_boxes=self.rel_obj_box(f_sg).sigmoid())

        if cfg.hoi:
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
            if cfg.hoi_queries_from_rel:  # RELQ
                q_hoi = f_sg[-1]
            else:
                q_hoi = self.hoi_query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, N_hoi, d)
                if cfg.use_query_transform:
                    # keys/values: the decoded relation queries of this image (the relation cues to transfer)
                    for layer in self.query_transform:
                        q_hoi = layer(q_hoi, torch.zeros_like(q_hoi), f_sg[-1], q_rel)
            # Eq. 8: h_hoi = HOIDecoder(F_hoi, Q_hoi) and its five branches
            h_hoi = self.hoi_decoder(q_hoi, memory, mem_pos, mem_mask)  # (L, B, N_hoi, d)
            obj_logits, _ = self.hoi_obj(h_hoi)
            verb_logits, _ = self.hoi_verb(h_hoi)
            out["hoi"] = dict(human_logits=self.hoi_human(h_hoi), obj_logits=obj_logits, verb_logits=verb_logits,
                              human_boxes=self.hoi_human_box(h_hoi).sigmoid(),
                              obj_boxes=self.hoi_obj_box(h_hoi).sigmoid())
        return out

    def idle_parameters(self, task):
        """Parameters that receive no gradient from a batch of `task` ("sgg" or "hoi").

        train.py sets their .grad to None after the (DDP-synchronised) backward, so AdamW neither moves nor
        decays them during the other task's steps."""
        if task == "sgg":
            prefixes = ("w_t.", "r2i.", "feature_transform.", "query_transform.", "hoi_")
        else:
            prefixes = ("rel_sub_box.", "rel_obj_box.", "rel_sub.classifier.", "rel_obj.classifier.",
                        "rel_pred.classifier.")
        return [p for n, p in self.named_parameters() if n.startswith(prefixes)]

    def parameter_groups(self):
        """Names -> group: backbone, text_classifier, sgg (III-A, III-B), hoi (III-C); for the optimiser."""
        groups = {"backbone": [], "text_classifier": [], "sgg": [], "hoi": []}
        hoi_prefixes = ("w_t.", "r2i.", "feature_transform.", "query_transform.", "hoi_")
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["backbone"].append(p)
            elif isinstance(self.get_submodule(name.rsplit(".", 1)[0]), TextClassifier):
                groups["text_classifier"].append(p)
            elif name.startswith(hoi_prefixes):
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
    """(P, 4), (T, 4) -> L1 cost (P, T) and GIoU (P, T); the "box cost" of Eq. 9 is L1 - GIoU."""
    l1 = torch.cdist(pred_cxcywh, tgt_cxcywh, p=1)
    giou = generalized_box_iou(box_convert(pred_cxcywh, "cxcywh", "xyxy"), box_convert(tgt_cxcywh, "cxcywh", "xyxy"))
    return l1, giou


def _assign(cost, sizes):
    """cost (B, Q, sum(sizes)) -> per image (query indices, target indices) of the minimum-cost matching."""
    out = []
    for b, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[b].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


class HungarianMatcher:
    """Eq. 9: L_cost = alpha_1 L_box + alpha_2 L_cls + alpha_3 L_cls^r, solved by linear_sum_assignment.

    What the paper leaves open, and what we chose:
      * the box cost "encompasses a box regression loss L1 and an IoU loss" (following QPIC): we use
        L1 (on normalised cxcywh) - GIoU, each with weight 1 inside alpha_1;
      * the star means "subject or object": we add the subject and the object terms (RelTR), so that a
        5-tuple pays for both of its boxes; for HOIs the human takes the subject's place;
      * classification costs are -p(class), as DETR (the log of CE is dropped in the cost; monotone);
      * the multi-label verb cost of an HOI is QPIC's: -(mean p on the positive verbs + mean (1 - p) on the
        negative verbs) / 2.
    The costs are built for the whole batch in one pass and split per image (DETR)."""

    def __init__(self, cost_box=1.0, cost_class=2.0, cost_rel=4.0):
        self.a1, self.a2, self.a3 = cost_box, cost_class, cost_rel

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
        c_box = l1_s + l1_o - giou_s - giou_o  # (B*Q, T)
        c_cls = -(p_sub[:, cat["sub_labels"]] + p_obj[:, cat["obj_labels"]])
        c_rel = -p_rel[:, cat["preds"]]
        cost = self.a1 * c_box + self.a2 * c_cls + self.a3 * c_rel
        return _assign(cost.view(B, Q, -1).cpu(), sizes)

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
        c_box = l1_h - giou_h + (l1_o - giou_o) * has_obj
        c_cls = -(p_human[:, None] + p_obj[:, cat["obj_labels"]])
        y = cat["verbs"]  # (T, V)
        c_verb = -0.5 * (p_verb @ y.t() / (y.sum(1)[None] + 1e-4)
                         + (1 - p_verb) @ (1 - y).t() / ((1 - y).sum(1)[None] + 1e-4))
        cost = self.a1 * c_box + self.a2 * c_cls + self.a3 * c_verb
        return _assign(cost.view(B, Q, -1).cpu(), sizes)


def _num_targets(n, device):
    """The loss normaliser: targets in the whole (distributed) batch per process, at least 1 (DETR)."""
    n = torch.tensor(float(n), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Eq. 10: L = lambda_1 L_seg + lambda_2 L_algn + L_rel + L_hoi, with deep supervision.

    L_rel (and likewise L_hoi) is the matched cost of Eq. 9 written as losses: alpha_1 (L1 + GIoU loss)
    on both boxes + alpha_2 CE on both labels + alpha_3 on the predicate (CE) or the verbs (focal).
    Unmatched queries: the paper says it computes no loss for them; then nothing ever teaches a query to
    say "no relation", all 100 queries stay confident and the ranking at test time is noise. We therefore
    follow DETR by default: unmatched queries are trained towards the no-object / no-relation class with
    weight eos_coef = 0.1 (and towards all-zero verbs). unmatched_loss=False gives the paper's literal rule."""

    def __init__(self, cfg: Config, entity_to_seg, hoi_object_to_seg, num_seg_classes):
        super().__init__()
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.cost_box, cfg.cost_class, cfg.cost_rel)
        self.register_buffer("entity_to_seg", entity_to_seg.clone())
        self.register_buffer("hoi_object_to_seg", hoi_object_to_seg.clone())
        self.num_seg_classes = num_seg_classes

    def _ce(self, logits, matched_labels, idx, background_weight_index=-1):
        """CE over all queries, unmatched -> the last class with weight eos_coef (or matched queries only)."""
        B, Q, C = logits.shape
        target = torch.full((B, Q), C - 1, dtype=torch.long, device=logits.device)
        target[idx] = matched_labels
        if not self.cfg.unmatched_loss:
            return F.cross_entropy(logits[idx].float(), matched_labels) if len(matched_labels) else logits.sum() * 0
        weight = torch.ones(C, device=logits.device)
        weight[background_weight_index] = self.cfg.eos_coef
        return F.cross_entropy(logits.float().transpose(1, 2), target, weight=weight)

    def _box_losses(self, pred, tgt, num, keep=None):
        if keep is not None:
            pred, tgt = pred[keep], tgt[keep]
        l1 = F.l1_loss(pred.float(), tgt, reduction="sum") / num
        giou = generalized_box_iou_loss(box_convert(pred.float(), "cxcywh", "xyxy"),
                                        box_convert(tgt, "cxcywh", "xyxy"), reduction="sum") / num
        return l1 + giou

    def relation_losses(self, out, tgts):
        """L_rel for one decoder layer: dict of weighted terms."""
        indices = self.matcher.match_relations(out, tgts)
        idx = (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
               torch.cat([q for q, _ in indices]))
        matched = {k: torch.cat([t[k][j] for t, (_, j) in zip(tgts, indices)]) for k in tgts[0]}
        num = _num_targets(len(idx[0]), out["sub_logits"].device)
        cfg = self.cfg
        return {
            "rel_box": cfg.cost_box * (self._box_losses(out["sub_boxes"][idx], matched["sub_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num)),
            "rel_cls": cfg.cost_class * (self._ce(out["sub_logits"], matched["sub_labels"], idx)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx)),
            "rel_pred": cfg.cost_rel * self._ce(out["pred_logits"], matched["preds"], idx),
        }

    def hoi_losses(self, out, tgts):
        """L_hoi for one decoder layer: dict of weighted terms."""
        indices = self.matcher.match_hois(out, tgts)
        idx = (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
               torch.cat([q for q, _ in indices]))
        matched = {k: torch.cat([t[k][j] for t, (_, j) in zip(tgts, indices)]) for k in tgts[0]}
        device, cfg = out["human_logits"].device, self.cfg
        num = _num_targets(len(idx[0]), device)
        num_obj = _num_targets(int(matched["has_obj"].sum()), device)
        # verbs: focal loss (gamma 2, no alpha: QPIC's CornerNet-style form) normalised by positive labels
        if cfg.unmatched_loss:
            verb_target = torch.zeros_like(out["verb_logits"], dtype=torch.float)
            verb_target[idx] = matched["verbs"]
            verb_logits = out["verb_logits"].float()
        else:
            verb_target, verb_logits = matched["verbs"], out["verb_logits"][idx].float()
        num_pos = _num_targets(float(verb_target.sum()), device)
        verb = sigmoid_focal_loss(verb_logits, verb_target, alpha=-1, gamma=2.0, reduction="sum") / num_pos
        return {
            "hoi_box": cfg.cost_box * (self._box_losses(out["human_boxes"][idx], matched["human_boxes"], num)
                                       + self._box_losses(out["obj_boxes"][idx], matched["obj_boxes"], num_obj,
                                                          keep=matched["has_obj"])),
            "hoi_cls": cfg.cost_class * (self._ce(out["human_logits"], torch.zeros_like(matched["obj_labels"]), idx)
                                         + self._ce(out["obj_logits"], matched["obj_labels"], idx)),
            "hoi_verb": cfg.cost_rel * verb,
        }

    def forward(self, outputs, targets, task):
        """outputs: SG2HOI.forward(); targets: one dict per image; task: "sgg" or "hoi".

        Returns {term: value} with every term already weighted, and "loss" = their sum (Eq. 10)."""
        cfg, losses = self.cfg, {}
        device = outputs["feat_mask"].device
        for t in targets:
            _check_target_boxes(t)
        if cfg.use_bbseg:
            to_seg = self.entity_to_seg if task == "sgg" else self.hoi_object_to_seg
            fm = outputs["feat_mask"]
            stride = outputs["canvas_hw"][0] / fm.shape[1]
            y = bbseg_targets([t["boxes"].float().cpu() for t in targets],
                              [to_seg[t["labels"].long()].cpu() for t in targets],
                              fm.shape[1:], stride, self.num_seg_classes).to(device)
            losses["seg"] = cfg.loss_seg * loss_bbseg(outputs["seg_logits"], y, fm)
        if cfg.use_vl_distill:
            has = [i for i, t in enumerate(targets) if t.get("clip") is not None]
            if has:
                teacher = torch.stack([targets[i]["clip"].float() for i in has]).to(device)
                student = outputs["align"][has].float()
                dist = F.l1_loss if cfg.align_loss == "l1" else F.mse_loss  # Eq. 5
                losses["align"] = cfg.loss_align * dist(student, teacher)
        if task == "sgg":
            tgts = [{k: v.to(device) for k, v in relation_targets(t).items()} for t in targets]
            layer_fn, head = self.relation_losses, outputs["rel"]
        else:
            tgts = [{k: v.to(device) for k, v in
                     hoi_targets(t, cfg.num_verbs, cfg.num_hoi_objects - 1).items()} for t in targets]
            layer_fn, head = self.hoi_losses, outputs["hoi"]
        num_layers = next(iter(head.values())).shape[0]
        for layer in range(num_layers):  # deep supervision: every layer is matched again (DETR)
            if layer < num_layers - 1 and not cfg.aux_loss:
                continue
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for k, v in layer_fn({k: v[layer] for k, v in head.items()}, tgts).items():
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
    return SetCriterion(model.cfg, model.entity_to_seg, model.hoi_object_to_seg, len(model.seg_names) + 1)


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
# DETR's class_embed (92 COCO ids) does not fit VG150 and is left out. DETR's MultiheadAttention keeps
# its out_proj name; its FFN is linear1/linear2 where ours is ffn.linear1/ffn.linear2.


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


def load_detr_weights(model: SG2HOI, state_dict_or_path, verbose=True):
    """Copy DETR's COCO weights into `model` where names and shapes fit; returns (loaded, skipped)."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
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
    skipped += [f"{k}: no place in SG2HOI+" for k in sd if k not in used]
    model.load_state_dict(own)
    if verbose:
        print(f"DETR init: loaded {len(loaded)} tensors, skipped {len(skipped)}")
        for s in skipped:
            print("  skipped", s)
    return loaded, skipped
