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


def load_model_from_checkpoint(path, device):
    """train.py's checkpoint -> (model in eval mode on device, Config). Raises InputError naming the file when it
    is missing, unreadable, not a train.py checkpoint, or its config lacks the class names of its tasks."""
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
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit the checkpoint's config "
                         f"({' '.join(str(e).split())[:400]})") from None
    return model.to(device).eval(), cfg


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
    (bf16 autocast on CUDA), boxes back in the original image's pixels."""
    import torch
    import sg2hoi
    from torchvision import tv_tensors

    transform = sg2hoi.make_transforms(False, cfg.image_size, cfg.max_size)
    x = transform(tv_tensors.Image(image_uint8)).as_subclass(torch.Tensor)  # (3, h, w) normalised
    images, mask, _ = sg2hoi.collate([(x, {})])  # (1, 3, h, w), (1, h, w) all False
    out = _forward(model, images, mask, device)
    return image_predictions(out, cfg, tuple(image_uint8.shape[-2:]), top, threshold, correct_mat), tuple(x.shape[-2:])


def run_on_images(ckpt_path, image_args, out_dir, top=10, threshold=0.1, merge_iou=MERGE_IOU, device=None):
    """--image: the checkpoint's model on each image, writing the four files of this section's header into
    out_dir. A bad image is reported on stderr and skipped; returns the exit status: 0 = every image done,
    1 = some failed, 2 = the checkpoint cannot be used."""
    import sys
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg = load_model_from_checkpoint(ckpt_path, device)
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
    p.add_argument("--image", nargs="+", default=[], help="run --ckpt on these image files, folders or globs")
    p.add_argument("--out_dir", default="out/images", help="where --image writes its pictures, DOT and JSON")
    p.add_argument("--top", type=int, default=10, help="--image: at most this many triplets and HOIs per image")
    p.add_argument("--threshold", type=float, default=0.1, help="--image: keep triplets / HOIs scoring >= this")
    args = p.parse_args(argv)
    if args.image:  # your own images: pictures, scene graphs and JSON (run_on_images)
        if not args.ckpt:
            p.error("--image needs --ckpt")
        raise SystemExit(run_on_images(args.ckpt, args.image, args.out_dir, args.top, args.threshold))
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
