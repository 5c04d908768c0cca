"""eval.py: the metrics SG2HOI+ reports (Sec. IV-C), computed as the field's reference evaluators do.

Three pure metric functions (numpy in, dict out), written image by image as metrics.md states them, each with
its rules (and the references' quirks, kept on purpose) in its docstring:
  sgdet_metrics  - VG150 SGDet R@K, mR@K, no graph constraint, zero-shot, head/body/tail (SGB sgg_eval.py, SGTR)
  hico_map       - HICO-DET mAP Full / Rare / Non-rare, Default (QPIC hico_eval.py) and Known-Object (eval_one.m)
  vcoco_role_ap  - V-COCO agent AP and role AP, Scenarios 1 and 2 (s-gupta/v-coco vsrl_eval.py)
Then inference, the paper's tables, saved predictions, pictures, your own images, the command line:

    python eval.py --ckpt runs/toy/ckpt.pt                       # Tables I-IV on the checkpoint's test splits
    torchrun --nproc_per_node=N eval.py --ckpt ...               # the same, each process evaluating its share
    python eval.py --ckpt runs/toy/ckpt.pt --image a.jpg pics/   # your own images: pictures, scene graph, JSON
(tools/figures.py draws Figures 2-4 for test images; tools/bootstrap.py compares --save-predictions files.)
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import datetime
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import sg2hoi

IOU_THRESHOLD = 0.5  # every benchmark, tested as >= 0.5


# ------------------------------------------------------------------------------------------------ IoU and input checks
def iou_matrix(a, b):
    """(N, 4), (M, 4) xyxy -> (N, M) IoU with the inclusive-pixel convention of every reference evaluator:
    w = min(x2) - max(x1) + 1, area = (x2 - x1 + 1)(y2 - y1 + 1), in float32 (SGB's BoxList is float32)."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a NaN box (V-COCO's missing object) gives NaN
        return inter / (area_a[:, None] + area_b[None, :] - inter)


