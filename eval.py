"""eval.py: the metrics SG2HOI+ reports (Sec. IV-C), computed as the field's reference evaluators do.

Three pure metric functions (numpy in, dict out), usable on anyone's predictions:
  sgdet_metrics  - VG150 SGDet R@K, mR@K, no-graph-constraint, zero-shot, head/body/tail
                   (KaihuaTang/Scene-Graph-Benchmark.pytorch sgg_eval.py, Scarecrow0/SGTR)
  hico_map       - HICO-DET mAP Full / Rare / Non-rare, Default and Known-Object (hitachi-rd-cv/qpic hico_eval.py,
                   Known-Object as the official ho-rcnn eval_one.m)
  vcoco_role_ap  - V-COCO agent AP and role AP, Scenarios 1 and 2 (s-gupta/v-coco vsrl_eval.py)
The exact rules (and their quirks, which we keep on purpose) are in each docstring.
Then: inference over a checkpoint's test splits, the paper's tables, timing, pictures (CLI at the bottom).

    python eval.py --ckpt runs/toy/ckpt.pt                # Tables I-IV on the checkpoint's test splits
    python eval.py --predictions preds.pt                 # evaluate saved predictions (no model needed)
    python eval.py --ckpt runs/toy/ckpt.pt --visualize pics   # Figures 2-4 style pictures of test images
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
    """(N, 4), (M, 4) xyxy -> (N, M) IoU with the inclusive-pixel convention of every reference evaluator:
    w = min(x2) - max(x1) + 1, area = (x2 - x1 + 1)(y2 - y1 + 1), in float32."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a[:, None] + area_b[None, :] - inter)


