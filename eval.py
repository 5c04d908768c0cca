"""eval.py: the metrics SG2HOI+ reports (Sec. IV-C), computed as the field's reference evaluators do.

Three pure metric functions (numpy in, dict out), usable on anyone's predictions:
  sgdet_metrics  - VG150 SGDet R@K, mR@K, no-graph-constraint, zero-shot, head/body/tail
                   (KaihuaTang/Scene-Graph-Benchmark.pytorch sgg_eval.py, Scarecrow0/SGTR)
  hico_map       - HICO-DET mAP Full / Rare / Non-rare, Default and Known-Object (hitachi-rd-cv/qpic hico_eval.py,
                   Known-Object as the official ho-rcnn eval_one.m)
  vcoco_role_ap  - V-COCO agent AP and role AP, Scenarios 1 and 2 (s-gupta/v-coco vsrl_eval.py)
The exact rules (and their quirks, which we keep on purpose) are in each docstring.
Then: distributed inference over a checkpoint's test splits, the paper's tables, timing, pictures, the model on
your own images, benchmarks (CLI at the bottom).

    python eval.py --ckpt runs/toy/ckpt.pt                # Tables I-IV on the checkpoint's test splits
    torchrun --nproc_per_node=N eval.py --ckpt ...        # the same, each process evaluating its share
    python eval.py --predictions preds.pt                 # evaluate saved predictions (no model needed)
    python eval.py --ckpt runs/toy/ckpt.pt --visualize pics   # Figures 2-4 style pictures of test images
    python eval.py --ckpt runs/toy/ckpt.pt --image a.jpg pics/   # your own images: pictures, scene graph, JSON
    python eval.py --benchmark metrics|model|data|rehearsal   # speed at full size, the paper-run rehearsal
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

IOU_THRESHOLD = 0.5  # every benchmark, tested as >= 0.5


# ------------------------------------------------------------------------------------------------ IoU (+1 pixel convention)


def iou_matrix(a, b):
    """(..., N, 4), (..., M, 4) xyxy -> (..., N, M) IoU with the inclusive-pixel convention of every reference
    evaluator: w = min(x2) - max(x1) + 1, area = (x2 - x1 + 1)(y2 - y1 + 1), in float32. Leading dimensions
    (a batch of images) broadcast; 1-D inputs are read as (N, 4). The same float32 operations in the same order
    for one image or a batch, so batched and per-image results are bitwise equal."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    a = a.reshape(-1, 4) if a.ndim < 2 else a
    b = b.reshape(-1, 4) if b.ndim < 2 else b
    iw = np.minimum(a[..., :, None, 2], b[..., None, :, 2]) - np.maximum(a[..., :, None, 0], b[..., None, :, 0]) + 1
    ih = np.minimum(a[..., :, None, 3], b[..., None, :, 3]) - np.maximum(a[..., :, None, 1], b[..., None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def qpic_iou_matrix(a, b):
    """QPIC's compute_IOU: as iou_matrix, but 0 whenever the boxes do not overlap by more than zero pixels
    *without* the +1 (its test `max(x1) >= min(x2)`), which zeroes boxes overlapping by at most one pixel."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    a = a.reshape(-1, 4) if a.ndim < 2 else a
    b = b.reshape(-1, 4) if b.ndim < 2 else b
    iou = iou_matrix(a, b)
    no_overlap = (np.maximum(a[..., :, None, 0], b[..., None, :, 0]) >= np.minimum(a[..., :, None, 2], b[..., None, :, 2])) | \
                 (np.maximum(a[..., :, None, 1], b[..., None, :, 1]) >= np.minimum(a[..., :, None, 3], b[..., None, :, 3]))
    return np.where(no_overlap, 0.0, iou).astype(np.float32)


# ------------------------------------------------------------------------------------------------ shared helpers
# The evaluators below run in two stages, both vectorised over images:
#   1. candidates: each image's raw prediction -> the few ranked detections the metric looks at (HICO: the top-100
#      masked (pair, verb) candidates; SGDet: one triplet per pair + the top-100 no-graph-constraint candidates).
#      This is also the "compact" form that distributed evaluation gathers and --save-predictions writes.
#   2. matching: the candidates of a chunk of images (padded to the chunk's largest size) against the GT, with
#      one batched IoU; the per-image bookkeeping (already-matched GT, R@K prefixes) becomes cumulative ops.


def _check_inputs(metric, gts, preds, gt_fields, pred_forms):
    """Clear errors for wrong inputs: equal lengths, dicts, the fields each side needs (pred_forms: the
    alternative field sets a prediction may have, e.g. the raw model output or the compact candidates)."""
    if len(gts) != len(preds):
        raise ValueError(f"{metric}: {len(gts)} ground-truth images but {len(preds)} predictions "
                         "(one prediction per test image, in the same order)")
    for i, g in enumerate(gts):
        if not isinstance(g, dict):
            raise ValueError(f"{metric}: ground truth of image {i} is a {type(g).__name__}, expected a dict")
        missing = [f for f in gt_fields if f not in g]
        if missing:
            raise ValueError(f"{metric}: ground truth of image {i} lacks {missing}")
    _check_preds(metric, preds, pred_forms)


def _check_preds(metric, preds, pred_forms):
    """Every prediction is a dict with one of the field sets in pred_forms (else ValueError naming the image)."""
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            raise ValueError(f"{metric}: prediction of image {i} is a {type(p).__name__}, expected a dict")
        if not any(p.keys() >= set(form) for form in pred_forms):
            best = min(pred_forms, key=lambda form: sum(f not in p for f in form))
            raise ValueError(f"{metric}: prediction of image {i} lacks {[f for f in best if f not in p]} "
                             f"(has {sorted(p)})")


def _chunks_by_size(sizes, chunk=1024):
    """Image indices in chunks of similar size (sorted by size, stable), so that padding a chunk to its largest
    image wastes little. sizes (n,) -> list of index arrays."""
    order = np.argsort(np.asarray(sizes), kind="stable")
    return [order[i:i + chunk] for i in range(0, len(order), chunk)]


def _pad_stack(arrays, length, fill, shape=(), dtype=None):
    """List of (n_i, *shape) arrays -> (len, length, *shape) array, rows past n_i set to fill."""
    if arrays and all(len(x) == length for x in arrays):  # nothing to pad (the usual case): one C-level copy
        return np.stack(arrays).astype(dtype, copy=False).reshape((len(arrays), length) + tuple(shape))
    out = np.full((len(arrays), length) + tuple(shape), fill, dtype)
    for j, x in enumerate(arrays):
        out[j, :len(x)] = x
    return out


def _triplet_codes(rows, bases):
    """(..., 3) integer rows -> (...,) int64 codes, one per distinct triplet (bases: the three value ranges)."""
    rows = np.asarray(rows, np.int64)
    return (rows[..., 0] * bases[1] + rows[..., 1]) * bases[2] + rows[..., 2]


def _stable_topk_desc(flat, k):
    """(B, n) scores -> (B, min(k, n)) indices: the first k of a *stable* descending sort of each row (ties in
    index order; Python's list.sort(reverse=True) as QPIC). np.argpartition finds the best k in O(n); when the
    k-th and (k+1)-th best values differ, that set is the only possible one and only its k entries need
    sorting (by score, then index). A row with a tie across that boundary (or a NaN) is sorted in full."""
    if flat.shape[1] <= k:
        return np.argsort(-flat, axis=1, kind="stable")
    neg = -flat
    part = np.argpartition(neg, k, axis=1)  # position k: the (k+1)-th best; before it the best k, unordered
    idx = np.sort(part[:, :k], axis=1)  # the best k, in index (pair-major) order
    vals = np.take_along_axis(neg, idx, 1)  # (B, k)
    next_val = np.take_along_axis(neg, part[:, k:k + 1], 1)[:, 0]  # (B,) the (k+1)-th best
    idx = np.take_along_axis(idx, np.argsort(vals, axis=1, kind="stable"), 1)  # by score, ties in index order
    for r in np.nonzero(~(vals.max(1) < next_val))[0]:  # a tie across the boundary, or a NaN
        idx[r] = np.argsort(neg[r], kind="stable")[:k]
    return idx


def _numpy_topk_desc(flat, k):
    """(B, n) scores -> (B, min(k, n)): exactly np.argsort(-row)[:k] for every row (numpy's default, unstable
    sort, as SGB's no-graph-constraint ranking). A row whose best k + 1 values are all distinct has only one
    possible answer, found with np.partition and a sort of k values; a row with a tie there (or a NaN) calls
    np.argsort on the whole row, so the tie order is numpy's own."""
    B, n = flat.shape
    if n <= k + 1:
        return np.stack([np.argsort(-row)[:k] for row in flat]) if B else np.zeros((0, min(k, n)), np.int64)
    neg = -flat
    part = np.argpartition(neg, k, axis=1)[:, :k + 1]  # the k + 1 best, unordered
    vals = np.take_along_axis(neg, part, 1)
    order = np.argsort(vals, axis=1, kind="stable")
    vals, part = np.take_along_axis(vals, order, 1), np.take_along_axis(part, order, 1)
    unique = (np.diff(vals, axis=1) > 0).all(1)  # strictly increasing: no tie among the best k + 1, no NaN
    out = part[:, :k].copy()
    for r in np.nonzero(~unique)[0]:
        out[r] = np.argsort(-flat[r])[:k]
    return out


def _in_rows(rows, table):
    """(..., 3) integer rows, (T, 3) table -> (...,) bool: the row occurs in the table."""
    rows, table = np.asarray(rows, np.int64), np.asarray(table, np.int64).reshape(-1, 3)
    if len(table) == 0:
        return np.zeros(rows.shape[:-1], bool)
    lo = min(rows.min(initial=0), table.min())
    bases = np.maximum(rows.reshape(-1, 3).max(0, initial=0), table.max(0)) - lo + 1
    return np.isin(_triplet_codes(rows - lo, bases), _triplet_codes(table - lo, bases))


# ------------------------------------------------------------------------------------------------ VG150 SGDet


def _triplet_set(rows):
    """Rows of three labels (array-like, any length) -> a set of int 3-tuples."""
    return {tuple(int(x) for x in row) for row in np.asarray(rows).reshape(-1, 3)}


SGDET_PRED_FIELDS = ("boxes", "labels", "scores", "rel_pairs", "rel_scores")
SGDET_COMPACT_FIELDS = ("gc", "ng")
_CANDIDATE_FIELDS = ("sub_boxes", "obj_boxes", "sub_labels", "obj_labels", "predicates", "scores")


def sgdet_candidates(preds, num_predicates, max_ng=100, chunk=512):
    """Raw SGDet predictions -> the compact form the evaluator needs, per image:
      gc: one triplet per pair in the given order, predicate 1 + argmax(rel_scores[:, 1:]) (first max wins),
          score s_sub * s_obj * p (kept for readers; the evaluator keeps the order it is given);
      ng: the top max_ng (pair, predicate >= 1) candidates by (s_sub * s_obj) * p in float32, ranked exactly as
          np.argsort(-scores.ravel()) (SGB's SGNoGraphConstraintRecall).
    Each is a dict of sub_boxes (K, 4) float32, obj_boxes, sub_labels, obj_labels, predicates (1..C), scores."""
    _check_preds("sgdet_metrics", preds, (SGDET_PRED_FIELDS, SGDET_COMPACT_FIELDS))
    out = [None] * len(preds)
    C = num_predicates
    groups = {}  # images with the same number of pairs are ranked together
    for i, p in enumerate(preds):
        if "gc" in p:  # already compact
            out[i] = p
            continue
        rs = np.asarray(p["rel_scores"])
        pairs = np.asarray(p["rel_pairs"]).reshape(-1, 2)
        if rs.shape != (len(pairs), C + 1):
            raise ValueError(f"sgdet_metrics: prediction of image {i}: rel_scores has shape {rs.shape}, expected "
                             f"({len(pairs)}, {C + 1}) = (pairs, 1 + num_predicates)")
        groups.setdefault(len(pairs), []).append(i)
    for Q, ids in groups.items():
        for c in range(0, len(ids), chunk):
            idx = ids[c:c + chunk]
            B = len(idx)
            pairs = np.stack([np.asarray(preds[i]["rel_pairs"]).reshape(-1, 2) for i in idx])  # (B, Q, 2)
            rel = np.stack([np.asarray(preds[i]["rel_scores"], np.float32) for i in idx])  # (B, Q, C + 1)
            M = max(len(np.asarray(preds[i]["labels"])) for i in idx)  # boxes per image (padded to the chunk's)
            boxes = _pad_stack([np.asarray(preds[i]["boxes"], np.float32).reshape(-1, 4) for i in idx], M, 0, (4,),
                               np.float32)  # (B, M, 4)
            labels = _pad_stack([np.asarray(preds[i]["labels"]) for i in idx], M, -1, (), np.int64)  # (B, M)
            obj_scores = _pad_stack([np.asarray(preds[i]["scores"], np.float32) for i in idx], M, 0, (), np.float32)
            s_sub = np.take_along_axis(obj_scores, pairs[:, :, 0], 1)  # (B, Q)
            s_obj = np.take_along_axis(obj_scores, pairs[:, :, 1], 1)
            pair_scores = s_sub * s_obj  # (B, Q) float32, = scores[pairs].prod(1)
            gc_pred = 1 + rel[:, :, 1:].argmax(2)  # (B, Q)
            overall = (pair_scores[:, :, None] * rel[:, :, 1:]).reshape(B, Q * C)  # (B, Q * C) pair-major
            top = _numpy_topk_desc(overall, max_ng) if Q else np.zeros((B, 0), np.int64)  # (B, T)
            gc_score = pair_scores * np.take_along_axis(rel, gc_pred[:, :, None], 2)[:, :, 0]

            rows = np.arange(B)[:, None]

            def cands(pp, pr, sc):  # (B, K, 2) box indices, (B, K) predicates and scores -> batched fields
                return dict(sub_boxes=boxes[rows, pp[:, :, 0]], obj_boxes=boxes[rows, pp[:, :, 1]],
                            sub_labels=labels[rows, pp[:, :, 0]], obj_labels=labels[rows, pp[:, :, 1]],
                            predicates=pr, scores=sc)
            gc = cands(pairs, gc_pred, gc_score)
            ng = cands(np.take_along_axis(pairs, (top // C)[:, :, None], 1), top % C + 1,
                       np.take_along_axis(overall, top, 1))
            for j, i in enumerate(idx):  # per image: views into the chunk's arrays
                out[i] = dict(gc={k: v[j] for k, v in gc.items()}, ng={k: v[j] for k, v in ng.items()})
    return out


def _iou_rows(a, b):
    """(K, 4), (K, 4) -> (K,) IoU of a[k] with b[k]: iou_matrix's float32 operations, element by element."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a + area_b - inter)


def _sgdet_gt_chunk(gts, ids):
    """A chunk of images' GT relations, padded: subject and object boxes (B, R, 4), triplets (B, R, 3) =
    (subject label, predicate, object label) with padding -1, and the (B, R) validity mask."""
    rels = [np.asarray(gts[i]["rels"]).reshape(-1, 3) for i in ids]
    R = max(len(r) for r in rels)
    gt_boxes = [np.asarray(gts[i]["boxes"], np.float32).reshape(-1, 4) for i in ids]
    gt_labels = [np.asarray(gts[i]["labels"]) for i in ids]
    g_sub = _pad_stack([b[r[:, 0]] for b, r in zip(gt_boxes, rels)], R, 0, (4,), np.float32)  # (B, R, 4)
    g_obj = _pad_stack([b[r[:, 1]] for b, r in zip(gt_boxes, rels)], R, 0, (4,), np.float32)
    g_trip = np.stack([_pad_stack([lab[r[:, 0]] for lab, r in zip(gt_labels, rels)], R, -1, (), np.int64),
                       _pad_stack([r[:, 2] for r in rels], R, -1, (), np.int64),
                       _pad_stack([lab[r[:, 1]] for lab, r in zip(gt_labels, rels)], R, -1, (), np.int64)],
                      -1)  # (B, R, 3); padding -1 never equals a label
    valid = np.arange(R)[None] < np.array([len(r) for r in rels])[:, None]
    return g_sub, g_obj, g_trip, valid


def _sgdet_hits(gt_chunk, cands, ids, ks):
    """A chunk of images (its _sgdet_gt_chunk) -> {K: (B, R) bool GT relations hit by the first K candidates}.
    A hit needs all three labels equal and both IoUs >= 0.5 (+1 convention); one candidate may hit several GT."""
    g_sub, g_obj, g_trip, valid = gt_chunk
    R = valid.shape[1]
    P = max(len(cands[i]["predicates"]) for i in ids)
    c = [cands[i] for i in ids]
    p_sub = _pad_stack([x["sub_boxes"] for x in c], P, 0, (4,), np.float32)  # (B, P, 4)
    p_obj = _pad_stack([x["obj_boxes"] for x in c], P, 0, (4,), np.float32)
    p_trip = np.stack([_pad_stack([x[f] for x in c], P, -2, (), np.int64)
                       for f in ("sub_labels", "predicates", "obj_labels")], -1)  # (B, P, 3); padding -2 matches none
    lo = min(p_trip.min(initial=0), g_trip.min(initial=0))
    bases = np.maximum(p_trip.reshape(-1, 3).max(0, initial=0), g_trip.reshape(-1, 3).max(0, initial=0)) - lo + 1
    same = _triplet_codes(p_trip - lo, bases)[:, :, None] == _triplet_codes(g_trip - lo, bases)[:, None, :]
    b, p, r = np.nonzero(same)  # (B, P, R) same three labels: the IoUs only there
    hits = np.zeros(same.shape, bool)
    hits[b, p, r] = (_iou_rows(p_sub[b, p], g_sub[b, r]) >= IOU_THRESHOLD) & \
                    (_iou_rows(p_obj[b, p], g_obj[b, r]) >= IOU_THRESHOLD)
    cum = np.logical_or.accumulate(hits, axis=1) if P else hits  # (B, P, R): hit by one of the first p + 1
    return {k: cum[:, min(k, P) - 1] if P else np.zeros((len(ids), R), bool) for k in ks}


def sgdet_metrics(gts, preds, num_predicates, ks=(20, 50, 100), zeroshot_triplets=None, longtail=None, chunk=1024):
    """VG150 SGDet recall metrics, as Scene-Graph-Benchmark (SGB) and SGTR compute them.

    gts[i]   = {"boxes": (N, 4) xyxy pixels, "labels": (N,), "rels": (R, 3) [subject, object, predicate 1..C]}
    preds[i] = {"boxes": (M, 4), "labels": (M,), "scores": (M,), "rel_pairs": (Q, 2) indices into boxes, ranked
                best first, "rel_scores": (Q, C + 1), column 0 = no relation}
               or the compact form of sgdet_candidates ({"gc": ..., "ng": ...}), with the same numbers.
    zeroshot_triplets: rows (subject label, object label, predicate), SGB's column order.
    longtail: {"head": [...], "body": [...], "tail": [...]} predicate ids.

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
      * head/body/tail: the per-predicate recalls behind mR@K averaged inside each group (SGTR).
    Vectorised: candidates per chunk of images with the same pair count, matching per chunk of images of
    similar GT size; every per-image value and every mean is the same float64 operation on the same values,
    in the same order, as a per-image loop (the test compares with one).
    Returns fractions (not percentages)."""
    _check_inputs("sgdet_metrics", gts, preds, ("boxes", "labels", "rels"), (SGDET_PRED_FIELDS, SGDET_COMPACT_FIELDS))
    ks = tuple(sorted(ks))
    modes = ("", "ng")
    C = num_predicates
    cands = sgdet_candidates(preds, C)
    rels = [np.asarray(g["rels"]).reshape(-1, 3) for g in gts]
    all_pred = np.concatenate([r[:, 2] for r in rels]) if rels else np.zeros(0, int)
    if not ((all_pred >= 1) & (all_pred <= C)).all():  # checked at once; the loop only names the image
        i = next(i for i, r in enumerate(rels) if len(r) and not ((r[:, 2] >= 1) & (r[:, 2] <= C)).all())
        raise ValueError(f"sgdet_metrics: ground truth of image {i}: predicate ids must be 1..{C} "
                         f"(column 3 of rels), got {sorted(set(rels[i][:, 2].tolist()))}")
    n_rels = np.array([len(r) for r in rels])
    n_pairs = np.array([len(c["gc"]["predicates"]) for c in cands])
    used = np.nonzero((n_rels > 0) & (n_pairs > 0))[0]  # SGB skips images without GT or without a pair
    zs = None if zeroshot_triplets is None else np.asarray(zeroshot_triplets, np.int64).reshape(-1, 3)
    # per image (NaN = not averaged) and per (image, predicate) entries, filled chunk by chunk
    recall = {(m, k): np.full(len(gts), np.nan) for m in modes for k in ks}
    zrecall = {(m, k): np.full(len(gts), np.nan) for m in modes for k in ks}
    per_pred = {(m, k): [] for m in modes for k in ks}  # arrays of rows (image, predicate, recall in that image)
    mode_cands = {m: [c[key] for c in cands] for m, key in zip(modes, ("gc", "ng"))}
    for ids in _chunks_by_size(n_rels[used], chunk):
        ids = used[ids]
        B = len(ids)
        gt_chunk = _sgdet_gt_chunk(gts, ids)
        g_trip, valid = gt_chunk[2:]  # (B, R, 3), (B, R)
        for mode in modes:
            hit = _sgdet_hits(gt_chunk, mode_cands[mode], ids, ks)  # {K: (B, R)}
            n_gt = valid.sum(1)  # (B,)
            code = np.arange(B)[:, None] * (C + 1) + np.where(valid, g_trip[:, :, 1], 0)  # (B, R) image x predicate
            present = np.bincount(code.ravel(), valid.ravel(), B * (C + 1)).reshape(B, C + 1)  # GT count
            b, p = np.nonzero(present[:, 1:])
            p = p + 1
            zs_mask = None
            if zs is not None:  # zero-shot lookup in SGB's column order (subject label, object label, predicate)
                zs_mask = _in_rows(g_trip[:, :, [0, 2, 1]], zs) & valid
                n_zs = zs_mask.sum(1)
            for k in ks:
                h = hit[k] & valid
                recall[mode, k][ids] = h.sum(1) / n_gt
                hits_p = np.bincount(code.ravel(), h.ravel(), B * (C + 1)).reshape(B, C + 1)
                per_pred[mode, k].append(np.stack([ids[b], p, hits_p[b, p] / present[b, p]], 1))
                if zs_mask is not None:
                    rows = n_zs > 0
                    zrecall[mode, k][ids[rows]] = (h & zs_mask).sum(1)[rows] / n_zs[rows]
    out = {}
    for mode in modes:
        for k in ks:
            rec = recall[mode, k][~np.isnan(recall[mode, k])]  # image order
            out[f"{mode}R@{k}"] = float(np.mean(rec)) if len(rec) else 0.0
            entries = np.concatenate(per_pred[mode, k]) if per_pred[mode, k] else np.zeros((0, 3))
            entries = entries[np.lexsort((entries[:, 0], entries[:, 1]))]  # by predicate, then image order
            per = np.zeros(num_predicates)
            if len(entries):
                preds_sorted = entries[:, 1].astype(np.int64)
                starts = np.flatnonzero(np.r_[True, preds_sorted[1:] != preds_sorted[:-1]])
                for s, e in zip(starts, np.r_[starts[1:], len(entries)]):
                    per[preds_sorted[s] - 1] = np.mean(entries[s:e, 2])
            out[f"{mode}mR@{k}"] = float(per.mean())
            if zeroshot_triplets is not None:
                z = zrecall[mode, k][~np.isnan(zrecall[mode, k])]
                out[f"{mode}zR@{k}"] = float(np.mean(z)) if len(z) else 0.0
            for group, ids_ in (longtail or {}).items():
                out[f"{mode}mR@{k}_{group}"] = float(np.mean([per[i - 1] for i in ids_])) if len(ids_) else 0.0
    return out


# ------------------------------------------------------------------------------------------------ HICO-DET


def eleven_point_ap(rec, prec):
    """11-point interpolated AP of QPIC's voc_ap and the official VOCevaldet_bboxpair.m. The thresholds are
    np.arange(0., 1.1, 0.1): 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001 sit just above
    their decimal value, so a recall of exactly 0.3, 0.6 or 0.7 does not reach them (kept on purpose)."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap += p / 11.0
    return ap


HICO_PRED_FIELDS = ("boxes", "labels", "sub_ids", "obj_ids", "verb_scores")
HICO_COMPACT_FIELDS = ("sub_boxes", "obj_boxes", "sub_labels", "obj_labels", "verbs", "scores")


def hico_candidates(preds, correct_mat, max_hois=100, chunk=256):
    """Raw HICO predictions (QPIC's PostProcessHOI) -> the compact form the evaluator needs, per image: its top
    max_hois (pair, verb) candidates after the verb-object mask, in QPIC's visit order:
    scores = verb_scores x correct_mat[verb, object label] in float32 (masked candidates score 0, not removed),
    enumerated pair-major (p * V + v), stable descending sort, the first max_hois kept.
    Returns dicts of sub_boxes (D, 4) float32, obj_boxes, sub_labels, obj_labels, verbs, scores (D,) float32."""
    _check_preds("hico_map", preds, (HICO_PRED_FIELDS, HICO_COMPACT_FIELDS))
    cm_t = np.asarray(correct_mat, np.float32).T  # (O, V)
    all_valid = bool((cm_t == 1).all())
    out = [None] * len(preds)
    groups = {}  # images with the same (P, V) are ranked together
    for i, p in enumerate(preds):
        if "verb_scores" not in p:  # already compact
            out[i] = p
            continue
        vs = np.asarray(p["verb_scores"])
        if vs.ndim != 2 or vs.shape[1] != cm_t.shape[1] or vs.shape[0] != len(np.asarray(p["obj_ids"])):
            raise ValueError(f"hico_map: prediction of image {i}: verb_scores has shape {vs.shape}, expected "
                             f"({len(np.asarray(p['obj_ids']))}, {cm_t.shape[1]}) = (pairs, verbs of correct_mat)")
        groups.setdefault(vs.shape, []).append(i)
    for (P, V), ids in groups.items():
        for c in range(0, len(ids), chunk):
            idx = ids[c:c + chunk]
            labels = [np.asarray(preds[i]["labels"]) for i in idx]
            sub_ids = [np.asarray(preds[i]["sub_ids"]) for i in idx]
            obj_ids = [np.asarray(preds[i]["obj_ids"]) for i in idx]
            obj_labels = np.stack([lab[o] for lab, o in zip(labels, obj_ids)])  # (B, P)
            scores = np.stack([np.asarray(preds[i]["verb_scores"], np.float32) for i in idx])  # (B, P, V)
            if not all_valid:  # x 1.0 changes nothing: a dense mask skips the multiplication
                scores *= cm_t[obj_labels]
            flat = scores.reshape(len(idx), P * V)  # (B, P * V) pair-major
            top = _stable_topk_desc(flat, max_hois)  # (B, D)
            for j, i in enumerate(idx):
                boxes = np.asarray(preds[i]["boxes"], np.float32).reshape(-1, 4)
                det_p, det_v = top[j] // V, top[j] % V
                s, o = sub_ids[j][det_p], obj_ids[j][det_p]
                out[i] = dict(sub_boxes=boxes[s], obj_boxes=boxes[o], sub_labels=labels[j][s],
                              obj_labels=labels[j][o], verbs=det_v, scores=flat[j, top[j]])
    return out


def _hico_match(gts, cands, ids):
    """A chunk of images (all with GT boxes) -> (B, D) bool true positives of their candidates, QPIC's rule:
    a candidate matches the GT HOI of its verb with both boxes of the same label and QPIC IoU >= 0.5 and the
    largest min(IoU_sub, IoU_obj) (first GT on ties); if that GT is already matched it is a false positive.
    A duplicate GT row has the same column as its first copy, so argmax always picks the first copy."""
    hois = [np.asarray(gts[i]["hois"]).reshape(-1, 3) for i in ids]
    K = max(len(h) for h in hois)
    D = max(len(cands[i]["verbs"]) for i in ids)
    B = len(ids)
    if K == 0 or D == 0:
        return np.zeros((B, D), bool)
    gb = [np.asarray(gts[i]["boxes"], np.float32).reshape(-1, 4) for i in ids]
    gl = [np.asarray(gts[i]["labels"]) for i in ids]
    g_sub = _pad_stack([b[h[:, 0]] for b, h in zip(gb, hois)], K, 0, (4,), np.float32)  # (B, K, 4)
    g_obj = _pad_stack([b[h[:, 1]] for b, h in zip(gb, hois)], K, 0, (4,), np.float32)
    g_sl = _pad_stack([lab[h[:, 0]] for lab, h in zip(gl, hois)], K, -1, (), np.int64)  # (B, K)
    g_ol = _pad_stack([lab[h[:, 1]] for lab, h in zip(gl, hois)], K, -1, (), np.int64)
    g_v = _pad_stack([h[:, 2] for h in hois], K, -1, (), np.int64)
    c = [cands[i] for i in ids]
    d_sub = _pad_stack([x["sub_boxes"] for x in c], D, 0, (4,), np.float32)  # (B, D, 4)
    d_obj = _pad_stack([x["obj_boxes"] for x in c], D, 0, (4,), np.float32)
    d_sl = _pad_stack([x["sub_labels"] for x in c], D, -2, (), np.int64)  # (B, D); -2 never equals GT
    d_ol = _pad_stack([x["obj_labels"] for x in c], D, -2, (), np.int64)
    d_v = _pad_stack([x["verbs"] for x in c], D, -2, (), np.int64)
    # QPIC's compute_IOU returns 0 for boxes of different labels
    ov_s = np.where(d_sl[:, :, None] == g_sl[:, None, :], qpic_iou_matrix(d_sub, g_sub), 0.0)  # (B, D, K)
    ov_o = np.where(d_ol[:, :, None] == g_ol[:, None, :], qpic_iou_matrix(d_obj, g_obj), 0.0)
    ok = (ov_s >= IOU_THRESHOLD) & (ov_o >= IOU_THRESHOLD) & (d_v[:, :, None] == g_v[:, None, :])
    best = np.where(ok, np.minimum(ov_s, ov_o), -1.0).argmax(2)  # (B, D): first GT on ties (QPIC's strict '>')
    has = np.take_along_axis(ok, best[:, :, None], 2)[:, :, 0]  # (B, D) the candidate has a GT to match
    # the first candidate (in visit order) that picks a GT is its TP; later ones picking it are FPs
    key = np.where(has, np.arange(B)[:, None] * K + best, -1).ravel()
    tp = np.zeros(B * D, bool)
    first = np.unique(key, return_index=True)[1]
    tp[first] = key[first] >= 0
    return tp.reshape(B, D)


def hico_map(gts, preds, correct_mat, rare_triplets, known_object=False, non_rare_triplets=None, max_hois=100,
             chunk=1024):
    """HICO-DET mAP as hitachi-rd-cv/qpic datasets/hico_eval.py (Default) and ho-rcnn eval_one.m (Known-Object).

    gts[i]   = {"boxes": (N, 4) xyxy, "labels": (N,), "hois": (K, 3) [subject index, object index, verb]}
    preds[i] = {"boxes", "labels", "sub_ids": (P,), "obj_ids": (P,), "verb_scores": (P, V)} (PostProcessHOI)
               or the compact form of hico_candidates (then correct_mat was applied there and is not used here).
    correct_mat (V, O) verb-object validity; rare_triplets rows (subject label, object label, verb);
    non_rare_triplets likewise (QPIC: training count >= 10; see below).

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
        instances, so a class with zero training instances is in neither and counts for Full only); without
        non_rare_triplets, every class not in rare_triplets;
      * known_object: a class's detections are kept only on images whose GT has an HOI with that class's object
        label (the official rule, with the image-level table built from the box GT); npos unchanged.
    Vectorised: candidate selection per chunk of images with np.partition, matching per chunk of images of
    similar GT size, one per-class loop over flat arrays; the per-class arrays are the same values in the same
    order as a per-image loop, so np.argsort's tie order and every float are unchanged.
    Returns fractions: mAP_full, mAP_rare, mAP_non_rare (and mean_max_recall), and per_class: each class's
    triplet (subject label, object label, verb), npos, AP and rarity (the toy test set has 16 classes, so one class
    moving by 40 AP moves mAP Full by 2.5)."""
    _check_inputs("hico_map", gts, preds, ("boxes", "labels", "hois"), (HICO_PRED_FIELDS, HICO_COMPACT_FIELDS))
    # the GT classes in order of first appearance, their npos, and which images show which object label
    hois = [np.asarray(g["hois"]).reshape(-1, 3) for g in gts]
    gt_labels = [np.asarray(g["labels"]) for g in gts]
    gt_trip = [np.stack([lab[h[:, 0]], lab[h[:, 1]], h[:, 2]], 1).astype(np.int64) for lab, h in zip(gt_labels, hois)]
    all_gt = np.concatenate(gt_trip) if gt_trip else np.zeros((0, 3), np.int64)
    gt_image = np.repeat(np.arange(len(gts)), [len(h) for h in hois])
    has_boxes = np.array([len(np.asarray(g["boxes"]).reshape(-1, 4)) > 0 for g in gts], bool)
    used = np.nonzero(has_boxes)[0]  # images without GT boxes: predictions dropped (QPIC)
    cands = [None] * len(gts)
    for i, c in zip(used, hico_candidates([preds[i] for i in used], correct_mat, max_hois)):
        cands[i] = c
    # every triplet as one int64 code (labels and verbs shifted to be >= 0)
    det_trip = [np.stack([cands[i]["sub_labels"], cands[i]["obj_labels"], cands[i]["verbs"]], 1).reshape(-1, 3)
                for i in used]
    rows = np.concatenate([all_gt] + det_trip).astype(np.int64) if len(all_gt) + len(det_trip) else \
        np.zeros((0, 3), np.int64)
    lo = min(rows.min(initial=0), 0)
    bases = rows.max(0, initial=0) - lo + 1 if len(rows) else np.ones(3, np.int64)
    gt_codes = _triplet_codes(all_gt - lo, bases)
    _, first_idx, class_of_gt = np.unique(gt_codes, return_index=True, return_inverse=True)
    appearance = np.argsort(first_idx, kind="stable")  # classes in order of first appearance (QPIC)
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(len(appearance))
    class_codes = np.unique(gt_codes)[appearance]  # (n_classes,)
    gt_classes = [tuple(int(x) for x in all_gt[first_idx[j]]) for j in appearance]
    npos = np.bincount(rank[class_of_gt.ravel()], minlength=len(gt_classes)) if len(gt_codes) else np.zeros(0, int)
    # per image and candidate: class index (-1: not a GT class), score, true positive; image order x visit order
    D = max((len(cands[i]["verbs"]) for i in used), default=0)
    det_class = np.full((len(gts), D), -1, np.int64)
    det_score = np.zeros((len(gts), D), np.float32)
    det_tp = np.zeros((len(gts), D), bool)
    sorted_codes = np.sort(class_codes)
    sorted_to_class = np.argsort(class_codes)  # position in sorted_codes -> class index
    for ids in _chunks_by_size([len(hois[i]) for i in used], chunk):
        ids = used[ids]
        tp = _hico_match(gts, cands, ids)  # (B, D') with D' <= D
        fields = {f: _pad_stack([cands[i][f] for i in ids], D, -1, (), np.int64)
                  for f in ("sub_labels", "obj_labels", "verbs")}  # (B, D) each; padding -1
        codes = _triplet_codes(np.stack([fields["sub_labels"], fields["obj_labels"], fields["verbs"]], -1) - lo, bases)
        if len(sorted_codes):
            pos = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)  # (B, D)
            is_class = (sorted_codes[pos] == codes) & (fields["verbs"] >= 0)
            det_class[ids] = np.where(is_class, sorted_to_class[pos], -1)
        det_score[ids] = _pad_stack([cands[i]["scores"] for i in ids], D, 0, (), np.float32)
        det_tp[ids, :tp.shape[1]] = tp
    flat_class, flat_score, flat_tp = det_class.ravel(), det_score.ravel(), det_tp.ravel()
    flat_image = np.repeat(np.arange(len(gts)), D)
    keep = flat_class >= 0
    flat_class, flat_score, flat_tp, flat_image = flat_class[keep], flat_score[keep], flat_tp[keep], flat_image[keep]
    order = np.argsort(flat_class, kind="stable")  # grouped by class, image and visit order kept inside
    flat_class, flat_score, flat_tp, flat_image = flat_class[order], flat_score[order], flat_tp[order], flat_image[order]
    bounds = np.searchsorted(flat_class, np.arange(len(gt_classes) + 1))
    if known_object:  # image-level table from the box GT: image i shows an HOI with object label o
        obj_lo = int(min(all_gt[:, 1].min(initial=0), 0))
        n_obj = int(all_gt[:, 1].max(initial=0)) - obj_lo + 1
        shows = np.zeros((len(gts), n_obj), bool)
        shows[gt_image, all_gt[:, 1] - obj_lo] = True
    ap, max_recall = np.zeros(len(gt_classes)), np.zeros(len(gt_classes))
    for c, trip in enumerate(gt_classes):
        scores, tps = flat_score[bounds[c]:bounds[c + 1]], flat_tp[bounds[c]:bounds[c + 1]]
        if known_object and len(scores):
            keep = shows[flat_image[bounds[c]:bounds[c + 1]], trip[1] - obj_lo]
            scores, tps = scores[keep], tps[keep]
        if len(scores) == 0:
            continue  # AP 0, max recall 0
        rank_order = np.argsort(-scores)  # float32, numpy's default sort (QPIC)
        tp = np.cumsum(tps[rank_order])
        fp = np.cumsum(~tps[rank_order])
        rec = tp / npos[c]
        prec = tp / (tp + fp)
        ap[c], max_recall[c] = eleven_point_ap(rec, prec), float(rec.max())
    rare = _triplet_set(rare_triplets)
    non_rare = _triplet_set(non_rare_triplets) if non_rare_triplets is not None else set(gt_classes) - rare
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    per_class = [{"triplet": list(t), "npos": int(npos[c]), "ap": float(ap[c]), "rare": t in rare}
                 for c, t in enumerate(gt_classes)]  # the classes' APs, in order of first appearance
    return dict(mAP_full=mean([ap[c] for c in range(len(gt_classes))]),
                mAP_rare=mean([ap[c] for c, t in enumerate(gt_classes) if t in rare]),
                mAP_non_rare=mean([ap[c] for c, t in enumerate(gt_classes) if t in non_rare]),
                mean_max_recall=mean([max_recall[c] for c in range(len(gt_classes))]), num_classes=len(gt_classes),
                per_class=per_class)


# ------------------------------------------------------------------------------------------------ V-COCO


def voc_ap(rec, prec):
    """All-point VOC AP of vsrl_eval.py: end points (0, 0) and (1, 0), precision made monotone from the right,
    sum of recall steps x precision."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _vcoco_ap(tp, fp, scores, npos):
    """Global ranking a_sc.argsort()[::-1] on float32 scores; AP 0 without detections, NaN when npos = 0."""
    if npos == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.asarray(scores, np.float32).argsort()[::-1]
    tp = np.cumsum(np.asarray(tp, np.float32)[order])
    fp = np.cumsum(np.asarray(fp, np.float32)[order])
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec)


def _nanmean_or_zero(values):
    """Mean over the non-NaN values; 0 when there is none."""
    values = np.asarray(values, float)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else 0.0


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
    agent_rec = [([], [], []) for _ in range(A)]  # (tp, fp, scores)
    role_rec = {(a, r, s): ([], [], []) for a in range(A) for r in range(len(actions[a]["roles"]) - 1) for s in (1, 2)}
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
                    record[0].append(0), record[1].append(1), record[2].append(scores[j])
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
                record[0].append(int(ok)), record[1].append(int(not ok)), record[2].append(scores[j])

        for a in range(A):
            visit(agent_scores[:, a], a, agent_rec[a])
            for r in range(len(actions[a]["roles"]) - 1):
                for s in (1, 2):
                    visit(role_scores[:, a, r], a, role_rec[(a, r, s)], role=r, scenario=s)
    agent_ap = np.array([_vcoco_ap(*agent_rec[a], npos[a]) for a in range(A)])
    out = {"agent_mAP": float(np.nansum(agent_ap) / A), "agent_ap": {actions[a]["name"]: agent_ap[a] for a in range(A)}}
    for s in (1, 2):
        aps = {f"{actions[a]['name']}-{actions[a]['roles'][r + 1]}": _vcoco_ap(*role_rec[(a, r, s)], npos[a])
               for a in range(A) for r in range(len(actions[a]["roles"]) - 1)}
        reported = [v for k, v in aps.items() if k != "point-instr"]
        out[f"role_mAP_S{s}"] = _nanmean_or_zero(reported)
        out[f"role_mAP_S{s}_all"] = _nanmean_or_zero(list(aps.values()))
        out[f"role_ap_S{s}"] = aps
    return out


# ------------------------------------------------------------------------------------------------ inference on a test split


def sgg_ground_truth(record):
    """A VG record (0-based predicates) -> sgdet_metrics' GT (predicates 1..C)."""
    return dict(boxes=record["boxes"], labels=record["labels"], rels=record["rels"] + np.array([0, 0, 1]))


def hico_ground_truth(record):
    return dict(boxes=record["boxes"], labels=record["labels"], hois=record["hois"])


def longtail_groups(train_records, num_predicates, head=0.09, tail=0.04):
    """Head / body / tail predicate ids (1-based) from training frequencies: head >= 9 % of the training
    relations, tail < 4 %, body in between (the toy scenes' frequency gaps lie at about 9 % and 4 %).
    Used for the toy scenes; VG150 uses SGTR's fixed list (vocab.json)."""
    counts = np.zeros(num_predicates)
    for r in train_records:
        np.add.at(counts, r["rels"][:, 2], 1)
    frac = counts / max(counts.sum(), 1)
    groups = {"head": [], "body": [], "tail": []}
    for p in range(num_predicates):
        if counts[p] == 0:
            continue
        groups["head" if frac[p] >= head else "tail" if frac[p] < tail else "body"].append(p + 1)
    return groups


def zeroshot_from_training(train_records, test_records):
    """(subject label, object label, predicate 1..C) triplets of the test GT that never occur in training."""
    def triplets(records):
        return {(int(r["labels"][s]), int(r["labels"][o]), int(p) + 1) for r in records
                for s, o, p in r["rels"].tolist()}
    return sorted(triplets(test_records) - triplets(train_records))


def _test_dataset(records, cfg):
    """The records with the test transform (shorter side = cfg.image_size), as a DetectionDataset."""
    import sg2hoi

    tf = sg2hoi.make_transforms(False, cfg.image_size, cfg.max_size)
    return sg2hoi.DetectionDataset(records, {"task": "sgg" if "rels" in records[0] else "hoi"}, tf)


def _forward(model, images, mask, device, amp=False):
    """The model in inference: no gradients; float32, or bf16 autocast on CUDA when amp (train.py --amp bf16 /
    eval.py --amp bf16: faster, the box branches stay float32)."""
    import torch

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        return model(images.to(device), mask.to(device))


def predict(model, cfg, records, device, batch_size=8, rel_post=None, hoi_post=None, want=("rel", "hoi"), amp=False):
    """Run the model on records; returns (relation predictions, HOI predictions) per image, original pixels.
    rel_post / hoi_post: functions applied to each batch's list of predictions as soon as it is made (collect
    uses them to keep only the compact form); want: which of the two to compute; amp: as in _forward."""
    import torch
    import sg2hoi

    if not records:  # a process whose shard of the test split is empty (fewer images than processes)
        return [], []
    loader = torch.utils.data.DataLoader(_test_dataset(records, cfg), batch_size=batch_size, shuffle=False,
                                         num_workers=0, collate_fn=sg2hoi.collate)
    rel_preds, hoi_preds = [], []
    model.eval()
    for images, mask, targets in loader:
        out = _forward(model, images, mask, device, amp)
        sizes = [t["orig_size"].tolist() for t in targets]
        if "rel" in want:
            batch = sg2hoi.relation_predictions(out["rel"], sizes)
            rel_preds += rel_post(batch) if rel_post else batch
        if "hoi" in want and "hoi" in out:
            batch = sg2hoi.hoi_predictions(out["hoi"], sizes)
            hoi_preds += hoi_post(batch) if hoi_post else batch
    return rel_preds, hoi_preds


def time_per_image(model, cfg, records, device, warmup=3, n=20, amp=False):
    """Table I's time per image: batch 1, after warm-up, model forward plus post-processing."""
    import torch
    import sg2hoi

    ds = _test_dataset(records[: warmup + n], cfg)
    model.eval()
    times = []
    for i in range(len(ds)):
        images, mask, targets = sg2hoi.collate([ds[i]])
        images, mask = images.to(device), mask.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = _forward(model, images, mask, device, amp)
        sg2hoi.relation_predictions(out["rel"], [targets[0]["orig_size"].tolist()])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return float(np.mean(times)) if times else float("nan"), name


def _rank_world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_to_master(local):
    """Every rank's object -> the list of all ranks' objects on rank 0 (None on the others); one collective.
    Without a process group: [local]."""
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return [local]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return gathered


def _interleave(shards, n):
    """Rank r's shard holds images r, r + W, r + 2W, ... (W = len(shards)) -> one list in image order."""
    out = [None] * n
    for r, shard in enumerate(shards):
        if len(shard) != len(range(r, n, len(shards))):
            raise RuntimeError(f"rank {r} returned {len(shard)} predictions for {len(range(r, n, len(shards)))} images")
        out[r::len(shards)] = shard
    return out


def collect(model, cfg, data, device, limit=0, compact=True, amp=False):
    """data: {"sgg": {"train": (records, meta), "test": (...)}, "hoi": {...}} -> everything the metrics need.

    Distributed (a torch.distributed process group is initialised): every rank runs the model on its own shard
    of each test split (rank r takes images r, r + W, r + 2W, ...: no padding, no image twice or lost), reduces
    each prediction to the compact form (compact=True) and the shards are gathered to rank 0 in one
    gather_object, put back in image order there. Rank 0 then builds the ground truth and times Table I (no
    collective after the gather). Returns the dict on rank 0 and None on the other ranks.
    The compact form keeps what the evaluator reads: HICO-DET the top-100 masked (pair, verb) candidates
    (hico_candidates), SGDet each pair's graph-constrained triplet and the top-100 no-graph-constraint
    candidates (sgdet_candidates), V-COCO the masked detections in float32 (vcoco_detections); the metrics are
    the same as from the full predictions (compact=False keeps those, for tests). amp: as in _forward."""
    import sg2hoi

    rank, world = _rank_world()
    tests, local = {}, {}
    if "sgg" in data:
        test, meta = data["sgg"]["test"]
        tests["sgg"] = test = test[:limit] if limit else test
        C = len(meta["predicate_names"])
        post = (lambda batch: sgdet_candidates(batch, C)) if compact else None
        local["sgg"] = predict(model, cfg, test[rank::world], device, rel_post=post, want=("rel",), amp=amp)[0]
    if "hoi" in data:
        test, meta = data["hoi"]["test"]
        tests["hoi"] = test = test[:limit] if limit else test
        if not compact:
            post = None
        elif meta["dataset"] == "hico":
            post = lambda batch: hico_candidates(batch, meta["correct_mat"])  # noqa: E731
        else:
            post = lambda batch: [vcoco_detections(p, meta["verbs"], meta["actions"], meta["correct_mat"])  # noqa
                                  for p in batch]
        local["hoi"] = predict(model, cfg, test[rank::world], device, hoi_post=post, want=("hoi",), amp=amp)[1]
    gathered = _gather_to_master(local)
    if rank != 0:
        return None
    preds = {task: _interleave([g[task] for g in gathered], len(tests[task])) for task in local}
    out = {}
    if "sgg" in data:
        (train, _), (_, meta) = data["sgg"]["train"], data["sgg"]["test"]
        test = tests["sgg"]
        vocab = sg2hoi.load_vocab()
        is_vg150 = meta["predicate_names"] == vocab["vg150_predicates"] and not meta.get("toy")
        out["sgg"] = dict(gts=[sgg_ground_truth(r) for r in test], preds=preds["sgg"],
                          num_predicates=len(meta["predicate_names"]),
                          zeroshot=zeroshot_from_training(train, test),
                          longtail=vocab["vg150_longtail"] if is_vg150 else
                          longtail_groups(train, len(meta["predicate_names"])))
        out["sgg"]["time"], out["sgg"]["device"] = time_per_image(model, cfg, test, device, amp=amp)  # rank 0 alone
    if "hoi" in data:
        (train, _), (_, meta) = data["hoi"]["train"], data["hoi"]["test"]
        test = tests["hoi"]
        out["hoi"] = dict(dataset=meta["dataset"], preds=preds["hoi"], correct_mat=meta["correct_mat"])
        if meta["dataset"] == "hico":
            out["hoi"]["gts"] = [hico_ground_truth(r) for r in test]
            rare, counts = sg2hoi.rare_triplets_from_training(train)
            out["hoi"]["rare"] = rare
            out["hoi"]["non_rare"] = non_rare_triplets(counts)
            out["hoi"]["verb_names"], out["hoi"]["object_names"] = meta["verb_names"], meta["object_names"]
        else:
            out["hoi"]["gts"] = [sg2hoi.vcoco_ground_truth(r, meta["verbs"], meta["actions"]) for r in test]
            out["hoi"]["verbs"], out["hoi"]["actions"] = meta["verbs"], meta["actions"]
    return out


def non_rare_triplets(train_counts, threshold=10):
    """QPIC's non-rare set: triplets with at least `threshold` training instances. A test class that never
    occurs in training is in neither the rare nor the non-rare list (QPIC's set_rare_hois): Full only."""
    return sorted(t for t, c in train_counts.items() if c >= threshold)


def vcoco_detections(pred, verbs, actions, correct_mat=None, missing_object_label=80):
    """QPIC's V-COCO post-processing and generate_vcoco_official: one detection per query.

    First the verb scores are multiplied by the verb-object validity mask, as QPIC's and CDN's V-COCO
    PostProcessHOI do (metrics.md section 2.2): score[q, v] *= correct_mat[v, object_label(q)], where
    correct_mat is corre_vcoco (V, 80) with a column of ones appended for the "no object" class (a (V, 81) mask
    that already has it is used as it is), so impossible (verb, object) pairs get score 0.
    Then a role score is its verb's masked score, its box the object box (NaN when the object label is
    "no object"); the agent score is the role's score, the max of the two role scores for two-role actions, or
    the agent-only verb's own score. Everything in float32 (the evaluator's precision)."""
    Q = len(pred["sub_ids"])
    A = len(actions)
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


def metrics_from_collected(c):
    """The numbers of Tables I-IV from collect()'s output (or from a --predictions file); predictions may be
    in the full or the compact form."""
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
            preds = hico_candidates(h["preds"], h["correct_mat"])  # once for both settings
            m["hico"] = {"default": hico_map(h["gts"], preds, h["correct_mat"], **kw),
                         "known_object": hico_map(h["gts"], preds, h["correct_mat"], known_object=True, **kw)}
            if "verb_names" in h:  # each class's AP under its name, e.g. "ride horse"
                for setting in m["hico"].values():
                    for c in setting["per_class"]:
                        c["name"] = f"{h['verb_names'][c['triplet'][2]]} {h['object_names'][c['triplet'][1]]}"
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


# The headline numbers that --bootstrap reports: (label, place in metrics_from_collected's dict).
HEADLINE = (("SGDet R@50", "sgg.R@50"), ("SGDet mR@50", "sgg.mR@50"), ("HICO mAP Full", "hico.default.mAP_full"),
            ("HICO mAP Rare", "hico.default.mAP_rare"), ("HICO mAP Non-rare", "hico.default.mAP_non_rare"),
            ("V-COCO AP S1", "vcoco.role_mAP_S1"))


def headline(metrics):
    """{label: value in %} of the HEADLINE numbers present in a metrics dict."""
    values = {label: lookup_metric(metrics, dotted) for label, dotted in HEADLINE}
    return {label: 100 * v for label, v in values.items() if v is not None}


def resample(collected, picks):
    """collect()'s dict with each task's test images replaced by picks[task] (indices, repeats allowed): one image
    drawn twice counts twice, its ground truth and its predictions alike."""
    out = {}
    for task, c in collected.items():
        idx = picks[task]
        out[task] = {**c, "gts": [c["gts"][i] for i in idx], "preds": [c["preds"][i] for i in idx]}
    return out


def bootstrap(collected_runs, resamples=200, seed=0):
    """How much of a metric, and of the difference between runs, is the luck of the test images: the test images
    of each split are drawn with replacement `resamples` times, the same draw for every run (a paired bootstrap),
    and the HEADLINE metrics recomputed. collected_runs: {name: collect()'s dict}, every run on the same test
    splits. Returns {"runs": {name: {label: (value, std)}}, "differences": {"b - a": {label: (diff, std, lo, hi)}}}
    with the 2.5 / 97.5 % percentiles of each difference against the first run."""
    names = list(collected_runs)
    sizes = {t: len(c["gts"]) for t, c in collected_runs[names[0]].items()}
    for name in names[1:]:
        other = {t: len(c["gts"]) for t, c in collected_runs[name].items()}
        if other != sizes:
            raise ValueError(f"--bootstrap: {name} has test splits {other}, {names[0]} has {sizes}: the runs must "
                             f"be evaluated on the same test images")
    full = {n: headline(metrics_from_collected(c)) for n, c in collected_runs.items()}
    rng = np.random.default_rng(seed)
    draws = {n: [] for n in names}
    for _ in range(resamples):
        picks = {t: rng.integers(0, size, size) for t, size in sizes.items()}
        for n in names:
            draws[n].append(headline(metrics_from_collected(resample(collected_runs[n], picks))))
    labels = [label for label, _ in HEADLINE if label in full[names[0]]]
    table = {n: np.array([[d[label] for label in labels] for d in draws[n]]) for n in names}
    result = {"resamples": resamples, "seed": seed, "images": sizes,
              "runs": {n: {label: (full[n][label], float(table[n][:, j].std())) for j, label in enumerate(labels)}
                       for n in names},
              "differences": {}}
    for n in names[1:]:
        diff = table[n] - table[names[0]]
        result["differences"][f"{n} - {names[0]}"] = {
            label: (full[n][label] - full[names[0]][label], float(diff[:, j].std()),
                    float(np.percentile(diff[:, j], 2.5)), float(np.percentile(diff[:, j], 97.5)))
            for j, label in enumerate(labels)}
    return result


def format_bootstrap(result):
    lines = [f"paired bootstrap: {result['resamples']} draws of the test images {result['images']} with replacement"]
    for n, row in result["runs"].items():
        lines.append(f"{n}: " + " | ".join(f"{label} {v:.1f} +- {s:.1f}" for label, (v, s) in row.items()))
    for n, row in result["differences"].items():
        lines.append(f"{n}: " + " | ".join(f"{label} {d:+.1f} (std {s:.1f}, 95 % {lo:+.1f} .. {hi:+.1f})"
                                            for label, (d, s, lo, hi) in row.items()))
    return "\n".join(lines)


def evaluate(model, cfg, data, device, limit=0, amp=False):
    """Tables I-IV of a model: call it on every rank when a process group is initialised (each rank runs its
    shard, rank 0 computes the metrics). Returns the metrics dict on rank 0 and None on the other ranks, which
    return right after the gather (no collective afterwards inside this function). amp: as in _forward."""
    collected = collect(model, cfg, data, device, limit, amp=amp)
    return None if collected is None else metrics_from_collected(collected)


def format_tables(m):
    """The paper's tables as text (percentages)."""
    lines = []
    pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
    if "sgg" in m:
        s = m["sgg"]
        lines += ["Table I  SGDet (" + f"{s['num_images']} test images)",
                  "          R@20/50/100          mR@20/50/100        ngR@20/50/100        ngmR@20/50/100      "
                  "zR@50/100     time/img",
                  "          " + " / ".join(pct(s[f"R@{k}"]) for k in (20, 50, 100)) + "   "
                  + " / ".join(pct(s[f"mR@{k}"]) for k in (20, 50, 100)) + "   "
                  + " / ".join(pct(s[f"ngR@{k}"]) for k in (20, 50, 100)) + "   "
                  + " / ".join(pct(s[f"ngmR@{k}"]) for k in (20, 50, 100)) + "   "
                  + " / ".join(pct(s.get(f"zR@{k}", 0)) for k in (50, 100))
                  + f"   {1000 * (s['time_per_image_s'] or float('nan')):.1f} ms on {s['device']}",
                  "Table II long-tail mR@50/100:  head " + " / ".join(pct(s.get(f"mR@{k}_head", 0)) for k in (50, 100))
                  + "   body " + " / ".join(pct(s.get(f"mR@{k}_body", 0)) for k in (50, 100))
                  + "   tail " + " / ".join(pct(s.get(f"mR@{k}_tail", 0)) for k in (50, 100))]
    if "vcoco" in m:
        v = m["vcoco"]
        lines += [f"Table III V-COCO  AP_role S1 {pct(v['role_mAP_S1'])}  S2 {pct(v['role_mAP_S2'])}  "
                  f"(agent mAP {pct(v['agent_mAP'])})"]
    if "hico" in m:
        d, k = m["hico"]["default"], m["hico"]["known_object"]
        lines += ["Table IV HICO-DET    Default: Full / Rare / Non-rare     Known-Object: Full / Rare / Non-rare",
                  f"                     {pct(d['mAP_full'])} / {pct(d['mAP_rare'])} / {pct(d['mAP_non_rare'])}"
                  f"                {pct(k['mAP_full'])} / {pct(k['mAP_rare'])} / {pct(k['mAP_non_rare'])}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pictures (Figs. 2-4)


def _palette(n):
    """n distinct RGB colours (golden-angle hues), the same colour for a class in every picture."""
    import colorsys

    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)) for i in range(n)]


def draw_prediction(image_uint8, gt, seg_map, triplets, class_names, seg_names, max_side=384):
    """One picture like the paper's Figures 2-4, as a (3, H', W') uint8 tensor:
    [image + ground-truth boxes | predicted box-based segmentation map over the image | image + the predicted
    triplets' boxes], and under it a legend, one line per triplet, in the colour of its boxes.

    image_uint8 (3, H, W); gt = {"boxes" (N, 4) xyxy pixels, "labels" (N,)}; seg_map (h, w) class index into
    seg_names, 0 = background; triplets = [(subject box, subject name, relation text, object box or None,
    object name, score)], best first."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    from torchvision.transforms.v2 import functional as TF
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    H, W = image_uint8.shape[-2:]
    scale = max_side / max(H, W)
    size = (round(H * scale), round(W * scale))
    image = TF.resize(image_uint8, list(size), antialias=True)

    def scaled(boxes):
        return torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4) * scale

    seg_colours, triplet_colours = _palette(len(seg_names) + 1), _palette(len(triplets))
    # 1. ground truth
    gt_labels = [class_names[int(c)] for c in gt["labels"]]
    panel_gt = draw_bounding_boxes(image, scaled(gt["boxes"]), gt_labels, colors="white", width=2)
    # 2. the segmentation map of Eq. 1, one colour per class, background left transparent
    seg = F.interpolate(torch.as_tensor(seg_map)[None, None].float(), size=size, mode="nearest")[0, 0].long()
    present = [int(c) for c in seg.unique() if c > 0]
    masks = torch.stack([seg == c for c in present]) if present else torch.zeros(0, *size, dtype=torch.bool)
    panel_seg = draw_segmentation_masks(image, masks, alpha=0.6, colors=[seg_colours[c] for c in present]) \
        if present else image.clone()
    # 3. the predicted triplets: subject and object of triplet i share colour i and are tagged "i"
    boxes, tags, cols = [], [], []
    for i, (sbox, _, _, obox, _, _) in enumerate(triplets):
        for box in (sbox, obox):
            if box is not None:
                boxes.append(scaled(box)[0])
                tags.append(str(i + 1))
                cols.append(triplet_colours[i])
    panel_pred = draw_bounding_boxes(image, torch.stack(boxes), tags, colors=cols, width=2) if boxes else image
    row = torch.cat([panel_gt, panel_seg, panel_pred], dim=2)  # (3, H', 3 W')
    # the legend (PIL draws text: torchvision's own drawing uses it too)
    line_h = 14
    legend = Image.new("RGB", (row.shape[2], line_h * (len(triplets) + len(present) // 6 + 2) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, (_, sname, rel, _, oname, score) in enumerate(triplets):
        text = f"{i + 1}. {sname} - {rel} - {oname}" if oname else f"{i + 1}. {sname} - {rel}"
        draw.text((4, 2 + line_h * i), f"{text}   ({score:.2f})", fill=triplet_colours[i])
    seg_text = "segmentation map: " + (", ".join(seg_names[c - 1] for c in present) or "background only")
    draw.text((4, 2 + line_h * len(triplets)), seg_text, fill=(0, 0, 0))
    legend = TF.pil_to_tensor(legend)
    return torch.cat([row, legend], dim=1)


def visualize(model, cfg, data, device, out_dir, num_images=8, top=5):
    """--visualize: Figures 2-4 for the first num_images test images of each task, as PNG files in out_dir.
    SGG pictures show the top graph-constrained triplets, HOI pictures the top HOIs after the validity mask."""
    import torch
    import torchvision
    import sg2hoi

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    written = []
    for task in ("sgg", "hoi"):
        if task not in data:
            continue
        test, meta = data[task]["test"]
        ds = _test_dataset(test[:num_images], cfg)
        for i in range(len(ds)):
            images, mask, targets = sg2hoi.collate([ds[i]])
            out = _forward(model, images, mask, device)
            size = targets[0]["orig_size"].tolist()
            fh, fw = out["feat_mask"].shape[1:]
            valid_h, valid_w = int((~out["feat_mask"][0]).any(1).sum()), int((~out["feat_mask"][0]).any(0).sum())
            seg_map = out["seg_logits"][0].argmax(0)[:valid_h, :valid_w].cpu() if "seg_logits" in out \
                else torch.zeros(fh, fw, dtype=torch.long)
            record = test[i]
            if task == "sgg":
                pred = sg2hoi.relation_predictions(out["rel"], [size])[0]
                names = meta["entity_names"]
                triplets = [(pred["boxes"][s], names[pred["labels"][s]], meta["predicate_names"][r - 1],
                             pred["boxes"][o], names[pred["labels"][o]], score)
                            for s, r, o, score in sg2hoi.relation_triplets(pred, True, top)]
            else:
                pred = sg2hoi.hoi_predictions(out["hoi"], [size])[0]
                names = meta["object_names"]
                triplets = []
                for h, o, v, score in sg2hoi.hoi_triplets(pred, meta["correct_mat"], top):
                    label = int(pred["labels"][o])
                    no_object = names[label] == "no object"  # V-COCO's 81st class
                    triplets.append((pred["boxes"][h], "person", meta["verb_names"][v],
                                     None if no_object else pred["boxes"][o], None if no_object else names[label],
                                     score))
            image = torchvision.io.decode_image(record["file"], mode=torchvision.io.ImageReadMode.RGB)
            picture = draw_prediction(image, record, seg_map, triplets, names, model.seg_names)
            path = os.path.join(out_dir, f"{task}_{i:03d}_{os.path.splitext(os.path.basename(record['file']))[0]}.png")
            torchvision.io.write_png(picture, path)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ your own images
# `python eval.py --ckpt runs/toy/ckpt.pt --image a.jpg photos/ "shots/*.png"`: the model on any pictures, from the
# checkpoint alone (its config holds the class names and the test-time resize; no dataset, no network). Per image:
#   <stem>_pred.png    the image with the merged entities' boxes and a legend of the kept triplets and HOIs
#   <stem>_graph.png   the scene graph drawn over a dimmed copy of the image (nodes at their boxes' centres)
#   <stem>_graph.dot   the same graph in Graphviz's DOT language
#   <stem>.json        every kept triplet and HOI (boxes in the original image's pixels), the graph, the settings
# A one-stage model predicts a subject box and an object box per query, so one object is predicted by many
# queries: merge_entities turns those boxes into one node per object before the graph is drawn.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")  # what a folder contributes
# Boxes of the same class name with IoU > MERGE_IOU are one entity (greedy by score, as NMS). 0.5 is the benchmarks'
# own "this box is that object" (IOU_THRESHOLD); the subject and object heads regress one object independently, and
# on a briefly trained toy model their boxes of one object overlapped at IoU 0.5-0.7, so 0.7 left duplicates.
MERGE_IOU = 0.5
MIN_DRAW_SIDE = 640  # pictures are drawn with a longer side of at least this many pixels (toy images are 128 px)


class InputError(Exception):
    """A checkpoint or an image that cannot be used; the message names the file and what is wrong with it."""


def checkpoint_weights(ckpt, path, weights="auto"):
    """The state dict of a train.py checkpoint to evaluate: "ema" = the averaged weights (Config.ema_decay > 0),
    "raw" = the trained weights themselves, "auto" = the averaged ones when the checkpoint has them."""
    if weights not in ("auto", "ema", "raw"):
        raise InputError(f"weights must be auto, ema or raw, got {weights!r}")
    if weights == "ema" and "ema" not in ckpt:
        raise InputError(f"{path}: the checkpoint holds no averaged weights (trained with ema_decay 0)")
    return ckpt["ema"] if weights != "raw" and "ema" in ckpt else ckpt["model"]


def load_model_from_checkpoint(path, device, weights="auto"):
    """train.py's checkpoint -> (model in eval mode on device, Config); `weights` as in checkpoint_weights.
    Raises InputError naming the file when it is missing, unreadable, not a train.py checkpoint, or its config
    lacks the class names of its tasks."""
    model, cfg, _ = read_checkpoint(path, device, weights)
    return model, cfg


def read_checkpoint(path, device, weights="auto"):
    """load_model_from_checkpoint's work, also returning the checkpoint dict itself (its "args": the data)."""
    import dataclasses
    import torch
    import sg2hoi

    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing here
        raise InputError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"config", "model"} <= set(ckpt):
        raise InputError(f"{path}: not a train.py checkpoint (it needs the keys 'config' and 'model')")
    try:
        cfg = sg2hoi.Config(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid config ({e})") from None
    needed = (["entity_names", "predicate_names"] if cfg.sgg else []) + \
             (["hoi_object_names", "verb_names"] if cfg.hoi else [])
    missing = [n for n in needed if not getattr(cfg, n)]
    if missing:
        raise InputError(f"{path}: the checkpoint's config lacks the class names {', '.join(missing)} "
                         f"(tasks={cfg.tasks!r}); train.py sets them from the datasets")
    # The text-embedding table is only read to initialise tensors that the checkpoint overwrites, so the model is
    # built without it: a checkpoint trained elsewhere runs without that file.
    try:
        model = sg2hoi.build_model(dataclasses.replace(cfg, text_embeddings=""))
    except (OSError, ValueError, KeyError) as e:  # e.g. an HSSG model whose GloVe file (word_vectors) is not here
        raise InputError(f"{path}: cannot build the model of the checkpoint's config ({e})") from None
    try:
        model.load_state_dict(checkpoint_weights(ckpt, path, weights))
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit the checkpoint's config "
                         f"({' '.join(str(e).split())[:400]})") from None
    return model.to(device).eval(), cfg, ckpt


def hoi_validity_mask(cfg):
    """(V, O) verb-object validity mask for hoi_triplets when the checkpoint's HOI vocabulary is HICO-DET's or
    V-COCO's (as the toy HOI data's is): the 600 HICO-DET HOI classes, or corre_vcoco plus QPIC's "no object"
    column; None (no mask) for any other vocabulary."""
    import sg2hoi

    vocab = sg2hoi.load_vocab()
    coco = [c["name"] for c in vocab["coco80"]]
    if cfg.hoi_object_names == coco and cfg.verb_names == vocab["hico_verbs"]:
        return sg2hoi._hico_correct_mat(vocab)
    if cfg.hoi_object_names == coco + ["no object"] and cfg.verb_names == [v["name"] for v in vocab["vcoco_verbs"]]:
        return np.concatenate([np.array(vocab["corre_vcoco"], np.float32), np.ones((len(cfg.verb_names), 1))], 1)
    return None


def expand_image_args(args):
    """--image arguments -> [(path, error or None)]: a folder gives its image files (by extension, sorted, not
    recursive), a pattern with * ? [ gives its sorted matches, anything else is taken as a file (checked when
    read). A folder without images or a pattern without matches is an error entry, so the others still run."""
    import glob

    out = []
    for a in args:
        if os.path.isdir(a):
            files = sorted(os.path.join(a, f) for f in os.listdir(a) if f.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(a, f)))
            none = f"{a}: folder holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
            out += [(f, None) for f in files] or [(a, none)]
        elif glob.has_magic(a):
            files = sorted(f for f in glob.glob(a) if os.path.isfile(f))
            out += [(f, None) for f in files] or [(a, f"{a}: no file matches this pattern")]
        else:
            out.append((a, None))
    return out


def read_image(path):
    """An image file -> (3, H, W) uint8 RGB, upright as its EXIF orientation says. torchvision.io decodes JPEG,
    PNG, GIF and WebP; PIL (torchvision's own dependency) the rest (BMP, TIFF, ...). Raises InputError."""
    import torch
    import torchvision
    from PIL import Image, ImageOps
    from torchvision.transforms.v2 import functional as TF

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such image file")
    try:
        image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
        if image.ndim == 4:  # an animated GIF decodes as (frames, 3, H, W): its first frame is the picture
            image = image[0]
        return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode as uint16
    except (RuntimeError, ValueError):
        pass
    try:
        with Image.open(path) as im:
            return TF.pil_to_tensor(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise InputError(f"{path}: not an image that torchvision or PIL can read ({type(e).__name__})") from None


def _entity(box, label, names, score, size_hw):
    """One predicted box as JSON: xyxy in original pixels (clipped to the image), label index and name, score."""
    H, W = size_hw
    box = np.clip(np.asarray(box, np.float64), 0, [W, H, W, H])
    return {"box": [round(float(v), 2) for v in box], "label": int(label), "name": names[int(label)],
            "score": round(float(score), 6)}


def image_predictions(out, cfg, size_hw, top=10, threshold=0.1, correct_mat=None):
    """The model's output for ONE image -> {"relations": [...], "hois": [...]}, best first, at most `top` each,
    score >= threshold. size_hw = the ORIGINAL image's (H, W): the model's boxes are normalised by the resized
    image's un-padded size, so relation_predictions / hoi_predictions scale them straight to original pixels.

    relation: {"subject", "object": entity, "predicate": {"index" into cfg.predicate_names, "name"}, "score" =
    s_sub * s_obj * p_predicate (graph constraint: one triplet per query, its best predicate)}.
    HOI: {"human", "object" (None for V-COCO's "no object"), "verb": {"index" into cfg.verb_names, "name"},
    "score" = sigmoid(verb) * s_obj * s_human, after the verb-object validity mask}.
    entity: {"box" xyxy, "label" index into the task's vocabulary, "name", "score" (its class probability)}."""
    import sg2hoi

    result = {"relations": [], "hois": []}
    if cfg.sgg:
        pred = sg2hoi.relation_predictions(out["rel"], [size_hw])[0]
        names = cfg.entity_names
        for s, r, o, score in sg2hoi.relation_triplets(pred, graph_constraint=True, top_k=top):
            if score < threshold:
                break  # ranked: the rest score lower
            result["relations"].append({
                "subject": _entity(pred["boxes"][s], pred["labels"][s], names, pred["scores"][s], size_hw),
                "predicate": {"index": r - 1, "name": cfg.predicate_names[r - 1]},
                "object": _entity(pred["boxes"][o], pred["labels"][o], names, pred["scores"][o], size_hw),
                "score": round(score, 6)})
    if cfg.hoi:
        pred = sg2hoi.hoi_predictions(out["hoi"], [size_hw])[0]
        # the entity scores hoi_predictions folds into the verb scores: P(human) and the object class probability
        p_human = out["hoi"]["human_logits"][-1][0].float().softmax(-1)[:, 0].cpu().numpy()  # (Q,)
        s_obj = out["hoi"]["obj_logits"][-1][0].float().softmax(-1)[:, :-1].max(-1).values.cpu().numpy()  # (Q,)
        Q, names = len(p_human), cfg.hoi_object_names
        for h, o, v, score in sg2hoi.hoi_triplets(pred, correct_mat, top_k=top):
            if score < threshold or score <= 0:  # masked (invalid verb-object) pairs score exactly 0
                break
            no_object = names[int(pred["labels"][o])] == "no object"
            result["hois"].append({
                "human": _entity(pred["boxes"][h], pred["labels"][h], names, p_human[h], size_hw),
                "verb": {"index": v, "name": cfg.verb_names[v]},
                "object": None if no_object else _entity(pred["boxes"][o], pred["labels"][o], names, s_obj[o - Q],
                                                         size_hw),
                "score": round(score, 6)})
    return result


def merge_entities(result, iou_threshold=MERGE_IOU):
    """The kept triplets and HOIs -> the scene graph {"entities", "edges"}, one node per object.

    Rule: every subject / object / human box is a candidate; candidates with the same class NAME (so a relation's
    "person" and an HOI's "person" can merge, the two vocabularies being different) and IoU > iou_threshold are one
    entity. Greedy by class probability, exactly as NMS: torchvision's batched_nms keeps the best box of each
    cluster, and every other box joins the best kept box of its class that overlaps it by more than the threshold
    (the box that suppressed it). The entity's box, label and score are those of its best box.
    Edges: one per (subject entity, object entity, predicate or verb, kind); duplicates keep the highest score.
    An HOI without an object (V-COCO's agent-only actions) adds its verb to the human's "actions" instead."""
    import torch
    from torchvision.ops import batched_nms, box_iou

    cands = []  # (box, name, label, vocabulary, score, member reference)
    for i, r in enumerate(result["relations"]):
        for role in ("subject", "object"):
            cands.append((r[role], "entity_names", ["relations", i, role]))
    for i, h in enumerate(result["hois"]):
        for role in ("human", "object"):
            if h[role] is not None:
                cands.append((h[role], "hoi_object_names", ["hois", i, role]))
    if not cands:
        return {"entities": [], "edges": [], "merge_rule": f"same class name and IoU > {iou_threshold}"}
    boxes = torch.tensor([c[0]["box"] for c in cands], dtype=torch.float64)  # (N, 4) xyxy
    scores = torch.tensor([c[0]["score"] for c in cands], dtype=torch.float64)
    class_names = sorted({c[0]["name"] for c in cands})
    classes = torch.tensor([class_names.index(c[0]["name"]) for c in cands])
    keep = batched_nms(boxes, scores, classes, iou_threshold)  # (K,) indices, best score first
    joins = (box_iou(boxes, boxes[keep]) > iou_threshold) & (classes[:, None] == classes[keep][None])  # (N, K)
    joins[keep, torch.arange(len(keep))] = True  # a kept box is its own entity (even a degenerate, zero-area one)
    node_of = joins.int().argmax(1)  # (N,) first True = the best-scoring kept box that overlaps it
    entities = []
    for k, i in enumerate(keep.tolist()):
        best, vocabulary, _ = cands[i]
        entities.append({"id": f"n{k}", "name": best["name"], "label": best["label"], "vocabulary": vocabulary,
                         "box": best["box"], "score": best["score"], "members": [], "actions": []})
    where = {}  # (key, index, role) -> entity index
    for c, k in zip(cands, node_of.tolist()):
        entities[k]["members"].append(c[2])
        where[tuple(c[2])] = k
    # display names: "person" when one person, else "person 1", "person 2" (by score)
    for name in class_names:
        same = [e for e in entities if e["name"] == name]
        for j, e in enumerate(same):
            e["display_name"] = name if len(same) == 1 else f"{name} {j + 1}"
    edges = {}
    for kind, key, a, b, rel in (("relation", "relations", "subject", "object", "predicate"),
                                 ("hoi", "hois", "human", "object", "verb")):
        for i, t in enumerate(result[key]):
            if t[b] is None:
                e = entities[where[(key, i, a)]]
                e["actions"] += [t[rel]["name"]] if t[rel]["name"] not in e["actions"] else []
                continue
            edge_key = (entities[where[(key, i, a)]]["id"], entities[where[(key, i, b)]]["id"], t[rel]["name"], kind)
            if edge_key not in edges:
                edges[edge_key] = {"source": edge_key[0], "target": edge_key[1], "label": edge_key[2], "kind": kind,
                                   "score": t["score"], "from": []}
            edges[edge_key]["score"] = max(edges[edge_key]["score"], t["score"])
            edges[edge_key]["from"].append([key, i])
    return {"entities": entities, "edges": list(edges.values()),
            "merge_rule": f"same class name and IoU > {iou_threshold}, greedy by class probability (NMS)"}


def _dot_quote(text):
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def scene_graph_dot(graph, size_hw, title=""):
    """The graph in Graphviz's DOT language: one node per entity (label = its display name and its V-COCO
    agent-only actions; tooltip = box and score; pos = its box's centre in points, y up, so `neato -n` keeps the
    image's layout while `dot` lays it out its own way), one edge per predicate (solid) or HOI verb (dashed)."""
    H = size_hw[0]
    lines = ["digraph scene_graph {", f"  graph [label={_dot_quote(title)}, labelloc=t];",
             '  node [shape=box, style="rounded,filled", fillcolor="#f0f0f0"];']
    for e in graph["entities"]:
        x1, y1, x2, y2 = e["box"]
        label = e["display_name"] + "".join(f"\n({a})" for a in e["actions"])
        tip = f"{e['name']} box [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}] score {e['score']:.2f}"
        lines.append(f"  {e['id']} [label={_dot_quote(label)}, tooltip={_dot_quote(tip)}, "
                     f"pos=\"{(x1 + x2) / 2:.1f},{H - (y1 + y2) / 2:.1f}!\"];")
    for d in graph["edges"]:
        style = "solid" if d["kind"] == "relation" else "dashed"
        tip = f"{d['kind']} score {d['score']:.2f}"
        lines.append(f"  {d['source']} -> {d['target']} [label={_dot_quote(d['label'])}, style={style}, "
                     f"tooltip={_dot_quote(tip)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _font(size):
    """PIL's default font at `size` px (scalable with FreeType, Pillow >= 10.1), else its fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _canvas(image_uint8, min_side=MIN_DRAW_SIDE):
    """(3, H, W) uint8 -> (PIL RGB image, scale from original to canvas pixels): upscaled so that its longer side
    is at least min_side, otherwise the image itself. Text and lines are then sized from the canvas. Upscaling is
    nearest-neighbour: the model saw those pixels, so they stay crisp blocks (and the PNG stays small)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    H, W = image_uint8.shape[-2:]
    scale = max(1.0, min_side / max(H, W))
    if scale > 1:
        image_uint8 = TF.resize(image_uint8, [round(H * scale), round(W * scale)], InterpolationMode.NEAREST)
    return TF.to_pil_image(image_uint8), scale


def _sizes(canvas):
    """(font px, line width px) legible at any picture size: 2.5 % and 0.4 % of the canvas's longer side."""
    side = max(canvas.size)
    return max(12, round(0.025 * side)), max(2, round(0.004 * side))


def _overlap(a, b):
    """Intersection area of two xyxy rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_label(draw, text, font, anchors, placed, bounds, pad):
    """Where to put a text box, avoiding the boxes in `placed`: anchors are (x, y, ax, ay), the point (x, y) and
    which point of the text box goes there (ax, ay in 0..1 of its width and height, 0 = left / top). The first
    anchor whose box (kept inside bounds) overlaps nothing placed wins, else the one with the least overlap. The
    box is appended to `placed` and returned with the text's offset: ((x1, y1, x2, y2), (tx, ty))."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    w, h = r - l + 2 * pad, b - t + 2 * pad
    best, best_cost = None, None
    for x, y, ax, ay in anchors:
        x0 = min(max(x - ax * w, bounds[0]), bounds[2] - w)
        y0 = min(max(y - ay * h, bounds[1]), bounds[3] - h)
        box = (x0, y0, x0 + w, y0 + h)
        cost = sum(_overlap(box, p) for p in placed)
        if best is None or cost < best_cost:
            best, best_cost = box, cost
        if cost == 0:
            break
    placed.append(best)
    return best, (best[0] + pad - l, best[1] + pad - t)


def _readable_on(colour):
    """Black or white text, whichever reads better on `colour` (Rec. 601 luma)."""
    return (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150 else (255, 255, 255)


def _darker(colour, f=0.65):
    return tuple(int(c * f) for c in colour)


def _member_entities(graph):
    """{(key, index, role): entity index} from the entities' members, e.g. ("relations", 0, "subject") -> 2."""
    return {tuple(m): k for k, e in enumerate(graph["entities"]) for m in e["members"]}


def draw_image_predictions(image_uint8, result, graph):
    """Picture (a), a PIL image: the image (upscaled to MIN_DRAW_SIDE when smaller) with each graph entity's box
    in its own colour, tagged with its display name, and under it a legend, one line per distinct relation
    triplet (R1, R2, ...) and HOI (H1, ...) between entities: "subject  predicate  object  best score",
    entity names in their box's colour."""
    from PIL import Image, ImageDraw

    canvas, scale = _canvas(image_uint8)
    font_px, lw = _sizes(canvas)
    font, pad = _font(font_px), max(2, font_px // 6)
    draw = ImageDraw.Draw(canvas)
    W, H = canvas.size
    colours = _palette(len(graph["entities"]))
    boxes = [[v * scale for v in e["box"]] for e in graph["entities"]]
    for box, c in zip(boxes, colours):
        draw.rectangle(box, outline=c, width=lw)
    placed = []
    for e, box, c in zip(graph["entities"], boxes, colours):  # tags above the box's top-left corner, or nearby
        x1, y1, x2, y2 = box
        anchors = [(x1, y1, 0, 1), (x1, y1, 0, 0), (x2, y1, 1, 1), (x1, y2, 0, 0), (x1, y2, 0, 1), (x2, y2, 1, 0)]
        rect, xy = _place_label(draw, e["display_name"], font, anchors, placed, (0, 0, W, H), pad)
        draw.rectangle(rect, fill=c)
        draw.text(xy, e["display_name"], font=font, fill=_readable_on(c))
    # the legend: one line per distinct (subject entity, predicate, object entity), best first, as (text, colour)
    # segments; several queries predicting the same triplet (one-stage models do) share a line, "(n queries)"
    node = _member_entities(graph)
    grey, black = (110, 110, 110), (0, 0, 0)
    distinct = {}  # (key, subject entity, predicate, object entity or None) -> [best score, number of queries]
    for key, a, rel, b in (("relations", "subject", "predicate", "object"), ("hois", "human", "verb", "object")):
        for i, t in enumerate(result[key]):
            k = (key, node[(key, i, a)], t[rel]["name"], None if t[b] is None else node[(key, i, b)])
            distinct.setdefault(k, [t["score"], 0])[1] += 1
    lines, counter = [], {"relations": 0, "hois": 0}
    for (key, a, name, b), (score, n) in distinct.items():
        counter[key] += 1
        line = [(f"{'R' if key == 'relations' else 'H'}{counter[key]}  ", grey),
                (graph["entities"][a]["display_name"], _darker(colours[a])), (f"  {name}  ", black)]
        if b is not None:
            line.append((graph["entities"][b]["display_name"], _darker(colours[b])))
        line.append((f"   {score:.2f}" + (f"  ({n} queries)" if n > 1 else ""), grey))
        lines.append(line)
    if not lines:
        lines = [[("no relation or HOI scores above the threshold", grey)]]
    # the legend's font shrinks (not below 10 px) when its widest line would not fit the picture's width
    widest = max(sum(draw.textlength(s, font=font) for s, _ in line) for line in lines)
    legend_px = max(10, min(font_px, int(font_px * (W - 2 * pad) / max(widest, 1))))
    legend_font, line_h = _font(legend_px), round(legend_px * 1.35)
    legend = Image.new("RGB", (W, line_h * len(lines) + 2 * pad), (255, 255, 255))
    ldraw = ImageDraw.Draw(legend)
    for j, line in enumerate(lines):
        x = pad
        for text, colour in line:
            ldraw.text((x, pad + j * line_h), text, font=legend_font, fill=colour)
            x += ldraw.textlength(text, font=legend_font)
    picture = Image.new("RGB", (W, H + legend.height), (255, 255, 255))
    picture.paste(canvas, (0, 0))
    picture.paste(legend, (0, H))
    return picture


def _spread(points, min_dist, bounds, steps=50):
    """Push points (N, 2) apart until no two are closer than min_dist (or `steps` passes), inside bounds: two
    objects with the same centre (a cup held in front of a person) still get two visible nodes."""
    p = np.array(points, np.float64).reshape(-1, 2)
    for _ in range(steps):
        moved = False
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                d = p[j] - p[i]
                dist = float(np.hypot(*d))
                if dist < min_dist:
                    u = d / dist if dist > 1e-6 else np.array([np.cos(i + j), np.sin(i + j)])  # any fixed direction
                    p[i] -= u * (min_dist - dist) / 2
                    p[j] += u * (min_dist - dist) / 2
                    moved = True
        p[:, 0] = p[:, 0].clip(bounds[0], bounds[2])
        p[:, 1] = p[:, 1].clip(bounds[1], bounds[3])
        if not moved:
            break
    return p


def _dashed_line(draw, p, q, fill, width, dash):
    """A dashed segment p -> q (PIL draws only solid lines)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    length = float(np.hypot(*(q - p)))
    for s in np.arange(0, length, 2 * dash):
        a, b = p + (q - p) * s / length, p + (q - p) * min(s + dash, length) / length
        draw.line([tuple(a), tuple(b)], fill=fill, width=width)


def draw_scene_graph(image_uint8, graph):
    """Picture (b), a PIL image: the scene graph over a dimmed copy of the image. Nodes sit at their boxes'
    centres (pushed apart where two would overlap), each box outlined thinly in its node's colour; arrows go
    subject -> object, solid for predicates, dashed blue for HOI verbs; several predicates of one directed pair
    share an arrow and a label, two arrows between the same nodes are drawn side by side. Labels are placed
    greedily where they cover no node and no other label (_place_label)."""
    from PIL import Image, ImageDraw

    canvas, scale = _canvas(image_uint8)
    canvas = Image.blend(canvas, Image.new("RGB", canvas.size, (255, 255, 255)), 0.6)  # dimmed: the graph reads first
    font_px, lw = _sizes(canvas)
    font, pad, r = _font(font_px), max(2, font_px // 6), max(5, round(0.45 * font_px))
    draw = ImageDraw.Draw(canvas)
    W, H = canvas.size
    bounds = (0, 0, W, H)
    entities, colours = graph["entities"], _palette(len(graph["entities"]))
    index = {e["id"]: k for k, e in enumerate(entities)}
    boxes = [[v * scale for v in e["box"]] for e in entities]
    pos = _spread([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes], max(3 * r, 5 * font_px),
                  (r, r, W - r, H - r))
    edge_colour = {"relation": (30, 30, 30), "hoi": (20, 80, 200)}
    # arrows: one per (source, target, kind) with all its predicates; side by side when they share two nodes
    groups = {}
    for d in graph["edges"]:
        groups.setdefault((index[d["source"]], index[d["target"]], d["kind"]), []).append(d)
    pairs = {}
    for key in groups:
        pairs.setdefault(frozenset(key[:2]), []).append(key)
    placed = [(x - r, y - r, x + r, y + r) for x, y in pos]  # labels keep off the nodes
    arrows = []  # (key, start, end, label anchors)
    for key, ds in groups.items():
        a, b, kind = key
        text = ", ".join(f"{d['label']} {d['score']:.2f}" for d in sorted(ds, key=lambda d: -d["score"]))
        if a == b:  # self-loop: a subject and object boxes merged into one entity
            x, y = pos[a]
            arrows.append((key, None, None, text, [(x, y - 3 * r, 0.5, 1), (x + 2 * r, y - 2 * r, 0, 0.5)]))
            continue
        lo, hi = sorted((a, b))
        u = (pos[hi] - pos[lo]) / max(float(np.hypot(*(pos[hi] - pos[lo]))), 1e-6)
        normal = np.array([-u[1], u[0]])
        siblings = sorted(pairs[frozenset((a, b))])
        offset = (siblings.index(key) - (len(siblings) - 1) / 2) * max(3 * lw, font_px)
        direction = (pos[b] - pos[a]) / max(float(np.hypot(*(pos[b] - pos[a]))), 1e-6)
        start = pos[a] + normal * offset + direction * (r + lw)
        end = pos[b] + normal * offset - direction * (r + lw)
        # label candidates along the arrow, from its middle outwards: above, below, right of, left of the point
        anchors = []
        for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
            x, y = start + (end - start) * t
            anchors += [(x, y - 2 * lw, 0.5, 1), (x, y + 2 * lw, 0.5, 0),
                        (x + 2 * lw, y, 0, 0.5), (x - 2 * lw, y, 1, 0.5)]
        # the arrow itself is an obstacle for labels: small squares along it
        steps = max(2, int(np.hypot(*(end - start)) / lw))
        placed += [(x - lw, y - lw, x + lw, y + lw) for x, y in np.linspace(start, end, steps)]
        arrows.append((key, start, end, text, anchors))
    # labels: nodes first (right of the node, else left, above, below), then the edges
    node_labels = []
    for k, e in enumerate(entities):
        text = e["display_name"] + "".join(f" ({a})" for a in e["actions"])
        x, y = pos[k]
        anchors = [(x + 1.5 * r, y, 0, 0.5), (x - 1.5 * r, y, 1, 0.5),
                   (x, y - 1.5 * r, 0.5, 1), (x, y + 1.5 * r, 0.5, 0)]
        node_labels.append((k, text, *_place_label(draw, text, font, anchors, placed, bounds, pad)))
    edge_labels = [(key[2], text, *_place_label(draw, text, font, anchors, placed, bounds, pad))
                   for key, _, _, text, anchors in arrows]
    # draw: box outlines, arrows, nodes, then labels on top
    for box, c in zip(boxes, colours):
        draw.rectangle(box, outline=c, width=max(1, lw // 2))
    head = 3 * lw + 4
    for (a, b, kind), start, end, _, _ in arrows:
        colour = edge_colour[kind]
        if start is None:
            x, y = pos[a]
            draw.ellipse((x - r, y - 3 * r, x + r, y - r), outline=colour, width=lw)
            continue
        (_dashed_line(draw, start, end - (end - start) / np.hypot(*(end - start)) * head * 0.5, colour, lw, 2 * lw + 2)
         if kind == "hoi" else draw.line([tuple(start), tuple(end)], fill=colour, width=lw))
        u = (end - start) / max(float(np.hypot(*(end - start))), 1e-6)
        n = np.array([-u[1], u[0]])
        draw.polygon([tuple(end), tuple(end - u * head + n * head / 2), tuple(end - u * head - n * head / 2)],
                     fill=colour)
    for (x, y), c in zip(pos, colours):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c, outline=(0, 0, 0), width=max(1, lw // 2))
    for k, text, rect, xy in node_labels:
        draw.rectangle(rect, fill=(255, 255, 255), outline=colours[k], width=max(1, lw // 2))
        draw.text(xy, text, font=font, fill=_darker(colours[k]))
    for kind, text, rect, xy in edge_labels:
        draw.rectangle(rect, fill=(255, 255, 255))
        draw.text(xy, text, font=font, fill=edge_colour[kind])
    if not entities:
        draw.text((pad, pad), "no relation or HOI scores above the threshold", font=font, fill=(0, 0, 0))
    kinds = {d["kind"] for d in graph["edges"]}
    if len(kinds) == 2:  # a key, bottom left, when both kinds of arrow are drawn
        key = [("solid: predicate", edge_colour["relation"]), ("   dashed: HOI verb", edge_colour["hoi"])]
        width = sum(draw.textlength(t, font=font) for t, _ in key)
        top = H - round(1.4 * font_px) - 2 * pad
        draw.rectangle((0, top, width + 2 * pad, H), fill=(255, 255, 255))
        x = pad
        for text, colour in key:
            draw.text((x, top + pad), text, font=font, fill=colour)
            x += draw.textlength(text, font=font)
    return canvas


def _outputs_for(path, out_dir, used):
    """The four output paths of one image: <out_dir>/<stem>{_pred.png, _graph.png, _graph.dot, .json}; a stem
    already used in this run (a/x.jpg and b/x.png) gets _2, _3, ..."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    base = os.path.join(out_dir, name)
    return {"prediction": base + "_pred.png", "graph": base + "_graph.png", "dot": base + "_graph.dot",
            "json": base + ".json"}


def predict_image(model, cfg, image_uint8, device, top=10, threshold=0.1, correct_mat=None):
    """One image (3, H, W) uint8 -> (image_predictions(...), resized (h, w)): the test-time resize of the
    checkpoint's config (shorter side cfg.image_size, longer side <= cfg.max_size), batch of one, _forward
    (float32), boxes back in the original image's pixels."""
    import torch
    import sg2hoi
    from torchvision import tv_tensors

    transform = sg2hoi.make_transforms(False, cfg.image_size, cfg.max_size)
    x = transform(tv_tensors.Image(image_uint8)).as_subclass(torch.Tensor)  # (3, h, w) normalised
    images, mask, _ = sg2hoi.collate([(x, {})])  # (1, 3, h, w), (1, h, w) all False
    out = _forward(model, images, mask, device)
    return image_predictions(out, cfg, tuple(image_uint8.shape[-2:]), top, threshold, correct_mat), tuple(x.shape[-2:])


def run_on_images(ckpt_path, image_args, out_dir, top=10, threshold=0.1, merge_iou=MERGE_IOU, device=None,
                  weights="auto"):
    """--image: the checkpoint's model on each image, writing the four files of this section's header into
    out_dir. A bad image is reported on stderr and skipped; returns the exit status: 0 = every image done,
    1 = some failed, 2 = the checkpoint cannot be used."""
    import sys
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg = load_model_from_checkpoint(ckpt_path, device, weights)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    correct_mat = hoi_validity_mask(cfg) if cfg.hoi else None
    os.makedirs(out_dir, exist_ok=True)
    used, failed, done = set(), [], 0
    for path, error in expand_image_args(image_args):
        try:
            if error:
                raise InputError(error)
            image = read_image(path)
            t = time.perf_counter()
            result, resized_hw = predict_image(model, cfg, image, device, top, threshold, correct_mat)
            seconds = time.perf_counter() - t
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)
            continue
        H, W = image.shape[-2:]
        graph = merge_entities(result, merge_iou)
        files = _outputs_for(path, out_dir, used)
        draw_image_predictions(image, result, graph).save(files["prediction"], optimize=True)
        draw_scene_graph(image, graph).save(files["graph"], optimize=True)
        with open(files["dot"], "w") as f:
            f.write(scene_graph_dot(graph, (H, W), title=os.path.basename(path)))
        record = {"image": path, "width": int(W), "height": int(H), "checkpoint": ckpt_path,
                  "settings": {"top": top, "threshold": threshold, "merge_iou": merge_iou, "tasks": cfg.tasks,
                               "image_size": cfg.image_size, "max_size": cfg.max_size,
                               "resized_hw": list(resized_hw), "device": str(device),
                               "hoi_validity_mask": correct_mat is not None, "graph_constraint": True},
                  "seconds": round(seconds, 4), "box_format": "xyxy, pixels of the original image",
                  **result, **graph, "files": files}
        with open(files["json"], "w") as f:
            json.dump(record, f, indent=1)
        done += 1
        print(f"{path}: {len(result['relations'])} relations, {len(result['hois'])} HOIs, "
              f"{len(graph['entities'])} entities, {seconds:.3f} s -> {files['json']} (+ pictures, DOT)")
    print(f"{done} image(s) done, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ saved predictions


def _to_tensors(x):
    import torch

    if isinstance(x, dict):
        return {k: _to_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_tensors(v) for v in x]
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def _to_numpy(x):
    import torch

    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_numpy(v) for v in x]
    if torch.is_tensor(x):
        return x.numpy()
    return x


def save_predictions(collected, path):
    """Predictions and ground truth as tensors, loadable with torch.load(..., weights_only=True)."""
    import torch

    torch.save(_to_tensors(collected), path)


def load_predictions(path):
    """A --save-predictions file -> collect()'s dict, checked for structure; PredictionsError (one line naming
    the file and what is wrong) for a file that is not one: unreadable, a training checkpoint, missing fields,
    fewer predictions than ground-truth images."""
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a truncated or foreign file)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PredictionsError(f"{path}: not a predictions file written by eval.py --save-predictions "
                               f"(torch.load failed: {reason})") from None
    if isinstance(raw, dict) and ("model" in raw or "config" in raw):
        raise PredictionsError(f"{path}: this is a training checkpoint (keys {sorted(raw)[:6]}), not saved "
                               "predictions: pass it with --ckpt")
    if not isinstance(raw, dict) or not raw or not set(raw) <= {"sgg", "hoi"}:
        keys = sorted(raw)[:6] if isinstance(raw, dict) else type(raw).__name__
        raise PredictionsError(f"{path}: expected a dict with 'sgg' and/or 'hoi' (as written by --save-predictions), "
                               f"got {keys}")
    collected = _to_numpy(raw)
    needs = {"sgg": ("gts", "preds", "num_predicates", "zeroshot", "longtail"),
             "hoi": ("dataset", "gts", "preds", "correct_mat")}
    for task, c in collected.items():
        missing = [k for k in needs[task] if not isinstance(c, dict) or k not in c]
        if task == "hoi" and not missing:
            missing = [k for k in (("rare",) if c["dataset"] == "hico" else ("verbs", "actions")) if k not in c]
        if missing:
            raise PredictionsError(f"{path}: '{task}' lacks {missing}")
        if len(c["preds"]) != len(c["gts"]):
            raise PredictionsError(f"{path}: '{task}' has {len(c['preds'])} predictions for {len(c['gts'])} "
                                   "ground-truth images")
    return collected


class PredictionsError(ValueError):
    """A --predictions file that cannot be evaluated (the message names the file and the problem)."""


# ------------------------------------------------------------------------------------------------ benchmarks


def synthetic_sgdet(num_images, num_pairs=100, num_predicates=50, num_classes=150, seed=0):
    """Random ground truth and predictions at VG150 SGDet scale (for the speed benchmark): ~12 boxes and
    ~6 relations per image, num_pairs ranked pairs, half of the GT relations with a near-copy prediction."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(num_images):
        n = rng.integers(2, 24)
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 300, (n, 2))], 1).astype(np.float32)
        labels = rng.integers(0, num_classes, n)
        rels = np.stack([rng.integers(0, n, 6), rng.integers(0, n, 6), rng.integers(1, num_predicates + 1, 6)], 1)
        gts.append(dict(boxes=boxes, labels=labels, rels=rels))
        m = 2 * num_pairs
        pboxes = np.concatenate([boxes[rng.integers(0, n, m)] + rng.normal(0, 5, (m, 4))], 0).astype(np.float32)
        plabels = np.where(rng.random(m) < 0.5, labels[rng.integers(0, n, m)], rng.integers(0, num_classes, m))
        preds.append(dict(boxes=pboxes, labels=plabels, scores=rng.random(m).astype(np.float32),
                          rel_pairs=np.stack([np.arange(num_pairs), np.arange(num_pairs, m)], 1),
                          rel_scores=rng.dirichlet(np.ones(num_predicates + 1), num_pairs).astype(np.float32)))
    return gts, preds


def synthetic_hico(num_images, num_pairs=100, num_verbs=117, num_objects=80, seed=0):
    """Random HICO-DET-scale ground truth and QPIC-style predictions (100 query pairs per image)."""
    rng = np.random.default_rng(seed)
    correct_mat = (rng.random((num_verbs, num_objects)) < 0.07).astype(np.float32)
    correct_mat[:, 0] = 1
    valid = np.argwhere(correct_mat)  # (verb, object) pairs that are HOI classes
    gts, preds = [], []
    for _ in range(num_images):
        k = rng.integers(1, 5)
        classes = valid[rng.integers(0, len(valid), k)]
        xy = rng.uniform(0, 400, (2 * k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 200, (2 * k, 2))], 1).astype(np.float32)
        labels = np.concatenate([np.zeros(k, int), classes[:, 1]])
        gts.append(dict(boxes=boxes, labels=labels, hois=np.stack([np.arange(k), np.arange(k, 2 * k), classes[:, 0]], 1)))
        pick = rng.integers(0, k, num_pairs)
        pb = np.concatenate([boxes[pick], boxes[k + pick]]) + rng.normal(0, 8, (2 * num_pairs, 4))
        preds.append(dict(boxes=pb.astype(np.float32), labels=np.concatenate([np.zeros(num_pairs, int), labels[k + pick]]),
                          sub_ids=np.arange(num_pairs), obj_ids=np.arange(num_pairs, 2 * num_pairs),
                          verb_scores=rng.random((num_pairs, num_verbs)).astype(np.float32) ** 4))
    rare = valid[rng.random(len(valid)) < 0.23]
    return gts, preds, correct_mat, np.stack([np.zeros(len(rare), int), rare[:, 1], rare[:, 0]], 1)


def benchmark_metrics(sgdet_images=26446, hico_images=9658):
    """Seconds for the full-size test sets: SGDet (graph constraint and not, zero-shot and long tail, 100 pairs
    per image) and HICO-DET Default + Known-Object (100 pairs x 117 verbs per image) with the sparse
    synthetic verb-object mask (about 7 % of the pairs allowed, like corre_hico) and with a dense mask (every
    pair allowed: the worst case, e.g. a user's own dataset). Each hico_map call starts from the raw
    predictions. The data generation is not timed."""
    gts, preds = synthetic_sgdet(sgdet_images)
    zeroshot = np.array([[g["labels"][s], g["labels"][o], p] for g in gts[::50] for s, o, p in g["rels"].tolist()])
    out = {"sgdet_images": sgdet_images, "hico_images": hico_images,
           "note": "*_s: wall seconds; *_cpu_s: CPU seconds of this process (lower than wall on a shared machine)"}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out[f"{name}_s"], out[f"{name}_cpu_s"] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
    timed("sgdet", lambda: sgdet_metrics(gts, preds, 50, zeroshot_triplets=zeroshot,
                                         longtail={"head": [1, 2], "body": [3, 4], "tail": [5, 6]}))
    gts, preds, correct_mat, rare = synthetic_hico(hico_images)
    for name, mask in (("sparse", correct_mat), ("dense", np.ones_like(correct_mat))):
        timed(f"hico_{name}_mask", lambda: (hico_map(gts, preds, mask, rare),
                                            hico_map(gts, preds, mask, rare, known_object=True)))
    return out


def benchmark_model(cfg, image_hw=(512, 512), warmup=2, n=5):
    """CPU seconds per image (batch 1) of the whole model's forward and of its backbone alone."""
    import torch
    import sg2hoi

    model = sg2hoi.build_model(cfg).eval()
    images, mask = torch.randn(1, 3, *image_hw), torch.zeros(1, *image_hw, dtype=torch.bool)

    def timed(fn):
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
        return (time.perf_counter() - t) / n

    t_backbone = timed(lambda: model.backbone(images))
    t_model = timed(lambda: model(images, mask))
    return {"model_s": t_model, "backbone_s": t_backbone, "ratio": t_model / t_backbone,
            "threads": torch.get_num_threads(), "image_hw": list(image_hw)}


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate an SG2HOI+ checkpoint: Tables I-IV of the paper. Distributed: "
                    "torchrun --nproc_per_node=N eval.py --ckpt ... (each process evaluates its share of the test "
                    "images; rank 0 prints and writes).")
    p.add_argument("--ckpt", default="", help="checkpoint written by train.py")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                   help="which weights of --ckpt: ema = the moving average (train.py --ema_decay), raw = the trained "
                        "weights; auto = the average when the checkpoint has one")
    p.add_argument("--predictions", default="", help="evaluate a file written by --save-predictions (no model)")
    p.add_argument("--save-predictions", dest="save_predictions", default="",
                   help="write the ground truth and the compact predictions here (loadable by --predictions)")
    p.add_argument("--json", default="",
                   help="write the metrics here (default with --ckpt: eval_<checkpoint stem>.json beside the "
                        "checkpoint, e.g. runs/toy/eval_ckpt.json; train.py's metrics.json is never replaced)")
    p.add_argument("--bootstrap", nargs="+", default=[], metavar="PREDICTIONS",
                   help="files written by --save-predictions (runs on the same test images): each headline metric's "
                        "spread over --resamples draws of the test images, and each run's difference to the first")
    p.add_argument("--resamples", type=int, default=200, help="--bootstrap: draws of the test images")
    p.add_argument("--limit", type=int, default=0, help="first N test images only")
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help="bf16: autocast on CUDA (faster; the boxes stay float32); none: float32 throughout")
    p.add_argument("--dist_timeout", type=float, default=60.0,
                   help="minutes a distributed collective may wait (torchrun) before the run fails instead of hanging")
    p.add_argument("--visualize", default="", help="write Figure 2-4 style PNGs of test images into this folder")
    p.add_argument("--num_visualize", type=int, default=8, help="test images per task for --visualize")
    p.add_argument("--benchmark", choices=["metrics", "model", "data", "rehearsal"], default="",
                   help="metrics: speed at the full test-set sizes; model: paper config forward vs backbone (CPU)")
    p.add_argument("--image", nargs="+", default=[], help="run --ckpt on these image files, folders or globs")
    p.add_argument("--out_dir", default="out/images", help="where --image writes its pictures, DOT and JSON")
    p.add_argument("--top", type=int, default=10, help="--image: at most this many triplets and HOIs per image")
    p.add_argument("--threshold", type=float, default=0.1, help="--image: keep triplets / HOIs scoring >= this")
    args = p.parse_args(argv)
    if args.image and not args.ckpt:
        p.error("--image needs --ckpt")
    if not args.benchmark and not args.image and not args.bootstrap and not (args.ckpt or args.predictions):
        p.error("give --ckpt (or --predictions)")
    if args.resamples < 1:
        p.error("--resamples must be >= 1")
    if args.visualize and not args.ckpt:
        p.error("--visualize needs --ckpt (it runs the model)")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    if not args.dist_timeout > 0:
        p.error("--dist_timeout must be > 0 minutes")
    return args


def output_paths(args):
    """{what: path} of every file or folder this run will write (rank 0)."""
    json_path = args.json or (os.path.join(os.path.dirname(args.ckpt) or ".",
                                           f"eval_{os.path.splitext(os.path.basename(args.ckpt))[0]}.json")
                              if args.ckpt else "")
    paths = {"--json": json_path, "--save-predictions": args.save_predictions, "--visualize": args.visualize}
    return {k: v for k, v in paths.items() if v}


def check_writable(paths):
    """Before any work: every output can be written (a file's folder is created if missing; a test file is
    created and removed there). Returns None or the one-line error naming the flag and the path."""
    import tempfile

    for flag, path in paths.items():
        folder = path if flag == "--visualize" else (os.path.dirname(os.path.abspath(path)))
        try:
            if flag != "--visualize" and os.path.isdir(path):
                return f"eval.py: cannot write {flag} {path}: it is a folder"
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".eval_write_test"):
                pass
            if flag != "--visualize" and os.path.exists(path) and not os.access(path, os.W_OK):
                return f"eval.py: cannot write {flag} {path}: the file is not writable"
        except OSError as e:
            return f"eval.py: cannot write {flag} {path}: {e.strerror or e}"
    return None