def qpic_iou_matrix(a, b):
    """QPIC's compute_IOU: as iou_matrix, but 0 whenever the boxes do not overlap by more than zero pixels
    *without* the +1 (its test `max(x1) >= min(x2)`), which zeroes boxes overlapping by at most one pixel."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    apart_x = np.maximum(a[:, None, 0], b[None, :, 0]) >= np.minimum(a[:, None, 2], b[None, :, 2])
    apart_y = np.maximum(a[:, None, 1], b[None, :, 1]) >= np.minimum(a[:, None, 3], b[None, :, 3])
    return np.where(apart_x | apart_y, 0.0, iou_matrix(a, b)).astype(np.float32)


def _check_inputs(metric, gts, preds, gt_fields, pred_forms):
    """Clear errors for wrong inputs: equal lengths, the fields of each side (pred_forms: raw or compact)."""
    if len(gts) != len(preds):
        raise ValueError(f"{metric}: {len(gts)} ground-truth images but {len(preds)} predictions "
                         "(one prediction per test image, in the same order)")
    for i, (g, p) in enumerate(zip(gts, preds)):
        if not g.keys() >= set(gt_fields):
            raise ValueError(f"{metric}: ground truth of image {i} lacks {[f for f in gt_fields if f not in g]}")
        if not any(p.keys() >= set(form) for form in pred_forms):
            best = min(pred_forms, key=lambda form: sum(f not in p for f in form))
            raise ValueError(f"{metric}: prediction of image {i} lacks {[f for f in best if f not in p]} "
                             f"(has {sorted(p)})")


def _mean(values):
    """Plain mean as a float; 0.0 for an empty list (a group or split without any entry)."""
    return float(np.mean(values)) if len(values) else 0.0


# ------------------------------------------------------------------------------------------------ VG150 SGDet
SGDET_PRED_FIELDS = ("boxes", "labels", "scores", "rel_pairs", "rel_scores")
SGDET_COMPACT_FIELDS = ("gc", "ng")  # sgdet_candidates' form, which distributed evaluation and files keep


def sgdet_candidates(preds, num_predicates, max_ng=100):
    """Raw SGDet predictions -> per image {"gc": one triplet per pair, in the given order, "ng": the top max_ng
    no-graph-constraint candidates} (sgdet_metrics' first two rules), each a dict of sub_boxes (K, 4) float32,
    obj_boxes, sub_labels, obj_labels, predicates (1..C), scores. A compact prediction is passed through."""
    C, out = num_predicates, []
    for p in preds:
        if "gc" in p:
            out.append(p)
            continue
        pairs = np.asarray(p["rel_pairs"]).reshape(-1, 2)
        rel = np.asarray(p["rel_scores"], np.float32)
        if rel.shape != (len(pairs), C + 1):
            raise ValueError(f"sgdet_metrics: rel_scores of shape {rel.shape}, expected (pairs, 1 + num_predicates)")
        boxes, labels = np.asarray(p["boxes"], np.float32).reshape(-1, 4), np.asarray(p["labels"])
        obj_scores = np.asarray(p["scores"], np.float32)
        pair_scores = obj_scores[pairs[:, 0]] * obj_scores[pairs[:, 1]]  # (Q,) float32, s_sub * s_obj
        gc_pred = 1 + rel[:, 1:].argmax(1)  # (Q,) column 0 (no relation) excluded, the first max wins
        overall = (pair_scores[:, None] * rel[:, 1:]).ravel()  # (Q * C,) pair-major, (s_sub * s_obj) * p
        top = np.argsort(-overall)[:max_ng]  # numpy's default (unstable) sort: SGB's exact tie order
        gc_scores = pair_scores * rel[np.arange(len(pairs)), gc_pred]
        out.append(dict(gc=_triplets(boxes, labels, pairs, gc_pred, gc_scores),
                        ng=_triplets(boxes, labels, pairs[top // C], top % C + 1, overall[top])))
    return out


def _triplets(boxes, labels, pairs, predicates, scores):
    """Candidate triplets as the matching reads them: pairs (K, 2) index boxes (N, 4) and labels (N,)."""
    s, o = pairs[:, 0], pairs[:, 1]
    return dict(sub_boxes=boxes[s], obj_boxes=boxes[o], sub_labels=labels[s], obj_labels=labels[o],
                predicates=predicates, scores=scores)


def sgdet_metrics(gts, preds, num_predicates, ks=(20, 50, 100), zeroshot_triplets=None, longtail=None):
    """VG150 SGDet recall metrics as fractions, as Scene-Graph-Benchmark (SGB) and SGTR compute them.

    gts[i]   = {"boxes": (N, 4) xyxy pixels, "labels": (N,), "rels": (R, 3) [subject, object, predicate 1..C]}
    preds[i] = {"boxes": (M, 4), "labels": (M,), "scores": (M,), "rel_pairs": (Q, 2) into boxes, best first,
                "rel_scores": (Q, C + 1), column 0 = no relation}, or sgdet_candidates' compact form.
    zeroshot_triplets: rows (subject label, object label, predicate); longtail: {"head": [...], ...} predicate ids.

    Rules (metrics.md section 3):
      * graph constraint: one triplet per pair, predicate 1 + argmax(rel_scores[:, 1:]) (first max wins), pairs
        in the order given (the evaluator does not re-sort);
      * no graph constraint: every (pair, predicate >= 1) scored (s_sub * s_obj) * p in float32, ranked with
        np.argsort(-scores.ravel()), the first 100 kept; ngR@K uses prefixes of them;
      * a hit needs all three labels equal and subject and object IoU >= 0.5 (+1 convention); a GT relation hit
        by many predictions counts once; one prediction may hit several GT relations (duplicates);
      * R@K per image = |GT hit by the first K| / |GT|, mean over images; images without GT relations, and
        images with GT but no predicted pair, are skipped (SGB's early return);
      * mR@K: per predicate, the mean over the images containing it of (hits / count) in that image; then the
        mean over all num_predicates (absent predicates count 0);
      * zR@K: over GT relations whose (subject label, object label, predicate) is zero-shot, the mean over the
        images that have at least one;
      * head/body/tail: the per-predicate recalls behind mR@K averaged inside each group (SGTR)."""
    _check_inputs("sgdet_metrics", gts, preds, ("boxes", "labels", "rels"), (SGDET_PRED_FIELDS, SGDET_COMPACT_FIELDS))
    cands = sgdet_candidates(preds, num_predicates)
    zeroshot = set() if zeroshot_triplets is None else _triplet_set(zeroshot_triplets)
    recall, zrecall, per_predicate = {}, {}, {}  # (mode, K) -> per-image values; (mode, K, predicate) -> likewise
    for g, image_cands in zip(gts, cands):
        rels = np.asarray(g["rels"]).reshape(-1, 3)
        if len(rels) == 0 or len(image_cands["gc"]["predicates"]) == 0:
            continue  # SGB skips the image
        gt_boxes, labels = np.asarray(g["boxes"], np.float32).reshape(-1, 4), np.asarray(g["labels"])
        gt_trip = np.stack([labels[rels[:, 0]], rels[:, 2], labels[rels[:, 1]]], 1)  # (R, 3) sub, pred, obj
        is_zeroshot = np.array([(labels[s], labels[o], p) in zeroshot for s, o, p in rels.tolist()], bool)
        present, which, count = np.unique(rels[:, 2], return_inverse=True, return_counts=True)  # its predicates
        for mode, key in (("", "gc"), ("ng", "ng")):
            cand = image_cands[key]
            cand_trip = np.stack([cand["sub_labels"], cand["predicates"], cand["obj_labels"]], 1).reshape(-1, 3)
            hit = (cand_trip[:, None, :] == gt_trip[None, :, :]).all(2)  # (P, R) same three labels
            hit &= iou_matrix(cand["sub_boxes"], gt_boxes[rels[:, 0]]) >= IOU_THRESHOLD
            hit &= iou_matrix(cand["obj_boxes"], gt_boxes[rels[:, 1]]) >= IOU_THRESHOLD
            first_hit = np.where(hit.any(0), hit.argmax(0), np.inf)  # (R,) rank of the first candidate hitting it
            for k in ks:
                hit = first_hit < k
                recall.setdefault((mode, k), []).append(hit.mean())
                hits = np.bincount(which, weights=hit, minlength=len(present))  # hits of each present predicate
                for p, value in zip(present.tolist(), (hits / count).tolist()):
                    per_predicate.setdefault((mode, k, p), []).append(value)
                if is_zeroshot.any():
                    zrecall.setdefault((mode, k), []).append(hit[is_zeroshot].mean())
    out = {}
    for mode in ("", "ng"):
        for k in sorted(ks):
            out[f"{mode}R@{k}"] = _mean(recall.get((mode, k), []))
            per = [_mean(per_predicate.get((mode, k, p), [])) for p in range(1, num_predicates + 1)]
            out[f"{mode}mR@{k}"] = float(np.mean(per))
            if zeroshot_triplets is not None:
                out[f"{mode}zR@{k}"] = _mean(zrecall.get((mode, k), []))
            for group, ids in (longtail or {}).items():
                out[f"{mode}mR@{k}_{group}"] = _mean([per[p - 1] for p in ids])
    return out


# ------------------------------------------------------------------------------------------------ HICO-DET
def eleven_point_ap(rec, prec):
    """11-point interpolated AP of QPIC's voc_ap and the official VOCevaldet_bboxpair.m, on np.arange(0., 1.1, 0.1),
    whose 0.3, 0.6 and 0.7 sit just above their decimal value: a recall of exactly 0.3, 0.6 or 0.7 misses them."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap += p / 11.0
    return ap


HICO_PRED_FIELDS = ("boxes", "labels", "sub_ids", "obj_ids", "verb_scores")
HICO_COMPACT_FIELDS = ("sub_boxes", "obj_boxes", "sub_labels", "obj_labels", "verbs", "scores")


def _stable_top(scores, k):
    """Indices of the first k of a *stable* descending sort (QPIC's list.sort(reverse=True)); only the scores at
    least the k-th best are sorted (~100 of ~12,000 per image): the same result, ties included."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    kth = np.partition(-scores, k - 1)[k - 1]  # minus the k-th best score
    if np.isnan(kth):  # fewer than k numbers: NaNs take part, the full sort handles them
        return np.argsort(-scores, kind="stable")[:k]
    contenders = np.flatnonzero(-scores <= kth)  # in index (pair-major) order
    return contenders[np.argsort(-scores[contenders], kind="stable")][:k]


def hico_candidates(preds, correct_mat, max_hois=100):
    """Raw HICO predictions (QPIC's PostProcessHOI) -> per image its top max_hois masked (pair, verb) candidates
    in QPIC's visit order (hico_map's second rule): dicts of sub_boxes (D, 4) float32, obj_boxes, sub_labels,
    obj_labels, verbs, scores (D,) float32. A compact prediction is passed through."""
    correct_mat, out = np.asarray(correct_mat, np.float32), []
    for p in preds:
        if "verb_scores" not in p:
            out.append(p)
            continue
        pair, verb, scores = _hico_top(p, correct_mat, max_hois)
        labels, boxes = np.asarray(p["labels"]), np.asarray(p["boxes"], np.float32).reshape(-1, 4)
        s, o = np.asarray(p["sub_ids"])[pair], np.asarray(p["obj_ids"])[pair]
        out.append(dict(sub_boxes=boxes[s], obj_boxes=boxes[o], sub_labels=labels[s], obj_labels=labels[o],
                        verbs=verb, scores=scores))
    return out


def _hico_top(p, correct_mat, k):
    """One image's raw HICO prediction -> its top k (pair, verb) candidates in QPIC's visit order, as (pair (k,),
    verb (k,), score (k,) float32): verb scores x correct_mat[verb, object label] (masked ones score 0 and stay;
    None: no mask), pair-major, stable. Also the order in which the --image demo lists HOIs."""
    verb_scores = np.asarray(p["verb_scores"], np.float32)  # (P, V)
    labels, obj_ids = np.asarray(p["labels"]), np.asarray(p["obj_ids"])
    scores = verb_scores * correct_mat[:, labels[obj_ids]].T if correct_mat is not None else verb_scores
    top = _stable_top(scores.ravel(), k)  # pair-major p * V + v
    return top // scores.shape[1], top % scores.shape[1], scores.ravel()[top]


def _hico_true_positives(g, cand):
    """(D,) bool for one image's candidates in visit order, QPIC's compute_fptp (hico_map's matching rule; first
    GT on ties, so of duplicate GT rows only the first copy can be matched)."""
    hois = np.asarray(g["hois"]).reshape(-1, 3)
    gt_boxes, gt_labels = np.asarray(g["boxes"], np.float32).reshape(-1, 4), np.asarray(g["labels"])
    sub_labels, obj_labels, verbs = (np.asarray(cand[f]) for f in ("sub_labels", "obj_labels", "verbs"))
    tp = np.zeros(len(verbs), bool)
    if len(hois) == 0 or len(tp) == 0:
        return tp
    s, o = hois[:, 0], hois[:, 1]
    # QPIC's compute_IOU returns 0 for boxes of different labels
    ov_s = np.where(sub_labels[:, None] == gt_labels[s], qpic_iou_matrix(cand["sub_boxes"], gt_boxes[s]), 0)
    ov_o = np.where(obj_labels[:, None] == gt_labels[o], qpic_iou_matrix(cand["obj_boxes"], gt_boxes[o]), 0)
    ok = (ov_s >= IOU_THRESHOLD) & (ov_o >= IOU_THRESHOLD) & (verbs[:, None] == hois[:, 2])  # (D, K)
    best = np.where(ok, np.minimum(ov_s, ov_o), -1.0).argmax(1)  # (D,) first GT on ties (QPIC's strict '>')
    matched = np.zeros(len(hois), bool)
    for d in np.flatnonzero(ok[np.arange(len(tp)), best]):  # the candidates that have a GT to match
        if not matched[best[d]]:
            matched[best[d]] = True
            tp[d] = True
    return tp


def _triplet_set(rows):
    """Rows of three labels (array-like, any length) -> a set of int 3-tuples."""
    return {tuple(int(x) for x in row) for row in np.asarray(rows).reshape(-1, 3)}


def non_rare_triplets(train_counts, threshold=10):
    """QPIC's non-rare set: triplets with at least `threshold` training instances (a test class absent from
    training is neither rare nor non-rare: Full only)."""
    return sorted(t for t, c in train_counts.items() if c >= threshold)


def hico_map(gts, preds, correct_mat, rare_triplets, known_object=False, non_rare_triplets=None, max_hois=100):
    """HICO-DET mAP as hitachi-rd-cv/qpic datasets/hico_eval.py (Default) and ho-rcnn eval_one.m (Known-Object).

    gts[i]   = {"boxes": (N, 4) xyxy, "labels": (N,), "hois": (K, 3) [subject index, object index, verb]}
    preds[i] = {"boxes", "labels", "sub_ids": (P,), "obj_ids": (P,), "verb_scores": (P, V)} (PostProcessHOI)
               or hico_candidates' compact form (correct_mat, (V, O) verb-object validity, already applied).
    rare_triplets, non_rare_triplets: rows (subject label, object label, verb).

    Rules (metrics.md section 1):
      * classes are the (subject label, object label, verb) triplets of the test GT; detections of any other
        triplet are ignored (no FP);
      * per image: scores x correct_mat (masked scores become 0, not removed), candidates pair-major, stable
        descending sort, the first max_hois = 100 kept;
      * images without GT boxes: their predictions are dropped (QPIC's behaviour, which is a bug, kept);
      * a detection matches the GT of its verb with both boxes of the same label and IoU >= 0.5 (QPIC's IoU)
        and the largest min(IoU_sub, IoU_obj); if that GT is already matched it is a false positive; duplicate
        GT rows all count in npos but only the first can be matched;
      * per class: detections of all images concatenated in image order, re-ranked by np.argsort(-score) on
        float32 scores (numpy's default, unstable, sort: as QPIC), 11-point AP; a class with no detection: 0;
      * Rare = classes in rare_triplets, Non-rare = those in non_rare_triplets (QPIC: >= 10 training
        instances; a class absent from training is in neither); without it, every class not rare;
      * known_object: a class's detections are kept only on images whose GT has an HOI with that class's object
        label (the official rule, with the image-level table built from the box GT); npos unchanged.
    Returns fractions: mAP_full, mAP_rare, mAP_non_rare, mean_max_recall, and per_class: each class's triplet,
    npos, AP and rarity."""
    _check_inputs("hico_map", gts, preds, ("boxes", "labels", "hois"), (HICO_PRED_FIELDS, HICO_COMPACT_FIELDS))
    npos, shows = {}, set()  # the test GT's classes (in order of first appearance) -> npos; {(image, object label)}
    for i, g in enumerate(gts):
        labels = np.asarray(g["labels"])
        for s, o, v in np.asarray(g["hois"]).reshape(-1, 3).tolist():
            t = (int(labels[s]), int(labels[o]), int(v))
            npos[t] = npos.get(t, 0) + 1  # every GT row counts
            shows.add((i, t[1]))
    classes = list(npos)
    used = [i for i, g in enumerate(gts) if len(np.asarray(g["boxes"]).reshape(-1, 4))]  # QPIC drops the others
    detections = {t: ([], [], []) for t in classes}  # class -> (image, score, true positive), image and visit order
    for i, cand in zip(used, hico_candidates([preds[i] for i in used], correct_mat, max_hois)):
        tp = _hico_true_positives(gts[i], cand)
        triplets = zip(np.asarray(cand["sub_labels"]).tolist(), np.asarray(cand["obj_labels"]).tolist(),
                       np.asarray(cand["verbs"]).tolist())
        for t, score, hit in zip(triplets, np.asarray(cand["scores"]).tolist(), tp.tolist()):
            if t in detections:  # a triplet that is no GT class is ignored (no FP)
                for column, value in zip(detections[t], (i, score, hit)):
                    column.append(value)
    ap, max_recall = np.zeros(len(classes)), np.zeros(len(classes))
    for c, t in enumerate(classes):
        images, scores, tps = (np.array(column) for column in detections[t])
        if known_object:
            keep = np.array([(i, t[1]) in shows for i in images.tolist()], bool)
            scores, tps = scores[keep], tps[keep]
        if len(scores):  # AP 0 without any detection
            order = np.argsort(-scores.astype(np.float32))
            tp, fp = np.cumsum(tps[order]), np.cumsum(~tps[order])
            rec, prec = tp / npos[t], tp / (tp + fp)
            ap[c], max_recall[c] = eleven_point_ap(rec, prec), rec.max()
    rare = _triplet_set(rare_triplets)
    non_rare = _triplet_set(non_rare_triplets) if non_rare_triplets is not None else set(classes) - rare
    per_class = [{"triplet": list(t), "npos": npos[t], "ap": float(ap[c]), "rare": t in rare}
                 for c, t in enumerate(classes)]  # the classes' APs, in order of first appearance
    return dict(mAP_full=_mean(ap), mAP_rare=_mean([ap[c] for c, t in enumerate(classes) if t in rare]),
                mAP_non_rare=_mean([ap[c] for c, t in enumerate(classes) if t in non_rare]),
                mean_max_recall=_mean(max_recall), num_classes=len(classes), per_class=per_class)


# ------------------------------------------------------------------------------------------------ V-COCO
def _vcoco_ap(record, npos):
    """record: [(true positive, score)] of one action(-role) over all images. Global ranking a_sc.argsort()[::-1]
    on float32 scores, then vsrl_eval.py's all-point VOC AP: end points (0, 0) and (1, 0), precision made
    monotone from the right, sum of recall steps x precision. AP 0 without detections, NaN when npos = 0."""
    if npos == 0:
        return float("nan")
    if len(record) == 0:
        return 0.0
    hits = np.array([hit for hit, _ in record], np.float32)
    order = np.array([score for _, score in record], np.float32).argsort()[::-1]
    tp = np.cumsum(hits[order])
    fp = np.cumsum(1 - hits[order])
    rec = np.concatenate(([0.0], tp / float(npos), [1.0]))
    prec = np.concatenate(([0.0], tp / np.maximum(tp + fp, np.finfo(np.float64).eps), [0.0]))
    for i in range(len(prec) - 1, 0, -1):
        prec[i - 1] = max(prec[i - 1], prec[i])
    i = np.where(rec[1:] != rec[:-1])[0]
    return float(np.sum((rec[i + 1] - rec[i]) * prec[i + 1]))


def vcoco_detections(pred, verbs, actions, correct_mat=None, missing_object_label=80):
    """QPIC's V-COCO post-processing and generate_vcoco_official: one detection per query, in float32. Verb scores
    are masked as in QPIC's and CDN's PostProcessHOI (metrics.md 2.2) by correct_mat[v, object label]: corre_vcoco
    (V, 80) plus a column of ones for "no object" (appended if absent). A role scores its verb's masked score with
    the object box (NaN for "no object"); the agent the role's score, two roles' max or an agent-only verb's own."""
    Q, A = len(pred["sub_ids"]), len(actions)
    names = [a["name"] for a in actions]
    obj_labels = np.asarray(pred["labels"])[pred["obj_ids"]]  # (Q,)
    verb_scores = np.asarray(pred["verb_scores"], np.float32)  # (Q, V)
    if correct_mat is not None:
        mask = np.asarray(correct_mat, np.float32)
        if mask.shape[1] == missing_object_label:  # (V, 80): append the "no object" column of ones (QPIC)
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.float32)], 1)
        verb_scores = verb_scores * mask[:, obj_labels].T  # (Q, V)
    agent = np.full((Q, A), np.nan, np.float32)
    role_scores = np.full((Q, A, 2), np.nan, np.float32)
    role_boxes = np.full((Q, A, 2, 4), np.nan, np.float32)
    obj_boxes = np.asarray(pred["boxes"], np.float32)[pred["obj_ids"]]
    obj_boxes[obj_labels == missing_object_label] = np.nan
    for v, verb in enumerate(verbs):
        a = names.index(verb["action"])
        s = verb_scores[:, v]
        if verb["role"] is None:
            agent[:, a] = s
        else:
            r = actions[a]["roles"].index(verb["role"]) - 1
            role_scores[:, a, r], role_boxes[:, a, r] = s, obj_boxes
            agent[:, a] = np.fmax(agent[:, a], s)  # single role: its score; two roles: their max
    return dict(person_boxes=np.asarray(pred["boxes"], np.float32)[pred["sub_ids"]], agent_scores=agent,
                role_boxes=role_boxes, role_scores=role_scores)


def vcoco_role_ap(gts, preds, actions, person_label=0):
    """V-COCO agent AP and role AP as s-gupta/v-coco vsrl_eval.py (_do_agent_eval, _do_role_eval).

    actions  = [{"name": "hit", "roles": ["agent", "instr", "obj"]}, ...] (26 in the official order)
    gts[i]   = {"boxes": (N, 4), "labels": (N,), "actions": (N, A) in {-1, 0, 1} (-1 = person not annotated),
                "role_ids": (N, A, 2) box index of each non-agent role or -1}; agents are the person boxes
    preds[i] = {"person_boxes": (P, 4), "agent_scores": (P, A), "role_boxes": (P, A, 2, 4), "role_scores": (P, A, 2)}

    Rules (metrics.md section 2): per image, detections with a NaN score are dropped, the rest visited by
    scores.argsort()[::-1]; each is assigned to the GT person of largest IoU (first on ties, even below 0.5);
    an unannotated person makes the detection skipped entirely; TP iff the person does the action, IoU >= 0.5,
    not yet covered, and (roles) the role overlap >= 0.5, where a missing GT role object counts as matched in
    Scenario 2 and only for an all-zero or all-NaN predicted box in Scenario 1; npos = persons doing the action.
    An image with detections but no GT person makes them FPs; an action without any detection has AP 0; an
    action with npos = 0 has AP NaN and is left out of the means (the reference crashes in all three).
    Returns agent_mAP (nansum / #actions, as printed by the official tool), role_mAP_S1/S2 (the numbers papers
    report: the mean over the action-roles without point-instr, 24 on V-COCO, as iCAN and QPIC), the official
    25-role nanmean as role_mAP_S1_all/role_mAP_S2_all, and the per action-role APs."""
    _check_inputs("vcoco_role_ap", gts, preds, ("boxes", "labels", "actions", "role_ids"),
                  (("person_boxes", "agent_scores", "role_boxes", "role_scores"),))
    A = len(actions)
    agent_rec = [[] for _ in range(A)]  # per action: [(true positive, score)]
    role_rec = {(a, r, s): [] for a in range(A) for r in range(len(actions[a]["roles"]) - 1) for s in (1, 2)}
    npos = np.zeros(A, int)
    for gt, pred in zip(gts, preds):
        labels = np.asarray(gt["labels"])
        persons = np.where(labels == person_label)[0]
        gt_boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
        gt_act = np.asarray(gt["actions"]).reshape(len(labels), A)[persons]
        gt_roles = np.asarray(gt["role_ids"]).reshape(len(labels), A, 2)[persons]
        ignore = np.any(gt_act == -1, axis=1)
        npos += (gt_act == 1).sum(0)
        p_boxes = np.asarray(pred["person_boxes"], np.float32).reshape(-1, 4)
        ov_person = iou_matrix(p_boxes, gt_boxes[persons]) if len(persons) else np.zeros((len(p_boxes), 0))
        assigned = ov_person.argmax(1) if len(persons) else None
        agent_scores = np.asarray(pred["agent_scores"], np.float32).reshape(len(p_boxes), A)
        role_scores = np.asarray(pred["role_scores"], np.float32).reshape(len(p_boxes), A, 2)
        role_boxes = np.asarray(pred["role_boxes"], np.float32).reshape(len(p_boxes), A, 2, 4)

        def visit(scores, a, record, role=None, scenario=None):
            valid = np.where(~np.isnan(scores))[0]
            covered = np.zeros(len(persons), bool)
            for j in valid[scores[valid].argsort()[::-1]]:
                if len(persons) == 0:  # no GT person: false positive (the reference crashes)
                    record.append((False, scores[j]))
                    continue
                m = assigned[j]
                if ignore[m]:
                    continue
                ok = gt_act[m, a] == 1 and ov_person[j, m] >= IOU_THRESHOLD and not covered[m]
                if ok and role is not None:
                    rid, box = gt_roles[m, a, role], role_boxes[j, a, role]
                    if rid == -1:
                        empty = np.all(box == 0.0) or np.all(np.isnan(box))
                        ov_role = 1.0 if (scenario == 2 or empty) else 0.0
                    else:
                        ov_role = iou_matrix(box[None], gt_boxes[rid][None])[0, 0]  # NaN box -> NaN -> fails
                    ok = ov_role >= IOU_THRESHOLD
                if ok:
                    covered[m] = True
                record.append((bool(ok), scores[j]))

        for a in range(A):
            visit(agent_scores[:, a], a, agent_rec[a])
            for r in range(len(actions[a]["roles"]) - 1):
                for s in (1, 2):
                    visit(role_scores[:, a, r], a, role_rec[(a, r, s)], role=r, scenario=s)
    agent_ap = np.array([_vcoco_ap(agent_rec[a], npos[a]) for a in range(A)])
    out = {"agent_mAP": float(np.nansum(agent_ap) / A), "agent_ap": {actions[a]["name"]: agent_ap[a] for a in range(A)}}
    for s in (1, 2):
        aps = {f"{actions[a]['name']}-{actions[a]['roles'][r + 1]}": _vcoco_ap(role_rec[(a, r, s)], npos[a])
               for a in range(A) for r in range(len(actions[a]["roles"]) - 1)}
        reported = [v for k, v in aps.items() if k != "point-instr"]
        out[f"role_mAP_S{s}"] = _mean([v for v in reported if not np.isnan(v)])  # NaN: no GT, left out
        out[f"role_mAP_S{s}_all"] = _mean([v for v in aps.values() if not np.isnan(v)])
        out[f"role_ap_S{s}"] = aps
    return out


# ------------------------------------------------------------------------------------------------ test-split inference
def sgg_ground_truth(record):
    """A VG record (0-based predicates) -> sgdet_metrics' GT (predicates 1..C)."""
    return dict(boxes=record["boxes"], labels=record["labels"], rels=record["rels"] + np.array([0, 0, 1]))


def longtail_groups(train_records, num_predicates, head=0.09, tail=0.04):
    """Head / body / tail predicate ids (1-based) of the toy scenes: head >= 9 % of the training relations, tail
    < 4 % (the toy frequencies' gaps), body in between. VG150 uses SGTR's fixed list (vocab.json)."""
    counts = np.zeros(num_predicates)
    for r in train_records:
        np.add.at(counts, r["rels"][:, 2], 1)
    frac = counts / max(counts.sum(), 1)  # a predicate absent from training is in no group
    return {"head": [p + 1 for p in range(num_predicates) if frac[p] >= head],
            "body": [p + 1 for p in range(num_predicates) if tail <= frac[p] < head],
            "tail": [p + 1 for p in range(num_predicates) if 0 < frac[p] < tail]}


def zeroshot_from_training(train_records, test_records):
    """(subject label, object label, predicate 1..C) triplets of the test GT that never occur in training."""
    def triplets(records):
        return {(int(r["labels"][s]), int(r["labels"][o]), int(p) + 1) for r in records
                for s, o, p in r["rels"].tolist()}
    return sorted(triplets(test_records) - triplets(train_records))


def _forward(model, images, mask, device, amp=False):
    """The model in inference: no gradients; float32, or bf16 autocast on CUDA when amp (--amp bf16)."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        return model(images.to(device), mask.to(device))


def predict(model, cfg, records, device, batch_size=8, post=None, amp=False):
    """Run the model on one task's records -> its predictions per image (relations for scene-graph records, HOIs for
    HOI records), in original pixels; post is applied to each batch's predictions (collect keeps the compact form)."""
    if not records:  # a process whose shard of the test split is empty (fewer images than processes)
        return []
    task = "sgg" if "rels" in records[0] else "hoi"
    transform = sg2hoi.make_transforms(False, cfg.image_size, cfg.max_size)  # the test resize
    dataset = sg2hoi.DetectionDataset(records, {"task": task}, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=sg2hoi.collate)
    preds = []
    model.eval()
    for images, mask, targets in loader:
        out = _forward(model, images, mask, device, amp)
        sizes = [t["orig_size"].tolist() for t in targets]
        if task == "sgg":
            batch = sg2hoi.relation_predictions(out["rel"], sizes)
        else:
            batch = sg2hoi.hoi_predictions(out["hoi"], sizes)
        preds += post(batch) if post else batch
    return preds


