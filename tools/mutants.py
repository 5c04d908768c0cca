"""Mutation check of the test suite: do the tests catch a wrong implementation? (issue 27)

Each mutant below is one realistic bug, one line of code changed, named after the rule of the paper, of a reference
evaluator or of a data format that it breaks. For each mutant this script copies the project into a temporary
directory, applies that one change there, runs the tests that should catch it (python -m pytest -x -q -k ...) with a
time limit, and records whether they failed (caught) or passed (survived). The working tree is never touched.

    python3 tools/mutants.py                 # the whole catalogue (11 minutes on 2 CPU cores), table + score
    python3 tools/mutants.py --list          # the catalogue without running anything
    python3 tools/mutants.py --only NAME ... # some mutants (names from --list; a prefix is enough)
    python3 tools/mutants.py --all-tests ... # run the whole test file against each mutant, not the selection

A mutant is (file, old text, new text, tests): the old text must occur exactly once in the file (the script stops
otherwise, naming the mutant: after a refactor, update the catalogue); tests is the pytest -k expression of the tests
written for that rule. test_sg2hoi.py::test_mutant_catalogue_is_well_formed checks the catalogue in the suite.
A mutant expected to survive carries `survives`: why no test can (or should) tell it from the original.
Standard library only; nothing in the core files imports this script.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILE = "test_sg2hoi.py"
TIMEOUT_S = 300  # per mutant; a mutant whose tests hang past it counts as caught (the run did not pass)


def mutant(name, rule, file, old, new, tests, survives=""):
    return dict(name=name, rule=rule, file=file, old=old, new=new, tests=tests, survives=survives)


MUTANTS = [
    # ---------------------------------------------------------------- III-A: BBSeg targets, L_seg, aggregation
    mutant("bbseg_targets_without_background_shift", "Eq. 2: box class c fills channel 1 + c (0 = background)",
           "sg2hoi.py", "y.index_put_((image, 1 + labels)", "y.index_put_((image, labels)",
           "bbseg_targets"),
    mutant("bbseg_cell_corners_not_centres", "Eq. 2 targets: a cell is inside a box when its centre is",
           "sg2hoi.py", "cy = (torch.arange(H, dtype=torch.float32) + 0.5) * stride",
           "cy = torch.arange(H, dtype=torch.float32) * stride",
           "bbseg_targets"),
    mutant("bbseg_small_boxes_vanish", "Eq. 2 targets: a box smaller than a cell still marks the cell of its centre",
           "sg2hoi.py", "small = ~inside.flatten(1).any(1)", "small = torch.zeros(len(boxes), dtype=torch.bool)",
           "bbseg_targets"),
    mutant("seg_loss_divided_by_channels", "Eq. 2: L_seg sums the N_seg + 1 channels (not their mean)",
           "sg2hoi.py", "return (bce * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)",
           "return (bce * valid).sum((1, 2, 3)) / (valid.sum((1, 2, 3)).clamp(min=1) * bce.shape[1])",
           "2x2_map or bf16"),
    mutant("seg_loss_counts_padding", "Eq. 2: L_seg averages over the un-padded cells only",
           "sg2hoi.py", "valid = (~feat_mask).unsqueeze(1).float()  # (B, 1, H, W)",
           "valid = torch.ones_like(feat_mask).unsqueeze(1).float()  # (B, 1, H, W)",
           "2x2_map or bf16"),
    mutant("semantic_background_not_zero", "Sec. III-A: background cells get the zero semantic vector",
           "sg2hoi.py", "torch.cat([torch.zeros(1, table.shape[1]), table])",
           "torch.cat([table.mean(0, keepdim=True), table])",
           "aggregation_concatenates"),
    mutant("aggregation_order_swapped", "Eq. 3: f_agg = [W_v V, W_s E_s]",
           "sg2hoi.py", "f_agg = torch.cat([self.w_v(v), self.w_s(e_s.permute(0, 3, 1, 2).contiguous())], dim=1)",
           "f_agg = torch.cat([self.w_s(e_s.permute(0, 3, 1, 2).contiguous()), self.w_v(v)], dim=1)",
           "aggregation_concatenates"),
    mutant("cls_token_gap_counts_padding", "Eq. 4: the [CLS] input is GAP(V) over the image, not the padding",
           "sg2hoi.py",
           "gap = (v.flatten(2).transpose(1, 2) * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)",
           "gap = v.flatten(2).transpose(1, 2).mean(1, keepdim=True)",
           "aggregation_concatenates"),
    # ---------------------------------------------------------------- III-B: VL distillation (Eq. 5)
    mutant("align_pool_computes_cls", "Eq. 5: SG2HOI+pool aligns the mean encoder output, not [CLS]",
           "sg2hoi.py", "f_vl = (f_en[:, 1:] * valid).sum(1) / valid.sum(1)  # (B, d)",
           "f_vl = f_en[:, 0]  # (B, d)",
           "vl_alignment_reads"),
    mutant("align_pool_counts_padding", "Eq. 5: the pooled feature averages the un-padded positions only",
           "sg2hoi.py", "f_vl = (f_en[:, 1:] * valid).sum(1) / valid.sum(1)  # (B, d)",
           "f_vl = f_en[:, 1:].mean(1)  # (B, d)",
           "vl_alignment_reads"),
    mutant("align_cls_reads_first_cell", "Eq. 5: SG2HOI+cls aligns the [CLS] output (token 0)",
           "sg2hoi.py", "f_vl = f_en[:, 0]  # (B, d)", "f_vl = f_en[:, 1]  # (B, d)",
           "vl_alignment_reads"),
    # ---------------------------------------------------------------- III-C: R2ITrans and the transformations
    mutant("r2i_reads_the_first_decoder_layer", "Eq. 7: R2ITrans reads the last relation-decoder layer's f_s, f_r, f_o",
           "sg2hoi.py", "\"f_s\": f_s[-1], \"f_r\": f_r[-1], \"f_o\": f_o[-1]}",
           "\"f_s\": f_s[0], \"f_r\": f_r[0], \"f_o\": f_o[0]}",
           "r2itrans_and"),
    mutant("eq7_inputs_permuted", "Eq. 7: W_t [f_s, f_r, f_o] (order of the concatenation)",
           "sg2hoi.py", "self.w_t(torch.cat([sg[\"f_s\"], sg[\"f_r\"], sg[\"f_o\"]], dim=-1))",
           "self.w_t(torch.cat([sg[\"f_s\"], sg[\"f_o\"], sg[\"f_r\"]], dim=-1))",
           "r2itrans_and or ablation or overfitting",
           survives="a permutation of W_t's inputs is a permutation of W_t's (learned, randomly initialised) columns: "
                    "the same model family with the same initial distribution; no test can tell it, rightly"),
    mutant("r2i_without_query_positions", "Eq. 7: R2ITrans takes Q_rel as the position of its tokens",
           "sg2hoi.py", "f_r2i = self.r2i(f_tilde, sg[\"q_rel\"])  # (B, N_rel, d)",
           "f_r2i = self.r2i(f_tilde, torch.zeros_like(sg[\"q_rel\"]))  # (B, N_rel, d)",
           "r2itrans_and"),
    mutant("hoi_decoder_reads_f_en_not_f_hoi", "Eq. 8: the HOI decoder reads F_hoi (the feature transformation's "
           "output)", "sg2hoi.py", "return f_hoi[:, 1:], enc[\"pos\"], enc[\"fmask\"].flatten(1)",
           "return enc[\"f_en\"][:, 1:], enc[\"pos\"], enc[\"fmask\"].flatten(1)",
           "r2itrans_and"),
    mutant("feature_transform_f_r2i_queries_f_en", "Sec. III-C: in the feature transformation f_en queries f_r2i",
           "sg2hoi.py", "f_hoi = layer(f_hoi, enc[\"tok_pos\"], f_r2i, sg[\"q_rel\"])  # (B, 1 + h*w, d)",
           "f_hoi = f_hoi + layer(f_r2i, sg[\"q_rel\"], f_hoi, enc[\"tok_pos\"]).mean(1, keepdim=True)",
           "r2itrans_and"),
    mutant("cross_attention_values_with_positions", "DETR / Sec. III-C: positions go to queries and keys, never "
           "values", "sg2hoi.py",
           "self.multihead_attn(x + x_pos, memory + memory_pos, memory, memory_mask)",
           "self.multihead_attn(x + x_pos, memory + memory_pos, memory + memory_pos, memory_mask)",
           "r2itrans_and"),
    mutant("query_transform_keys_and_positions_swapped", "Sec. III-C: HOI queries read the decoded relation queries "
           "(values) with Q_rel as their position", "sg2hoi.py", "kv, kv_pos = sg[\"f_sg\"], sg[\"q_rel\"]",
           "kv, kv_pos = sg[\"q_rel\"], sg[\"f_sg\"]",
           "r2itrans_and"),
    # ---------------------------------------------------------------- III-D: matching (Eq. 9)
    mutant("relation_cost_without_giou", "Eq. 9: box cost = 2.5 L1 - GIoU (the GIoU term)",
           "sg2hoi.py", "c_box = self.box_l1 * (l1_s + l1_o) - self.box_giou * (giou_s + giou_o)  # (B*Q, T)",
           "c_box = self.box_l1 * (l1_s + l1_o)  # (B*Q, T)",
           "matcher"),
    mutant("relation_cost_without_l1", "Eq. 9: box cost = 2.5 L1 - GIoU (the L1 term)",
           "sg2hoi.py", "c_box = self.box_l1 * (l1_s + l1_o) - self.box_giou * (giou_s + giou_o)  # (B*Q, T)",
           "c_box = -self.box_giou * (giou_s + giou_o)  # (B*Q, T)",
           "matcher"),
    mutant("relation_object_cost_reads_subject_labels", "Eq. 9: the object's class cost reads the object label",
           "sg2hoi.py", "c_cls = -(p_sub[:, cat[\"sub_labels\"]] + p_obj[:, cat[\"obj_labels\"]])",
           "c_cls = -(p_sub[:, cat[\"sub_labels\"]] + p_obj[:, cat[\"sub_labels\"]])",
           "matcher"),
    mutant("relation_cost_without_predicate", "Eq. 9: alpha_3 L_cls^r, the predicate term",
           "sg2hoi.py", "cost = self.a1 * c_box + self.a2 * c_cls + self.a3 * c_rel",
           "cost = self.a1 * c_box + self.a2 * c_cls",
           "matcher"),
    mutant("hoi_human_cost_reads_object_box", "Eq. 9 for HOIs: the human box cost reads the human box",
           "sg2hoi.py", "l1_h, giou_h = _box_costs(out[\"human_boxes\"].flatten(0, 1).float(), cat[\"human_boxes\"])",
           "l1_h, giou_h = _box_costs(out[\"obj_boxes\"].flatten(0, 1).float(), cat[\"human_boxes\"])",
           "matcher"),
    mutant("hoi_cost_without_giou", "Eq. 9 for HOIs: box cost = 2.5 L1 - GIoU",
           "sg2hoi.py",
           "c_box = self.box_l1 * l1_h - self.box_giou * giou_h + "
           "(self.box_l1 * l1_o - self.box_giou * giou_o) * has_obj",
           "c_box = self.box_l1 * l1_h + (self.box_l1 * l1_o) * has_obj",
           "matcher"),
    mutant("hoi_cost_missing_object_box_counted", "HOI matching: a target without object pays no object-box cost",
           "sg2hoi.py", "has_obj = cat[\"has_obj\"].float()[None]  # (1, T)",
           "has_obj = torch.ones_like(cat[\"has_obj\"].float()[None])  # (1, T)",
           "matcher"),
    # ---------------------------------------------------------------- III-D: losses (Eq. 10)
    mutant("no_eos_coef", "Eq. 10 (DETR): unmatched queries' no-object class has weight eos_coef = 0.1",
           "sg2hoi.py", "weight[-1] = self.cfg.eos_coef", "weight[-1] = 1.0",
           "loss_terms or auxiliary_losses"),
    mutant("aux_losses_dropped", "Eq. 10 (DETR): every decoder layer is supervised (auxiliary losses)",
           "sg2hoi.py", "if layer < num_layers - 1 and not cfg.aux_loss:", "if layer < num_layers - 1:",
           "loss_terms or auxiliary_losses"),
    mutant("box_loss_without_l1_weight", "Eq. 10: box loss = 2.5 L1 + GIoU loss",
           "sg2hoi.py", "return self.cfg.box_l1 * l1 + self.cfg.box_giou * giou",
           "return l1 + self.cfg.box_giou * giou",
           "loss_terms or auxiliary_losses"),
    mutant("hoi_box_loss_reads_the_missing_object_box", "L_hoi: an action without object has no object-box loss",
           "sg2hoi.py", "keep=matched[\"has_obj\"])),", "keep=None)),",
           "loss_terms or leaves_out_the_object_box"),
    mutant("align_loss_l1_and_l2_swapped", "Eq. 5: L_algn is the l1 distance by default (l2 = VLl2)",
           "sg2hoi.py", "distance = F.l1_loss if self.cfg.align_loss == \"l1\" else F.mse_loss",
           "distance = F.mse_loss if self.cfg.align_loss == \"l1\" else F.l1_loss",
           "mean_absolute_error"),
    mutant("verb_loss_over_matches_not_positive_labels", "QPIC: the verb focal loss is divided by the positive labels",
           "sg2hoi.py", "/ max(norm[\"positive_verbs\"], 1)", "/ max(norm[\"matched\"], 1)",
           "loss_terms or auxiliary_losses"),
    mutant("human_class_target_is_no_human", "L_hoi: a matched query's human target is class 0 (human)",
           "sg2hoi.py",
           "human = torch.zeros_like(matched[\"obj_labels\"])", "human = torch.ones_like(matched[\"obj_labels\"])",
           "loss_terms or auxiliary_losses"),
    # ---------------------------------------------------------------- inference scores
    mutant("relation_score_without_object_probability", "RelTR: a relation scores s_sub x s_obj x p_predicate",
           "eval.py",
           "pair_scores = obj_scores[pairs[:, 0]] * obj_scores[pairs[:, 1]]  # (Q,)",
           "pair_scores = obj_scores[pairs[:, 0]]  # (Q,)",
           "triplet_scores or graph_constraint or sgdet"),
    mutant("hoi_score_without_human_probability", "QPIC: an HOI scores p_human x p_object x sigmoid(verb)",
           "sg2hoi.py", "verb_scores=(verbs[b] * (s_obj[b] * p_human[b])[:, None]).cpu().numpy()))",
           "verb_scores=(verbs[b] * s_obj[b][:, None]).cpu().numpy()))",
           "triplet_scores"),
    # ---------------------------------------------------------------- metrics: SGDet
    mutant("sgdet_hit_at_iou_0_4", "SGDet: a hit needs IoU >= 0.5 (subject)",
           "eval.py", "hit &= iou_matrix(cand[\"sub_boxes\"], gt_boxes[rels[:, 0]]) >= IOU_THRESHOLD",
           "hit &= iou_matrix(cand[\"sub_boxes\"], gt_boxes[rels[:, 0]]) >= 0.4",
           "sgdet"),
    mutant("sgdet_hit_needs_iou_above_half", "SGDet: IoU exactly 0.5 is a hit (>=, not >) (object)",
           "eval.py", "hit &= iou_matrix(cand[\"obj_boxes\"], gt_boxes[rels[:, 1]]) >= IOU_THRESHOLD",
           "hit &= iou_matrix(cand[\"obj_boxes\"], gt_boxes[rels[:, 1]]) > IOU_THRESHOLD",
           "sgdet"),
    mutant("graph_constraint_predicate_may_be_no_relation", "SGB: the graph-constrained predicate is the argmax "
           "over 1..C, never no relation", "eval.py",
           "gc_pred = 1 + rel[:, 1:].argmax(1)  # (Q,)", "gc_pred = rel.argmax(1)  # (Q,)",
           "sgdet"),
    mutant("recall_at_k_looks_at_k_plus_1", "SGDet R@K: the first K triplets",
           "eval.py", "hit = first_hit < k", "hit = first_hit <= k",
           "sgdet"),
    mutant("sgdet_ground_truth_predicates_0_based", "SGB: the evaluator's predicates are 1..50 (0 = no relation)",
           "eval.py", "rels=record[\"rels\"] + np.array([0, 0, 1]))", "rels=record[\"rels\"])",
           "sgdet_ground_truth"),
    # ---------------------------------------------------------------- metrics: HICO-DET
    mutant("hico_hit_needs_iou_above_half", "HICO-DET (QPIC): IoU exactly 0.5 is a match (>=)",
           "eval.py", "ok = (ov_s >= IOU_THRESHOLD) & (ov_o >= IOU_THRESHOLD)",
           "ok = (ov_s > IOU_THRESHOLD) & (ov_o >= IOU_THRESHOLD)",
           "hico"),
    # (np.linspace(0, 1, 11) would be no mutant: it computes the same floats, 0.30000000000000004 included)
    mutant("hico_ap_on_decimal_thresholds", "HICO-DET: 11-point AP on np.arange(0, 1.1, 0.1) (float thresholds)",
           "eval.py", "for t in np.arange(0.0, 1.1, 0.1):", "for t in np.arange(0, 11) / 10:",
           "hico"),
    mutant("hico_ap_without_recall_1", "HICO-DET: the 11 points include recall 1.0",
           "eval.py", "for t in np.arange(0.0, 1.1, 0.1):", "for t in np.arange(0.0, 1.0, 0.1):",
           "hico"),
    mutant("hico_ap_without_interpolation", "HICO-DET: the precision at t is the best at recall >= t",
           "eval.py", "p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])",
           "p = 0.0 if np.sum(rec >= t) == 0 else prec[rec >= t][0]",
           "hico"),
    mutant("hico_gt_matched_twice", "HICO-DET (QPIC): a GT HOI already matched makes the next detection an FP",
           "eval.py", "if not matched[best[d]]:", "if True:",
           "hico"),
    mutant("hico_non_rare_above_10", "HICO-DET (QPIC): non-rare = at least 10 training instances",
           "eval.py", "return sorted(t for t, c in train_counts.items() if c >= threshold)",
           "return sorted(t for t, c in train_counts.items() if c > threshold)",
           "exactly_ten or neither_rare"),
    mutant("hico_rare_up_to_10", "HICO-DET (QPIC): rare = fewer than 10 training instances",
           "sg2hoi.py", "return sorted(t for t, c in counts.items() if c < threshold), counts",
           "return sorted(t for t, c in counts.items() if c <= threshold), counts",
           "exactly_ten or neither_rare"),
    mutant("known_object_by_subject_label", "HICO-DET Known-Object: images showing the class's object label",
           "eval.py", "keep = np.array([(i, t[1]) in shows for i in images.tolist()], bool)",
           "keep = np.array([(i, t[0]) in shows for i in images.tolist()], bool)",
           "known_object"),
    mutant("hico_mask_not_applied", "HICO-DET (QPIC): scores x correct_mat before the top 100",
           "eval.py", "scores = verb_scores * correct_mat[:, labels[obj_ids]].T",
           "scores = verb_scores * np.ones_like(correct_mat)[:, labels[obj_ids]].T",
           "hico"),
    # ---------------------------------------------------------------- metrics: V-COCO
    mutant("vcoco_role_object_not_checked", "V-COCO role AP: the role object must overlap >= 0.5",
           "eval.py", "ok = ov_role >= IOU_THRESHOLD", "ok = ok or ov_role >= IOU_THRESHOLD",
           "vcoco"),
    mutant("vcoco_scenarios_swapped", "V-COCO: Scenario 2 ignores a missing role object, Scenario 1 needs an empty box",
           "eval.py", "ov_role = 1.0 if (scenario == 2 or empty) else 0.0",
           "ov_role = 1.0 if (scenario == 1 or empty) else 0.0",
           "vcoco"),
    # ---------------------------------------------------------------- the schedule
    mutant("lr_drop_at_one_third", "Schedule: lr x 0.1 after 2/3 of each phase (default lr_drop)",
           "sg2hoi.py", "lr_drop: float = 2 / 3  #", "lr_drop: float = 1 / 3  #",
           "two_thirds"),
    mutant("lr_drop_after_not_at", "Schedule: the drop applies from progress = lr_drop on (>=)",
           "train.py", "factor = 0.1 if progress >= cfg.lr_drop else 1.0",
           "factor = 0.1 if progress > cfg.lr_drop else 1.0",
           "two_thirds"),
    mutant("phase_boundary_off_by_one", "Schedule: phase 2 starts at step phase1_steps",
           "train.py", "return 1 if step < self.phase1_steps else 2", "return 1 if step <= self.phase1_steps else 2",
           "two_thirds"),
    mutant("phase_2_progress_counts_phase_1", "Schedule: the progress of phase 2 counts phase 2's steps only",
           "train.py", "return (step - self.phase1_steps) / max(self.phase2_steps, 1)",
           "return step / max(self.phase2_steps, 1)",
           "two_thirds"),
    mutant("phase_2_lowers_the_hoi_part", "Sec. IV-D: in phase 2 the SGG part trains at lr_sgg_phase2 = 1e-5",
           "train.py", "lowered = phase == 2 and sgg_pretrained and g[\"name\"] == \"sgg\"",
           "lowered = phase == 2 and sgg_pretrained and g[\"name\"] == \"hoi\"",
           "two_thirds"),
    # ---------------------------------------------------------------- data conventions and the transform
    mutant("vg_predicates_kept_1_based", "RelTR's VG JSON: predicates 1..50 -> 0..49",
           "sg2hoi.py", "pairs = [[subject, object_, predicate - 1] for subject, object_, predicate in rels]",
           "pairs = [[subject, object_, predicate] for subject, object_, predicate in rels]",
           "vg_json_loader_converts"),
    mutant("vg_boxes_read_as_xyxy", "COCO-style JSON: bbox is [x, y, w, h] -> xyxy",
           "sg2hoi.py", "boxes.append([x, y, x + w, y + h])", "boxes.append([x, y, w, h])",
           "vg_json_loader_converts"),
    mutant("dropped_boxes_not_renumbered", "RelTR fix: pairs are re-numbered after degenerate / vanished boxes drop",
           "sg2hoi.py", "new_index = np.cumsum(keep) - 1", "new_index = np.arange(len(keep))",
           "vg_json_loader_converts or vanished_boxes_drop"),
    mutant("coco_ids_not_mapped_to_80", "HICO-DET / V-COCO: COCO category ids (1..90) -> the 80 classes",
           "sg2hoi.py", "coco91_to_80 = {c[\"id\"]: k for k, c in",
           "coco91_to_80 = {c[\"id\"]: c[\"id\"] - 1 for k, c in",
           "hico_loader or vcoco_loader"),
    mutant("vcoco_verbs_shifted", "V-COCO (QPIC JSON): verb ids are already 0-based",
           "sg2hoi.py", "\"vcoco\": ((\"train2014\", \"val2014\"), 29, 0, True)",
           "\"vcoco\": ((\"train2014\", \"val2014\"), 29, 1, True)",
           "hico_loader or vcoco_loader"),
    mutant("model_boxes_normalised_by_h_w_swapped", "DETR: boxes in the model are cxcywh / (w, h, w, h)",
           "sg2hoi.py", "scale = boxes_xyxy.new_tensor([w, h, w, h])", "scale = boxes_xyxy.new_tensor([h, w, h, w])",
           "box_conversions"),
    mutant("hico_verbs_shifted_twice", "HICO-DET: verb ids 1..117 -> 0..116, once",
           "sg2hoi.py", "hoi[\"category_id\"] - verb_base\n", "hoi[\"category_id\"] - verb_base - 1\n",
           "hico_loader or vcoco_loader"),
    mutant("flip_moves_the_image_not_its_boxes", "Sec. IV-D: the training flip moves the boxes with the image",
           "sg2hoi.py", "steps += [v2.RandomHorizontalFlip(0.5), v2.RandomShortestSize(",
           "steps += [v2.RandomApply([v2.Lambda(lambda x: x.flip(-1), tv_tensors.Image)], 0.5), "
           "v2.RandomShortestSize(",
           "moves_the_box_with or flips_boxes_with"),
]


def catalogue_problems(root=ROOT):
    """Every reason the catalogue cannot be run as it is: an old text that does not occur exactly once in its file,
    a duplicate name, a mutant that changes nothing. [] = well-formed."""
    problems, names, texts = [], set(), {}
    for m in MUTANTS:
        if m["name"] in names:
            problems.append(f"{m['name']}: duplicate name")
        names.add(m["name"])
        if m["file"] not in texts:
            with open(os.path.join(root, m["file"]), encoding="utf-8") as f:
                texts[m["file"]] = f.read()
        n = texts[m["file"]].count(m["old"])
        if n != 1:
            problems.append(f"{m['name']}: its old text occurs {n} times in {m['file']} (must be exactly once): "
                            f"{m['old']!r}")
        if m["old"] == m["new"]:
            problems.append(f"{m['name']}: old and new text are the same")
    return problems


def copy_project(dst):
    """The project's files (no .git, no caches) into dst."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.pyc")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def run_tests(m, selection, timeout=TIMEOUT_S):
    """Apply mutant m (None: no mutant) to a fresh copy of the project and run the tests of the -k `selection`
    (None: all) there -> (failed, seconds, last output line)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant_{m['name'] if m else 'none'}_") as tmp:
        copy_project(tmp)
        if m is not None:
            path = os.path.join(tmp, m["file"])
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.count(m["old"]) != 1:  # checked before; the tree may have changed since
                raise SystemExit(f"mutant {m['name']}: old text not found exactly once in {m['file']}")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace(m["old"], m["new"]))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", TEST_FILE]
        if selection is not None:
            cmd += ["-k", selection]
        start = time.time()
        try:
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, time.time() - start, f"timed out after {timeout} s"
        lines = [line for line in (r.stdout + r.stderr).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if r.returncode == 5:  # no test selected: the catalogue is wrong, not the code
            raise SystemExit(f"-k {selection!r} selects no test")
        return r.returncode != 0, time.time() - start, last


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (a name prefix is enough)")
    parser.add_argument("--all-tests", action="store_true", help="run the whole test file against each mutant")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per mutant (default %(default)s)")
    args = parser.parse_args(argv)

    problems = catalogue_problems()
    if problems:
        raise SystemExit("the mutant catalogue does not fit the code:\n  " + "\n  ".join(problems))
    chosen = MUTANTS
    if args.only:
        chosen = [m for m in MUTANTS if any(m["name"].startswith(p) for p in args.only)]
        if not chosen:
            raise SystemExit(f"no mutant matches {args.only}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m['name']:45} {m['file']:10} -k {m['tests']!r}\n{'':45} {m['rule']}")
            if m["survives"]:
                print(f"{'':45} expected to survive: {m['survives']}")
        print(f"{len(chosen)} mutants")
        return 0

    rows, start = [], time.time()
    # first the selected tests without any mutant: they must pass, or "caught" below would mean nothing
    union = None if args.all_tests else " or ".join(f"({m['tests']})" for m in chosen)
    failed, seconds, last = run_tests(None, union, args.timeout)
    print(f"[0/{len(chosen)}] no mutant: {'FAILED' if failed else 'passed'} ({seconds:.0f} s; {last})", flush=True)
    if failed:
        raise SystemExit("the selected tests fail without any mutant: fix them (or the code) first")
    for i, m in enumerate(chosen, 1):
        caught, seconds, last = run_tests(m, None if args.all_tests else m["tests"], args.timeout)
        rows.append((m, caught))
        print(f"[{i}/{len(chosen)}] {m['name']}: {'caught' if caught else 'SURVIVED'} ({seconds:.0f} s; {last})",
              flush=True)
    print()
    print(f"| {'mutant':45} | {'rule':100} | caught? |")
    print(f"|{'-' * 47}|{'-' * 102}|---------|")
    for m, caught in rows:
        print(f"| {m['name']:45} | {m['rule'][:100]:100} | {'yes' if caught else 'no':7} |")
    n_caught = sum(caught for _, caught in rows)
    print(f"\nscore: {n_caught} of {len(rows)} caught ({100 * n_caught / len(rows):.0f} %) in "
          f"{(time.time() - start) / 60:.1f} min")
    for m, caught in rows:
        if not caught:
            print(f"survivor {m['name']}: " + (m["survives"] or "NOT EXPLAINED: a test is missing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