def qpic_iou_matrix(a, b):
    """QPIC's compute_IOU: as iou_matrix, but 0 whenever the boxes do not overlap by more than zero pixels
    *without* the +1 (its test `max(x1) >= min(x2)`), which zeroes boxes overlapping by at most one pixel."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    iou = iou_matrix(a, b)
    no_overlap = (np.maximum(a[:, None, 0], b[None, :, 0]) >= np.minimum(a[:, None, 2], b[None, :, 2])) | \
                 (np.maximum(a[:, None, 1], b[None, :, 1]) >= np.minimum(a[:, None, 3], b[None, :, 3]))
    return np.where(no_overlap, 0.0, iou).astype(np.float32)


# ------------------------------------------------------------------------------------------------ VG150 SGDet


def _triplet_set(rows):
    """Rows of three labels (array-like, any length) -> a set of int 3-tuples."""
    return {tuple(int(x) for x in row) for row in np.asarray(rows).reshape(-1, 3)}


def _relation_hits(gt, pred_triplets, pred_boxes_s, pred_boxes_o):
    """(P, R) bool: prediction p hits GT relation r (same three labels, both IoUs >= 0.5). Not one-to-one."""
    rels = np.asarray(gt["rels"]).reshape(-1, 3)
    labels, boxes = np.asarray(gt["labels"]), np.asarray(gt["boxes"], np.float32)
    gt_trip = np.stack([labels[rels[:, 0]], rels[:, 2], labels[rels[:, 1]]], 1)  # (R, 3) = (s, p, o)
    same = (pred_triplets[:, None, :] == gt_trip[None]).all(-1)  # (P, R)
    if not same.any():
        return same
    return same & (iou_matrix(pred_boxes_s, boxes[rels[:, 0]]) >= IOU_THRESHOLD) \
                & (iou_matrix(pred_boxes_o, boxes[rels[:, 1]]) >= IOU_THRESHOLD)


def sgdet_metrics(gts, preds, num_predicates, ks=(20, 50, 100), zeroshot_triplets=None, longtail=None):
    """VG150 SGDet recall metrics, as Scene-Graph-Benchmark (SGB) and SGTR compute them.

    gts[i]   = {"boxes": (N, 4) xyxy pixels, "labels": (N,), "rels": (R, 3) [subject, object, predicate 1..C]}
    preds[i] = {"boxes": (M, 4), "labels": (M,), "scores": (M,), "rel_pairs": (Q, 2) indices into boxes, ranked
                best first, "rel_scores": (Q, C + 1), column 0 = no relation}
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
    Returns fractions (not percentages)."""
    ks = tuple(sorted(ks))
    zs = _triplet_set(zeroshot_triplets) if zeroshot_triplets is not None else set()
    modes = ("", "ng")
    recall = {m: {k: [] for k in ks} for m in modes}
    zrecall = {m: {k: [] for k in ks} for m in modes}
    per_pred = {m: {k: [[] for _ in range(num_predicates + 1)] for k in ks} for m in modes}
    for gt, pred in zip(gts, preds):
        rels = np.asarray(gt["rels"]).reshape(-1, 3)
        pairs = np.asarray(pred["rel_pairs"]).reshape(-1, 2)
        if len(rels) == 0 or len(pairs) == 0:
            continue
        boxes, labels = np.asarray(pred["boxes"], np.float32), np.asarray(pred["labels"])
        rel_scores = np.asarray(pred["rel_scores"], np.float32)
        # graph constraint: the given order
        gc_pred = 1 + rel_scores[:, 1:].argmax(1)
        # no graph constraint: (pair, predicate) candidates, top 100
        pair_scores = np.asarray(pred["scores"], np.float32)[pairs].prod(1)
        overall = pair_scores[:, None] * rel_scores[:, 1:]
        top = np.argsort(-overall.ravel())[:100]
        ng_pairs, ng_pred = pairs[top // num_predicates], top % num_predicates + 1
        gt_labels = np.asarray(gt["labels"])
        zs_mask = np.array([(gt_labels[s], gt_labels[o], p) in zs for s, o, p in rels.tolist()], bool)
        for mode, (pp, pr) in zip(modes, ((pairs, gc_pred), (ng_pairs, ng_pred))):
            trip = np.stack([labels[pp[:, 0]], pr, labels[pp[:, 1]]], 1)
            hits = _relation_hits(gt, trip, boxes[pp[:, 0]], boxes[pp[:, 1]])  # (P, R)
            for k in ks:
                hit = hits[:k].any(0)  # (R,)
                recall[mode][k].append(hit.mean())
                for p in np.unique(rels[:, 2]):
                    sel = rels[:, 2] == p
                    per_pred[mode][k][p].append(hit[sel].mean())
                if zs_mask.any():
                    zrecall[mode][k].append(hit[zs_mask].mean())
    out = {}
    for mode in modes:
        for k in ks:
            rec = recall[mode][k]
            out[f"{mode}R@{k}"] = float(np.mean(rec)) if rec else 0.0
            per = np.array([np.mean(v) if v else 0.0 for v in per_pred[mode][k][1:]])
            out[f"{mode}mR@{k}"] = float(per.mean())
            if zeroshot_triplets is not None:
                z = zrecall[mode][k]
                out[f"{mode}zR@{k}"] = float(np.mean(z)) if z else 0.0
            for group, ids in (longtail or {}).items():
                out[f"{mode}mR@{k}_{group}"] = float(np.mean([per[i - 1] for i in ids])) if len(ids) else 0.0
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


def _hico_image_detections(gt, pred, correct_mat, max_hois=100):
    """One image -> list of (triplet, score, tp) for its top-100 detections, in QPIC's visit order."""
    boxes, labels = np.asarray(pred["boxes"], np.float32), np.asarray(pred["labels"])
    sub_ids, obj_ids = np.asarray(pred["sub_ids"]), np.asarray(pred["obj_ids"])
    verb_scores = np.asarray(pred["verb_scores"], np.float32)
    P, V = verb_scores.shape
    scores = verb_scores * np.asarray(correct_mat, np.float32)[:, labels[obj_ids]].T  # (P, V), masked -> 0
    flat = scores.ravel()  # pair-major: index p * V + v
    order = np.argsort(-flat, kind="stable")[:max_hois]  # Python's stable list.sort(reverse=True)
    det_p, det_v, det_s = order // V, order % V, flat[order]
    det_sub, det_obj = sub_ids[det_p], obj_ids[det_p]
    det_trip = np.stack([labels[det_sub], labels[det_obj], det_v], 1)  # (D, 3)

    gt_boxes, gt_labels = np.asarray(gt["boxes"], np.float32), np.asarray(gt["labels"])
    hois = np.asarray(gt["hois"]).reshape(-1, 3)
    tp = np.zeros(len(order), bool)
    if len(hois):
        def overlaps(det_box_ids, gt_box_ids):  # (D, K) IoU, 0 for different labels (QPIC)
            iou = qpic_iou_matrix(boxes[det_box_ids], gt_boxes[gt_box_ids])
            return np.where(labels[det_box_ids][:, None] == gt_labels[gt_box_ids][None], iou, 0.0)
        ov_s, ov_o = overlaps(det_sub, hois[:, 0]), overlaps(det_obj, hois[:, 1])
        ok = (ov_s >= IOU_THRESHOLD) & (ov_o >= IOU_THRESHOLD) & (det_v[:, None] == hois[None, :, 2])
        min_ov = np.where(ok, np.minimum(ov_s, ov_o), -1.0)
        best = min_ov.argmax(1)  # first GT on ties (QPIC's strict '>')
        # QPIC finds the matched GT with gt_hois.index(...): an exact duplicate maps to its first copy
        first_copy = {}
        canonical = np.array([first_copy.setdefault(tuple(h), i) for i, h in enumerate(hois.tolist())])
        matched = np.zeros(len(hois), bool)
        for d in range(len(order)):
            if ok[d, best[d]]:
                g = canonical[best[d]]
                if not matched[g]:  # an already matched GT makes this a false positive (no fallback)
                    matched[g] = tp[d] = True
    return [(tuple(int(x) for x in det_trip[d]), float(det_s[d]), bool(tp[d])) for d in range(len(order))]