def _rank_world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect(model, cfg, data, device, limit=0, compact=True, amp=False):
    """data: {"sgg": {"train": (records, meta), "test": (...)}, "hoi": {...}} -> everything the metrics need.
    Rank r of W runs the model on test images r, r + W, r + 2W, ... (no padding, no image twice or lost) and
    keeps their compact form (the same metrics; compact=False: the full predictions); one gather_object brings
    the shards to rank 0, which puts them in image order and adds the ground truth. Returns the dict on rank 0,
    None on the others. (tools/gpu_check.py measures the time per image at batch 1.)"""
    rank, world = _rank_world()
    tests = {task: data[task]["test"][0] for task in data}  # the test records of each task
    if limit:
        tests = {task: test[:limit] for task, test in tests.items()}
    local = {}
    if "sgg" in data:
        C = len(data["sgg"]["test"][1]["predicate_names"])
        post = (lambda batch: sgdet_candidates(batch, C)) if compact else None
        start = time.perf_counter()  # Table I's time per image: this pass on rank 0 (batch 8, loading included)
        local["sgg"] = predict(model, cfg, tests["sgg"][rank::world], device, post=post, amp=amp)
        seconds = (time.perf_counter() - start) / max(len(local["sgg"]), 1)
    if "hoi" in data:
        meta = data["hoi"]["test"][1]
        if not compact:
            post = None
        elif meta["dataset"] == "hico":
            post = lambda batch: hico_candidates(batch, meta["correct_mat"])  # noqa: E731
        else:
            post = lambda batch: [vcoco_detections(p, meta["verbs"], meta["actions"], meta["correct_mat"])  # noqa
                                  for p in batch]
        local["hoi"] = predict(model, cfg, tests["hoi"][rank::world], device, post=post, amp=amp)
    shards = [local]
    if world > 1:
        shards = [None] * world if rank == 0 else None
        dist.gather_object(local, shards, dst=0)
    if rank != 0:
        return None
    preds = {task: [None] * len(test) for task, test in tests.items()}
    for r, shard in enumerate(shards):  # rank r's shard: images r, r + W, r + 2W, ... of each test split
        for task in preds:
            preds[task][r::world] = shard[task]
    out = {}
    if "sgg" in data:
        train, meta, test = data["sgg"]["train"][0], data["sgg"]["test"][1], tests["sgg"]
        vocab = sg2hoi.load_vocab()
        is_vg150 = meta["predicate_names"] == vocab["vg150_predicates"] and not meta.get("toy")
        out["sgg"] = dict(gts=[sgg_ground_truth(r) for r in test], preds=preds["sgg"],
                          num_predicates=len(meta["predicate_names"]),
                          zeroshot=zeroshot_from_training(train, test),
                          longtail=vocab["vg150_longtail"] if is_vg150 else
                          longtail_groups(train, len(meta["predicate_names"])))
        cpu = f"CPU ({torch.get_num_threads()} threads)"
        out["sgg"]["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
        out["sgg"]["time"] = seconds
    if "hoi" in data:
        train, meta, test = data["hoi"]["train"][0], data["hoi"]["test"][1], tests["hoi"]
        out["hoi"] = dict(dataset=meta["dataset"], preds=preds["hoi"], correct_mat=meta["correct_mat"])
        if meta["dataset"] == "hico":
            out["hoi"]["gts"] = [dict(boxes=r["boxes"], labels=r["labels"], hois=r["hois"]) for r in test]
            rare, counts = sg2hoi.rare_triplets_from_training(train)
            out["hoi"].update(rare=rare, non_rare=non_rare_triplets(counts), verb_names=meta["verb_names"],
                              object_names=meta["object_names"])
        else:
            out["hoi"]["gts"] = [sg2hoi.vcoco_ground_truth(r, meta["verbs"], meta["actions"]) for r in test]
            out["hoi"].update(verbs=meta["verbs"], actions=meta["actions"])
    return out


# ------------------------------------------------------------------------------------------------ metrics and tables
def metrics_from_collected(c):
    """The numbers of Tables I-IV from collect()'s output or a --save-predictions file (full or compact)."""
    m = {}
    if "sgg" in c:
        s = c["sgg"]
        m["sgg"] = sgdet_metrics(s["gts"], s["preds"], s["num_predicates"], zeroshot_triplets=s["zeroshot"],
                                 longtail=s["longtail"])
        m["sgg"]["time_per_image_s"], m["sgg"]["device"] = s.get("time"), s.get("device")
        m["sgg"]["num_images"] = len(s["gts"])
    if "hoi" in c:
        h = c["hoi"]
        if h["dataset"] == "hico":
            kw = dict(rare_triplets=h["rare"], non_rare_triplets=h.get("non_rare"))
            m["hico"] = {"default": hico_map(h["gts"], h["preds"], h["correct_mat"], **kw),
                         "known_object": hico_map(h["gts"], h["preds"], h["correct_mat"], known_object=True, **kw)}
            if "verb_names" in h:  # each class's AP under its name, e.g. "ride horse"
                for setting in m["hico"].values():
                    for cls in setting["per_class"]:
                        cls["name"] = f"{h['verb_names'][cls['triplet'][2]]} {h['object_names'][cls['triplet'][1]]}"
        else:
            dets = [p if "person_boxes" in p else vcoco_detections(p, h["verbs"], h["actions"], h["correct_mat"])
                    for p in h["preds"]]
            r = vcoco_role_ap(h["gts"], dets, h["actions"])
            m["vcoco"] = {k: v for k, v in r.items() if not isinstance(v, dict)}
    return m


def lookup_metric(metrics, dotted):
    """metrics["a"]["b"] for "a.b" (e.g. "hico.default.mAP_full") as a float; None where it is absent."""
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value)