def init_distributed(timeout_minutes=60.0):
    """Under torchrun (RANK in the environment): the process group (nccl with this process's GPU on CUDA,
    gloo on CPU) and this rank's device; otherwise nothing and the default device. A collective that waits
    longer than `timeout_minutes` fails the run instead of hanging; NCCL's own default (10 minutes) would end
    the other ranks while rank 0 alone parses the annotations or computes the metrics of a real test split."""
    import datetime
    import torch
    import torch.distributed as dist

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


def agree(error):
    """Rank 0's error (or None) on every rank, so that all ranks stop together before any work."""
    import torch.distributed as dist

    if _rank_world()[1] > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    return error


def load_model_and_data(ckpt_path, device, weights="auto"):
    """A train.py checkpoint -> (model on device, its Config, its data: the same test splits it was trained for)."""
    import sg2hoi
    import torch.distributed as dist

    try:
        model, cfg, ckpt = read_checkpoint(ckpt_path, device, weights)
    except InputError as e:
        raise SystemExit(f"eval.py: {e}") from None
    rank, world = _rank_world()
    if rank == 0 and "ema" in ckpt:
        print(f"{ckpt_path}: evaluating the {'trained' if weights == 'raw' else 'averaged (ema)'} weights")
    barrier = dist.barrier if world > 1 else (lambda: None)  # the toy data is generated once, by rank 0
    data = sg2hoi.build_data(cfg, ckpt["args"], is_master=rank == 0, barrier=barrier)
    return model, cfg, data