def hico_map(gts, preds, correct_mat, rare_triplets, known_object=False, non_rare_triplets=None, max_hois=100):
    """HICO-DET mAP as hitachi-rd-cv/qpic datasets/hico_eval.py (Default) and ho-rcnn eval_one.m (Known-Object).

    gts[i]   = {"boxes": (N, 4) xyxy, "labels": (N,), "hois": (K, 3) [subject index, object index, verb]}
    preds[i] = {"boxes", "labels", "sub_ids": (P,), "obj_ids": (P,), "verb_scores": (P, V)} (PostProcessHOI)
    correct_mat (V, O) verb-object validity; rare_triplets rows (subject label, object label, verb).

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
      * Rare = classes in rare_triplets, Non-rare = the others (or non_rare_triplets when given: QPIC leaves a
        class with zero training instances out of both);
      * known_object: a class's detections are kept only on images whose GT has an HOI with that class's object
        label (the official rule, with the image-level table built from the box GT); npos unchanged.
    Returns fractions: mAP_full, mAP_rare, mAP_non_rare (and mean_max_recall)."""
    gt_classes, npos = {}, {}
    images_with_object = {}
    for i, gt in enumerate(gts):
        labels = np.asarray(gt["labels"])
        for s, o, v in np.asarray(gt["hois"]).reshape(-1, 3).tolist():
            trip = (int(labels[s]), int(labels[o]), int(v))
            gt_classes.setdefault(trip, len(gt_classes))
            npos[trip] = npos.get(trip, 0) + 1
            images_with_object.setdefault(trip[1], set()).add(i)
    dets = {c: ([], [], []) for c in gt_classes}  # class -> (image ids, scores, tp)
    for i, (gt, pred) in enumerate(zip(gts, preds)):
        if len(np.asarray(gt["boxes"]).reshape(-1, 4)) == 0:
            continue
        for trip, score, tp in _hico_image_detections(gt, pred, correct_mat, max_hois):
            if trip in dets:
                dets[trip][0].append(i)
                dets[trip][1].append(score)
                dets[trip][2].append(tp)
    ap, max_recall = {}, {}
    for trip in gt_classes:
        image_ids, scores, tps = (np.asarray(x) for x in dets[trip])
        if known_object and len(image_ids):
            keep = np.isin(image_ids, list(images_with_object.get(trip[1], ())))
            scores, tps = scores[keep], tps[keep]
        if len(scores) == 0:
            ap[trip], max_recall[trip] = 0.0, 0.0
            continue
        order = np.argsort(-scores.astype(np.float32))
        tp = np.cumsum(tps[order])
        fp = np.cumsum(~tps[order])
        rec = tp / npos[trip]
        prec = tp / (tp + fp)
        ap[trip], max_recall[trip] = eleven_point_ap(rec, prec), float(rec.max())
    rare = _triplet_set(rare_triplets)
    non_rare = _triplet_set(non_rare_triplets) if non_rare_triplets is not None else set(gt_classes) - rare
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    return dict(mAP_full=mean([ap[c] for c in gt_classes]), mAP_rare=mean([ap[c] for c in gt_classes if c in rare]),
                mAP_non_rare=mean([ap[c] for c in gt_classes if c in non_rare]),
                mean_max_recall=mean([max_recall[c] for c in gt_classes]), num_classes=len(gt_classes))


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