# The headline numbers (tools/bootstrap.py reports their spread): (label, place in metrics_from_collected's dict).
HEADLINE = (("SGDet R@50", "sgg.R@50"), ("SGDet mR@50", "sgg.mR@50"), ("HICO mAP Full", "hico.default.mAP_full"),
            ("HICO mAP Rare", "hico.default.mAP_rare"), ("HICO mAP Non-rare", "hico.default.mAP_non_rare"),
            ("V-COCO AP S1", "vcoco.role_mAP_S1"))


def headline(metrics):
    """{label: value in %} of the HEADLINE numbers present in a metrics dict."""
    values = {label: lookup_metric(metrics, dotted) for label, dotted in HEADLINE}
    return {label: 100 * v for label, v in values.items() if v is not None}


def evaluate(model, cfg, data, device, limit=0, amp=False):
    """Tables I-IV of a model, called on every rank: the metrics dict on rank 0, None on the others."""
    collected = collect(model, cfg, data, device, limit, amp=amp)
    return None if collected is None else metrics_from_collected(collected)


def format_tables(m):
    """The paper's tables as text (percentages)."""
    def pct(d, keys):
        return " / ".join(f"{100 * d.get(k, 0):5.1f}" for k in keys)

    lines = []
    if "sgg" in m:
        s = m["sgg"]
        recalls = "   ".join(pct(s, [f"{name}@{k}" for k in (20, 50, 100)]) for name in ("R", "mR", "ngR", "ngmR"))
        ms = 1000 * (s["time_per_image_s"] or float("nan"))
        long_tail = "   ".join(f"{g} " + pct(s, [f"mR@50_{g}", f"mR@100_{g}"]) for g in ("head", "body", "tail"))
        lines += [f"Table I  SGDet ({s['num_images']} test images)",
                  "          R@20/50/100          mR@20/50/100        ngR@20/50/100        ngmR@20/50/100      "
                  "zR@50/100     time/img",
                  f"          {recalls}   {pct(s, ['zR@50', 'zR@100'])}   {ms:.1f} ms on {s['device']}",
                  f"Table II long-tail mR@50/100:  {long_tail}"]
    if "vcoco" in m:
        v = m["vcoco"]
        lines += [f"Table III V-COCO  AP_role S1 {pct(v, ['role_mAP_S1'])}  S2 {pct(v, ['role_mAP_S2'])}  "
                  f"(agent mAP {pct(v, ['agent_mAP'])})"]
    if "hico" in m:
        d, k = m["hico"]["default"], m["hico"]["known_object"]
        splits = ["mAP_full", "mAP_rare", "mAP_non_rare"]
        lines += ["Table IV HICO-DET    Default: Full / Rare / Non-rare     Known-Object: Full / Rare / Non-rare",
                  f"                     {pct(d, splits)}                {pct(k, splits)}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ saved predictions
def _convert(x, leaf):
    """x's dicts and lists rebuilt, every other value passed through leaf (numpy <-> torch for saving)."""
    if isinstance(x, dict):
        return {k: _convert(v, leaf) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_convert(v, leaf) for v in x]
    return leaf(x)


def save_predictions(collected, path):
    """Predictions and ground truth as tensors, loadable with torch.load(..., weights_only=True)."""
    torch.save(_convert(collected, lambda x: torch.from_numpy(np.ascontiguousarray(x))
                        if isinstance(x, np.ndarray) else x), path)


# ------------------------------------------------------------------------------------------------ pictures
# A fixed, simple layout: tagged boxes where the model put them, a legend under the image, the graph on a circle.
MIN_DRAW_SIDE = 640  # pictures are drawn with a longer side of at least this many pixels (toy images are 128 px)
EDGE_COLOURS = {"relation": (30, 30, 30), "hoi": (20, 80, 200)}  # scene-graph arrows: predicates, HOI verbs
WHITE, GREY, BLACK = (255, 255, 255), (110, 110, 110), (0, 0, 0)


def _palette(n):
    """n distinct RGB colours (golden-angle hues), the same colour for an index in every picture."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)) for i in range(n)]


def _darker(colour, f=0.65):
    """A box colour made dark enough to read as text on white."""
    return tuple(int(c * f) for c in colour)


def _font(size):
    """PIL's default font at `size` px (scalable with FreeType, Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _canvas(image_uint8, min_side=MIN_DRAW_SIDE):
    """(3, H, W) uint8 -> (PIL image upscaled (nearest) to a longer side >= min_side, scale, font px, line px)."""
    H, W = image_uint8.shape[-2:]
    scale = max(1.0, min_side / max(H, W))
    if scale > 1:
        image_uint8 = TF.resize(image_uint8, [round(H * scale), round(W * scale)], InterpolationMode.NEAREST)
    side = scale * max(H, W)
    return TF.to_pil_image(image_uint8), scale, max(12, round(0.025 * side)), max(2, round(0.004 * side))


def _label(draw, xy, text, font, colour, away=(0.0, 0.0)):
    """Text on a white box centred on xy, moved by `away` half-sizes ((1, -1): bottom-left corner at xy)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    width, height = draw.im.size
    x0 = min(max(xy[0] + (away[0] - 1) * w / 2, 0), width - w)
    y0 = min(max(xy[1] + (away[1] - 1) * h / 2, 0), height - h)
    draw.rectangle((x0, y0, x0 + w, y0 + h), fill=WHITE)
    draw.text((x0 + 2 - left, y0 + 2 - top), text, font=font, fill=colour)


def _draw_boxes(picture, boxes, names, colours, font, width):
    """Boxes (xyxy, picture pixels) outlined in their colours, each name written above its top-left corner."""
    draw = ImageDraw.Draw(picture)
    for (x1, y1, x2, y2), name, colour in zip(boxes, names, colours):
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        _label(draw, (x1, y1), name, font, _darker(colour, 0.4), away=(1, -1))
    return picture


def _with_legend(picture, lines, font_px):
    """The picture with a white strip under it: one text line per entry of lines, each a list of (text, colour)."""
    font, line_h = _font(font_px), round(1.35 * font_px)
    pad = line_h // 4
    out = Image.new("RGB", (picture.width, picture.height + line_h * len(lines) + 2 * pad), WHITE)
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for j, line in enumerate(lines):
        x = pad
        for text, colour in line:
            draw.text((x, picture.height + pad + j * line_h), text, font=font, fill=colour)
            x += draw.textlength(text, font=font)
    return out


def draw_image_predictions(image_uint8, result, graph):
    """Picture (a): each entity's box in its own colour, tagged with its name; under it a legend line per edge
    (best score, number of queries) and per agent-only action."""
    canvas, scale, font_px, width = _canvas(image_uint8)
    entities, colours = graph["entities"], _palette(len(graph["entities"]))
    boxes = [[v * scale for v in e["box"]] for e in entities]
    _draw_boxes(canvas, boxes, [e["display_name"] for e in entities], colours, _font(font_px), width)
    index = {e["id"]: k for k, e in enumerate(entities)}
    lines = []
    for d in graph["edges"]:
        a, b = index[d["source"]], index[d["target"]]
        queries = f"  ({len(d['from'])} queries)" if len(d["from"]) > 1 else ""
        lines.append([("R  " if d["kind"] == "relation" else "H  ", GREY),
                      (entities[a]["display_name"], _darker(colours[a])), (f"  {d['label']}  ", BLACK),
                      (entities[b]["display_name"], _darker(colours[b])), (f"   {d['score']:.2f}{queries}", GREY)])
    for k, e in enumerate(entities):
        lines += [[("H  ", GREY), (e["display_name"], _darker(colours[k])), (f"  {a}", BLACK)] for a in e["actions"]]
    return _with_legend(canvas, lines or [[("no relation or HOI scores above the threshold", GREY)]], font_px)


def draw_scene_graph(image_uint8, graph):
    """Picture (b): the entities on a circle (by score, clockwise from the top) and one arrow per (subject,
    object, kind) labelled with its predicates or verbs and scores, relations dark grey, HOI verbs blue."""
    image, _, font_px, width = _canvas(image_uint8)
    canvas = Image.new("RGB", image.size, WHITE)
    draw = ImageDraw.Draw(canvas)
    font, r, entities = _font(font_px), max(6, font_px // 2), graph["entities"]
    if not entities:
        draw.text((r, r), "no relation or HOI scores above the threshold", font=font, fill=BLACK)
        return canvas
    n = len(entities)
    angles = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
    outward = np.stack([np.cos(angles), np.sin(angles)], 1) if n > 1 else np.array([[0.0, 1.0]])  # (n, 2)
    radius = 0.5 * min(canvas.size) - 6 * r if n > 1 else 0.0  # room for the names outside the circle
    pos = np.array(canvas.size) / 2 + radius * outward  # (n, 2) node centres
    index = {e["id"]: k for k, e in enumerate(entities)}
    arrows, lanes = {}, {}  # (subject node, object node, kind) -> ["riding 0.72", ...]; node pair -> its arrows
    for d in graph["edges"]:
        key = (index[d["source"]], index[d["target"]], d["kind"])
        if key not in arrows:
            arrows[key] = []
            lanes.setdefault(tuple(sorted(key[:2])), []).append(key)
        arrows[key].append(f"{d['label']} {d['score']:.2f}")
    for (a, b, kind), texts in arrows.items():
        colour, text = EDGE_COLOURS[kind], ", ".join(texts)
        if a == b:  # subject and object boxes merged into one entity: a loop beside the node
            x, y = pos[a] - outward[a] * 2 * r
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
            _label(draw, (x, y), text, font, colour)
            continue
        u = (pos[b] - pos[a]) / np.linalg.norm(pos[b] - pos[a])
        normal, head = np.array([-u[1], u[0]]), 3 * width + 4
        # arrows between the same two nodes (a -> b, b -> a, relation and HOI) run side by side, 3 radii apart
        lane = lanes[tuple(sorted((a, b)))]
        side = normal if a < b else -normal  # the same side for both directions
        shift = side * (lane.index((a, b, kind)) - (len(lane) - 1) / 2) * 3 * r
        start, end = pos[a] + u * r + shift, pos[b] - u * r + shift
        draw.line([tuple(start), tuple(end)], fill=colour, width=width)
        draw.polygon([tuple(end), tuple(end - u * head + normal * head / 2), tuple(end - u * head - normal * head / 2)],
                     fill=colour)
        _label(draw, (start + end) / 2, text, font, colour)
    for k, (e, colour) in enumerate(zip(entities, _palette(n))):
        x, y = pos[k]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=BLACK)
        name = e["display_name"] + "".join(f" ({a})" for a in e["actions"])
        _label(draw, pos[k] + outward[k] * (r + 2), name, font, _darker(colour), away=outward[k])
    if {kind for _, _, kind in arrows} == {"relation", "hoi"}:
        _label(draw, (0, canvas.height), "dark: predicate, blue: HOI verb", font, BLACK, away=(1, -1))
    return canvas


# ------------------------------------------------------------------------------------------------ your own images
# `--image a.jpg photos/ "shots/*.png"`: the model on any pictures, from the checkpoint alone. A one-stage model
# predicts one object in many queries' boxes: merge_entities makes them one node per object.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what a folder contributes (torchvision.io reads them)
MERGE_IOU = 0.5  # boxes of one class name with IoU > this are one entity (the benchmarks' "this is that object")


class InputError(Exception):
    """A checkpoint or an image that cannot be used; the message names the file and what is wrong with it."""


def read_checkpoint(path, device):
    """train.py's checkpoint -> (model in eval mode on device, Config, the checkpoint dict); InputError naming the
    file when it is missing, unreadable, lacks the class names of its tasks or its weights do not fit."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:  # a truncated or foreign file, no "config" (not a train.py checkpoint), a config of another version
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = sg2hoi.config_from_saved(ckpt["config"])
    except Exception as e:  # noqa: BLE001 (pickle, zip, torch and config errors all mean the same thing here)
        raise InputError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    needed = (["entity_names", "predicate_names"] if cfg.sgg else []) + \
             (["hoi_object_names", "verb_names"] if cfg.hoi else [])
    missing = [n for n in needed if not getattr(cfg, n)]
    if missing:
        raise InputError(f"{path}: the checkpoint's config lacks the class names {', '.join(missing)} "
                         f"(tasks={cfg.tasks!r}); train.py sets them from the datasets")
    # built without the text-embedding file: it only initialises tensors that the checkpoint overwrites
    model = sg2hoi.build_model(dataclasses.replace(cfg, text_embeddings=""))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise InputError(f"{path}: the weights do not fit the checkpoint's config "
                         f"({' '.join(str(e).split())[:400]})") from None
    return model.to(device).eval(), cfg, ckpt


def hoi_validity_mask(cfg):
    """(V, O) verb-object validity mask of a HICO-DET or V-COCO vocabulary (the toy data's too), else None."""
    vocab = sg2hoi.load_vocab()
    coco = [c["name"] for c in vocab["coco80"]]
    for dataset, objects, verbs in (("hico", coco, vocab["hico_verbs"]),
                                    ("vcoco", coco + ["no object"], [v["name"] for v in vocab["vcoco_verbs"]])):
        if cfg.hoi_object_names == objects and cfg.verb_names == verbs:
            return sg2hoi._correct_mat(None, dataset, vocab)  # the loaders' matrix, from vocab.json
    return None


def expand_image_args(args):
    """--image arguments -> [(path, error or None)]: a folder gives its image files (sorted, not recursive), a
    pattern its sorted matches, anything else is a file; an empty folder or pattern is an error entry."""
    out = []
    for a in args:
        if os.path.isdir(a):
            files = [os.path.join(a, f) for f in sorted(os.listdir(a)) if f.lower().endswith(IMAGE_EXTENSIONS)]
            none = f"{a}: folder holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
        elif glob.has_magic(a):
            files, none = sorted(glob.glob(a)), f"{a}: no file matches this pattern"
        else:
            files, none = [a], None
        out += [(f, None) for f in files] or [(a, none)]
    return out


def read_image(path):
    """An image file (JPEG, PNG, GIF, WebP) -> (3, H, W) uint8 RGB, upright as its EXIF says; else InputError."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such image file")
    try:
        image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not an image that torchvision can read ({type(e).__name__})") from None
    if image.ndim == 4:  # an animated GIF decodes as (frames, 3, H, W): its first frame is the picture
        image = image[0]
    return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode as uint16


def _entity(box, label, names, score, size_hw):
    """One predicted box as JSON: xyxy in original pixels (clipped to the image), label index and name, score."""
    H, W = size_hw
    box = np.clip(np.asarray(box, np.float64), 0, [W, H, W, H])
    return {"box": [round(float(v), 2) for v in box], "label": int(label), "name": names[int(label)],
            "score": round(float(score), 6)}


def image_predictions(out, cfg, size_hw, top=10, threshold=0.1, correct_mat=None):
    """The model's output for ONE image -> {"relations": [...], "hois": [...]}, best first, at most `top` each,
    score >= threshold, boxes in the pixels of the ORIGINAL image of size size_hw. A relation's score is
    s_sub * s_obj * p (graph constraint), an HOI's sigmoid(verb) * s_obj * s_human after correct_mat."""
    result = {"relations": [], "hois": []}
    if cfg.sgg:
        pred = sg2hoi.relation_predictions(out["rel"], [size_hw])[0]  # pairs ranked by their best triplet's score
        names = cfg.entity_names
        for (s, o), row in list(zip(pred["rel_pairs"], pred["rel_scores"]))[:top]:
            r = 1 + int(row[1:].argmax())  # the graph constraint: the pair's best predicate (column 0 = none)
            score = float(pred["scores"][s] * pred["scores"][o] * row[r])
            if score < threshold:
                break  # ranked: the rest score lower
            result["relations"].append({
                "subject": _entity(pred["boxes"][s], pred["labels"][s], names, pred["scores"][s], size_hw),
                "predicate": {"index": r - 1, "name": cfg.predicate_names[r - 1]},
                "object": _entity(pred["boxes"][o], pred["labels"][o], names, pred["scores"][o], size_hw),
                "score": round(score, 6)})
    if cfg.hoi:
        pred = sg2hoi.hoi_predictions(out["hoi"], [size_hw])[0]
        names = cfg.hoi_object_names
        for q, v, score in zip(*_hico_top(pred, correct_mat, top)):  # invalid verb-object pairs score 0 (QPIC)
            h, o, v, score = pred["sub_ids"][q], pred["obj_ids"][q], int(v), float(score)
            if score < threshold or score <= 0:
                break
            no_object = names[int(pred["labels"][o])] == "no object"
            result["hois"].append({
                "human": _entity(pred["boxes"][h], pred["labels"][h], names, pred["scores"][h], size_hw),
                "verb": {"index": v, "name": cfg.verb_names[v]},
                "object": None if no_object else _entity(pred["boxes"][o], pred["labels"][o], names, pred["scores"][o],
                                                         size_hw),
                "score": round(score, 6)})
    return result


def merge_entities(result, iou_threshold=MERGE_IOU):
    """The kept triplets and HOIs -> the scene graph {"entities", "edges"}, one node per object: greedy NMS by
    class probability, each box joining the first entity of its class NAME (across both vocabularies) that it
    overlaps with IoU > iou_threshold, else starting one. One edge per (subject, object, label, kind) with its
    best score; an HOI without an object (V-COCO's agent-only actions) adds its verb to the human's "actions"."""
    cands = []  # (box dict, vocabulary, member reference)
    for i, r in enumerate(result["relations"]):
        cands += [(r[role], "entity_names", ["relations", i, role]) for role in ("subject", "object")]
    for i, h in enumerate(result["hois"]):
        cands += [(h[role], "hoi_object_names", ["hois", i, role]) for role in ("human", "object") if h[role]]
    entities, where = [], {}  # where: (key, index, role) -> entity index
    for c, vocabulary, member in sorted(cands, key=lambda cand: -cand[0]["score"]):
        box = torch.tensor([c["box"]], dtype=torch.float64)
        same = [k for k, e in enumerate(entities) if e["name"] == c["name"]
                and box_iou(box, torch.tensor([e["box"]], dtype=torch.float64)).item() > iou_threshold]
        if not same:
            entities.append({"id": f"n{len(entities)}", "name": c["name"], "label": c["label"], "box": c["box"],
                             "vocabulary": vocabulary, "score": c["score"], "members": [], "actions": []})
        k = same[0] if same else len(entities) - 1
        entities[k]["members"].append(member)
        where[tuple(member)] = k
    # display names: "person" when one person, else "person 1", "person 2" (by score)
    for name in sorted({e["name"] for e in entities}):
        same = [e for e in entities if e["name"] == name]
        for j, e in enumerate(same):
            e["display_name"] = name if len(same) == 1 else f"{name} {j + 1}"
    edges = {}
    for kind, key, a, b, rel in (("relation", "relations", "subject", "object", "predicate"),
                                 ("hoi", "hois", "human", "object", "verb")):
        for i, t in enumerate(result[key]):
            if t[b] is None:
                e = entities[where[(key, i, a)]]
                if t[rel]["name"] not in e["actions"]:
                    e["actions"].append(t[rel]["name"])
                continue
            source, target = entities[where[(key, i, a)]]["id"], entities[where[(key, i, b)]]["id"]
            label = t[rel]["name"]
            edge = edges.setdefault((source, target, label, kind), {
                "source": source, "target": target, "label": label, "kind": kind, "score": t["score"], "from": []})
            edge["score"] = max(edge["score"], t["score"])
            edge["from"].append([key, i])
    return {"entities": entities, "edges": list(edges.values())}


def _dot_quote(text):
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def scene_graph_dot(graph, size_hw, title=""):
    """The graph in Graphviz's DOT language: one node per entity (pos: its box's centre, y up, for `neato -n`),
    one edge per predicate (solid) or HOI verb (dashed)."""
    H = size_hw[0]
    lines = ["digraph scene_graph {", f"  graph [label={_dot_quote(title)}, labelloc=t];",
             '  node [shape=box, style="rounded,filled", fillcolor="#f0f0f0"];']
    for e in graph["entities"]:
        x1, y1, x2, y2 = e["box"]
        label = e["display_name"] + "".join(f"\n({a})" for a in e["actions"])
        lines.append(f"  {e['id']} [label={_dot_quote(label)}, pos=\"{(x1 + x2) / 2:.1f},{H - (y1 + y2) / 2:.1f}!\"];")
    for d in graph["edges"]:
        style = "solid" if d["kind"] == "relation" else "dashed"
        lines.append(f"  {d['source']} -> {d['target']} [label={_dot_quote(d['label'])}, style={style}, "
                     f"tooltip=\"{d['kind']} score {d['score']:.2f}\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _forward_one(model, cfg, image_uint8, device):
    """One image (3, H, W) uint8 -> (the model's output, resized (h, w)): the test-time resize, a batch of one."""
    transform = sg2hoi.make_transforms(False, cfg.image_size, cfg.max_size)
    x = transform(tv_tensors.Image(image_uint8)).as_subclass(torch.Tensor)  # (3, h, w) normalised
    images, mask, _ = sg2hoi.collate([(x, {})])  # (1, 3, h, w), (1, h, w) all False
    return _forward(model, images, mask, device), tuple(x.shape[-2:])


def run_on_images(ckpt_path, image_args, out_dir, top=10, threshold=0.1, merge_iou=MERGE_IOU, device=None):
    """--image: per image <stem>_pred.png (picture (a)), _graph.png (b), _graph.dot and .json in out_dir. A bad
    image is reported and skipped. Exit status: 0 = every image done, 1 = some failed, 2 = unusable checkpoint."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, _ = read_checkpoint(ckpt_path, device)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    correct_mat = hoi_validity_mask(cfg) if cfg.hoi else None
    os.makedirs(out_dir, exist_ok=True)
    used, failed, done = {}, [], 0
    for path, error in expand_image_args(image_args):
        try:
            if error:
                raise InputError(error)
            image = read_image(path)
            t = time.perf_counter()
            out, resized_hw = _forward_one(model, cfg, image, device)
            result = image_predictions(out, cfg, tuple(image.shape[-2:]), top, threshold, correct_mat)
            seconds = time.perf_counter() - t
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)
            continue
        H, W = image.shape[-2:]
        graph = merge_entities(result, merge_iou)
        stem = os.path.splitext(os.path.basename(path))[0]
        used[stem] = used.get(stem, 0) + 1  # a stem used before in this run (a.jpg, a.png) gets _2, _3, ...
        base = os.path.join(out_dir, stem if used[stem] == 1 else f"{stem}_{used[stem]}")
        files = {"prediction": base + "_pred.png", "graph": base + "_graph.png", "dot": base + "_graph.dot",
                 "json": base + ".json"}
        draw_image_predictions(image, result, graph).save(files["prediction"], optimize=True)
        draw_scene_graph(image, graph).save(files["graph"], optimize=True)
        with open(files["dot"], "w") as f:
            f.write(scene_graph_dot(graph, (H, W), title=os.path.basename(path)))
        record = {"image": path, "width": int(W), "height": int(H), "checkpoint": ckpt_path,
                  "settings": {"top": top, "threshold": threshold, "merge_iou": merge_iou, "tasks": cfg.tasks,
                               "resized_hw": list(resized_hw), "device": str(device),
                               "hoi_validity_mask": correct_mat is not None},
                  "seconds": round(seconds, 4), **result, **graph, "files": files}
        with open(files["json"], "w") as f:
            json.dump(record, f, indent=1)
        done += 1
        print(f"{path}: {len(result['relations'])} relations, {len(result['hois'])} HOIs, "
              f"{len(graph['entities'])} entities, {seconds:.3f} s -> {files['json']} (+ pictures, DOT)")
    print(f"{done} image(s) done, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an SG2HOI+ checkpoint: Tables I-IV of the paper "
                                            "(distributed: torchrun --nproc_per_node=N eval.py --ckpt ...).")
    p.add_argument("--ckpt", default="", help="checkpoint written by train.py")
    p.add_argument("--save-predictions", dest="save_predictions", default="",
                   help="write the ground truth and compact predictions here (for tools/bootstrap.py)")
    p.add_argument("--json", default="", help="write the metrics here (default: eval_<checkpoint stem>.json "
                   "beside the checkpoint; train.py's metrics.json stays)")
    p.add_argument("--limit", type=int, default=0, help="first N test images only")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16: autocast on CUDA")
    p.add_argument("--dist_timeout", type=float, default=60.0, help="minutes a collective may wait (torchrun)")
    p.add_argument("--image", nargs="+", default=[], help="run --ckpt on these image files, folders or globs")
    p.add_argument("--out_dir", default="out/images", help="where --image writes its pictures, DOT and JSON")
    p.add_argument("--top", type=int, default=10, help="--image: at most this many triplets and HOIs per image")
    p.add_argument("--threshold", type=float, default=0.1, help="--image: keep triplets / HOIs scoring >= this")
    args = p.parse_args(argv)
    if not args.ckpt:
        p.error("give --ckpt, a checkpoint written by train.py")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    if not args.dist_timeout > 0:
        p.error("--dist_timeout must be > 0 minutes")
    return args


def output_paths(args):
    """{flag: path} of every file this run will write (rank 0)."""
    json_path = args.json
    if not json_path:  # beside the checkpoint under its own name: train.py's metrics.json stays
        stem = os.path.splitext(os.path.basename(args.ckpt))[0]
        json_path = os.path.join(os.path.dirname(args.ckpt) or ".", f"eval_{stem}.json")
    paths = {"--json": json_path, "--save-predictions": args.save_predictions}
    return {k: v for k, v in paths.items() if v}


def check_writable(paths):
    """Before any work: can every output be written (folders created, a test file written)? None or the error."""
    for flag, path in paths.items():
        if os.path.isdir(path):
            return f"eval.py: cannot write {flag} {path}: it is a folder"
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".eval_write_test"):
                pass
        except OSError as e:
            return f"eval.py: cannot write {flag} {path}: {e.strerror or e}"
    return None


def init_distributed(timeout_minutes=60.0):
    """Under torchrun (RANK set): the process group (nccl on this process's GPU, gloo on CPU) and this rank's
    device, else the default device. Long timeout: rank 0 alone computes the metrics of a real test split."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


def load_model_and_data(ckpt_path, device):
    """A train.py checkpoint -> (model on device, its Config, its data: the same test splits it was trained for)."""
    try:
        model, cfg, ckpt = read_checkpoint(ckpt_path, device)
    except InputError as e:
        raise SystemExit(f"eval.py: {e}") from None
    rank, world = _rank_world()
    barrier = dist.barrier if world > 1 else (lambda: None)  # the toy data is generated once, by rank 0
    data = sg2hoi.build_data(cfg, ckpt["args"], is_master=rank == 0, barrier=barrier)
    return model, cfg, data


def main(argv=None):
    args = parse_args(argv)
    if args.image:  # your own images: pictures, scene graphs and JSON, one process
        raise SystemExit(run_on_images(args.ckpt, args.image, args.out_dir, args.top, args.threshold))
    device = init_distributed(args.dist_timeout)
    rank, world = _rank_world()
    try:
        # 1. every output path is writable, before any work (rank 0 checks, every rank stops on an error)
        paths = output_paths(args)
        error = [check_writable(paths) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise SystemExit(error[0])
        # 2. each rank runs the model on its shard of the test splits
        model, cfg, data = load_model_and_data(args.ckpt, device)
        collected = collect(model, cfg, data, device, args.limit, amp=args.amp == "bf16")
        if rank != 0:
            return
        # 3. rank 0: metrics, tables, files
        metrics = metrics_from_collected(collected)
        if args.save_predictions:
            save_predictions(collected, args.save_predictions)
            print(f"wrote {args.save_predictions}")
        print(format_tables(metrics))
        if "--json" in paths:
            with open(paths["--json"], "w") as f:
                json.dump(metrics, f, indent=1)
            print(f"wrote {paths['--json']}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