def benchmark_rehearsal(root="/tmp/sg2hoi_fullsize", out="/tmp/sg2hoi_rehearsal", processes=2, subset=4, scale=1.0,
                        model_args=()):
    """A rehearsal of the paper run on this machine: `processes` gloo processes train the paper preset (ResNet-50,
    800 x 1333, 100 + 100 queries, VG150 and HICO-DET vocabularies) on the full-size synthetic annotations
    (sg2hoi.write_fullsize_annotations; the loaders read and check all of them, training uses the first `subset`
    images of each training split): phase 1 and phase 2 steps, a checkpoint at every step, a SIGKILL of the whole
    run after the phase-1 checkpoint, a resume to the end, and an evaluation of 2 test images per task.
    Returns what train.py reported: start-up time, seconds per step, checkpoint size and write time, peak memory.
    The tests run it scaled down: annotations at `scale`, a small model (`model_args`, train.py flags)."""
    import re
    import signal
    import subprocess
    import sys
    import sg2hoi

    t = time.perf_counter()
    sg2hoi.write_fullsize_annotations(root, scale=scale)
    report = {"annotations_s": round(time.perf_counter() - t, 1)}
    here = os.path.dirname(os.path.abspath(__file__))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                os.path.join(here, "train.py")]
    batch = processes  # one image per process
    common = ["--preset", "paper", "--vg", os.path.join(root, "vg"), "--hoi", os.path.join(root, "hico"),
              "--text_teacher", "objects", "--train_subset", str(subset), "--batch_size", str(batch),
              "--sgg_epochs", "1", "--joint_epochs", "1",
              "--eval_every", "0", "--eval_limit", "2", "--ckpt_every", "1", "--log_every", "1", "--workers", "1",
              *model_args]
    phase1 = subset // batch
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    # 1. start, wait for the first phase-2 step's line, kill everything with SIGKILL
    t = time.perf_counter()
    proc = subprocess.Popen(torchrun + common + ["--out", out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first_lines = []
    for line in proc.stdout:
        first_lines.append(line)
        if re.match(rf"step {phase1 + 1}/", line):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    report["killed_after_s"] = round(time.perf_counter() - t, 1)
    # 2. resume to the end, with the final evaluation
    t = time.perf_counter()
    resumed = subprocess.run(torchrun + ["--resume", os.path.join(out, "ckpt.pt")], env=env, capture_output=True,
                             text=True)
    report["resume_run_s"] = round(time.perf_counter() - t, 1)
    text = "".join(first_lines) + resumed.stdout
    if resumed.returncode:
        raise RuntimeError(f"rehearsal: the resumed run failed:\n{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [x for x in log if "event" not in x]
    times = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] == a["step"] + 1]
    report.update(
        steps=[x["step"] for x in steps], phases=[x["phase"] for x in steps],
        seconds_per_step=round(float(np.median(times)), 1) if times else None,
        first_step_after_s=[float(m) for m in re.findall(r"first step done ([\d.]+) s", text)],
        checkpoint=re.findall(r"last checkpoint (\d+ MiB written in [\d.]+ s)", text),
        peak_memory_mib=[int(m) for m in re.findall(r"peak resident memory (\d+) MiB", text)],
        metrics_written=os.path.exists(os.path.join(out, "metrics.json")), out=out)
    return report


def run_benchmark(kind):
    import sg2hoi

    if kind == "metrics":
        result = benchmark_metrics()
    elif kind == "model":
        result = benchmark_model(sg2hoi.make_config("paper"))
    elif kind == "data":
        result = sg2hoi.benchmark_data("/tmp/sg2hoi_fullsize")
    else:
        result = benchmark_rehearsal()
    print(json.dumps(result, indent=1))


def write_results(args, paths, collected, model=None, cfg=None, data=None, device=None):
    """Rank 0: save the predictions, compute and print the tables, write the JSON, draw the pictures."""
    if args.save_predictions:
        save_predictions(collected, args.save_predictions)
        print(f"wrote {args.save_predictions}")
    metrics = metrics_from_collected(collected)
    print(format_tables(metrics))
    if "--json" in paths:
        with open(paths["--json"], "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {paths['--json']}")
    if args.visualize:
        written = visualize(model, cfg, data, device, args.visualize, args.num_visualize)
        print(f"wrote {len(written)} pictures to {args.visualize}")


def main(argv=None):
    import torch.distributed as dist

    args = parse_args(argv)
    if args.benchmark:
        run_benchmark(args.benchmark)
        return
    if args.bootstrap:  # test-set noise of saved predictions: no model, one process
        if len(set(args.bootstrap)) < len(args.bootstrap):
            raise SystemExit("eval.py: --bootstrap: a predictions file is given twice")
        try:
            runs = {path: load_predictions(path) for path in args.bootstrap}
            result = bootstrap(runs, args.resamples)
        except (PredictionsError, ValueError) as e:
            raise SystemExit(f"eval.py: {e}") from None
        print(format_bootstrap(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    if args.image:  # your own images: pictures, scene graphs and JSON (run_on_images)
        raise SystemExit(run_on_images(args.ckpt, args.image, args.out_dir, args.top, args.threshold,
                                       weights=args.weights))
    device = init_distributed(args.dist_timeout)
    rank = _rank_world()[0]
    try:
        # 1. every output path is writable, before any work (rank 0 checks, every rank stops on an error)
        paths = output_paths(args)
        error = agree(check_writable(paths) if rank == 0 else None)
        if error:
            raise SystemExit(error)
        # 2. the predictions: from a file (rank 0), or each rank runs the model on its shard of the test splits
        model = cfg = data = None
        if args.predictions:
            if rank != 0:
                return
            try:
                collected = load_predictions(args.predictions)
            except PredictionsError as e:
                raise SystemExit(f"eval.py: {e}") from None
        else:
            model, cfg, data = load_model_and_data(args.ckpt, device, args.weights)
            collected = collect(model, cfg, data, device, args.limit, amp=args.amp == "bf16")
        # 3. rank 0: metrics, tables, files, pictures
        if rank == 0:
            try:
                write_results(args, paths, collected, model, cfg, data, device)
            except PredictionsError as e:
                raise SystemExit(f"eval.py: {e}") from None
            except ValueError as e:  # a metric function's input check on a --predictions file
                if not args.predictions:
                    raise
                raise SystemExit(f"eval.py: {args.predictions}: {e}") from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