def _forward(model, images, mask, device):
    """The model in inference: no gradients, bf16 autocast on CUDA (as in training)."""
    import torch

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(images.to(device), mask.to(device))


def predict(model, cfg, records, device, batch_size=8):
    """Run the model on records; returns (relation predictions, HOI predictions) per image, original pixels."""
    import torch
    import sg2hoi

    loader = torch.utils.data.DataLoader(_test_dataset(records, cfg), batch_size=batch_size, shuffle=False,
                                         num_workers=0, collate_fn=sg2hoi.collate)
    rel_preds, hoi_preds = [], []
    model.eval()
    for images, mask, targets in loader:
        out = _forward(model, images, mask, device)
        sizes = [t["orig_size"].tolist() for t in targets]
        rel_preds += sg2hoi.relation_predictions(out["rel"], sizes)
        if "hoi" in out:
            hoi_preds += sg2hoi.hoi_predictions(out["hoi"], sizes)
    return rel_preds, hoi_preds


def time_per_image(model, cfg, records, device, warmup=3, n=20):
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
        out = _forward(model, images, mask, device)
        sg2hoi.relation_predictions(out["rel"], [targets[0]["orig_size"].tolist()])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return float(np.mean(times)) if times else float("nan"), name


def collect(model, cfg, data, device, limit=0):
    """data: {"sgg": {"train": (records, meta), "test": (...)}, "hoi": {...}} -> everything the metrics need."""
    import sg2hoi

    out = {}
    if "sgg" in data:
        (train, _), (test, meta) = data["sgg"]["train"], data["sgg"]["test"]
        test = test[:limit] if limit else test
        rel_preds, _ = predict(model, cfg, test, device)
        vocab = sg2hoi.load_vocab()
        is_vg150 = meta["predicate_names"] == vocab["vg150_predicates"] and not meta.get("toy")
        out["sgg"] = dict(gts=[sgg_ground_truth(r) for r in test], preds=rel_preds,
                          num_predicates=len(meta["predicate_names"]),
                          zeroshot=zeroshot_from_training(train, test),
                          longtail=vocab["vg150_longtail"] if is_vg150 else
                          longtail_groups(train, len(meta["predicate_names"])))
        out["sgg"]["time"], out["sgg"]["device"] = time_per_image(model, cfg, test, device)
    if "hoi" in data:
        (train, _), (test, meta) = data["hoi"]["train"], data["hoi"]["test"]
        test = test[:limit] if limit else test
        _, hoi_preds = predict(model, cfg, test, device)
        out["hoi"] = dict(dataset=meta["dataset"], preds=hoi_preds, correct_mat=meta["correct_mat"])
        if meta["dataset"] == "hico":
            out["hoi"]["gts"] = [hico_ground_truth(r) for r in test]
            out["hoi"]["rare"] = sg2hoi.rare_triplets_from_training(train)[0]
        else:
            out["hoi"]["gts"] = [sg2hoi.vcoco_ground_truth(r, meta["verbs"], meta["actions"]) for r in test]
            out["hoi"]["verbs"], out["hoi"]["actions"] = meta["verbs"], meta["actions"]
    return out


def vcoco_detections(pred, verbs, actions, missing_object_label=80):
    """QPIC's generate_vcoco_official: one detection per query; a role score is its verb's score, its box the
    object box (NaN when the object label is "no object"); the agent score is the role's score, the max of the
    two role scores for two-role actions, or the agent-only verb's own score."""
    Q = len(pred["sub_ids"])
    A = len(actions)
    names = [a["name"] for a in actions]
    agent = np.full((Q, A), np.nan, np.float32)
    role_scores = np.full((Q, A, 2), np.nan, np.float32)
    role_boxes = np.full((Q, A, 2, 4), np.nan, np.float32)
    obj_boxes = pred["boxes"][pred["obj_ids"]].astype(np.float32)
    obj_boxes[pred["labels"][pred["obj_ids"]] == missing_object_label] = np.nan
    for v, verb in enumerate(verbs):
        a = names.index(verb["action"])
        s = pred["verb_scores"][:, v]
        if verb["role"] is None:
            agent[:, a] = s
        else:
            r = actions[a]["roles"].index(verb["role"]) - 1
            role_scores[:, a, r], role_boxes[:, a, r] = s, obj_boxes
            agent[:, a] = np.fmax(agent[:, a], s)  # single role: its score; two roles: their max
    return dict(person_boxes=pred["boxes"][pred["sub_ids"]], agent_scores=agent, role_boxes=role_boxes,
                role_scores=role_scores)


def metrics_from_collected(c):
    """The numbers of Tables I-IV from collect()'s output (or from a --predictions file)."""
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
            m["hico"] = {"default": hico_map(h["gts"], h["preds"], h["correct_mat"], h["rare"]),
                         "known_object": hico_map(h["gts"], h["preds"], h["correct_mat"], h["rare"],
                                                  known_object=True)}
        else:
            dets = [vcoco_detections(p, h["verbs"], h["actions"]) for p in h["preds"]]
            r = vcoco_role_ap(h["gts"], dets, h["actions"])
            m["vcoco"] = {k: v for k, v in r.items() if not isinstance(v, dict)}
    return m


def evaluate(model, cfg, data, device, limit=0):
    return metrics_from_collected(collect(model, cfg, data, device, limit))


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
    import torch

    return _to_numpy(torch.load(path, map_location="cpu", weights_only=True))


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
    """Seconds for the full-size test sets: SGDet (graph constraint and not, 100 pairs per image) and HICO-DET
    (Default and Known-Object, 100 pairs per image). The data generation is not timed."""
    gts, preds = synthetic_sgdet(sgdet_images)
    t = time.perf_counter()
    sgdet_metrics(gts, preds, 50, zeroshot_triplets=np.zeros((0, 3), int),
                  longtail={"head": [1, 2], "body": [3, 4], "tail": [5, 6]})
    t_sg = time.perf_counter() - t
    gts, preds, correct_mat, rare = synthetic_hico(hico_images)
    t = time.perf_counter()
    hico_map(gts, preds, correct_mat, rare)
    hico_map(gts, preds, correct_mat, rare, known_object=True)
    t_hico = time.perf_counter() - t
    return {"sgdet_s": t_sg, "sgdet_images": sgdet_images, "hico_s": t_hico, "hico_images": hico_images}


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


def main(argv=None):
    import torch
    import sg2hoi

    p = argparse.ArgumentParser(description="Evaluate an SG2HOI+ checkpoint: Tables I-IV of the paper.")
    p.add_argument("--ckpt", default="", help="checkpoint written by train.py")
    p.add_argument("--predictions", default="", help="evaluate a file written by --save-predictions (no model)")
    p.add_argument("--save-predictions", dest="save_predictions", default="")
    p.add_argument("--json", default="", help="write the metrics here (default: beside the checkpoint)")
    p.add_argument("--limit", type=int, default=0, help="first N test images only")
    p.add_argument("--visualize", default="", help="write Figure 2-4 style PNGs of test images into this folder")
    p.add_argument("--num_visualize", type=int, default=8, help="test images per task for --visualize")
    p.add_argument("--benchmark", choices=["metrics", "model"], default="",
                   help="metrics: speed at the full test-set sizes; model: paper config forward vs backbone (CPU)")
    args = p.parse_args(argv)
    if args.benchmark == "metrics":
        print(json.dumps(benchmark_metrics(), indent=1))
        return
    if args.benchmark == "model":
        print(json.dumps(benchmark_model(sg2hoi.make_config("paper")), indent=1))
        return
    if not (args.ckpt or args.predictions):
        p.error("give --ckpt (or --predictions)")
    if args.visualize and not args.ckpt:
        p.error("--visualize needs --ckpt (it runs the model)")
    if args.ckpt:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        cfg = sg2hoi.Config(**ckpt["config"])
        model = sg2hoi.build_model(cfg)
        model.load_state_dict(ckpt["model"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        data = sg2hoi.build_data(cfg, ckpt["args"])
        if args.visualize:
            paths = visualize(model, cfg, data, device, args.visualize, args.num_visualize)
            print(f"wrote {len(paths)} pictures to {args.visualize}")
    collected = load_predictions(args.predictions) if args.predictions else collect(model, cfg, data, device, args.limit)
    if args.save_predictions:
        save_predictions(collected, args.save_predictions)
    metrics = metrics_from_collected(collected)
    print(format_tables(metrics))
    out = args.json or (os.path.join(os.path.dirname(args.ckpt), "metrics.json") if args.ckpt else "")
    if out:
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
