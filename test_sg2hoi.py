"""Tests: each one states a property of SG2HOI+ and checks it on a small worked example.

Run: python -m pytest -q test_sg2hoi.py        (a few minutes on 2 CPU cores)
"""
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import box_iou, generalized_box_iou

import eval as ev
import sg2hoi
import train

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency here); they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))  # the tests of tools/ (prepare_clip, gpu_check, study, ...)
import bench  # noqa: E402  (tools/bench.py: synthetic test sets of any size for the metric tests)
import bootstrap  # noqa: E402  (tools/bootstrap.py: reads --save-predictions files)
import figures  # noqa: E402  (tools/figures.py: Figures 2-4 of test images)
torch.set_num_threads(2)


def toy_cfg(**kw):
    kw = dict(dict(num_entity_classes=9, num_predicates=10, num_hoi_objects=9, num_verbs=7, num_rel_queries=8,
                   num_hoi_queries=8), **kw)
    return sg2hoi.make_config("toy", **kw)


def sgg_targets():
    return [dict(boxes=torch.tensor([[10., 12, 50, 70], [40, 30, 100, 110], [5, 5, 20, 20]]),
                 labels=torch.tensor([0, 3, 5]), rels=torch.tensor([[0, 1, 2], [2, 0, 7]]),
                 size=torch.tensor([128, 112]), clip=torch.randn(64)),
            dict(boxes=torch.tensor([[5., 5, 30, 40]]), labels=torch.tensor([1]),
                 rels=torch.zeros(0, 3, dtype=torch.long), size=torch.tensor([100, 128]))]


def hoi_targets():
    return [dict(boxes=torch.tensor([[10., 12, 50, 70], [40, 30, 100, 110]]), labels=torch.tensor([0, 4]),
                 hois=torch.tensor([[0, 1, 2], [0, 1, 5], [0, -1, 1]]), size=torch.tensor([128, 112])),
            dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 hois=torch.zeros(0, 3, dtype=torch.long), size=torch.tensor([100, 128]))]


def batch(h=128, w=128, pad_second=True):
    x = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    if pad_second:
        mask[1, 100:, :] = True
    return x, mask


# ==================================================================================================== model (issue 2)


def test_toy_output_shapes():
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    out = model(*batch())
    L, B, Q = cfg.rel_dec_layers, 2, cfg.num_rel_queries
    assert out["seg_logits"].shape == (B, len(model.seg_names) + 1, 16, 16)  # stride 8 on 128 px
    assert out["align"].shape == (B, cfg.text_dim)
    assert out["rel"]["sub_logits"].shape == (L, B, Q, cfg.num_entity_classes + 1)
    assert out["rel"]["pred_logits"].shape == (L, B, Q, cfg.num_predicates + 1)
    assert out["rel"]["obj_boxes"].shape == (L, B, Q, 4)
    assert out["hoi"]["human_logits"].shape == (cfg.hoi_dec_layers, B, cfg.num_hoi_queries, 2)
    assert out["hoi"]["verb_logits"].shape == (cfg.hoi_dec_layers, B, cfg.num_hoi_queries, cfg.num_verbs)
    assert out["hoi"]["obj_logits"].shape == (cfg.hoi_dec_layers, B, cfg.num_hoi_queries, cfg.num_hoi_objects + 1)
    assert ((out["rel"]["sub_boxes"] > 0) & (out["rel"]["sub_boxes"] < 1)).all()  # sigmoid cxcywh


def test_paper_output_shapes():
    cfg = sg2hoi.make_config("paper")
    assert (cfg.d_model, cfg.enc_layers, cfg.rel_dec_layers, cfg.r2i_layers, cfg.feat_trans_layers,
            cfg.query_trans_layers, cfg.hoi_dec_layers, cfg.num_rel_queries, cfg.num_hoi_queries) == \
        (256, 6, 6, 3, 2, 2, 6, 100, 100)
    assert (cfg.cost_box, cfg.cost_class, cfg.cost_rel, cfg.loss_seg, cfg.loss_align) == (1, 2, 4, 2, 4)
    model = sg2hoi.build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 192), torch.zeros(1, 256, 192, dtype=torch.bool))
    assert out["feat_mask"].shape == (1, 8, 6)  # stride 32
    assert out["seg_logits"].shape == (1, len(model.seg_names) + 1, 8, 6)
    assert out["rel"]["pred_logits"].shape == (6, 1, 100, 51)
    assert out["hoi"]["verb_logits"].shape == (6, 1, 100, 117)
    assert out["hoi"]["obj_logits"].shape == (6, 1, 100, 81)


def _naive_relation_cost(out, q, t, a1=1.0, a2=2.0, a3=4.0):
    """Eq. 9 for one (query, target) pair, written out term by term."""
    def box_cost(pred, tgt):
        l1 = (pred - tgt).abs().sum()
        xyxy = lambda b: torchvision.ops.box_convert(b[None], "cxcywh", "xyxy")  # noqa: E731
        return 2.5 * l1 - generalized_box_iou(xyxy(pred), xyxy(tgt))[0, 0]  # QPIC's 2.5 L1 - 1 GIoU
    p_s = out["sub_logits"][0, q].softmax(-1)[t["sub_labels"]]
    p_o = out["obj_logits"][0, q].softmax(-1)[t["obj_labels"]]
    p_r = out["pred_logits"][0, q].softmax(-1)[t["preds"]]
    return (a1 * (box_cost(out["sub_boxes"][0, q], t["sub_boxes"]) + box_cost(out["obj_boxes"][0, q], t["obj_boxes"]))
            - a2 * (p_s + p_o) - a3 * p_r)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed):
    """The Hungarian matching has the minimum total Eq. 9 cost over all injective assignments (6 random cases)."""
    torch.manual_seed(seed)
    Q, T = 5, 3
    out = dict(sub_logits=torch.randn(1, Q, 6), obj_logits=torch.randn(1, Q, 6), pred_logits=torch.randn(1, Q, 5),
               sub_boxes=torch.rand(1, Q, 4) * 0.4 + 0.3, obj_boxes=torch.rand(1, Q, 4) * 0.4 + 0.3)
    tgt = dict(sub_boxes=torch.rand(T, 4) * 0.4 + 0.3, obj_boxes=torch.rand(T, 4) * 0.4 + 0.3,
               sub_labels=torch.randint(0, 5, (T,)), obj_labels=torch.randint(0, 5, (T,)),
               preds=torch.randint(0, 4, (T,)))
    rows, cols = sg2hoi.HungarianMatcher(1, 2, 4).match_relations(out, [tgt])[0]
    cost = lambda q, t: float(_naive_relation_cost(out, q, {k: v[t] for k, v in tgt.items()}))  # noqa: E731
    found = sum(cost(q, t) for q, t in zip(rows.tolist(), cols.tolist()))
    brute = min(sum(cost(q, t) for t, q in enumerate(perm)) for perm in itertools.permutations(range(Q), T))
    assert len(rows) == T
    assert found == pytest.approx(brute, abs=1e-5)


@pytest.mark.parametrize("seed", range(1, 7))
def test_hoi_matcher_equals_brute_force_and_ignores_missing_object_box(seed):
    """The HOI matching has the minimum total cost over all assignments (6 random cases); a target without an
    object (V-COCO, index -1) pays no object-box cost."""
    torch.manual_seed(seed)
    Q = 4
    out = dict(human_logits=torch.randn(1, Q, 2), obj_logits=torch.randn(1, Q, 6), verb_logits=torch.randn(1, Q, 6),
               human_boxes=torch.rand(1, Q, 4) * 0.4 + 0.3, obj_boxes=torch.rand(1, Q, 4) * 0.4 + 0.3)
    t = sg2hoi.hoi_targets(dict(boxes=torch.tensor([[10., 10, 60, 90], [50, 40, 100, 100], [0, 0, 30, 30]]),
                                labels=torch.tensor([0, 2, 3]), hois=torch.tensor([[0, 1, 1], [0, 1, 3], [2, -1, 0]]),
                                size=torch.tensor([100, 100])), num_verbs=6, missing_object_label=4)
    assert t["verbs"].tolist() == [[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]]  # verbs of one pair merged
    assert t["has_obj"].tolist() == [True, False] and t["obj_labels"].tolist() == [2, 4]
    matcher = sg2hoi.HungarianMatcher(1, 2, 4)
    rows, cols = matcher.match_hois(out, [t])[0]

    def cost(q, j):
        h = torchvision.ops.box_convert(out["human_boxes"][0, q][None], "cxcywh", "xyxy")
        o = torchvision.ops.box_convert(out["obj_boxes"][0, q][None], "cxcywh", "xyxy")
        th = torchvision.ops.box_convert(t["human_boxes"][j][None], "cxcywh", "xyxy")
        to = torchvision.ops.box_convert(t["obj_boxes"][j][None], "cxcywh", "xyxy")
        box = 2.5 * (out["human_boxes"][0, q] - t["human_boxes"][j]).abs().sum() - generalized_box_iou(h, th)[0, 0]
        if t["has_obj"][j]:
            box = box + 2.5 * (out["obj_boxes"][0, q] - t["obj_boxes"][j]).abs().sum() \
                - generalized_box_iou(o, to)[0, 0]
        cls = -(out["human_logits"][0, q].softmax(-1)[0] + out["obj_logits"][0, q].softmax(-1)[t["obj_labels"][j]])
        p, y = out["verb_logits"][0, q].sigmoid(), t["verbs"][j]
        verb = -0.5 * ((p * y).sum() / (y.sum() + 1e-4) + ((1 - p) * (1 - y)).sum() / ((1 - y).sum() + 1e-4))
        return float(box + 2 * cls + 4 * verb)

    found = sum(cost(q, j) for q, j in zip(rows.tolist(), cols.tolist()))
    brute = min(sum(cost(q, j) for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), 2))
    assert found == pytest.approx(brute, abs=1e-5)


def test_box_conversions_agree_with_torchvision():
    xyxy = torch.tensor([[10., 20, 50, 80], [0, 0, 128, 64]])
    model_boxes = sg2hoi.boxes_to_model(xyxy, (64, 128))  # h = 64, w = 128
    assert torch.allclose(model_boxes[0], torch.tensor([30 / 128, 50 / 64, 40 / 128, 60 / 64]))
    assert torch.allclose(sg2hoi.boxes_to_pixels(model_boxes, (64, 128)), xyxy)
    # the evaluators' +1 IoU equals torchvision's IoU of boxes grown by one pixel
    a, b = torch.tensor([[0., 0, 9, 9], [3, 4, 20, 30]]), torch.tensor([[5., 5, 14, 14], [3, 4, 20, 30]])
    grow = lambda t: t + torch.tensor([0, 0, 1, 1])  # noqa: E731
    assert np.allclose(ev.iou_matrix(a.numpy(), b.numpy()), box_iou(grow(a), grow(b)).numpy(), atol=1e-6)
    assert ev.iou_matrix([[0, 0, 9, 9]], [[5, 5, 14, 14]])[0, 0] == pytest.approx(25 / 175)


def test_bbseg_targets_fill_boxes_at_the_feature_resolution():
    """A box labels the feature cells whose centres it contains; a box smaller than a cell still marks one."""
    y = sg2hoi.bbseg_targets([torch.tensor([[0., 0, 16, 8], [17, 17, 18, 18]])], [torch.tensor([2, 0])],
                             (4, 4), 8, 4)
    assert y.shape == (1, 4, 4, 4)
    assert y[0, 3].nonzero().tolist() == [[0, 0], [0, 1]]  # centres (4, 4) and (12, 4) lie in the first box
    assert y[0, 1].nonzero().tolist() == [[2, 2]]  # the 1-pixel box marks the cell holding its centre
    assert y[0, 0].sum() == 16 - 3 and (y.sum(1) >= 1).all()  # background elsewhere


ABLATIONS = {
    "-HSS": dict(use_bbseg=False, loss_seg=0.0), "HSSD": dict(semantic_embedding="discrete"),
    "HSSG": dict(semantic_embedding="glove"), "pool": dict(align_feature="pool"),
    "-VLpool": dict(use_vl_distill=False), "VLl2": dict(align_loss="l2"), "text-init": dict(classifier_init="text"),
    "-FETR": dict(use_feature_transform=False), "-QUTR": dict(use_query_transform=False),
    "-R2ITR": dict(use_r2i=False), "RELQ": dict(hoi_queries_from_rel=True), "SGG-only": dict(tasks="sgg"),
    "HOI-only": dict(tasks="hoi"),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_builds_runs_and_backpropagates(name, tmp_path):
    kw = dict(ABLATIONS[name])
    if kw.get("semantic_embedding") == "glove":  # a tiny GloVe-format file with every word of the class names
        names = [f"entity {i}" for i in range(9)] + [f"object {i}" for i in range(9)]
        words = sorted({w for n in names for w in n.split()})
        path = tmp_path / "glove.txt"
        path.write_text("".join(f"{w} " + " ".join(f"{v:.4f}" for v in np.random.rand(64)) + "\n" for w in words))
        kw["word_vectors"] = str(path)
    cfg = toy_cfg(**kw)
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    for task, targets in (("sgg", sgg_targets()), ("hoi", hoi_targets())):
        if (task == "sgg" and not cfg.sgg) or (task == "hoi" and not cfg.hoi):
            continue
        model.zero_grad()
        losses = crit(model(*batch()), targets, task)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        losses["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_overfitting_one_toy_batch_drives_the_loss_down_tenfold(tmp_path):
    """The whole model can memorise four toy images of each task (DETR's first sanity check)."""
    sg2hoi.write_toy_datasets(str(tmp_path), num_train=4, num_test=1, seed=3)
    tf = sg2hoi.make_transforms(False, 128, 128)
    vg = sg2hoi.load_dataset("vg", str(tmp_path / "vg"), "train")
    hico = sg2hoi.load_dataset("hico", str(tmp_path / "hico"), "train")
    cfg = sg2hoi.config_from_meta(toy_cfg(num_rel_queries=8, num_hoi_queries=8), vg[1], hico[1])
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    batches = {"sgg": sg2hoi.collate([sg2hoi.DetectionDataset(*vg, tf)[i] for i in range(len(vg[0]))]),
               "hoi": sg2hoi.collate([sg2hoi.DetectionDataset(*hico, tf)[i] for i in range(len(hico[0]))])}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    first, last = {}, {}
    for step in range(200):  # the HOI loss is down 10x by step 180 (SGG by 150)
        task = "sgg" if step % 2 == 0 else "hoi"
        images, mask, targets = batches[task]
        loss = crit(model(images, mask, with_hoi=task == "hoi"), targets, task)["loss"]
        first.setdefault(task, loss.item())
        last[task] = loss.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert last["sgg"] < first["sgg"] / 10, (first, last)
    assert last["hoi"] < first["hoi"] / 10, (first, last)


def test_graph_constraint_gives_one_triplet_per_pair_and_no_constraint_every_predicate():
    pred = dict(boxes=np.zeros((4, 4)), labels=np.array([0, 0, 1, 1]), scores=np.array([0.9, 0.5, 0.8, 1.0]),
                rel_pairs=np.array([[0, 2], [1, 3]]),
                rel_scores=np.array([[0.1, 0.6, 0.3], [0.0, 0.2, 0.8]]))  # column 0 = no relation
    pred["boxes"] = np.arange(16.0).reshape(4, 4)  # box k starts at 4k: the triplets say which boxes they use
    (cand,), (short,) = ev.sgdet_candidates([pred], 2), ev.sgdet_candidates([pred], 2, max_ng=3)

    def triplets(c):
        return [(int(s[0]) // 4, int(p), int(o[0]) // 4, round(float(x), 4))
                for s, p, o, x in zip(c["sub_boxes"], c["predicates"], c["obj_boxes"], c["scores"])]

    # pair (0, 2): 0.9 * 0.8 * 0.6 = 0.432 with predicate 1; pair (1, 3): 0.5 * 1.0 * 0.8 = 0.4 with predicate 2
    assert triplets(cand["gc"]) == [(0, 1, 2, 0.432), (1, 2, 3, 0.4)]
    # candidates: 0.432 (0,1,2), 0.216 (0,2,2), 0.1 (1,1,3), 0.4 (1,2,3)
    assert [t[:3] for t in triplets(cand["ng"])] == [(0, 1, 2), (1, 2, 3), (0, 2, 2), (1, 1, 3)]
    assert len(short["ng"]["scores"]) == 3


def test_model_post_processing_matches_the_evaluator_input_format():
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg).eval()
    with torch.no_grad():
        out = model(*batch())
    rel = sg2hoi.relation_predictions(out["rel"], [(480, 640), (100, 128)])
    assert rel[0]["boxes"].shape == (16, 4) and rel[0]["rel_scores"].shape == (8, 11)
    assert (rel[0]["boxes"][:, [0, 2]] <= 640 + 1e-3).all() and (rel[0]["boxes"][:, [1, 3]] <= 480 + 1e-3).all()
    np.testing.assert_allclose(rel[0]["rel_scores"].sum(1), 1, rtol=1e-5)
    score = rel[0]["scores"][rel[0]["rel_pairs"]].prod(1) * rel[0]["rel_scores"][:, 1:].max(1)
    assert (np.diff(score) <= 1e-7).all()  # ranked best first
    hoi = sg2hoi.hoi_predictions(out["hoi"], [(480, 640), (100, 128)])
    assert hoi[0]["verb_scores"].shape == (8, 7) and (hoi[0]["labels"][:8] == 0).all()
    mask = np.zeros((7, 9))
    mask[2, :] = 1
    (cand,) = ev.hico_candidates(hoi[:1], mask, max_hois=100)
    assert len(cand["verbs"]) == 56 and (cand["verbs"][cand["scores"] > 0] == 2).all()  # masked verbs score 0


def _fake_detr_state_dict(model_depth=50, layers=6):
    """A state dict with DETR's real key names and shapes (as in detr-r50-e632da11.pth)."""
    sd = {}
    resnet = getattr(torchvision.models, f"resnet{model_depth}")(weights=None)
    for k, v in resnet.state_dict().items():
        if not k.startswith("fc.") and "num_batches_tracked" not in k:
            sd["backbone.0.body." + k] = v + 1.0  # distinguishable from a fresh init
    sd["input_proj.weight"], sd["input_proj.bias"] = torch.randn(256, 2048, 1, 1), torch.randn(256)

    def layer(prefix, decoder):
        attns = ["self_attn", "multihead_attn"] if decoder else ["self_attn"]
        for a in attns:
            sd[f"{prefix}.{a}.in_proj_weight"], sd[f"{prefix}.{a}.in_proj_bias"] = torch.randn(768, 256), torch.randn(768)
            sd[f"{prefix}.{a}.out_proj.weight"], sd[f"{prefix}.{a}.out_proj.bias"] = torch.randn(256, 256), torch.randn(256)
        sd[f"{prefix}.linear1.weight"], sd[f"{prefix}.linear1.bias"] = torch.randn(2048, 256), torch.randn(2048)
        sd[f"{prefix}.linear2.weight"], sd[f"{prefix}.linear2.bias"] = torch.randn(256, 2048), torch.randn(256)
        for n in range(1, 4 if decoder else 3):
            sd[f"{prefix}.norm{n}.weight"], sd[f"{prefix}.norm{n}.bias"] = torch.randn(256), torch.randn(256)
    for i in range(layers):
        layer(f"transformer.encoder.layers.{i}", False)
        layer(f"transformer.decoder.layers.{i}", True)
    sd["transformer.decoder.norm.weight"], sd["transformer.decoder.norm.bias"] = torch.randn(256), torch.randn(256)
    sd["class_embed.weight"], sd["class_embed.bias"] = torch.randn(92, 256), torch.randn(92)
    for i, (a, b) in enumerate([(256, 256), (256, 256), (4, 256)]):
        sd[f"bbox_embed.layers.{i}.weight"], sd[f"bbox_embed.layers.{i}.bias"] = torch.randn(a, b), torch.randn(a)
    sd["query_embed.weight"] = torch.randn(100, 256)
    return {"model": sd}


def test_detr_checkpoint_loads_every_mappable_tensor(capsys):
    model = sg2hoi.build_model(sg2hoi.make_config("paper"))
    ckpt = _fake_detr_state_dict()
    loaded, skipped = sg2hoi.load_detr_weights(model, ckpt)
    sd, own = ckpt["model"], model.state_dict()
    mapping = sg2hoi.detr_key_map(model, sd)
    assert set(loaded) == set(mapping)  # every tensor with a place in the model was loaded
    for ours, theirs in mapping.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    # what DETR has and where it went
    assert torch.equal(own["hoi_decoder.layers.5.ffn.linear2.weight"], sd["transformer.decoder.layers.5.linear2.weight"])
    assert torch.equal(own["r2i.layers.2.self_attn.in_proj_weight"], sd["transformer.encoder.layers.2.self_attn.in_proj_weight"])
    assert torch.equal(own["hoi_obj_box.layers.2.weight"], sd["bbox_embed.layers.2.weight"])
    resnet_keys = [k for k in sd if k.startswith("backbone.0.body.")]
    assert all(f"backbone.body.{k[len('backbone.0.body.'):]}" in loaded for k in resnet_keys)
    assert any("class_embed" in s for s in skipped)  # COCO's 92 classes do not fit VG150
    assert "loaded" in capsys.readouterr().out


def test_bad_config_values_fail_with_the_field_name():
    with pytest.raises(ValueError, match="backbone"):
        sg2hoi.make_config("paper", backbone="vgg16")
    with pytest.raises(ValueError, match="preset"):
        sg2hoi.make_config("huge")
    with pytest.raises(ValueError, match="d_model"):
        sg2hoi.make_config("toy", d_model=66, nheads=4)
    with pytest.raises(ValueError, match="entity_names"):
        sg2hoi.make_config("toy", num_entity_classes=3, entity_names=["a", "b"])
    with pytest.raises(ValueError, match="hoi_queries_from_rel"):
        sg2hoi.make_config("toy", hoi_queries_from_rel=True, num_hoi_queries=4, num_rel_queries=8)
    with pytest.raises(ValueError, match="semantic_embedding"):
        sg2hoi.make_config("toy", semantic_embedding="word2vec")


def test_degenerate_target_box_is_a_clear_error():
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    t = sgg_targets()
    t[0]["boxes"][1] = torch.tensor([50., 30, 40, 110])  # x2 < x1
    with pytest.raises(ValueError, match="box 1 .* degenerate"):
        sg2hoi.build_criterion(model)(model(*batch()), t, "sgg")


def test_a_batch_without_any_relation_or_hoi_gives_finite_losses():
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    empty = [dict(boxes=torch.tensor([[5., 5, 30, 40]]), labels=torch.tensor([1]), rels=torch.zeros(0, 3).long(),
                  hois=torch.zeros(0, 3).long(), size=torch.tensor([128, 128]))] * 2
    for task in ("sgg", "hoi"):
        losses = crit(model(*batch()), empty, task)
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()


# ==================================================================================================== data (issue 3)


def _png(path, w, h):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.io.write_png(torch.zeros(3, h, w, dtype=torch.uint8), str(path))


def _vg_fixture(root, rels_override=None, extra_ann=None):
    """RelTR's COCO-style VG JSON: a duplicate pair with two predicates, an exact duplicate triplet, a
    non-overlapping pair, a degenerate box, an image without relations."""
    vocab = sg2hoi.load_vocab()
    cats = [{"supercategory": n, "id": i + 1, "name": n} for i, n in enumerate(vocab["vg150_objects"])]
    man, horse, shirt = (vocab["vg150_objects"].index(n) + 1 for n in ("man", "horse", "shirt"))
    anns = [{"bbox": [10, 20, 30, 40], "category_id": man, "image_id": 7, "id": 1},      # xywh
            {"bbox": [5, 50, 60, 30], "category_id": horse, "image_id": 7, "id": 2},
            {"bbox": [15, 25, 0, 10], "category_id": shirt, "image_id": 7, "id": 3},     # degenerate (w = 0)
            {"bbox": [70, 0, 20, 20], "category_id": shirt, "image_id": 7, "id": 4},     # far from the horse
            {"bbox": [1, 1, 5, 5], "category_id": man, "image_id": 8, "id": 5}] + (extra_ann or [])
    on, wearing, near = (vocab["vg150_predicates"].index(n) + 1 for n in ("on", "wearing", "near"))
    rels = rels_override or {"7": [[0, 1, on], [0, 1, near], [0, 1, on], [0, 2, wearing], [3, 1, near]], "8": []}
    images = [{"file_name": "7.jpg", "height": 90, "width": 100, "id": 7},
              {"file_name": "8.jpg", "height": 50, "width": 50, "id": 8}]
    os.makedirs(root, exist_ok=True)
    for split in ("train", "val", "test"):
        json.dump({"images": images, "annotations": anns, "categories": cats}, open(f"{root}/{split}.json", "w"))
    json.dump({"train": rels, "val": rels, "test": rels, "rel_categories": ["__background__"] + vocab["vg150_predicates"]},
              open(f"{root}/rel.json", "w"))
    _png(f"{root}/images/7.jpg", 100, 90)
    _png(f"{root}/images/8.jpg", 50, 50)
    return on, wearing, near, man, horse, shirt


def test_vg_json_loader_converts_every_convention(tmp_path, capsys):
    on, wearing, near, man, horse, shirt = _vg_fixture(str(tmp_path))
    records, meta = sg2hoi.load_vg_json(str(tmp_path), "train")
    assert len(records) == 1  # image 8 has no relations: skipped (SGB's filter_empty_rels)
    r = records[0]
    # xywh -> xyxy, the degenerate shirt dropped, labels 0-based
    np.testing.assert_array_equal(r["boxes"], [[10, 20, 40, 60], [5, 50, 65, 80], [70, 0, 90, 20]])
    np.testing.assert_array_equal(r["labels"], [man - 1, horse - 1, shirt - 1])
    # predicates 0-based; the relation on the dropped box removed; indices re-numbered (3 -> 2)
    np.testing.assert_array_equal(r["rels"], [[0, 1, on - 1], [0, 1, near - 1], [0, 1, on - 1], [2, 1, near - 1]])
    assert meta["entity_names"][man - 1] == "man" and len(meta["predicate_names"]) == 50
    out = capsys.readouterr().out
    assert "degenerate boxes dropped: 1" in out and "relations on dropped boxes: 1" in out


def test_vg_loader_bad_input_names_file_record_and_field(tmp_path):
    root = str(tmp_path / "a")
    _vg_fixture(root, rels_override={"7": [[0, 9, 1]]})
    with pytest.raises(sg2hoi.DataError, match=r"rel.json: train/7.*\(0, 9\).*4 boxes"):
        sg2hoi.load_vg_json(root, "train")
    root = str(tmp_path / "b")
    _vg_fixture(root, extra_ann=[{"bbox": [1, 1, 5, 5], "category_id": 999, "image_id": 7, "id": 9}])
    with pytest.raises(sg2hoi.DataError, match=r"train.json: image 7, annotation 4: field 'category_id' = 999"):
        sg2hoi.load_vg_json(root, "train")
    root = str(tmp_path / "c")
    _vg_fixture(root)
    os.remove(f"{root}/images/7.jpg")
    with pytest.raises(sg2hoi.DataError, match="7.jpg not found"):
        sg2hoi.load_vg_json(root, "train")
    with open(f"{root}/test.json", "w") as f:
        f.write('{"images": [')  # truncated
    with pytest.raises(sg2hoi.DataError, match="test.json: malformed or truncated JSON"):
        sg2hoi.load_vg_json(root, "test")


def _hoia_fixture(root, ann_file, image_dir, images):
    os.makedirs(f"{root}/annotations", exist_ok=True)
    json.dump(images, open(f"{root}/annotations/{ann_file}", "w"))
    for im in images:
        _png(f"{root}/images/{image_dir}/{im['file_name']}", 120, 100)


def test_hico_loader_skips_bad_training_indices_and_keeps_verbs_of_a_pair(tmp_path, capsys):
    root = str(tmp_path)
    train = [{"file_name": "HICO_train2015_00000001.jpg", "img_id": 1,
              "annotations": [{"bbox": [10, 10, 50, 90], "category_id": 1}, {"bbox": [40, 20, 110, 90], "category_id": 19}],
              "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 77, "hoi_category_id": 1},
                                 {"subject_id": 0, "object_id": 1, "category_id": 88, "hoi_category_id": 2}]},
             {"file_name": "HICO_train2015_00000002.jpg", "img_id": 2,
              "annotations": [{"bbox": [10, 10, 50, 90], "category_id": 1}],
              "hoi_annotation": [{"subject_id": 0, "object_id": 3, "category_id": 5}]}]  # object_id out of range
    test = [{"file_name": "HICO_test2015_00000001.jpg",  # no img_id, no hoi_category_id (as the real test file)
             "annotations": [{"bbox": [0, 0, 200, 90], "category_id": 1}, {"bbox": [40, 20, 110, 90], "category_id": 90}],
             "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 58}]}]
    _hoia_fixture(root, "trainval_hico.json", "train2015", train)
    _hoia_fixture(root, "test_hico.json", "test2015", test)
    records, meta = sg2hoi.load_hico(root, "train")
    assert len(records) == 1 and "out-of-range subject/object ids skipped: 1" in capsys.readouterr().out
    np.testing.assert_array_equal(records[0]["labels"], [0, 17])  # COCO id 19 (horse) -> COCO-80 index 17
    np.testing.assert_array_equal(records[0]["hois"], [[0, 1, 76], [0, 1, 87]])  # verbs 0-based, pair kept
    t = sg2hoi.hoi_targets(dict(boxes=torch.as_tensor(records[0]["boxes"]), labels=torch.as_tensor(records[0]["labels"]),
                                hois=torch.as_tensor(records[0]["hois"]), size=torch.tensor([100, 120])), 117, 80)
    assert t["verbs"].shape == (1, 117) and t["verbs"][0, [76, 87]].tolist() == [1, 1]  # one target, two verbs
    test_records, _ = sg2hoi.load_hico(root, "test")
    np.testing.assert_array_equal(test_records[0]["boxes"][0], [0, 0, 120, 90])  # clamped to the 120 x 100 image
    np.testing.assert_array_equal(test_records[0]["labels"], [0, 79])  # toothbrush (COCO 90) -> 79
    assert meta["correct_mat"].shape == (117, 80) and meta["correct_mat"].sum() == 600
    # a bad index in the test file is an error, not a skip
    test[0]["hoi_annotation"][0]["object_id"] = 5
    _hoia_fixture(root, "test_hico.json", "test2015", test)
    with pytest.raises(sg2hoi.DataError, match=r"test_hico.json: record 0 .*hoi_annotation 0.*\(0, 5\)"):
        sg2hoi.load_hico(root, "test")


def test_vcoco_loader_keeps_actions_without_object_and_two_role_actions(tmp_path):
    root = str(tmp_path)
    vocab = sg2hoi.load_vocab()
    verb = {v["name"]: i for i, v in enumerate(vocab["vcoco_verbs"])}
    images = [{"file_name": "COCO_train2014_000000000009.jpg",
               "annotations": [{"bbox": [10, 10, 50, 90], "category_id": 1}, {"bbox": [60, 50, 80, 70], "category_id": 49},
                               {"bbox": [40, 60, 100, 90], "category_id": 51}],
               "hoi_annotation": [{"subject_id": 0, "object_id": -1, "category_id": verb["stand"]},
                                  {"subject_id": 0, "object_id": 1, "category_id": verb["cut_instr"]},
                                  {"subject_id": 0, "object_id": 2, "category_id": verb["cut_obj"]},
                                  {"subject_id": 0, "object_id": -1, "category_id": verb["eat_obj"]}]}]
    _hoia_fixture(root, "trainval_vcoco.json", "train2014", images)
    records, meta = sg2hoi.load_vcoco(root, "train")
    r = records[0]
    np.testing.assert_array_equal(r["hois"], [[0, -1, verb["stand"]], [0, 1, verb["cut_instr"]],
                                             [0, 2, verb["cut_obj"]], [0, -1, verb["eat_obj"]]])
    assert meta["correct_mat"].shape == (29, 81) and len(meta["object_names"]) == 81
    gt = sg2hoi.vcoco_ground_truth(r, meta["verbs"], meta["actions"])
    names = [a["name"] for a in meta["actions"]]
    cut, eat, stand = names.index("cut"), names.index("eat"), names.index("stand")
    assert gt["actions"][0, [cut, eat, stand]].tolist() == [1, 1, 1]
    assert meta["actions"][cut]["roles"] == ["agent", "instr", "obj"]
    assert gt["role_ids"][0, cut].tolist() == [1, 2] and gt["role_ids"][0, eat].tolist() == [-1, -1]
    t = sg2hoi.hoi_targets(dict(boxes=torch.as_tensor(r["boxes"]), labels=torch.as_tensor(r["labels"]),
                                hois=torch.as_tensor(r["hois"]), size=torch.tensor([100, 120])), 29, 80)
    # COCO ids 49 (knife) and 51 (bowl) are COCO-80 indices 43 and 45; 80 = "no object"
    assert t["obj_labels"].tolist() == [80, 43, 45] and t["has_obj"].tolist() == [False, True, True]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    sg2hoi.write_toy_datasets(str(root), num_train=600, num_test=120, seed=5)
    return str(root)


def _replay_toy_scenes(seed, num_train, num_test, size=128):
    """What write_toy_datasets drew, replayed from the same random stream (about 3 s) and written down here, apart
    from the writers and loaders: {(dataset, split): [(file name, boxes xyxy, labels, pairs)]}, 0-based, file order."""
    vocab = sg2hoi.load_vocab()
    vg = {n: i for i, n in enumerate(vocab["vg150_objects"])}
    predicate = {n: i for i, n in enumerate(vocab["vg150_predicates"])}
    coco80 = {c["name"]: i for i, c in enumerate(vocab["coco80"])}
    verb = {"hico": {n: i for i, n in enumerate(vocab["hico_verbs"])},
            "vcoco": {v["name"]: i for i, v in enumerate(vocab["vcoco_verbs"])}}
    name = {("hico", "train"): "HICO_train2015_{:08d}.png", ("hico", "test"): "HICO_test2015_{:08d}.png",
            ("vcoco", "train"): "COCO_train2014_{:012d}.png", ("vcoco", "test"): "COCO_val2014_{:012d}.png"}
    rng, truth, image_id = np.random.default_rng(seed), {}, 0
    for split, n in (("train", num_train), ("test", num_test), ("val", num_test // 5)):
        for _ in range(n):
            image_id += 1  # VG's files are numbered across its splits
            _, ents, rels, _, _ = sg2hoi.toy_scene(rng, "train" if split == "train" else "test", size, scene_graph=True)
            truth.setdefault(("vg", split), []).append(
                (f"{image_id}.png", np.array([b for _, b in ents], np.float32), [vg[e] for e, _ in ents],
                 [[s, o, predicate[p]] for s, o, p in rels]))
    for dataset in ("hico", "vcoco"):
        for split, n in (("train", num_train), ("test", num_test)):
            for k in range(n):
                _, ents, _, hois, actions = sg2hoi.toy_scene(rng, split, size)
                truth.setdefault((dataset, split), []).append(
                    (name[(dataset, split)].format(k + 1), np.array([b for _, b in ents], np.float32),
                     [coco80[sg2hoi.TOY_COCO.get(e, e)] for e, _ in ents],
                     [[s, o, verb[dataset][v]] for s, o, v in (hois if dataset == "hico" else actions)]))
    return truth


def test_toy_round_trip_through_the_real_loaders_is_exact(toy_root):
    """The toy writers and the real loaders together give back exactly the scenes drawn: each record's image file,
    0-based labels, predicates and verbs, xyxy pixel boxes, every relation and HOI in order."""
    root, truth = toy_root, _replay_toy_scenes(seed=5, num_train=600, num_test=120)  # the fixture's settings
    for kind, split in [("vg", "train"), ("vg", "test"), ("vg", "val"), ("hico", "train"), ("hico", "test"),
                        ("vcoco", "train"), ("vcoco", "test")]:
        records, _ = sg2hoi.load_dataset(kind, os.path.join(root, kind), split)
        key = "rels" if kind == "vg" else "hois"
        assert len(records) == len(truth[(kind, split)]) > 0
        for r, (file, boxes, labels, pairs) in zip(records, truth[(kind, split)]):
            assert os.path.basename(r["file"]) == file and os.path.isfile(r["file"])
            np.testing.assert_array_equal(r["boxes"], boxes)
            np.testing.assert_array_equal(r["labels"], labels)
            np.testing.assert_array_equal(r[key], np.array(pairs).reshape(-1, 3))


def test_toy_data_has_long_tail_rare_hois_and_zero_shot_triplets(toy_root):
    root = toy_root
    train, meta = sg2hoi.load_dataset("vg", os.path.join(root, "vg"), "train")
    test, _ = sg2hoi.load_dataset("vg", os.path.join(root, "vg"), "test")
    groups = ev.longtail_groups(train, len(meta["predicate_names"]))
    assert len(groups["head"]) >= 2 and len(groups["body"]) >= 2 and len(groups["tail"]) >= 2, groups
    used = {p for r in train for p in r["rels"][:, 2].tolist()}
    assert len(used) >= 10  # at least ten predicates
    zs = ev.zeroshot_from_training(train, test)
    name = lambda i: meta["entity_names"][i]  # noqa: E731
    assert {(name(s), meta["predicate_names"][p - 1], name(o)) for s, o, p in zs} >= \
        {("dog", "under", "table"), ("cup", "on", "chair")}
    hico_train, _ = sg2hoi.load_dataset("hico", os.path.join(root, "hico"), "train")
    hico_test, _ = sg2hoi.load_dataset("hico", os.path.join(root, "hico"), "test")
    rare, counts = sg2hoi.rare_triplets_from_training(hico_train)
    test_classes = {(int(r["labels"][s]), int(r["labels"][o]), v) for r in hico_test for s, o, v in r["hois"].tolist()}
    assert rare and set(rare) & test_classes  # rare classes exist and are evaluated
    assert any(c >= 10 for c in counts.values())
    # the HOIs follow from relations: "fly kite" needs the kite above and held
    vocab = sg2hoi.load_vocab()
    fly = vocab["hico_verbs"].index("fly")
    assert any(v == fly for r in hico_train for v in r["hois"][:, 2].tolist())
    # the scene-graph set carries the cues of the rare HOIs: "sit at table" = a person sitting on a chair in front of
    # a table is common among the VG training scenes and rare among the HICO training HOIs
    ent, pred = meta["entity_names"], meta["predicate_names"]
    def sgg_cue(r):
        rels = {(ent[r["labels"][s]], pred[p], ent[r["labels"][o]]) for s, o, p in r["rels"].tolist()}
        return {("person", "sitting on", "chair"), ("person", "in front of", "table")} <= rels
    sit_at = vocab["hico_verbs"].index("sit_at")
    assert sum(map(sgg_cue, train)) >= 5 * max(1, sum(v == sit_at for r in hico_train for v in r["hois"][:, 2]))


def test_dataset_with_the_training_transform_flips_boxes_with_the_image_and_keeps_indices(tmp_path):
    """DetectionDataset + make_transforms(train=True) (shorter side 50 = the image's: the resize keeps the size):
    each seed gives the boxes unchanged or mirrored (x -> 100 - x), and over 8 seeds both occur."""
    _png(str(tmp_path / "a.png"), 100, 50)
    rec = dict(file=str(tmp_path / "a.png"), image_id=1, width=100, height=50,
               boxes=np.array([[10, 5, 30, 25], [60, 10, 100, 50]], np.float32), labels=np.array([3, 4]),
               rels=np.array([[0, 1, 2]]))
    ds = sg2hoi.DetectionDataset([rec], {"task": "sgg"}, sg2hoi.make_transforms(True, 50, 100, multi_scale=False))
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, t = ds[0]
        assert image.shape[-2:] == (50, 100)
        seen.add(tuple(map(tuple, t["boxes"].tolist())))
        assert t["rels"].tolist() == [[0, 1, 2]] and t["labels"].tolist() == [3, 4]
    assert seen == {((10, 5, 30, 25), (60, 10, 100, 50)), ((70, 5, 90, 25), (0, 10, 40, 50))}


def test_resize_scales_boxes_and_vanished_boxes_drop_with_their_relations(tmp_path):
    _png(str(tmp_path / "a.png"), 200, 100)
    rec = dict(file=str(tmp_path / "a.png"), image_id=1, width=200, height=100,
               boxes=np.array([[0, 0, 1, 1], [20, 10, 60, 50], [100, 40, 200, 100]], np.float32),
               labels=np.array([1, 2, 3]), rels=np.array([[0, 1, 5], [1, 2, 6], [2, 0, 7]]))
    ds = sg2hoi.DetectionDataset([rec], {"task": "sgg"}, torchvision.transforms.v2.Resize(50))  # shorter side 50
    image, t = ds[0]
    assert image.shape[-2:] == (50, 100) and t["size"].tolist() == [50, 100]
    # box 0 (1 x 1 px) becomes 0.5 px and is dropped; the others are halved and re-indexed
    assert t["boxes"].tolist() == [[10, 5, 30, 25], [50, 20, 100, 50]]
    assert t["labels"].tolist() == [2, 3] and t["rels"].tolist() == [[0, 1, 6]]


def test_collate_pads_and_masks():
    a, b = torch.ones(3, 20, 30), torch.ones(3, 25, 10)
    images, mask, _ = sg2hoi.collate([(a, {}), (b, {})])
    assert images.shape == (2, 3, 25, 30)
    assert mask[0, :20, :30].logical_not().all() and mask[0, 20:].all()
    assert mask[1, :, 10:].all() and not mask[1, :25, :10].any()


def test_missing_image_file_is_reported_with_its_record(tmp_path):
    rec = dict(file=str(tmp_path / "gone.png"), image_id=42, width=10, height=10, boxes=np.zeros((0, 4), np.float32),
               labels=np.zeros(0, np.int64), rels=np.zeros((0, 3), np.int64))
    with pytest.raises(sg2hoi.DataError, match="gone.png.*record 42"):
        sg2hoi.DetectionDataset([rec], {"task": "sgg"}, torchvision.transforms.v2.Identity())[0]


# ==================================================================================================== metrics (issue 5)


def test_hico_ap_uses_eleven_points_with_the_float_thresholds():
    # npos = 10, three true positives at the top: recall 0.3 exactly, which does not reach 0.30000000000000004
    rec = np.array([0.1, 0.2, 0.3])
    prec = np.array([1.0, 1.0, 1.0])
    assert ev.eleven_point_ap(rec, prec) == pytest.approx(3 / 11)  # t = 0, 0.1, 0.2 only
    assert ev.eleven_point_ap(np.array([0.31]), np.array([0.5])) == pytest.approx(4 * 0.5 / 11)


def _hico_case(pred_boxes, pred_labels, pairs, verb_scores, gt_boxes, gt_labels, gt_hois, V=3, O=2):
    gt = dict(boxes=np.array(gt_boxes, np.float32), labels=np.array(gt_labels), hois=np.array(gt_hois).reshape(-1, 3))
    pred = dict(boxes=np.array(pred_boxes, np.float32), labels=np.array(pred_labels),
                sub_ids=np.array([p[0] for p in pairs]), obj_ids=np.array([p[1] for p in pairs]),
                verb_scores=np.array(verb_scores, np.float32))
    return gt, pred


def test_hico_one_match_rule_no_fallback_and_duplicate_gt():
    H, O = [0, 0, 99, 99], [100, 100, 199, 199]
    # GT: the same (person, object, verb 1) twice (a duplicate) -> npos = 2, only one matchable
    gt, pred = _hico_case([H, O, H, O], [0, 1, 0, 1], [(0, 1), (2, 3)], [[0, 0.9, 0], [0, 0.8, 0]],
                          [H, O], [0, 1], [[0, 1, 1], [0, 1, 1]])
    m = ev.hico_map([gt], [pred], np.ones((3, 2)), rare_triplets=[])
    # ranked: TP (0.9), FP (0.8: its best GT is already matched; the duplicate is never tried)
    # recall 0.5 max, precision 1 then 0.5 -> 11-point AP = 6 points x 1 / 11 (t = 0 .. 0.5)
    assert m["mAP_full"] == pytest.approx(6 / 11)
    assert m["num_classes"] == 1


def test_hico_mask_top100_and_images_without_gt_boxes():
    H, O = [0, 0, 99, 99], [100, 100, 199, 199]
    gt, pred = _hico_case([H, O], [0, 1], [(0, 1)], [[0.9, 0.8, 0.7]], [H, O], [0, 1], [[0, 1, 2]])
    mask = np.ones((3, 2))
    mask[2, 1] = 0  # verb 2 impossible with object 1: its score becomes 0 (kept, but ranked last)
    assert ev.hico_map([gt], [pred], mask, [])["mAP_full"] == pytest.approx(1.0)  # a 0-score TP is still a TP
    # an image with no GT boxes: QPIC drops its predictions (no FP)
    empty_gt = dict(boxes=np.zeros((0, 4)), labels=np.zeros(0, int), hois=np.zeros((0, 3), int))
    assert ev.hico_map([gt, empty_gt], [pred, pred], np.ones((3, 2)), [])["mAP_full"] == pytest.approx(1.0)
    # the same image with its GT box but a prediction elsewhere: an FP ranked above the TP
    _, fp_pred = _hico_case([H, [300, 300, 399, 399]], [0, 1], [(0, 1)], [[0, 0, 0.95]], [], [], [])
    ap = ev.hico_map([gt, gt], [pred, fp_pred], np.ones((3, 2)), [])["mAP_full"]
    # npos 2; ranked FP (0.95) then TP (0.7): recall 0.5 reached at precision 0.5 -> 6 points x 0.5 / 11
    assert ap == pytest.approx(3 / 11)


def test_hico_rare_split_and_known_object():
    H, O1, O2 = [0, 0, 99, 99], [100, 100, 199, 199], [200, 200, 299, 299]
    gt_a, pred_a = _hico_case([H, O1], [0, 1], [(0, 1)], [[0, 0.9, 0]], [H, O1], [0, 1], [[0, 1, 1]], O=3)
    # image b has only an object of class 2; a (wrong) detection of class (0, 1, 1) there is an FP by default,
    # but is not counted under Known-Object (image b has no GT with object 1)
    gt_b, pred_b = _hico_case([H, O2], [0, 1], [(0, 1)], [[0, 0.95, 0]], [H, O2], [0, 2], [[0, 1, 1]], O=3)
    mask = np.ones((3, 3))
    default = ev.hico_map([gt_a, gt_b], [pred_a, pred_b], mask, rare_triplets=[(0, 2, 1)])
    ko = ev.hico_map([gt_a, gt_b], [pred_a, pred_b], mask, rare_triplets=[(0, 2, 1)], known_object=True)
    # class (0,1,1): default ranks the FP (0.95) above the TP (0.9): AP = 11 points x 0.5 / 11 = 0.5
    # class (0,2,1): no detection: AP 0; it is the rare class
    assert default["mAP_non_rare"] == pytest.approx(0.5) and default["mAP_rare"] == 0.0
    assert ko["mAP_non_rare"] == pytest.approx(1.0) and ko["mAP_full"] == pytest.approx(0.5)
    assert default["per_class"] == [{"triplet": [0, 1, 1], "npos": 1, "ap": pytest.approx(0.5), "rare": False},
                                    {"triplet": [0, 2, 1], "npos": 1, "ap": 0.0, "rare": True}]


def test_hico_qpic_iou_zeroes_one_pixel_overlaps():
    a, b = np.array([[0, 0, 10, 10]]), np.array([[10, 0, 20, 10]])  # overlap one pixel column with the +1 rule
    assert ev.iou_matrix(a, b)[0, 0] > 0
    assert ev.qpic_iou_matrix(a, b)[0, 0] == 0


def _sg_pred(boxes, labels, scores, pairs, rel_scores):
    return dict(boxes=np.array(boxes, np.float32), labels=np.array(labels), scores=np.array(scores, np.float32),
                rel_pairs=np.array(pairs).reshape(-1, 2), rel_scores=np.array(rel_scores, np.float32))


def test_sgdet_one_prediction_can_hit_several_gt_relations_and_order_is_kept():
    A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]
    gt = dict(boxes=np.array([A, B, C], np.float32), labels=np.array([1, 2, 3]),
              rels=np.array([[0, 1, 1], [0, 1, 1], [1, 2, 2]]))  # a duplicate GT triplet
    pred = _sg_pred([A, B, C], [1, 2, 3], [1, 1, 1], [[1, 2], [0, 1]],
                    [[0, 0.1, 0.9], [0, 0.9, 0.1]])  # given order: (1,2,pred 2) first, then (0,1,pred 1)
    m = ev.sgdet_metrics([gt], [pred], num_predicates=2, ks=(1, 2))
    assert m["R@1"] == pytest.approx(1 / 3)  # the evaluator does not re-sort: the first pair hits one GT
    assert m["R@2"] == pytest.approx(1.0)  # the second prediction hits both duplicates
    assert m["mR@1"] == pytest.approx((0 + 1) / 2)  # predicate 1: 0/2, predicate 2: 1/1
    # no graph constraint ranks (pair, predicate) by score: both at 0.9, then 0.1 ones
    assert m["ngR@2"] == pytest.approx(1.0)


def test_sgdet_skips_images_without_gt_or_predictions_and_averages_zero_shot_over_images_with_them():
    A, B = [0, 0, 10, 10], [20, 20, 30, 30]
    gt1 = dict(boxes=np.array([A, B], np.float32), labels=np.array([1, 2]), rels=np.array([[0, 1, 1], [1, 0, 2]]))
    gt2 = dict(boxes=np.array([A, B], np.float32), labels=np.array([1, 2]), rels=np.array([[0, 1, 1]]))
    gt_empty = dict(boxes=np.zeros((0, 4)), labels=np.zeros(0, int), rels=np.zeros((0, 3), int))
    hit = _sg_pred([A, B], [1, 2], [1, 1], [[0, 1]], [[0, 1.0, 0]])
    no_pairs = _sg_pred([A, B], [1, 2], [1, 1], np.zeros((0, 2), int), np.zeros((0, 3)))
    m = ev.sgdet_metrics([gt1, gt2, gt_empty, gt2], [hit, hit, hit, no_pairs], num_predicates=2, ks=(20,),
                         zeroshot_triplets=[(2, 1, 2)])  # (subject label 2, object label 1, predicate 2)
    assert m["R@20"] == pytest.approx((0.5 + 1.0) / 2)  # the empty-GT image and the no-prediction image skipped
    assert m["zR@20"] == 0.0  # only image 1 has a zero-shot GT, and it is missed
    assert m["mR@20"] == pytest.approx((1.0 + 0.0) / 2)
    m = ev.sgdet_metrics([gt1], [hit], 2, ks=(20,), longtail={"head": [1], "body": [], "tail": [2]})
    assert m["mR@20_head"] == 1.0 and m["mR@20_tail"] == 0.0


def _vcoco_setup():
    actions = [{"name": "hold", "roles": ["agent", "obj"]}, {"name": "stand", "roles": ["agent"]},
               {"name": "point", "roles": ["agent", "instr"]}, {"name": "cut", "roles": ["agent", "instr", "obj"]}]
    P, K, T = [0, 0, 50, 100], [40, 40, 60, 60], [60, 10, 90, 30]
    # person 0 holds nothing visible (role object -1), stands, cuts with the knife K the thing T
    gt = dict(boxes=np.array([P, K, T], np.float32), labels=np.array([0, 5, 6]),
              actions=np.array([[1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]),
              role_ids=np.array([[[-1, -1], [-1, -1], [-1, -1], [1, 2]]] + [[[-1, -1]] * 4] * 2))
    return actions, gt, P, K, T


def test_vcoco_scenario_1_needs_an_empty_box_for_a_missing_role_scenario_2_ignores_it():
    actions, gt, P, K, T = _vcoco_setup()
    nan = [np.nan] * 4
    det = dict(person_boxes=np.array([P], np.float32), agent_scores=np.array([[0.9, 0.8, 0.1, 0.7]]),
               role_boxes=np.array([[[T, nan], [nan, nan], [K, nan], [K, T]]], np.float32),
               role_scores=np.array([[[0.9, np.nan], [np.nan, np.nan], [0.1, np.nan], [0.7, 0.6]]]))
    r = ev.vcoco_role_ap([gt], [det], actions)
    assert r["role_ap_S1"]["hold-obj"] == 0.0  # a box was predicted for an absent object
    assert r["role_ap_S2"]["hold-obj"] == 1.0  # ignored in Scenario 2
    assert r["role_ap_S1"]["cut-instr"] == 1.0 and r["role_ap_S1"]["cut-obj"] == 1.0
    assert math.isnan(r["role_ap_S1"]["point-instr"])  # nobody points: npos = 0 -> NaN, not in the means
    det["role_boxes"][0, 0, 0] = np.nan  # predict "absent" for hold-obj
    assert ev.vcoco_role_ap([gt], [det], actions)["role_ap_S1"]["hold-obj"] == 1.0


def test_vcoco_reported_mean_leaves_out_point_instr():
    actions, gt, P, K, T = _vcoco_setup()
    gt["actions"][0, 2] = 1  # now the person points, with an instrument we never find
    gt["role_ids"][0, 2, 0] = 1
    det = dict(person_boxes=np.array([P], np.float32), agent_scores=np.array([[0.9, 0.8, 0.5, 0.7]]),
               role_boxes=np.array([[[[0, 0, 0, 0], [0, 0, 0, 0]], [[0] * 4] * 2, [T, T], [K, T]]], np.float32),
               role_scores=np.array([[[0.9, np.nan], [np.nan, np.nan], [0.5, np.nan], [0.7, 0.6]]]))
    r = ev.vcoco_role_ap([gt], [det], actions)
    assert r["role_ap_S1"]["point-instr"] == 0.0
    assert r["role_mAP_S1"] == pytest.approx(1.0)  # hold-obj, cut-instr, cut-obj: the reported mean
    assert r["role_mAP_S1_all"] == pytest.approx(3 / 4)  # the official tool's nanmean with point-instr
    assert r["agent_mAP"] == pytest.approx((1 + 1 + 1 + 1) / 4)


def test_vcoco_unannotated_person_detections_are_skipped_and_no_gt_person_gives_fp():
    actions, gt, P, K, T = _vcoco_setup()
    gt["actions"][0] = -1  # the person is not annotated in V-COCO
    det = dict(person_boxes=np.array([P], np.float32), agent_scores=np.array([[0.9, 0.8, 0.1, 0.7]]),
               role_boxes=np.zeros((1, 4, 2, 4), np.float32), role_scores=np.full((1, 4, 2), 0.5, np.float32))
    r = ev.vcoco_role_ap([gt], [det], actions)
    assert all(math.isnan(v) for v in r["agent_ap"].values())  # npos 0 everywhere, the detection skipped
    actions2, gt2, *_ = _vcoco_setup()
    no_person = dict(gt2, labels=np.array([5, 5, 6]))
    for fp_score, expected in ((0.5, 1.0), (0.95, 0.5)):  # the FP ranked after / before the TP (0.9)
        det_fp = dict(det, agent_scores=np.array([[fp_score, 0.8, 0.1, 0.7]], np.float32))
        r = ev.vcoco_role_ap([gt2, no_person], [det, det_fp], actions2)
        assert r["agent_ap"]["hold"] == pytest.approx(expected)


# ==================================================================================================== training (issue 4)

TINY = ["--toy_train", "48", "--toy_train_hoi", "48", "--toy_test", "8", "--batch_size", "8", "--sgg_epochs", "1",
        "--joint_epochs", "1", "--workers", "0", "--log_every", "1", "--num_rel_queries", "8", "--num_hoi_queries", "8"]


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tinytoy"))
    sg2hoi.ensure_toy_datasets(root, num_train=48, num_test=8, num_train_hoi=48)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_toy, tmp_path_factory):
    """The whole TINY schedule, trained once per module (no evaluation): its folder (log.jsonl, ckpt.pt)."""
    out = str(tmp_path_factory.mktemp("tinyrun"))
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", out, "--no_eval"] + TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_run):
    """The final checkpoint of tiny_run, for the eval.py CLI and resume tests."""
    return os.path.join(tiny_run, "ckpt.pt")


def _run(args, cwd=HERE, timeout=300, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _run_all(arg_lists, timeout=400):
    """Independent runs at the same time (one thread each: the suite's time on a 2-core machine); their
    CompletedProcess-like results in order."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable] + a, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for a in arg_lists]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(SimpleNamespace(returncode=p.returncode, stdout=out, stderr=err))
    return results


def _log(out, events=False):
    """The step lines of a run's log.jsonl (or, with events=True, the event lines: resume, eval)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [x for x in lines if ("event" in x) == events]


def test_schedule_phases_and_alternation_from_the_log(tiny_run):
    out = tiny_run
    log = _log(out)
    # 48 images / batch 8 = 6 batches per epoch: phase 1 = 1 SGG epoch, phase 2 = 1 HOI epoch alternating with SGG
    assert [x["phase"] for x in log] == [1] * 6 + [2] * 12
    assert [x["task"] for x in log[:6]] == ["sgg"] * 6
    assert [x["task"] for x in log[6:]] == ["sgg", "hoi"] * 6
    assert all("rel_pred" in x for x in log if x["task"] == "sgg")
    assert all("hoi_verb" in x and "rel_pred" not in x for x in log if x["task"] == "hoi")
    # the config travels with the checkpoint and loads with weights_only=True
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    cfg = sg2hoi.Config(**ckpt["config"])
    assert cfg.num_rel_queries == 8 and cfg.entity_names[:3] == sg2hoi.load_vocab()["vg150_objects"][:3]
    assert dataclasses_equal(cfg, sg2hoi.Config(**ckpt["config"]))
    model = sg2hoi.build_model(cfg)
    model.load_state_dict(ckpt["model"])  # strict: every tensor fits


def dataclasses_equal(a, b):
    import dataclasses
    return dataclasses.asdict(a) == dataclasses.asdict(b)


def test_resume_after_sigkill_continues_with_the_same_losses(tiny_toy, tmp_path):
    common = ["train.py", "--toy_root", tiny_toy, "--no_eval", "--ckpt_every", "4", "--deterministic"] + TINY
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_err = open(tmp_path / "ref.err", "w")
    ref_proc = subprocess.Popen([sys.executable] + common + ["--out", ref], cwd=HERE, stdout=subprocess.DEVNULL,
                                stderr=ref_err, env=env)  # the uninterrupted run, alongside
    proc = subprocess.Popen([sys.executable] + common + ["--out", killed], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it has passed the checkpoint of step 8
        time.sleep(0.2)
        if os.path.exists(os.path.join(killed, "log.jsonl")) and len(_log(killed)) >= 10:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.err").read_text()[-3000:]
    reference = {x["step"]: x["loss"] for x in _log(ref)}
    done = len(_log(killed))
    assert 10 <= done < 18, "the run should have been killed mid-way"
    stale = os.path.join(killed, "ckpt.pt.tmp999999")  # what a SIGKILL during a checkpoint write leaves
    open(stale, "wb").write(b"partial")
    # without --out: the run continues in the checkpoint's own folder (run from another working directory)
    r = _run([os.path.join(HERE, "train.py"), "--resume", os.path.join(killed, "ckpt.pt"), "--no_eval",
              "--ckpt_every", "4", "--deterministic", "--log_every", "1"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and not os.path.exists(stale)
    assert not os.path.exists(tmp_path / "runs")
    steps = [x["step"] for x in _log(killed)]
    assert steps == sorted(reference), "each step once in the log, the repeated ones dropped"
    (event,) = _log(killed, events=True)
    assert event["event"] == "resume" and event["step"] % 4 == 0
    for x in _log(killed):
        assert x["loss"] == pytest.approx(reference[x["step"]], rel=1e-5, abs=1e-6), x["step"]
    # the weights at the end: those of the uninterrupted run
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (ref, killed))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_divergence_stops_naming_the_step_or_skips_until_max_skips(tiny_toy, tmp_path):
    blow_up = ["--lr", "1e6", "--lr_backbone", "1e6", "--lr_text_classifier", "1e6"]  # a real divergence
    stop, r = _run_all([["train.py", "--toy_root", tiny_toy, "--out", str(tmp_path / "a"), "--no_eval"] + blow_up + TINY,
                        ["train.py", "--toy_root", tiny_toy, "--out", str(tmp_path / "b"), "--no_eval", "--nonfinite",
                         "skip", "--max_skips", "3"] + blow_up + TINY])
    assert stop.returncode != 0
    assert "step 1 (sgg batch" in stop.stderr and "non-finite values in model output" in stop.stderr
    assert "Traceback" not in stop.stderr and "linear_sum_assignment" not in stop.stderr
    assert r.returncode != 0
    assert r.stdout.count("step skipped") == 3 and "3 consecutive steps skipped" in r.stderr
    assert [x["step"] for x in _log(str(tmp_path / "b"))] == [1], "only the finite first step is logged"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_with_c10d_rendezvous_on_localhost(tiny_toy, tmp_path):
    port = _free_port()
    out = str(tmp_path / "nodes")
    cmd = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",  # noqa
                        f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                        "--rdzv_id=sg2hoi-test", "train.py", "--toy_root", tiny_toy, "--out", out, "--max_steps", "4",
                        "--no_eval"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd(n), cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n in (0, 1)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert any("2 process(es)" in o[0] for o in outs)
    assert [x["step"] for x in _log(out)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- worked examples: every rule by hand (issue 27)
# One small example per rule that the paper, a reference evaluator or a data format fixes, with the arithmetic in
# the comments. tools/mutants.py puts a realistic one-line bug into a copy of the code for each rule and checks
# that the tests named for that rule catch it (README, "Do the tests catch a wrong implementation?").
LN2, LN3 = math.log(2), math.log(3)


def _which_target(query_box, box_a, box_b):
    """One query, two targets a (0) and b (1) that differ only in their boxes (every class and verb cost is equal:
    uniform logits): the target each matcher gives the query, (relation matcher, HOI matcher)."""
    q = torch.tensor([[query_box]])  # (B = 1, Q = 1, 4) cxcywh
    two = torch.tensor([box_a, box_b])  # the same box for subject and object (human and object)
    rel_out = dict(sub_logits=torch.zeros(1, 1, 3), obj_logits=torch.zeros(1, 1, 3), pred_logits=torch.zeros(1, 1, 3),
                   sub_boxes=q, obj_boxes=q)
    rel_tgt = dict(sub_boxes=two, obj_boxes=two, sub_labels=torch.tensor([0, 0]), obj_labels=torch.tensor([0, 0]),
                   preds=torch.tensor([0, 0]))
    hoi_out = dict(human_logits=torch.zeros(1, 1, 2), obj_logits=torch.zeros(1, 1, 3), verb_logits=torch.zeros(1, 1, 2),
                   human_boxes=q, obj_boxes=q)
    hoi_tgt = dict(human_boxes=two, obj_boxes=two, obj_labels=torch.tensor([0, 0]),
                   verbs=torch.tensor([[1.0, 0.0], [1.0, 0.0]]), has_obj=torch.tensor([True, True]))
    matcher = sg2hoi.HungarianMatcher()  # alpha = 1, 2, 4; box cost 2.5 L1 - GIoU
    return (int(matcher.match_relations(rel_out, [rel_tgt])[0][1]), int(matcher.match_hois(hoi_out, [hoi_tgt])[0][1]))


def test_matcher_box_cost_is_2_5_l1_minus_giou_where_l1_and_giou_disagree():
    """Eq. 9's box cost, per box: 2.5 * L1(cxcywh) - GIoU. In each case L1 alone and GIoU alone prefer different
    targets, and the weighted sum decides: a matcher without either term picks the other target."""
    # case 1, query (.5, .5, .1, .1):
    #   a = (.5, .5, .3, .3) contains it: L1 = .4, GIoU = IoU = .01 / .09 = .111 -> 2.5 * .4 - .111 = .889
    #   b = (.6, .5, .1, .1) touches it:  L1 = .1, GIoU = 0 (enclosing box = union) -> .25
    #   L1 alone: b; GIoU alone: a; the sum: b
    assert _which_target([.5, .5, .1, .1], [.5, .5, .3, .3], [.6, .5, .1, .1]) == (1, 1)
    # case 2, query (.5, .5, .2, .2):
    #   a = (.5, .5, .3, .3) contains it: L1 = .2, GIoU = .04 / .09 = .444 -> .5 - .444 = .056
    #   b = (.69, .5, .2, .2) overlaps .01 x .2: L1 = .19, IoU = GIoU = .002 / .078 = .026 -> .475 - .026 = .449
    #   L1 alone: b; GIoU alone: a; the sum: a
    assert _which_target([.5, .5, .2, .2], [.5, .5, .3, .3], [.69, .5, .2, .2]) == (0, 0)


def _onehot(rows, width, big=20.0):
    """Logits (1, len(rows), width) that put probability ~1 on the given class of each query."""
    x = torch.zeros(1, len(rows), width)
    for q, c in enumerate(rows):
        x[0, q, c] = big
    return x


def test_matcher_class_costs_weigh_2_and_the_predicate_cost_4():
    """Eq. 9: alpha_2 = 2 on p(subject label) + p(object label), alpha_3 = 4 on p(predicate); the boxes are equal.
    Target: subject label 0, object label 1, predicate 2. Which of two queries gets it?"""
    box = torch.full((1, 2, 4), 0.5)
    tgt = dict(sub_boxes=torch.full((1, 4), 0.5), obj_boxes=torch.full((1, 4), 0.5), sub_labels=torch.tensor([0]),
               obj_labels=torch.tensor([1]), preds=torch.tensor([2]))
    matcher = sg2hoi.HungarianMatcher(1, 2, 4)

    def winner(sub, obj, pred):  # per query: the class its subject / object / predicate logits say
        out = dict(sub_logits=_onehot(sub, 3), obj_logits=_onehot(obj, 3), pred_logits=_onehot(pred, 4),
                   sub_boxes=box, obj_boxes=box)
        return int(matcher.match_relations(out, [tgt])[0][0])

    # q0: both labels right, predicate wrong: -2 * (1 + 1) - 4 * 0 = -4
    # q1: object label wrong, predicate right: -2 * (1 + 0) - 4 * 1 = -6  -> q1 (the predicate weighs more)
    assert winner(sub=[0, 0], obj=[1, 0], pred=[0, 2]) == 1
    # q0: both labels right: -4; q1: the object says label 0 (the target's *subject* label): -2 -> q0
    assert winner(sub=[0, 0], obj=[1, 0], pred=[0, 0]) == 0


def _rel_case(layers=1, **cfg_kw):
    """One image, one relation: subject box (25, 25, 75, 75) label 0, object box (30, 30, 70, 70) label 1,
    predicate 0, on a 100 x 100 image; two queries, q0 near the target, q1 far away (unmatched).
    Criterion without L_seg / L_algn unless cfg_kw asks (they have their own tests); 2 entity classes, 2 predicates."""
    cfg = toy_cfg(**dict(dict(num_entity_classes=2, num_predicates=2, num_rel_queries=2, use_bbseg=False,
                              use_vl_distill=False), **cfg_kw))
    crit = sg2hoi.SetCriterion(cfg, torch.arange(2), torch.arange(2), 5, 8)
    t = dict(boxes=torch.tensor([[25., 25, 75, 75], [30, 30, 70, 70]]), labels=torch.tensor([0, 1]),
             rels=torch.tensor([[0, 1, 0]]), size=torch.tensor([100, 100]))
    # q0: subject box exact (.5, .5, .5, .5); object box (.5, .5, .2, .2) inside the target's (.5, .5, .4, .4)
    sub_boxes = torch.tensor([[[.5, .5, .5, .5], [.1, .1, .05, .05]]])
    obj_boxes = torch.tensor([[[.5, .5, .2, .2], [.1, .1, .05, .05]]])
    # q0's logits give p = 2 / 4 to the right class (ln 2 against two zeros); q1's are uniform over 3 classes
    sub_logits = torch.tensor([[[LN2, 0, 0], [0, 0, 0]]])
    obj_logits = torch.tensor([[[0, LN2, 0], [0, 0, 0]]])
    pred_logits = torch.tensor([[[LN2, 0, 0], [0, 0, 0]]])
    rel = {k: v[None].repeat(layers, 1, 1, 1) for k, v in dict(
        sub_logits=sub_logits, obj_logits=obj_logits, pred_logits=pred_logits, sub_boxes=sub_boxes,
        obj_boxes=obj_boxes).items()}
    return crit, dict(feat_mask=torch.zeros(1, 4, 4, dtype=torch.bool), rel=rel), [t]


def test_relation_loss_terms_by_hand_with_the_no_object_weight_eos_coef():
    """Eq. 10's L_rel on the case of _rel_case: each term weighted by its alpha (1, 2, 4); unmatched queries learn
    "no object" / "no relation" with weight eos_coef = 0.1 (DETR); CE = weighted sum / total weight 1 + 0.1."""
    crit, out, targets = _rel_case()
    losses = crit(out, targets, "sgg")
    # boxes (matched q0 only, / 1 relation): subject exact -> 0; object: L1 = .2 + .2 = .4, GIoU = IoU = .04 / .16
    # = .25 -> GIoU loss .75; alpha_1 * (2.5 * .4 + .75) = 1.75
    assert float(losses["rel_box"]) == pytest.approx(1.75, abs=1e-5)
    # CE: q0 -> its label, p = 1/2: ln 2, weight 1; q1 -> "no object" (last class), p = 1/3: ln 3, weight 0.1
    ce = (LN2 + 0.1 * LN3) / (1 + 0.1)
    assert float(losses["rel_cls"]) == pytest.approx(2 * (ce + ce), abs=1e-5)  # alpha_2 x (subject + object)
    assert float(losses["rel_pred"]) == pytest.approx(4 * ce, abs=1e-5)  # alpha_3 x predicate
    assert float(losses["loss"]) == pytest.approx(1.75 + 8 * ce, abs=1e-5)


def test_auxiliary_losses_match_every_decoder_layer_and_add_up():
    """Deep supervision (DETR): every decoder layer is matched and pays the whole L_rel; the terms of layer l < L-1
    carry the suffix _l and the total adds them all. Two identical layers -> twice one layer's loss."""
    crit, out, targets = _rel_case(layers=1)
    one = crit(out, targets, "sgg")
    crit, out, targets = _rel_case(layers=2)
    two = crit(out, targets, "sgg")
    assert sorted(two) == ["loss", "rel_box", "rel_box_0", "rel_cls", "rel_cls_0", "rel_pred", "rel_pred_0"]
    for k in ("rel_box", "rel_cls", "rel_pred"):
        assert float(two[k + "_0"]) == pytest.approx(float(one[k]))
    assert float(two["loss"]) == pytest.approx(2 * float(one["loss"]))


def test_alignment_loss_is_the_mean_absolute_error_times_4_or_the_mean_squared_error():
    """Eq. 5 / Eq. 10: lambda_2 L_algn with L_algn = mean over the text_dim components of |student - teacher| (l1,
    the default) or of its square (VLl2). Student = teacher except one component off by 2 of 64."""
    for loss, per_component in (("l1", 2.0), ("l2", 4.0)):
        crit, out, targets = _rel_case(use_vl_distill=True, align_loss=loss)
        teacher = torch.randn(crit.cfg.text_dim)
        student = teacher.clone()
        student[5] += 2.0
        targets[0]["clip"] = teacher
        out["align"] = student[None]  # (B, text_dim)
        assert float(crit(out, targets, "sgg")["align"]) == pytest.approx(4 * per_component / 64, abs=1e-6)


def test_hoi_box_loss_leaves_out_the_object_box_of_an_action_without_object():
    """V-COCO: an HOI without object (index -1) has a zero object box that no box loss reads; the human box still
    counts. Both predicted human boxes exact, so the box loss is 0 whatever the object boxes are."""
    cfg = toy_cfg(num_hoi_objects=3, num_verbs=2, num_hoi_queries=2, use_bbseg=False, use_vl_distill=False)
    crit = sg2hoi.SetCriterion(cfg, torch.arange(3), torch.arange(3), 5, 8)
    t = dict(boxes=torch.tensor([[40., 40, 60, 60]]), labels=torch.tensor([0]), hois=torch.tensor([[0, -1, 0]]),
             size=torch.tensor([100, 100]))
    out = dict(feat_mask=torch.zeros(1, 4, 4, dtype=torch.bool), hoi=dict(
        human_boxes=torch.tensor([[[[.5, .5, .2, .2], [.1, .1, .05, .05]]]]),
        obj_boxes=torch.tensor([[[[.5, .5, .5, .5], [.1, .1, .05, .05]]]]),
        human_logits=torch.zeros(1, 1, 2, 2), obj_logits=torch.zeros(1, 1, 2, 4), verb_logits=torch.zeros(1, 1, 2, 2)))
    assert float(crit(out, [t], "hoi")["hoi_box"]) == pytest.approx(0.0, abs=1e-5)


def test_hoi_loss_terms_by_hand_human_class_and_focal_verbs_over_positive_labels():
    """L_hoi: the human branch is a 2-way CE whose matched target is class 0 ("human"); verbs use the focal loss
    (gamma 2) over every query and verb, divided by the number of positive verb labels (QPIC), not of matches."""
    cfg = toy_cfg(num_hoi_objects=2, num_verbs=2, num_hoi_queries=2, use_bbseg=False, use_vl_distill=False)
    crit = sg2hoi.SetCriterion(cfg, torch.arange(2), torch.arange(2), 5, 8)
    # one person (0, 0, 50, 100) and one object of class 1 (50, 0, 100, 100) on a 100 x 100 image, two verbs
    t = dict(boxes=torch.tensor([[0., 0, 50, 100], [50, 0, 100, 100]]), labels=torch.tensor([0, 1]),
             hois=torch.tensor([[0, 1, 0], [0, 1, 1]]), size=torch.tensor([100, 100]))
    far = [.1, .1, .05, .05]
    out = dict(feat_mask=torch.zeros(1, 4, 4, dtype=torch.bool), hoi=dict(
        human_boxes=torch.tensor([[[[.25, .5, .5, 1.], far]]]), obj_boxes=torch.tensor([[[[.75, .5, .5, 1.], far]]]),
        human_logits=torch.tensor([[[[math.log(3), 0], [0, 0]]]]),  # q0: p(human) = 3/4
        obj_logits=torch.tensor([[[[0, LN2, 0], [0, 0, 0]]]]),  # q0: p(class 1) = 1/2; q1 uniform
        verb_logits=torch.zeros(1, 1, 2, 2)))  # sigmoid = 1/2 everywhere
    losses = crit(out, [t], "hoi")
    assert float(losses["hoi_box"]) == pytest.approx(0.0, abs=1e-5)  # both boxes of q0 exact
    # human CE: q0 -> class 0, -ln(3/4), weight 1; q1 -> class 1 ("no human"), ln 2, weight 0.1
    # object CE: q0 -> class 1, ln 2; q1 -> "no object", ln 3, weight 0.1; both / (1 + 0.1), times alpha_2 = 2
    human = (math.log(4 / 3) + 0.1 * LN2) / 1.1
    obj = (LN2 + 0.1 * LN3) / 1.1
    assert float(losses["hoi_cls"]) == pytest.approx(2 * (human + obj), abs=1e-5)
    # focal loss at p = 1/2: -ln(1/2) * (1 - 1/2)^2 = ln 2 / 4 for each of 2 queries x 2 verbs -> ln 2 in all,
    # / 2 positive verb labels (1 matched pair) -> ln 2 / 2, times alpha_3 = 4
    assert float(losses["hoi_verb"]) == pytest.approx(4 * LN2 / 2, abs=1e-5)


def test_seg_loss_sums_the_channels_and_averages_the_unpadded_cells_of_a_2x2_map():
    """Eq. 2 per image: sum over the N_seg + 1 channels of the BCE, averaged over the un-padded cells."""
    logits = torch.zeros(1, 2, 2, 2)  # (B, channels, H, W)
    logits[0, 1, 0, 0] = math.log(3)  # sigmoid = 3/4 at channel 1 of cell (0, 0), whose target is 1
    logits[0, :, 1, 1] = 10.0  # the padded cell: a huge loss that must not count
    y = torch.zeros(1, 2, 2, 2)
    y[0, 1, 0, 0] = 1.0
    y[0, 0, 0, 1] = y[0, 0, 1, 0] = 1.0
    pad = torch.tensor([[[False, False], [False, True]]])
    # logit 0: BCE = ln 2 whatever the target (5 of the 6 valid values); the sixth: -ln(3/4) = ln(4/3)
    expected = (5 * LN2 + math.log(4 / 3)) / 3  # summed over the 2 channels, averaged over 3 valid cells
    assert float(sg2hoi.loss_bbseg(logits, y, pad)[0]) == pytest.approx(expected, abs=1e-6)


def _recorder(seen, name):
    """A forward hook that keeps the first (args, output) of its module in seen[name] (and returns None, so the
    output is unchanged)."""
    def hook(module, args, output):
        seen.setdefault(name, (args, output))
    return hook


def _hooked_forward(cfg, hooks):
    """A forward pass of a fresh toy model on a 64 x 64 batch whose second image has 32 padded rows (so padding
    matters), recording the inputs and outputs of the named sub-modules: {name: (args, output)}."""
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg).eval()
    seen = {}
    for name in hooks:
        model.get_submodule(name).register_forward_hook(_recorder(seen, name))
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, 32:] = True
    with torch.no_grad():
        out = model(images, mask)
    return model, out, seen


def test_aggregation_concatenates_w_v_v_and_w_s_of_the_semantic_map_with_background_zero():
    """Eq. 3: f_agg = [W_v V, W_s E_s], E_s = the class text embedding of each cell's argmax class of s, and the zero
    vector where the argmax is background (channel 0). Eq. 4: the [CLS] token's input is GAP(V) over the un-padded
    cells. Both read at the encoder's input."""
    cfg = toy_cfg()
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg).eval()
    seen = {}
    forced = torch.zeros(2, len(model.seg_names) + 1, 8, 8)  # s: background on the left half, class 2 on the right
    forced[:, 0, :, :4] = 5.0
    forced[:, 3, :, 4:] = 5.0
    model.bbseg.register_forward_hook(lambda m, a, o: forced)  # replaces BBSeg's output
    model.input_proj.register_forward_hook(_recorder(seen, "v"))
    model.encoder.register_forward_hook(_recorder(seen, "encoder"))
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, 32:] = True  # image 1: the bottom 4 of 8 cell rows are padding
    with torch.no_grad():
        model(images, mask)
        v, (tokens, _, tok_mask) = seen["v"][1], seen["encoder"][0]  # v (2, d, 8, 8); tokens (2, 1 + 64, d)
        text = sg2hoi.class_text_embeddings(model.seg_names, cfg.text_dim, cfg.text_embeddings)  # (N_seg, E)
        e_s = torch.zeros(2, cfg.text_dim, 8, 8)
        e_s[:, :, :, 4:] = text[2][None, :, None, None]  # class 2 on the right; background (left) -> 0
        f_agg = torch.cat([model.w_v(v), model.w_s(e_s)], 1)  # (2, d, 8, 8)
        assert torch.allclose(tokens[:, 1:], f_agg.flatten(2).transpose(1, 2), atol=1e-5)
        gap = torch.stack([v[0].mean((1, 2)), v[1, :, :4].mean((1, 2))])  # image 1: its 4 un-padded rows only
        assert torch.allclose(tokens[:, 0], gap, atol=1e-5)
    assert not tok_mask[:, 0].any() and tok_mask[1, 1:].sum() == 32  # [CLS] never masked; 4 rows x 8 padded


@pytest.mark.parametrize("feature", ["cls", "pool"])
def test_vl_alignment_reads_the_cls_output_or_the_mean_of_the_unpadded_encoder_outputs(feature):
    """Eq. 5: the vector aligned with CLIP is W_a f_en[CLS] (SG2HOI+cls) or W_a of the mean of f_en over the
    un-padded positions, [CLS] excluded (SG2HOI+pool)."""
    model, out, seen = _hooked_forward(toy_cfg(align_feature=feature), ["encoder"])
    f_en = seen["encoder"][1]  # (2, 1 + 64, d)
    if feature == "cls":
        f_vl = f_en[:, 0]
    else:  # image 1: the first 32 cells (4 rows of 8) are its image
        f_vl = torch.stack([f_en[0, 1:].mean(0), f_en[1, 1:33].mean(0)])
    assert torch.allclose(out["align"], model.align_proj(f_vl), atol=1e-5)


def test_r2itrans_and_the_feature_and_query_transformations_attend_to_what_sec_iii_c_says():
    """Sec. III-C, read through forward hooks on one toy forward pass:
      Eq. 7  R2ITrans = self-attention over W_t [f_s, f_r, f_o] (the last relation-decoder layer's branch features)
             with Q_rel as position: queries = keys = x + Q_rel, values = x;
      feature transformation: f_en (+ its positions) queries f_r2i (+ Q_rel); values f_r2i, without positions;
      query transformation: Q_hoi queries the decoded relation queries f_sg[-1] (+ Q_rel); values f_sg[-1];
      Eq. 8  the HOI decoder reads the transformed HOI queries and F_hoi = the feature transformation's output
             without the [CLS] position."""
    names = ["encoder", "rel_decoder", "rel_sub", "rel_obj", "rel_pred", "w_t", "r2i", "r2i.layers.0.self_attn",
             "feature_transform.0", "feature_transform.0.multihead_attn", "query_transform.0",
             "query_transform.0.multihead_attn", "hoi_decoder"]
    model, out, seen = _hooked_forward(toy_cfg(), names)
    close = lambda a, b: a.shape == b.shape and torch.allclose(a, b, atol=1e-5)  # noqa: E731
    q_rel = model.rel_query_embed.weight[None].expand(2, -1, -1)  # (2, N_rel, d)
    f_en, f_sg = seen["encoder"][1], seen["rel_decoder"][1]  # (2, 1 + 64, d), (L, 2, N_rel, d)
    _, tok_pos, tok_mask = seen["encoder"][0]
    # W_t's input: the three branch features of the LAST layer. Their order inside the concatenation is not
    # observable (W_t is learned: permuting its inputs permutes its columns), so the test accepts any order.
    blocks = seen["w_t"][0][0].split(model.cfg.d_model, -1)
    last = {n: seen[f"rel_{n}"][1][1][-1] for n in ("sub", "obj", "pred")}
    assert sorted(n for b in blocks for n, f in last.items() if close(b, f)) == ["obj", "pred", "sub"]
    x, pos = seen["r2i"][0][:2]
    assert close(x, seen["w_t"][1]) and close(pos, q_rel)
    q, k, v = seen["r2i.layers.0.self_attn"][0][:3]
    assert close(q, x + q_rel) and close(k, x + q_rel) and close(v, x)
    f_r2i = seen["r2i"][1]
    q, k, v = seen["feature_transform.0.multihead_attn"][0][:3]
    assert close(q, f_en + tok_pos) and close(k, f_r2i + q_rel) and close(v, f_r2i)
    q, k, v = seen["query_transform.0.multihead_attn"][0][:3]
    q_hoi = model.hoi_query_embed.weight[None].expand(2, -1, -1)
    assert close(q, q_hoi) and close(k, f_sg[-1] + q_rel) and close(v, f_sg[-1])
    queries, memory, mem_pos, mem_mask = seen["hoi_decoder"][0]
    assert close(queries, seen["query_transform.0"][1])
    assert close(memory, seen["feature_transform.0"][1][:, 1:]) and close(mem_pos, tok_pos[:, 1:])
    assert torch.equal(mem_mask, tok_mask[:, 1:])


def test_triplet_scores_multiply_subject_object_and_predicate_or_human_object_and_verb_probabilities():
    """Inference: a relation scores p(subject) x p(object) x p(predicate) (RelTR), an HOI p(human) x p(object) x
    sigmoid(verb) (QPIC); "no object" is left out of the object's argmax."""
    rel_out = dict(sub_logits=torch.tensor([[[[LN2, 0, 0]]]]),  # p = (1/2, 1/4, 1/4): label 0 at 1/2
                   obj_logits=torch.tensor([[[[0, LN3, 0]]]]),  # p = (1/5, 3/5, 1/5): label 1 at 3/5
                   pred_logits=torch.tensor([[[[math.log(4), 0, 0]]]]),  # p = (4/6, 1/6, 1/6 = no relation)
                   sub_boxes=torch.full((1, 1, 1, 4), .5), obj_boxes=torch.full((1, 1, 1, 4), .5))
    pred = sg2hoi.relation_predictions(rel_out, [(100, 100)])[0]
    # one pair (box 0 = its subject, box 1 = its object), predicate 1 (column 0 = no relation): 1/2 x 3/5 x 2/3
    (cand,) = ev.sgdet_candidates([pred], 2)
    assert pred["rel_pairs"].tolist() == [[0, 1]] and cand["gc"]["predicates"].tolist() == [1]
    assert cand["gc"]["scores"][0] == pytest.approx(0.2)
    hoi_out = dict(human_logits=torch.tensor([[[[math.log(3), 0]]]]),  # p(human) = 3/4
                   obj_logits=torch.tensor([[[[LN2, 0, 0]]]]),  # label 0 at 1/2
                   verb_logits=torch.zeros(1, 1, 1, 1),  # sigmoid = 1/2
                   human_boxes=torch.full((1, 1, 1, 4), .5), obj_boxes=torch.full((1, 1, 1, 4), .5))
    hoi = sg2hoi.hoi_predictions(hoi_out, [(100, 100)])[0]
    assert hoi["verb_scores"][0, 0] == pytest.approx(3 / 4 * 1 / 2 * 1 / 2)


def _one_relation(sub_box, obj_box, gt_sub=(0, 0, 9, 9), gt_obj=(20, 0, 29, 9)):
    """SGDet R@1 of one prediction against one GT relation (labels 1 -> 2, predicate 1), boxes given."""
    gt = dict(boxes=np.array([gt_sub, gt_obj], np.float32), labels=np.array([1, 2]), rels=np.array([[0, 1, 1]]))
    pred = _sg_pred([sub_box, obj_box], [1, 2], [1, 1], [[0, 1]], [[0, 1.0]])
    return ev.sgdet_metrics([gt], [pred], num_predicates=1, ks=(1,))["R@1"]


def test_sgdet_hit_needs_iou_at_least_half_for_subject_and_object():
    """A hit needs IoU >= 0.5 for both boxes, with the +1 pixel convention: a hit at 0.5, a miss at 0.45."""
    # GT (0, 0, 9, 9) = 10 x 10 = 100 px; (0, 0, 9, 19) = 200 px holds it: IoU = 100 / 200 = 0.5 exactly
    assert _one_relation((0, 0, 9, 19), (20, 0, 29, 9)) == 1.0
    assert _one_relation((0, 0, 9, 9), (20, 0, 29, 19)) == 1.0
    # GT (0, 0, 8, 9) = 9 x 10 = 90 px; (0, 0, 19, 9) = 200 px holds it: IoU = 90 / 200 = 0.45
    assert _one_relation((0, 0, 19, 9), (20, 0, 29, 9), gt_sub=(0, 0, 8, 9)) == 0.0
    assert _one_relation((0, 0, 9, 9), (20, 0, 39, 9), gt_obj=(20, 0, 28, 9)) == 0.0


def test_hico_hit_needs_iou_at_least_half_for_human_and_object():
    """HICO-DET (QPIC): a detection matches with both IoUs >= 0.5: a hit at exactly 0.5, a miss at 0.45."""
    H, O = [0, 0, 9, 9], [20, 0, 29, 9]
    for human, obj, gt_h, ap in (([0, 0, 9, 19], O, H, 1.0), (H, [20, 0, 29, 19], H, 1.0),  # IoU 100 / 200
                                 ([0, 0, 19, 9], O, [0, 0, 8, 9], 0.0)):  # IoU 90 / 200 = 0.45
        gt, pred = _hico_case([human, obj], [0, 1], [(0, 1)], [[0.9, 0, 0]], [gt_h, O], [0, 1], [[0, 1, 0]])
        assert ev.hico_map([gt], [pred], np.ones((3, 2)), [])["mAP_full"] == pytest.approx(ap)


def test_sgdet_recall_at_k_counts_the_gt_relations_hit_by_the_first_k_triplets():
    """R@K = |GT relations hit by the first K triplets| / |GT relations|, in the order given."""
    A, B, C, D = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [80, 80, 90, 90]
    gt = dict(boxes=np.array([A, B, C, D], np.float32), labels=np.array([1, 2, 3, 4]),
              rels=np.array([[0, 1, 1], [2, 3, 1], [1, 2, 1]]))  # three GT relations
    # predictions in this order: hits GT 0, misses (wrong pair), hits GT 1
    pred = _sg_pred([A, B, C, D], [1, 2, 3, 4], [1, 1, 1, 1], [[0, 1], [0, 3], [2, 3]], [[0, 1.0]] * 3)
    m = ev.sgdet_metrics([gt], [pred], num_predicates=1, ks=(1, 2, 3))
    assert (m["R@1"], m["R@2"], m["R@3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))


def test_sgdet_graph_constraint_predicate_ignores_the_no_relation_column():
    """SGB: with the graph constraint a pair's predicate is 1 + argmax(rel_scores[:, 1:]): column 0 ("no relation")
    never wins, even when it is the largest score. Here no relation .6, predicate 1 .3, predicate 2 .1."""
    A, B = [0, 0, 10, 10], [20, 20, 30, 30]
    gt = dict(boxes=np.array([A, B], np.float32), labels=np.array([1, 2]), rels=np.array([[0, 1, 1]]))
    pred = _sg_pred([A, B], [1, 2], [1, 1], [[0, 1]], [[0.6, 0.3, 0.1]])
    assert ev.sgdet_metrics([gt], [pred], num_predicates=2, ks=(1,))["R@1"] == 1.0


def test_rare_and_non_rare_split_at_exactly_ten_training_instances():
    """HICO-DET (QPIC): rare = fewer than 10 training instances; non-rare = at least 10. 10 is non-rare."""
    records = [dict(labels=np.array([0, 1]), hois=np.array([[0, 1, 0]] * 10 + [[0, 1, 1]] * 9))]
    rare, counts = sg2hoi.rare_triplets_from_training(records)
    assert counts == {(0, 1, 0): 10, (0, 1, 1): 9}
    assert rare == [(0, 1, 1)]
    assert ev.non_rare_triplets(counts) == [(0, 1, 0)]


def test_learning_rate_drops_tenfold_at_two_thirds_of_each_phase_and_sgg_slows_in_phase_2():
    """The schedule (Sec. IV-D + README): phase 1 = sgg_epochs of SGG steps, phase 2 = SGG and HOI alternating over
    2 x joint_epochs x HOI steps; lr x 0.1 from 2/3 of each phase on; in phase 2 the SGG part trains at
    lr_sgg_phase2 = 1e-5 (the HOI part at lr = 1e-4, the backbone at 1e-5 throughout)."""
    cfg = sg2hoi.make_config("paper", sgg_epochs=10, joint_epochs=5)
    sched = train.make_schedule(cfg, {"sgg": SimpleNamespace(steps_per_epoch=3),
                                      "hoi": SimpleNamespace(steps_per_epoch=6)})
    assert (sched.phase1_steps, sched.phase2_steps) == (30, 60)  # 10 x 3; 2 x 5 x 6
    assert (sched.phase(29), sched.phase(30), sched.task(30), sched.task(31)) == (1, 2, "sgg", "hoi")
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "name": n, "lr": lr, "base_lr": lr}
                           for n, lr in (("backbone", 1e-5), ("sgg", 1e-4), ("hoi", 1e-4))])

    def lrs(step):
        train.set_learning_rates(opt, cfg, sched.phase(step), sched.progress(step))
        return [g["lr"] for g in opt.param_groups]  # backbone, sgg, hoi

    assert lrs(19) == pytest.approx([1e-5, 1e-4, 1e-4])  # 19 / 30 < 2/3
    assert lrs(20) == pytest.approx([1e-6, 1e-5, 1e-5])  # 20 / 30 = 2/3: dropped
    assert lrs(30) == pytest.approx([1e-5, 1e-5, 1e-4])  # phase 2 starts at progress 0; SGG at lr_sgg_phase2
    assert lrs(69) == pytest.approx([1e-5, 1e-5, 1e-4])  # 39 / 60 < 2/3
    assert lrs(70) == pytest.approx([1e-6, 1e-6, 1e-5])  # 40 / 60 = 2/3


def test_sgdet_ground_truth_predicates_are_1_based_for_the_evaluator():
    """The loaders keep predicates 0-based (0..49); SGB's evaluator reads 1..50 with column 0 = no relation."""
    record = dict(boxes=np.zeros((2, 4)), labels=np.array([3, 4]), rels=np.array([[0, 1, 0], [1, 0, 49]]))
    assert ev.sgg_ground_truth(record)["rels"].tolist() == [[0, 1, 1], [1, 0, 50]]


def test_training_transform_moves_the_box_with_the_image_through_flip_and_resize():
    """make_transforms(train=True): an asymmetric 400 x 600 image, a bright block at its left inside a box. After the
    flip (p = 1/2) and the multi-scale resize the box still holds the block: its inside is bright, its mirror image
    dark. Over several seeds both the flipped and the unflipped case occur."""
    tf = sg2hoi.make_transforms(True, 800, 1333)
    image = torch.zeros(3, 400, 600, dtype=torch.uint8)
    image[:, 100:200, 50:150] = 255  # the block
    box = torchvision.tv_tensors.BoundingBoxes(torch.tensor([[40., 90, 160, 210]]), format="XYXY",
                                               canvas_size=(400, 600))  # the block with 10 px around it
    flipped = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out, out_box = tf(torchvision.tv_tensors.Image(image), box)
        H, W = out.shape[-2:]
        scale = H / 400
        assert 480 <= H <= 800 and W == pytest.approx(600 * scale, abs=1)  # shorter side 480..800, ratio kept
        x1, y1, x2, y2 = out_box[0].tolist()
        assert (x2 - x1, y2 - y1) == pytest.approx((120 * scale, 120 * scale), abs=1)
        m = int(20 * scale)  # the block's middle: 20 (resized) px inside the box
        inside = out[:, int(y1) + m:int(y2) - m, int(x1) + m:int(x2) - m].mean()
        mirror = out[:, int(y1) + m:int(y2) - m, W - int(x2) + m:W - int(x1) - m].mean()
        assert inside > mirror + 1.0, (seed, inside, mirror)  # normalised units: black ~ -2, white ~ +2
        flipped.add(x1 > W / 2)
    assert flipped == {True, False}


def test_hoi_matcher_gives_a_target_without_object_no_object_box_cost():
    """V-COCO: an action without object (index -1) has a zero object box that the matching must ignore. Target: the
    human box (.5, .5, .2, .2), no object. q1 has that human box exactly (cost 2.5 * 0 - 1 = -1); q0's is off by .1
    in x (L1 .1, GIoU 1/3: .25 - .33 = -.08) but its object box lies next to the zero box. Without an object cost q1
    wins; charging the zero box would make q0 win (L1 to the zero box: q0 .09, q1 2.0; 2.5 x 1.91 > .92)."""
    t = sg2hoi.hoi_targets(dict(boxes=torch.tensor([[40., 40, 60, 60]]), labels=torch.tensor([0]),
                                hois=torch.tensor([[0, -1, 0]]), size=torch.tensor([100, 100])),
                           num_verbs=2, missing_object_label=2)
    assert t["has_obj"].tolist() == [False] and t["obj_boxes"].tolist() == [[0, 0, 0, 0]]
    out = dict(human_logits=torch.zeros(1, 2, 2), obj_logits=torch.zeros(1, 2, 3), verb_logits=torch.zeros(1, 2, 2),
               human_boxes=torch.tensor([[[.6, .5, .2, .2], [.5, .5, .2, .2]]]),
               obj_boxes=torch.tensor([[[.015, .015, .03, .03], [.5, .5, .5, .5]]]))
    rows, _ = sg2hoi.HungarianMatcher().match_hois(out, [t])[0]
    assert rows.tolist() == [1]


def test_hico_eleven_point_ap_counts_recall_1_and_takes_the_best_precision_at_or_above_each_recall():
    """11-point AP = mean over t = 0, 0.1, ..., 1.0 of max(precision at recall >= t). Recall 1/2 at precision 1,
    then recall 1 at precision 1/2: t = 0 .. 0.5 give 1 (6 points), t = 0.6 .. 1.0 give 1/2 (5 points)."""
    assert ev.eleven_point_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((6 + 2.5) / 11)
    # the precision of a later, higher recall counts for the lower thresholds too (interpolation)
    assert ev.eleven_point_ap(np.array([0.5, 1.0]), np.array([0.5, 1.0])) == pytest.approx(1.0)


def test_hico_verb_object_mask_zeroes_impossible_pairs_before_the_top_k():
    """HICO-DET (QPIC): scores x correct_mat[verb, object label] before the top-k: an impossible (verb, object)
    candidate scores 0 and cannot push a possible one out. One pair, verb 0 impossible with object 1 (score .9),
    verb 1 possible (score .5, a true positive); top-1 only."""
    H, O = [0, 0, 99, 99], [100, 100, 199, 199]
    gt, pred = _hico_case([H, O], [0, 1], [(0, 1)], [[0.9, 0.5, 0]], [H, O], [0, 1], [[0, 1, 1]])
    mask = np.ones((3, 2))
    mask[0, 1] = 0
    assert ev.hico_map([gt], [pred], mask, [], max_hois=1)["mAP_full"] == pytest.approx(1.0)
    # without the mask the top-1 is the impossible verb 0 (not a GT class) and the true positive is cut
    assert ev.hico_map([gt], [pred], np.ones((3, 2)), [], max_hois=1)["mAP_full"] == 0.0


def test_mutant_catalogue_is_well_formed():
    """tools/mutants.py (not part of the suite, README): every mutant's old text occurs exactly once in its file,
    names are unique, at least 30 mutants. A refactor that moves a line makes this fail instead of a silent rot."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutants", os.path.join(HERE, "tools", "mutants.py"))
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    assert mutants.catalogue_problems(HERE) == []
    assert len(mutants.MUTANTS) >= 30



# ---------------------------------------------------------------- the same experiment on 1 or N processes (issue 10)


def test_micro_batches_with_global_counts_give_the_gradient_of_the_whole_batch():
    """Accumulation: 2 micro-batches of 2 images, each normalised by the counts of all 4, add up to the gradient of
    the batch of 4 (the toy backbone normalises with GroupNorm, so the micro-batch size does not matter)."""
    torch.manual_seed(0)
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    criterion = sg2hoi.build_criterion(model)
    x, mask = batch()
    x2, mask2 = batch(pad_second=False)
    images, masks = torch.cat([x, x2]), torch.cat([mask, mask2])
    for task, tg in (("sgg", sgg_targets), ("hoi", hoi_targets)):
        targets = tg() + tg()[::-1]
        Q = cfg.num_rel_queries if task == "sgg" else cfg.num_hoi_queries

        def grads(parts):
            model.zero_grad()
            norm = {}
            for sl in parts:
                for k, v in sg2hoi.batch_counts(targets[sl], task, Q).items():
                    norm[k] = norm.get(k, 0.0) + v
            total = 0.0
            for sl in parts:
                loss = criterion(model(images[sl], masks[sl]), targets[sl], task, norm=norm)["loss"]
                loss.backward()
                total += loss.item()
            return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        whole, g_whole = grads([slice(0, 4)])
        parts, g_parts = grads([slice(0, 2), slice(2, 4)])
        assert parts == pytest.approx(whole, rel=1e-5)
        assert g_whole.keys() == g_parts.keys()
        for n in g_whole:
            torch.testing.assert_close(g_parts[n], g_whole[n], rtol=1e-4, atol=1e-6, msg=n)
        # and without `norm` a batch is normalised by its own counts, as before
        assert criterion(model(images, masks), targets, task)["loss"].item() == pytest.approx(whole, rel=1e-5)


def test_split_batch_divides_the_global_batch_over_processes_and_micro_batches():
    assert train.split_batch(16, 1, 0) == (16, 1)
    assert train.split_batch(16, 2, 0) == (8, 1)
    assert train.split_batch(16, 2, 4) == (4, 2)
    assert train.split_batch(16, 1, 5) == (4, 4)  # equal micro-batches: 16 = 4 x 4, never 5 + 5 + 5 + 1
    assert train.split_batch(8, 8, 2) == (1, 1)
    with pytest.raises(SystemExit, match="not divisible by 3 processes"):
        train.split_batch(16, 3, 0)


def test_one_process_two_processes_and_accumulation_log_the_same_losses(tiny_toy, tmp_path):
    common = ["--toy_root", tiny_toy, "--no_eval", "--max_steps", "8", "--deterministic"] + TINY  # 6 SGG, SGG, HOI
    runs = {"1": ["train.py"], "1x2": ["train.py", "--micro_batch", "4"],
            "2": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]}
    logs = {}
    for name, r in zip(runs, _run_all([cmd + common + ["--out", str(tmp_path / name)] for name, cmd in runs.items()])):
        assert r.returncode == 0, (name, r.stderr[-3000:])
        logs[name] = _log(str(tmp_path / name))
    assert [x["task"] for x in logs["1"]] == ["sgg"] * 7 + ["hoi"]
    for name in ("1x2", "2"):
        assert [x["step"] for x in logs[name]] == list(range(1, 9))
        for a, b in zip(logs["1"], logs[name]):
            terms = ("rel_box", "rel_cls", "rel_pred") if a["task"] == "sgg" else ("hoi_box", "hoi_cls", "hoi_verb")
            for term in ("loss", "seg", "align") + terms:
                assert b[term] == pytest.approx(a[term], rel=1e-3), (name, a["step"], term)


def test_two_processes_resume_restores_every_ranks_rng(tiny_toy, tmp_path):
    """With dropout each rank draws its own masks: resuming must restore every rank's RNG, not rank 0's."""
    ddp = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    common = ["--toy_root", tiny_toy, "--no_eval", "--deterministic", "--dropout", "0.3", "--ckpt_every", "3"] + TINY
    ref, split = str(tmp_path / "ref"), str(tmp_path / "split")
    for r in _run_all([ddp + common + ["--out", ref, "--max_steps", "6"],
                       ddp + common + ["--out", split, "--max_steps", "3"]]):
        assert r.returncode == 0, r.stderr[-3000:]
    r = _run(ddp + ["--resume", os.path.join(split, "ckpt.pt"), "--max_steps", "6", "--log_every", "1"], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = {x["step"]: x["loss"] for x in _log(ref)}
    resumed = {x["step"]: x["loss"] for x in _log(split)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


def test_two_gloo_processes_evaluate_during_training_and_slow_final_metrics_do_not_time_out(tiny_toy, tmp_path):
    """2 gloo processes: the schedule, an evaluation at the end of phase 1 (log event, best.pt), and a final
    evaluation whose metrics rank 0 computes alone for longer than the collective timeout: the run still ends
    cleanly with metrics.json."""
    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(f"""import os, sys, time
sys.path.insert(0, {HERE!r})
import eval as ev
import train
slow, calls = ev.metrics_from_collected, []
def slower(*a, **kw):
    calls.append(1)
    if len(calls) == 2:  # the final evaluation (the first is the one at the end of phase 1)
        time.sleep(8)  # the timeout below is 3 s
    return slow(*a, **kw)
ev.metrics_from_collected = slower
train.main()
""")
    out = str(tmp_path / "run")
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper), "--toy_root",
              tiny_toy, "--out", out, "--max_steps", "8", "--eval_every", "1", "--eval_limit", "4", "--dist_timeout",
              "0.05"] + TINY, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 process(es)" in r.stdout and "Table I" in r.stdout and "Table IV" in r.stdout
    log = _log(out)  # rank 0 only: one line per step; 48 images / global batch 8 = 6 steps per epoch
    assert [x["step"] for x in log] == list(range(1, 9))
    assert [x["phase"] for x in log] == [1] * 6 + [2] * 2
    events = _log(out, events=True)
    assert [(e["event"], e["step"], e["metric"]) for e in events] == [("eval", 6, "sgg.R@50"),
                                                                      ("eval", 8, "hico.default.mAP_full")]
    assert "hico" not in events[0]["metrics"], "phase 1 evaluates the SGG part only"
    assert os.path.exists(os.path.join(out, "best.pt")) and os.path.exists(os.path.join(out, "metrics.json"))


# ---------------------------------------------------------------- resume, schedule variants, faults (issues 8, 9)


def test_resume_refuses_flags_that_change_the_experiment_and_bad_checkpoints(tiny_ckpt, tmp_path):
    ckpt_path = tiny_ckpt
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert os.path.isabs(ckpt["args"]["toy_root"]), "data paths are stored absolute (eval from any folder)"
    r = _run(["train.py", "--resume", ckpt_path, "--joint_epochs", "5", "--preset", "paper", "--batch_size", "8"])
    assert r.returncode != 0
    assert "--joint_epochs 5 (the checkpoint has 1)" in r.stderr and "--preset paper" in r.stderr
    assert "batch_size" not in r.stderr, "a flag equal to the checkpoint's value is no conflict"
    bad = {"truncated.pt": open(ckpt_path, "rb").read()[:1000], "text.pt": b"not a checkpoint"}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    torch.save(ckpt["model"], tmp_path / "bare.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "made_up_field": 1}}, tmp_path / "future.pt")
    for name, message in (("truncated.pt", "not a readable checkpoint"), ("text.pt", "not a readable checkpoint"),
                          ("bare.pt", "not a train.py checkpoint"), ("future.pt", "made_up_field"),
                          ("missing.pt", "no such file")):
        with pytest.raises(SystemExit, match=f"{name}: .*{message}"):
            train.load_checkpoint(str(tmp_path / name))


def test_table_v_hoi_row_trains_the_hoi_part_on_a_frozen_sgg_part(tiny_toy, tmp_path):
    out = str(tmp_path / "run")
    common = ["train.py", "--toy_root", tiny_toy, "--out", out, "--no_eval", "--hoi_on_frozen_sgg", "true"] + TINY
    r = _run(common + ["--max_steps", "6"])  # the end of phase 1
    assert r.returncode == 0, r.stderr[-3000:]
    after_sgg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    r = _run(["train.py", "--resume", os.path.join(out, "ckpt.pt")])
    assert r.returncode == 0, r.stderr[-3000:]
    log = _log(out)
    assert [x["task"] for x in log] == ["sgg"] * 6 + ["hoi"] * 6  # phase 2: HOI batches only, 1 HOI epoch
    final = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    model = sg2hoi.build_model(sg2hoi.Config(**torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]))
    hoi_only = {n for n, p in model.named_parameters() if any(p is q for q in train.idle_parameters(model, "sgg"))}
    changed = {name for name in after_sgg if not torch.equal(after_sgg[name], final[name])}
    assert changed <= hoi_only, f"the SGG part moved in phase 2: {sorted(changed - hoi_only)[:5]}"
    assert len(changed) > 0.9 * len(hoi_only), "the HOI part trains"


def test_zero_training_steps_and_bad_flags_are_errors(tmp_path):
    small = str(tmp_path / "small")
    sg2hoi.ensure_toy_datasets(small, num_train=8, num_test=4, num_train_hoi=8)
    r = _run(["train.py", "--toy_root", small, "--toy_train", "8", "--toy_train_hoi", "8", "--toy_test", "4", "--out",
              str(tmp_path / "o")])
    assert r.returncode != 0
    assert "8 usable images, fewer than the global batch of 16" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "metrics.json")
    for flag, value in (("--ckpt_every", "0"), ("--log_every", "0"), ("--max_steps", "-1"), ("--dist_timeout", "0")):
        with pytest.raises(SystemExit, match=flag):
            train.parse_args([flag, value])


def test_failed_checkpoint_write_removes_its_temporary_file_and_names_the_path(tmp_path, monkeypatch):
    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", disk_full)
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"could not write checkpoint .*ckpt.pt: .*No space left on device.*MiB free"):
        train.save_checkpoint(path, {"x": 1})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the ablation study (issue 13)


def test_every_study_row_sets_the_config_of_its_paper_row():
    import study  # tools/
    expected = {"FULL": {}, "SGG": dict(tasks="sgg"), "HOI": dict(hoi_on_frozen_sgg=True),
                "-HSS": dict(use_bbseg=False), "HSSD": dict(semantic_embedding="discrete"),
                "HSSG": dict(semantic_embedding="glove"), "-VLpool": dict(use_vl_distill=False),
                "VLl2": dict(align_loss="l2"), "-FETR": dict(use_feature_transform=False),
                "-QUTR": dict(use_query_transform=False), "-R2ITR": dict(use_r2i=False),
                "RELQ": dict(hoi_queries_from_rel=True)}
    assert list(study.STUDY_ROWS) == list(expected)
    full = sg2hoi.make_config("toy", **train.config_overrides(train.parse_args(study.FULL_FLAGS["pool_text"])))
    assert full.align_feature == "pool" and full.classifier_init == "text"  # SG2HOI+pool, the paper's FULL
    assert study.FULL_FLAGS["defaults"] == [] and study.parse_args([]).full == "defaults"
    for row, fields in expected.items():
        flags = study.FULL_FLAGS["pool_text"] + study.STUDY_ROWS[row][0]
        overrides = train.config_overrides(train.parse_args(flags))
        assert {k: v for k, v in overrides.items() if k not in ("align_feature", "classifier_init")} == fields, row
        if row != "HSSG":  # HSSG needs a word-vector file
            sg2hoi.make_config("toy", **overrides)


def test_study_runner_writes_the_table_and_skips_finished_runs(tiny_toy, tmp_path, capsys):
    import study  # tools/

    out = str(tmp_path / "study")
    argv = ["--rows", "FULL,-HSS,HSSG", "--seeds", "1", "--out", out, "--budget",
            "--sgg_epochs 1 --joint_epochs 1", "--run_args", " ".join(["--toy_root", tiny_toy, "--max_steps", "2",
                                                                       "--eval_limit", "2"] + TINY)]
    study.main(argv)  # in this process; each run is a train.py process of its own
    assert "2 run(s) to do" in capsys.readouterr().out
    assert all(os.path.exists(os.path.join(out, row, "seed0", "metrics.json")) for row in ("FULL", "-HSS"))
    with open(os.path.join(out, "study.json")) as f:
        table = json.load(f)
    assert table["rows"]["FULL"]["seeds"] == 1 and len(table["rows"]["FULL"]["mean"]) == 7
    assert table["rows"]["FULL"]["paper"][0] == 25.9 and "skipped" in table["rows"]["HSSG"]
    md = open(os.path.join(out, "study.md")).read()
    assert md.count("\n| ") >= 3 and "| -HSS | 1 |" in md and "(23.9)" in md
    study.main(argv)
    assert "0 run(s) to do" in capsys.readouterr().out
    study.main(argv[:1] + ["FULL"] + argv[2:] + ["--first_seed", "1"])  # one more seed: seed 1 alone
    assert "1 run(s) to do" in capsys.readouterr().out
    with open(os.path.join(out, "study.json")) as f:
        table = json.load(f)
    assert os.path.exists(os.path.join(out, "FULL", "seed1", "metrics.json")) and table["rows"]["FULL"]["seeds"] == 1


def test_draw_prediction_panels_boxes_segmentation_and_legend():
    image = torch.full((3, 64, 64), 100, dtype=torch.uint8)
    gt = dict(boxes=np.array([[8, 8, 40, 40]], np.float32), labels=np.array([1]))
    seg_map = torch.zeros(8, 8, dtype=torch.long)
    seg_map[:4, :4] = 2  # class 2 of seg_names ("dog") in the top-left quarter, background elsewhere
    holding = {"subject": _ent("person", [8, 8, 40, 40], 0.9), "predicate": {"index": 0, "name": "holding"},
               "object": _ent("cup", [30, 30, 60, 60], 0.8, 1), "score": 0.9}
    result = {"relations": [holding], "hois": []}
    pic = np.asarray(figures.draw_prediction(image, gt, seg_map, result, ["cup", "person"], ["person", "dog"]))
    pic = pic.astype(int)
    assert pic.shape[1] == 3 * 640 and pic.shape[0] > 640  # 64 px drawn x 10, three panels, legends under them
    assert (pic[250, 81] == 255).all()  # panel 1: the GT box's left edge (x = 80), in white
    assert (pic[250, 250] == 100).all()  # inside the box: the image untouched
    assert (pic[100, 640 + 100] != 100).any()  # panel 2: the dog's region is painted
    assert (pic[500, 640 + 500] == 100).all()  # background left as it is
    cup = ev._palette(2)[1]  # entity 1: the cup (entities are numbered by score)
    assert np.abs(pic[301, 2 * 640 + 450] - cup).max() <= 1  # panel 3: the cup box's top edge, in its colour
    assert (pic[640:, 2 * 640:] != 255).any()  # the legend has text


def test_eval_cli_tables_pictures_and_saved_predictions(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt  # (the command line in a process of its own: the distributed-evaluation and --image tests)
    pics, preds = str(tmp_path / "pics"), str(tmp_path / "preds.pt")
    ev.main(["--ckpt", ckpt, "--save-predictions", preds])
    out = capsys.readouterr().out
    assert "Table I" in out and "Table IV" in out
    with open(os.path.join(os.path.dirname(ckpt), "eval_ckpt.json")) as f:  # beside the checkpoint
        from_model = json.load(f)
    again = json.loads(json.dumps(ev.metrics_from_collected(bootstrap.load_predictions(preds))))
    assert again["sgg"]["R@50"] == from_model["sgg"]["R@50"] and again["hico"] == from_model["hico"]
    figures.main(["--ckpt", ckpt, "--out", pics, "--num_images", "2"])
    assert "wrote 4 pictures" in capsys.readouterr().out
    assert sorted(f[:3] for f in os.listdir(pics)) == ["hoi", "hoi", "sgg", "sgg"]
    # each class's AP under its name (verb, object), and mAP Full is their mean
    per_class = from_model["hico"]["default"]["per_class"]
    verbs, objects = (sg2hoi.load_vocab()[k] for k in ("hico_verbs", "coco80"))
    assert [c["name"] for c in per_class] == [f"{verbs[v]} {objects[o]['name']}" for _, o, v in
                                              (c["triplet"] for c in per_class)]
    assert np.mean([c["ap"] for c in per_class]) == pytest.approx(from_model["hico"]["default"]["mAP_full"])


# ==================================================================================================== bad images, loader errors (issues 9 and 11)


def _jpeg_bytes(w=40, h=30):
    return torchvision.io.encode_jpeg(torch.full((3, h, w), 120, dtype=torch.uint8)).numpy().tobytes()


def _bad_image_records(tmp_path):
    _png(str(tmp_path / "good.png"), 64, 48)
    (tmp_path / "truncated.jpg").write_bytes(_jpeg_bytes(64, 48)[:300])
    (tmp_path / "text.jpg").write_text("hello, I am text")
    return [dict(file=str(tmp_path / f), image_id=k, width=64, height=48, boxes=np.array([[1, 2, 30, 40]], np.float32),
                 labels=np.array([3]), rels=np.zeros((0, 3), np.int64))
            for k, f in enumerate(["good.png", "truncated.jpg", "text.jpg"])]


def test_bad_image_skip_mode_drops_the_item_counts_it_and_collate_leaves_it_out(tmp_path):
    records = _bad_image_records(tmp_path)
    ds = sg2hoi.DetectionDataset(records, {"task": "sgg", "bad_images": "skip"}, torchvision.transforms.v2.Identity())
    with pytest.warns(sg2hoi.BadImageWarning, match=r"truncated.jpg.*record 1.*1 dropped"):
        assert ds[1] is None
    with pytest.warns(sg2hoi.BadImageWarning, match=r"text.jpg.*record 2.*2 dropped"):
        assert ds[2] is None
    assert ds.skipped == 2
    images, mask, targets = sg2hoi.collate([ds[0], None, None])
    assert images.shape == (1, 3, 48, 64) and [t["image_id"] for t in targets] == [0]
    with pytest.raises(sg2hoi.DataError, match="all 2 images of a batch"):
        sg2hoi.collate([None, None])
    # the default stops with the file and the record named
    stop = sg2hoi.DetectionDataset(records, {"task": "sgg"}, torchvision.transforms.v2.Identity())
    with pytest.raises(sg2hoi.DataError, match=r"truncated.jpg: cannot read image of record 1 .*truncated"):
        stop[1]


def test_loader_header_check_stops_or_skips_a_text_file_named_jpg(tmp_path, capsys):
    root = str(tmp_path)
    _vg_fixture(root)
    with open(f"{root}/images/7.jpg", "w") as f:
        f.write("not an image")
    with pytest.raises(sg2hoi.DataError, match=r"train.json: image 7: image file .*7.jpg: not a readable image"):
        sg2hoi.load_vg_json(root, "train")
    records, _ = sg2hoi.load_dataset("vg", root, "train", bad_images="skip")
    assert records == [] and "unreadable image header skipped: 1" in capsys.readouterr().out


def test_vg_json_size_that_differs_from_the_image_is_an_error_naming_file_record_and_field(tmp_path):
    root = str(tmp_path)
    _vg_fixture(root)
    _png(f"{root}/images/7.jpg", 120, 90)  # the JSON says 100 x 90
    with pytest.raises(sg2hoi.DataError, match=r"train.json: image 7: field 'width' = 100 but the image file "
                                               r".*7.jpg is 120 x 90"):
        sg2hoi.load_vg_json(root, "train")
    assert len(sg2hoi.load_vg_json(root, "train", check_images=False)[0]) == 1  # no image check, no size check


def test_item_11_bad_fields_give_one_line_naming_file_record_and_field(tmp_path):
    vg = str(tmp_path / "vg")
    _vg_fixture(vg)
    coco = json.load(open(f"{vg}/train.json"))
    del coco["images"][1]["width"]
    json.dump(coco, open(f"{vg}/train.json", "w"))
    with pytest.raises(sg2hoi.DataError, match=r"train.json: image 8 \(8.jpg, entry 1 of 'images'\): field 'width' "
                                               r"missing"):
        sg2hoi.load_vg_json(vg, "train")
    coco = json.load(open(f"{vg}/val.json"))
    coco["annotations"][1]["bbox"] = [5, 50, 60]
    json.dump(coco, open(f"{vg}/val.json", "w"))
    with pytest.raises(sg2hoi.DataError, match=r"val.json: annotation id 2 \(image 7, entry 1 of 'annotations'\): "
                                               r"field 'bbox' "
                                               r"= \[5, 50, 60\]: expected 4 numbers"):
        sg2hoi.load_vg_json(vg, "val")
    vg2 = str(tmp_path / "vg2")
    _vg_fixture(vg2, rels_override={"7": [[0, 1, 3], [0, 1]]})
    with pytest.raises(sg2hoi.DataError, match=r"rel.json: train/7: entry 1 = \[0, 1\]: expected 3 numbers"):
        sg2hoi.load_vg_json(vg2, "train")
    hico = str(tmp_path / "hico")
    record = {"file_name": "HICO_test2015_00000001.jpg",
              "annotations": [{"bbox": [0, 0, 20, 30], "category_id": 1}, {"bbox": [5, 5, 40, 50], "category_id": 3}],
              "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 5}]}
    _hoia_fixture(hico, "test_hico.json", "test2015", [record, dict(record, hoi_annotation=[{"object_id": 1,
                                                                                             "category_id": 5}])])
    with pytest.raises(sg2hoi.DataError, match=r"test_hico.json: record 1 \(HICO_test2015_00000001.jpg\), "
                                               r"hoi_annotation 0: field 'subject_id' missing"):
        sg2hoi.load_hico(hico, "test")
    _hoia_fixture(hico, "test_hico.json", "test2015", [dict(record, annotations=[{"bbox": [0, 0, 20], "category_id": 1},
                                                                                record["annotations"][1]])])
    with pytest.raises(sg2hoi.DataError, match=r"record 0 \(HICO_test2015_00000001.jpg\), annotation 0: field 'bbox' "
                                               r"= \[0, 0, 20\]: expected 4 numbers"):
        sg2hoi.load_hico(hico, "test")
    _hoia_fixture(hico, "test_hico.json", "test2015", [record])
    assert len(sg2hoi.load_hico(hico, "test")[0]) == 1
    corre = f"{hico}/annotations/corre_hico.npy"
    np.save(corre, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle: never loaded
    with pytest.raises(sg2hoi.DataError, match=r"corre_hico.npy: not a readable numpy .npy matrix"):
        sg2hoi.load_hico(hico, "test")
    with open(corre, "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(sg2hoi.DataError, match=r"corre_hico.npy: not a readable numpy .npy matrix"):
        sg2hoi.load_hico(hico, "test")


# ==================================================================================================== metrics: vectorised
# evaluators, V-COCO mask, non-rare split, input checks, output paths, distributed evaluation (issues 8, 9, 10, 11)


def _ref_iou(a, b):
    """One pair of boxes, +1 convention, float32 (metrics.md section 0)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    one = np.float32(1)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]) + one, np.float32(0))
    ih = max(min(a[3], b[3]) - max(a[1], b[1]) + one, np.float32(0))
    inter = iw * ih
    area = lambda x: (x[2] - x[0] + one) * (x[3] - x[1] + one)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _ref_qpic_iou(a, b):
    if max(a[0], b[0]) >= min(a[2], b[2]) or max(a[1], b[1]) >= min(a[3], b[3]):
        return 0.0
    return _ref_iou(a, b)


def _ref_hico_map(gts, preds, correct_mat, rare, non_rare=None, known_object=False):
    """Brute force, following metrics.md section 1, one image and one detection at a time."""
    classes, npos, shows = [], {}, set()
    for i, g in enumerate(gts):
        for s, o, v in g["hois"].tolist():
            t = (int(g["labels"][s]), int(g["labels"][o]), int(v))
            if t not in npos:
                classes.append(t)
            npos[t] = npos.get(t, 0) + 1
            shows.add((i, t[1]))
    dets = {t: ([], [], []) for t in classes}
    for i, (g, p) in enumerate(zip(gts, preds)):
        if len(g["boxes"]) == 0:
            continue
        cand = []
        for q in range(len(p["sub_ids"])):
            s, o = p["sub_ids"][q], p["obj_ids"][q]
            for v in range(p["verb_scores"].shape[1]):
                score = np.float32(p["verb_scores"][q, v]) * np.float32(correct_mat[v, p["labels"][o]])
                cand.append((float(score), s, o, v))
        cand = sorted(cand, key=lambda c: c[0], reverse=True)[:100]  # Python's stable sort
        matched = set()
        for score, s, o, v in cand:
            best, best_ov = None, -1.0
            for k, (gs, go, gv) in enumerate(g["hois"].tolist()):
                if gv != v or p["labels"][s] != g["labels"][gs] or p["labels"][o] != g["labels"][go]:
                    continue
                ov_s, ov_o = _ref_qpic_iou(p["boxes"][s], g["boxes"][gs]), _ref_qpic_iou(p["boxes"][o], g["boxes"][go])
                if ov_s >= 0.5 and ov_o >= 0.5 and min(ov_s, ov_o) > best_ov:
                    best, best_ov = k, min(ov_s, ov_o)
            tp = best is not None and best not in matched
            if tp:
                matched.add(best)
            t = (int(p["labels"][s]), int(p["labels"][o]), v)
            if t in dets:
                dets[t][0].append(i), dets[t][1].append(score), dets[t][2].append(tp)
    ap = {}
    for t in classes:
        img, sc, tp = (np.array(x) for x in dets[t])
        if known_object and len(img):
            keep = np.array([(j, t[1]) in shows for j in img], bool)
            sc, tp = sc[keep], tp[keep]
        if len(sc) == 0:
            ap[t] = 0.0
            continue
        order = np.argsort(-sc.astype(np.float32))
        ctp, cfp = np.cumsum(tp[order]), np.cumsum(~tp[order])
        ap[t] = ev.eleven_point_ap(ctp / npos[t], ctp / (ctp + cfp))
    rare = {tuple(r) for r in rare}
    non_rare = set(classes) - rare if non_rare is None else {tuple(r) for r in non_rare}
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return dict(mAP_full=mean([ap[t] for t in classes]), mAP_rare=mean([ap[t] for t in classes if t in rare]),
                mAP_non_rare=mean([ap[t] for t in classes if t in non_rare]),
                per_class=[{"triplet": list(t), "npos": npos[t], "ap": ap[t], "rare": t in rare} for t in classes])


def _ref_sgdet(gts, preds, C, ks, zeroshot):
    """Brute force, following metrics.md section 3."""
    rec, zrec, per = {}, {}, {}
    for g, p in zip(gts, preds):
        if len(g["rels"]) == 0 or len(p["rel_pairs"]) == 0:
            continue
        gc = [(a, b, 1 + int(np.argmax(p["rel_scores"][q, 1:]))) for q, (a, b) in enumerate(p["rel_pairs"].tolist())]
        pair_s = p["scores"][p["rel_pairs"][:, 0]] * p["scores"][p["rel_pairs"][:, 1]]
        top = np.argsort(-(pair_s[:, None] * p["rel_scores"][:, 1:]).ravel())[:100]
        ng = [(*p["rel_pairs"][t // C].tolist(), int(t % C) + 1) for t in top]
        for mode, trips in (("", gc), ("ng", ng)):
            for k in ks:
                hit = []
                for s, o, r in g["rels"].tolist():
                    gt_t = (g["labels"][s], r, g["labels"][o])
                    hit.append(any((p["labels"][a], pr, p["labels"][b]) == gt_t
                                   and _ref_iou(p["boxes"][a], g["boxes"][s]) >= 0.5
                                   and _ref_iou(p["boxes"][b], g["boxes"][o]) >= 0.5 for a, b, pr in trips[:k]))
                hit = np.array(hit)
                rec.setdefault((mode, k), []).append(hit.mean())
                for r in np.unique(g["rels"][:, 2]):
                    per.setdefault((mode, k, int(r)), []).append(hit[g["rels"][:, 2] == r].mean())
                zs = np.array([(g["labels"][s], g["labels"][o], r) in zeroshot for s, o, r in g["rels"].tolist()])
                if zs.any():
                    zrec.setdefault((mode, k), []).append(hit[zs].mean())
    out = {}
    for mode in ("", "ng"):
        for k in ks:
            out[f"{mode}R@{k}"] = float(np.mean(rec[(mode, k)]))
            out[f"{mode}mR@{k}"] = float(np.mean([np.mean(per.get((mode, k, r), [0.0])) for r in range(1, C + 1)]))
            out[f"{mode}zR@{k}"] = float(np.mean(zrec[(mode, k)])) if (mode, k) in zrec else 0.0
    return out


def _tied_synthetic(seed):
    """Small HICO and SGDet data with many exact score ties, duplicate GT rows and duplicate predicted boxes."""
    gts_h, preds_h, cm, rare = bench.synthetic_hico(12, num_pairs=30, num_verbs=6, num_objects=4, seed=seed)
    rng = np.random.default_rng(seed)
    for g, p in zip(gts_h, preds_h):
        p["verb_scores"] = (rng.integers(0, 4, p["verb_scores"].shape) / 4).astype(np.float32)  # ties
        g["hois"] = np.concatenate([g["hois"], g["hois"][:1]])  # a duplicate GT row
        p["boxes"][1] = p["boxes"][0]  # duplicate predicted boxes
    gts_h[3] = dict(boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, int), hois=np.zeros((0, 3), int))
    gts_s, preds_s = bench.synthetic_sgdet(15, num_pairs=40, num_predicates=5, num_classes=4, seed=seed)
    for g, p in zip(gts_s, preds_s):
        p["rel_scores"] = (rng.integers(0, 3, p["rel_scores"].shape) / 3).astype(np.float32)
        p["scores"] = (rng.integers(1, 3, p["scores"].shape) / 2).astype(np.float32)
        g["rels"] = np.concatenate([g["rels"], g["rels"][:2]])  # duplicate GT triplets
    gts_s[2]["rels"] = np.zeros((0, 3), int)  # skipped: no GT relation
    preds_s[4] = dict(preds_s[4], rel_pairs=np.zeros((0, 2), int), rel_scores=np.zeros((0, 6), np.float32))
    return (gts_h, preds_h, cm, rare), (gts_s, preds_s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_a_brute_force_reference_with_ties_and_duplicates(seed):
    (gts, preds, cm, rare), (sg_gts, sg_preds) = _tied_synthetic(seed)
    non_rare = [t for t in {tuple(int(x) for x in (g["labels"][s], g["labels"][o], v))
                            for g in gts for s, o, v in g["hois"].tolist()} if t[2] % 2 == 0]
    compact = ev.hico_candidates(preds, cm)
    for mask in (cm, np.ones_like(cm)):
        for ko in (False, True):
            ref = _ref_hico_map(gts, preds, mask, rare, non_rare, known_object=ko)
            got = ev.hico_map(gts, preds, mask, rare, known_object=ko, non_rare_triplets=non_rare)
            assert {k: got[k] for k in ref} == ref
    # the compact form (what distributed evaluation gathers) gives the same numbers
    assert ev.hico_map(gts, compact, cm, rare) == ev.hico_map(gts, preds, cm, rare)
    ks = (5, 20, 50)
    zs = {(int(g["labels"][s]), int(g["labels"][o]), int(r)) for g in sg_gts[::3] for s, o, r in g["rels"].tolist()}
    got = ev.sgdet_metrics(sg_gts, sg_preds, 5, ks=ks, zeroshot_triplets=sorted(zs))
    assert {k: got[k] for k in _ref_sgdet(sg_gts, sg_preds, 5, ks, zs)} == _ref_sgdet(sg_gts, sg_preds, 5, ks, zs)
    sg_compact = ev.sgdet_candidates(sg_preds, 5)
    assert ev.sgdet_metrics(sg_gts, sg_compact, 5, ks=ks, zeroshot_triplets=sorted(zs)) == got


def test_vcoco_impossible_verb_object_pair_gets_role_score_zero():
    verbs = [{"name": "ride_instr", "action": "ride", "role": "instr"}, {"name": "stand", "action": "stand", "role": None}]
    actions = [{"name": "ride", "roles": ["agent", "instr"]}, {"name": "stand", "roles": ["agent"]}]
    correct_mat = np.array([[1, 0], [1, 1]], np.float32)  # (V = 2, 80 -> here 2 objects): ride_instr a cup: no
    pred = dict(boxes=np.array([[0, 0, 9, 9], [0, 0, 9, 9], [5, 5, 20, 20], [5, 5, 20, 20]], np.float32),
                labels=np.array([0, 0, 1, 2]), sub_ids=np.array([0, 1]), obj_ids=np.array([2, 3]),
                verb_scores=np.array([[0.8, 0.5], [0.7, 0.6]], np.float32))
    det = ev.vcoco_detections(pred, verbs, actions, correct_mat, missing_object_label=2)
    assert det["role_scores"][0, 0, 0] == 0.0  # object 1 cannot be ridden: masked to 0 (was 0.8)
    assert det["agent_scores"][0, 0] == 0.0
    assert det["role_scores"][1, 0, 0] == pytest.approx(0.7)  # "no object" (label 2): the appended column of ones
    assert np.isnan(det["role_boxes"][1, 0, 0]).all()
    assert det["agent_scores"][0, 1] == pytest.approx(0.5)


def test_hico_class_without_training_instances_is_neither_rare_nor_non_rare():
    H, O1, O2 = [0, 0, 99, 99], [100, 100, 199, 199], [200, 200, 299, 299]
    gt_a, pred_a = _hico_case([H, O1], [0, 1], [(0, 1)], [[0, 0.9, 0]], [H, O1], [0, 1], [[0, 1, 1]], O=3)
    gt_b, pred_b = _hico_case([H, O2], [0, 2], [(0, 1)], [[0.9, 0, 0]], [H, O2], [0, 2], [[0, 1, 0]], O=3)
    # training: (0, 1, 1) seen 12 times (non-rare); (0, 2, 0) never seen; (0, 2, 2) 3 times (rare, not in test)
    rare, counts = sg2hoi.rare_triplets_from_training(
        [dict(labels=np.array([0, 1]), hois=np.array([[0, 1, 1]] * 12)),
         dict(labels=np.array([0, 2]), hois=np.array([[0, 1, 2]] * 3))])
    non_rare = ev.non_rare_triplets(counts)
    assert rare == [(0, 2, 2)] and non_rare == [(0, 1, 1)]
    m = ev.hico_map([gt_a, gt_b], [pred_a, pred_b], np.ones((3, 3)), rare, non_rare_triplets=non_rare)
    assert m["mAP_full"] == pytest.approx(1.0) and m["mAP_non_rare"] == pytest.approx(1.0)
    assert m["mAP_rare"] == 0.0  # the rare class is not in the test set: empty mean
    pred_b["boxes"][1] = [400, 400, 499, 499]  # the unseen class missed: Full drops, Non-rare does not count it
    m = ev.hico_map([gt_a, gt_b], [pred_a, pred_b], np.ones((3, 3)), rare, non_rare_triplets=non_rare)
    assert m["mAP_full"] == pytest.approx(0.5) and m["mAP_non_rare"] == pytest.approx(1.0)


def test_metric_functions_name_missing_fields_and_length_mismatch():
    gts, preds, cm, rare = bench.synthetic_hico(3, num_pairs=4, num_verbs=3, num_objects=2)
    with pytest.raises(ValueError, match="3 ground-truth images but 2 predictions"):
        ev.hico_map(gts, preds[:2], cm, rare)
    bad = [dict(p) for p in preds]
    del bad[1]["verb_scores"]
    with pytest.raises(ValueError, match=r"prediction of image 1 lacks \['verb_scores'\]"):
        ev.hico_map(gts, bad, cm, rare)
    sg_gts, sg_preds = bench.synthetic_sgdet(3, num_pairs=4, num_predicates=3, num_classes=2)
    del sg_gts[2]["rels"]
    with pytest.raises(ValueError, match=r"ground truth of image 2 lacks \['rels'\]"):
        ev.sgdet_metrics(sg_gts, sg_preds, 3)
    with pytest.raises(ValueError, match="1 ground-truth images but 0 predictions"):
        ev.vcoco_role_ap([_vcoco_setup()[1]], [], _vcoco_setup()[0])


def _synthetic_collected():
    """A small collect()-style dict (no model), as --save-predictions writes it."""
    sg_gts, sg_preds = bench.synthetic_sgdet(4, num_pairs=6, num_predicates=3, num_classes=3)
    gts, preds, cm, rare = bench.synthetic_hico(4, num_pairs=6, num_verbs=3, num_objects=2)
    return {"sgg": dict(gts=sg_gts, preds=ev.sgdet_candidates(sg_preds, 3), num_predicates=3,
                        zeroshot=np.zeros((0, 3), int), longtail={"head": [1], "body": [2], "tail": [3]}),
            "hoi": dict(dataset="hico", gts=gts, preds=ev.hico_candidates(preds, cm), correct_mat=cm,
                        rare=rare, non_rare=np.zeros((0, 3), int))}


def test_bad_prediction_files_are_refused_naming_file_and_problem(tiny_ckpt, tmp_path):
    good = str(tmp_path / "good.pt")
    ev.save_predictions(_synthetic_collected(), good)
    bootstrap.main([good, "--resamples", "2", "--json", str(tmp_path / "m.json")])  # a valid file works
    assert json.load(open(tmp_path / "m.json"))["images"]["sgg"] == 4
    truncated = str(tmp_path / "truncated.pt")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:300])
    short = _synthetic_collected()
    short["sgg"]["preds"] = short["sgg"]["preds"][:2]  # 2 predictions for 4 images
    ev.save_predictions(short, str(tmp_path / "short.pt"))
    no_field = _synthetic_collected()
    del no_field["hoi"]["preds"][1]["verbs"]
    ev.save_predictions(no_field, str(tmp_path / "no_field.pt"))
    for path, problem in ((tiny_ckpt, "training checkpoint"), (truncated, "not a predictions file"),
                          (str(tmp_path / "short.pt"), "'sgg' has 2 predictions for 4 ground-truth images"),
                          (str(tmp_path / "no_field.pt"), "prediction of image 1 lacks ['verbs']")):
        with pytest.raises(SystemExit) as e:
            bootstrap.main([path, "--json", str(tmp_path / "bad.json")])
        message = str(e.value.code)
        assert path in message and problem in message and "\n" not in message, message
        assert not os.path.exists(tmp_path / "bad.json")  # never an empty result


def test_eval_does_not_replace_training_metrics_and_checks_outputs_before_inference(tiny_ckpt, tmp_path, capsys):
    args = ev.parse_args(["--ckpt", tiny_ckpt])
    assert ev.output_paths(args)["--json"] == os.path.join(os.path.dirname(tiny_ckpt), "eval_ckpt.json")
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    assert "eval_<checkpoint stem>.json" in " ".join(capsys.readouterr().out.split())  # --help says so
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--save-predictions", "--json"):
        target = str(blocker / "out")  # below a regular file: cannot be created
        t = time.time()
        with pytest.raises(SystemExit) as e:
            ev.main(["--ckpt", tiny_ckpt, flag, target])
        assert flag in str(e.value.code) and target in str(e.value.code)
        assert time.time() - t < 2  # refused before loading the model and running the inference
    with pytest.raises(SystemExit, match="is a folder"):
        ev.main(["--ckpt", tiny_ckpt, "--json", str(tmp_path)])


def test_distributed_evaluation_one_and_two_gloo_processes_write_identical_metrics(tiny_ckpt, tmp_path):
    results = {}
    runs = _run_all([["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "eval.py", "--ckpt",
                      tiny_ckpt, "--json", str(tmp_path / f"m{n}.json"), "--save-predictions",
                      str(tmp_path / f"p{n}.pt")] for n in (1, 2)])
    for n, r in zip((1, 2), runs):
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        assert r.stdout.count("Table I ") == 1  # rank 0 alone prints
        with open(tmp_path / f"m{n}.json") as f:
            results[n] = json.load(f)
    for m in results.values():
        m["sgg"].pop("time_per_image_s"), m["sgg"].pop("device")
    assert results[1] == results[2]
    p1, p2 = bootstrap.load_predictions(str(tmp_path / "p1.pt")), bootstrap.load_predictions(str(tmp_path / "p2.pt"))
    assert len(p2["sgg"]["preds"]) == len(p1["sgg"]["preds"]) == 8  # every image once, in image order
    for a, b in zip(p1["hoi"]["preds"] + [x["gc"] for x in p1["sgg"]["preds"]],
                    p2["hoi"]["preds"] + [x["gc"] for x in p2["sgg"]["preds"]]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-4)
    assert "verb_scores" not in p1["hoi"]["preds"][0] and "rel_scores" not in p1["sgg"]["preds"][0]  # compact


def test_compact_and_full_predictions_give_identical_metrics_on_a_checkpoint(tiny_ckpt):
    device = torch.device("cpu")
    model, cfg, data = ev.load_model_and_data(tiny_ckpt, device)
    full = ev.collect(model, cfg, data, device, limit=5, compact=False)
    compact = ev.collect(model, cfg, data, device, limit=5)
    assert "verb_scores" in full["hoi"]["preds"][0] and "verbs" in compact["hoi"]["preds"][0]
    m_full, m_compact = ev.metrics_from_collected(full), ev.metrics_from_collected(compact)
    for m in (m_full, m_compact):
        m["sgg"].pop("time_per_image_s")
    assert m_full == m_compact
    # a fake score spread makes the comparison bite: both forms rank the same candidates
    rng = np.random.default_rng(0)
    for p in full["hoi"]["preds"]:
        p["verb_scores"] = rng.random(p["verb_scores"].shape).astype(np.float32)
        p["boxes"] = data["hoi"]["test"][0][0]["boxes"][rng.integers(0, 2, len(p["boxes"]))].astype(np.float32)
    h = full["hoi"]
    assert ev.hico_map(h["gts"], h["preds"], h["correct_mat"], h["rare"]) == \
        ev.hico_map(h["gts"], ev.hico_candidates(h["preds"], h["correct_mat"]), h["correct_mat"], h["rare"])


# ==================================================================================================== model review
# fixes of issue 8 (items 2-7, 11-14, 16), issue 9 items 2 and 7, issue 10 item 1 (norms), issue 11 item 4 (stride)


def _glove_file(path, names, dim):
    """A GloVe-format file with a random vector for every word of `names`."""
    words = sorted({w for n in names for w in n.replace("_", " ").split()})
    rng = np.random.default_rng(0)
    path.write_text("".join(f"{w} " + " ".join(f"{v:.4f}" for v in rng.random(dim)) + "\n" for w in words))
    return str(path)


# combinations of the Table VIII switches and the FULL row, checked like the ablations
COMBINED_VARIANTS = {
    "-R2ITR-RELQ": dict(use_r2i=False, hoi_queries_from_rel=True),
    "FULL": dict(align_feature="pool", classifier_init="text"),
}


def test_seg_loss_is_computed_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    logits = (torch.randn(2, 12, 16, 16) * 3).to(torch.bfloat16)
    y = (torch.rand(2, 12, 16, 16) > 0.8).float()
    fm = torch.zeros(2, 16, 16, dtype=torch.bool)
    fm[1, 10:] = True
    ref = sg2hoi.loss_bbseg(logits.float(), y, fm)  # float32 of the same bf16 logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sg2hoi.loss_bbseg(logits, y, fm)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6, atol=0)
    # the whole criterion under autocast, on bf16 model outputs
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    images, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
        assert out["seg_logits"].dtype == torch.bfloat16
        losses = crit(out, sgg_targets(), "sgg")
    # the reference is Eq. 2 written out in float32 (BCE(x, y) = softplus(x) - x y; sum over channels, mean over
    # the un-padded cells, mean over the 2 images, times lambda_1), not loss_bbseg itself
    x, y = out["seg_logits"].float(), crit.seg_targets(out, sgg_targets(), "sgg")
    valid = (~out["feat_mask"]).float()  # (B, h, w)
    per_image = ((torch.nn.functional.softplus(x) - x * y).sum(1) * valid).sum((1, 2)) / valid.sum((1, 2))
    ref = cfg.loss_seg * per_image.mean()
    assert losses["seg"].dtype == torch.float32 and torch.allclose(losses["seg"], ref, rtol=1e-5, atol=0)


def test_only_the_text_initialised_class_weights_get_the_text_classifier_learning_rate():
    cfg = toy_cfg(classifier_init="text", lr=3e-4, lr_backbone=2e-4, lr_text_classifier=1e-5)
    model = sg2hoi.build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g: {names[id(p)] for p in ps} for g, ps in train.parameter_groups(model).items()}
    assert groups["text_classifier"] == {f"{b}.classifier.weight" for b in
                                         ("rel_sub", "rel_obj", "rel_pred", "hoi_obj", "hoi_verb")}
    # the randomly initialised parts of a text classifier train with their branch at lr
    for n in ("rel_sub.classifier.proj.weight", "rel_sub.classifier.background", "rel_pred.classifier.logit_scale"):
        assert n in groups["sgg"], n
    for n in ("hoi_obj.classifier.proj.bias", "hoi_obj.classifier.background", "hoi_verb.classifier.bias",
              "hoi_verb.classifier.logit_scale", "hoi_query_embed.weight", "w_t.weight"):
        assert n in groups["hoi"], n
    assert all(n.startswith("backbone.") for n in groups["backbone"])
    assert set().union(*groups.values()) == {n for n, p in model.named_parameters() if p.requires_grad}
    lr_of = {names[id(p)]: g["lr"] for g in train.make_optimizer(model, cfg).param_groups for p in g["params"]}
    assert lr_of["rel_sub.classifier.weight"] == 1e-5 and lr_of["rel_sub.classifier.background"] == 3e-4
    assert lr_of["hoi_verb.classifier.bias"] == 3e-4 and lr_of["backbone.body.0.weight"] == 2e-4


@pytest.mark.parametrize("name", sorted({**ABLATIONS, **COMBINED_VARIANTS}))
def test_a_train_step_moves_no_parameter_the_task_loss_does_not_reach(name, tmp_path):
    """train.py's step under DDP (loss + zero_touch, backward, idle grads -> None, AdamW with weight decay) on an SGG then an
    HOI batch: a parameter that the task's own loss gives no gradient must not move (AdamW's weight decay would move
    it by itself, its momentum on later steps), and no parameter with a nonzero gradient may be idle."""
    kw = dict({**ABLATIONS, **COMBINED_VARIANTS}[name])
    if kw.get("semantic_embedding") == "glove":
        kw["word_vectors"] = _glove_file(tmp_path / "glove.txt", [f"entity {i}" for i in range(9)]
                                         + [f"object {i}" for i in range(9)], 50)
    cfg = toy_cfg(**kw, weight_decay=0.1, enc_layers=1, rel_dec_layers=1, hoi_dec_layers=1, dim_feedforward=64)
    torch.manual_seed(0)
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    opt = train.make_optimizer(model, cfg)
    targets = {"sgg": sgg_targets, "hoi": hoi_targets}
    for task in [t for t in ("sgg", "hoi") if getattr(cfg, t)]:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        outputs = model(*batch(64, 64, pad_second=False), with_hoi=(task == "hoi"))  # as train.py
        losses = crit(outputs, targets[task](), task)
        # what the task's loss alone reaches in this batch
        losses["loss"].backward(retain_graph=True)
        no_grad = {n for n, p in model.named_parameters() if p.grad is None}
        nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        idle = {id(p) for p in train.idle_parameters(model, task, losses)}
        idle_names = {n for n, p in model.named_parameters() if id(p) in idle}
        assert not nonzero & idle_names, (task, sorted(nonzero & idle_names))
        assert no_grad <= idle_names, (task, sorted(no_grad - idle_names))
        # the step exactly as train.py does it
        opt.zero_grad(set_to_none=True)
        (losses["loss"] + train.zero_touch(train.idle_parameters(model, task, losses))).backward()  # as under DDP
        for p in train.idle_parameters(model, task, losses):
            p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_max_norm)
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert not moved & no_grad, (task, sorted(moved & no_grad))
        assert moved, task


def test_idle_parameters_name_the_heads_of_the_other_task_in_every_ablation():
    """Hand-checked ownership for a few ablations (the reachability itself, not a second reachability)."""
    def idle_names(model, task):
        ids = {id(p) for p in train.idle_parameters(model, task)}
        return {n.split(".")[0] for n, p in model.named_parameters() if id(p) in ids}

    full = sg2hoi.build_model(toy_cfg())
    assert idle_names(full, "sgg") == {"w_t", "r2i", "feature_transform", "hoi_query_embed", "query_transform",
                                       "hoi_decoder", "hoi_human", "hoi_obj", "hoi_verb", "hoi_human_box",
                                       "hoi_obj_box"}
    assert idle_names(full, "hoi") == {"rel_sub_box", "rel_obj_box", "rel_sub", "rel_obj", "rel_pred"}
    full_hoi = {n for n, p in full.named_parameters() if id(p) in {id(q) for q in train.idle_parameters(full, "hoi")}}
    assert "rel_sub.hidden.weight" not in full_hoi  # Eq. 7 reads f_s: the hidden layer serves HOIs too
    no_r2i = sg2hoi.build_model(toy_cfg(use_r2i=False))
    ids = {id(p) for p in train.idle_parameters(no_r2i, "hoi")}
    assert {"rel_sub.hidden.weight", "rel_pred.hidden.bias"} <= {n for n, p in no_r2i.named_parameters()
                                                                 if id(p) in ids}
    relq = sg2hoi.build_model(toy_cfg(hoi_queries_from_rel=True))
    assert "rel_decoder" not in idle_names(relq, "hoi") and "hoi_decoder" in idle_names(relq, "sgg")


def test_glove_semantic_map_keeps_its_300_d_width_beside_512_d_clip(tmp_path):
    """HSSG with the rest of the paper model: 300-d GloVe map, text-initialised classifiers, 512-d CLIP teacher."""
    ent, pred = [f"entity {i}" for i in range(6)], [f"relation {i}" for i in range(4)]
    obj, verb = [f"object {i}" for i in range(5)], [f"verb {i}" for i in range(7)]
    glove = _glove_file(tmp_path / "glove.6B.300d.txt", ent + obj, 300)
    cfg = sg2hoi.make_config("full", backbone="tiny", d_model=64, nheads=4, dim_feedforward=64, enc_layers=1,
                             rel_dec_layers=1, r2i_layers=1, feat_trans_layers=1, query_trans_layers=1,
                             hoi_dec_layers=1, num_rel_queries=4, num_hoi_queries=4, seg_hidden=16,
                             semantic_embedding="glove", word_vectors=glove,
                             num_entity_classes=6, entity_names=ent, num_predicates=4, predicate_names=pred,
                             num_hoi_objects=5, hoi_object_names=obj, num_verbs=7, verb_names=verb)
    assert cfg.text_dim == 512 and cfg.classifier_init == "text"
    model = sg2hoi.build_model(cfg)
    assert model.semantic_table.shape == (len(model.seg_names) + 1, 300)
    assert model.rel_sub.classifier.weight.shape == (6, 512) and model.align_proj.out_features == 512
    crit = sg2hoi.build_criterion(model)
    for task, targets in (("sgg", sgg_targets()), ("hoi", hoi_targets())):
        for t in targets:
            t["labels"] = t["labels"].clamp(max=4)
            t["clip"] = torch.nn.functional.normalize(torch.randn(512), dim=0)
        if task == "sgg":
            targets[0]["rels"][:, 2] = targets[0]["rels"][:, 2].clamp(max=3)
        model.zero_grad()
        losses = crit(model(*batch()), targets, task)
        assert "align" in losses and torch.isfinite(losses["loss"])
        losses["loss"].backward()
        assert model.w_s.weight.grad.shape == (32, 300, 1, 1) and torch.isfinite(model.w_s.weight.grad).all()


def _real_metas(hoi):
    """The metas load_vg_json / load_hico / load_vcoco give for the real data (their vocabularies)."""
    v = sg2hoi.load_vocab()
    vg = dict(task="sgg", entity_names=v["vg150_objects"], predicate_names=v["vg150_predicates"])
    objects = [c["name"] for c in v["coco80"]]
    if hoi == "hico":
        return vg, dict(task="hoi", object_names=objects, verb_names=v["hico_verbs"])
    return vg, dict(task="hoi", object_names=objects + ["no object"], verb_names=[x["name"] for x in v["vcoco_verbs"]])


@pytest.mark.parametrize("hoi", ["hico", "vcoco"])
def test_the_clip_recipe_names_cover_every_name_the_model_looks_up(hoi, tmp_path):
    import prepare_clip  # tools/

    names = prepare_clip.class_names_for("vg", hoi)
    assert len(names) == len(set(names))
    path = str(tmp_path / "clip_text.pt")  # what build_clip_embeddings writes, with random vectors
    torch.save({n: torch.randn(512) for n in names}, path)
    vg_meta, hoi_meta = _real_metas(hoi)
    base = sg2hoi.make_config("toy", num_rel_queries=4, num_hoi_queries=4, text_dim=512, text_embeddings=path,
                              classifier_init="text", semantic_embedding="clip")
    model = sg2hoi.build_model(sg2hoi.config_from_meta(base, vg_meta, hoi_meta))
    assert set(model.seg_names) <= set(names)
    assert model.hoi_obj.classifier.weight.shape == (len(hoi_meta["object_names"]), 512)
    if hoi == "vcoco":  # the HICO-DET names alone would miss V-COCO's "no object" and verbs
        assert "no object" in names and "hold_obj" in names
        torch.save({n: torch.randn(512) for n in prepare_clip.class_names_for("vg", "hico")}, path)
        with pytest.raises(KeyError, match="no text embedding"):
            sg2hoi.build_model(sg2hoi.config_from_meta(base, vg_meta, hoi_meta))
    assert prepare_clip.clip_prompt("no object") == "A photo of nothing"
    assert prepare_clip.clip_prompt("dining_table") == "A photo of a dining table"


def test_clip_image_cache_is_keyed_by_file_name_and_low_coverage_is_an_error(tmp_path, monkeypatch):
    import prepare_clip  # tools/

    for split in ("a", "b"):
        for i in range(3):
            _png(tmp_path / split / "images" / f"{split}{i}.jpg", 8, 6)
    records = [dict(file=str(tmp_path / "a" / "images" / f"a{i}.jpg"), image_id=i, boxes=np.zeros((0, 4), np.float32),
                    labels=np.zeros(0, np.int64), rels=np.zeros((0, 3), np.int64)) for i in range(3)]
    # build_clip_image_cache with a stand-in encoder (open_clip is an optional extra)
    monkeypatch.setattr(prepare_clip, "clip_image_teacher", lambda *a, **k: lambda im: torch.full((4,),
                                                                                                   float(im.shape[-1])))
    cache_path = str(tmp_path / "clip_images.pt")
    prepare_clip.build_clip_image_cache([records], cache_path)
    cache = torch.load(cache_path, weights_only=True)
    assert sorted(cache) == ["a0.jpg", "a1.jpg", "a2.jpg"]
    # the same images under another data root find their teacher
    moved = [dict(r, file=r["file"].replace(str(tmp_path), "/elsewhere/data")) for r in records]
    ds = sg2hoi.DetectionDataset(records, dict(task="sgg"), sg2hoi.make_transforms(False, 8, 8), teacher=cache)
    assert torch.equal(ds[1][1]["clip"], cache["a1.jpg"])
    assert sg2hoi.teacher_coverage(moved, cache, "VG train") == 1.0
    # two files with one name cannot share the cache
    twin = dict(records[0], file=str(tmp_path / "b" / "images" / "a0.jpg"))
    _png(twin["file"], 8, 6)
    with pytest.raises(ValueError, match="same file name"):
        prepare_clip.build_clip_image_cache([records, [twin]], cache_path)
    # coverage: 99 of 100 is enough, 98 of 100 is an error with the counts
    many = [dict(file=f"/x/{i}.jpg") for i in range(100)]
    assert sg2hoi.teacher_coverage(many, {f"{i}.jpg": 0 for i in range(99)}, "HICO-DET train") == 0.99
    with pytest.raises(ValueError, match=r"only 98 of 100 images of HICO-DET train"):
        sg2hoi.teacher_coverage(many, {f"{i}.jpg": 0 for i in range(98)}, "HICO-DET train")


class _NotAllowed:
    pass


def test_a_detr_training_checkpoint_with_argparse_args_loads_safely(tmp_path, capsys):
    import argparse

    model = sg2hoi.build_model(toy_cfg())
    sd = {"transformer.decoder.norm.weight": torch.randn(64), "transformer.decoder.norm.bias": torch.randn(64),
          "query_embed.weight": torch.randn(100, 64), "class_embed.weight": torch.randn(92, 64),
          "class_embed.bias": torch.randn(92)}
    path = str(tmp_path / "checkpoint.pth")  # as DETR's main.py writes it
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "lr_scheduler": {"step_size": 200}, "epoch": 299,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet50", dataset_file="coco")}, path)
    loaded, skipped = sg2hoi.load_detr_weights(model, path)
    assert {"rel_decoder.norm.weight", "hoi_decoder.norm.bias", "rel_query_embed.weight"} <= set(loaded)
    assert torch.equal(model.rel_query_embed.weight, sd["query_embed.weight"][:8])
    assert any(s.startswith("class_embed.weight") and "hidden layer" in s for s in skipped)
    assert "class_embed (COCO-91 classifier) not used" in capsys.readouterr().out
    # anything else than argparse.Namespace is refused with a message that says what to do
    torch.save({"model": sd, "args": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="cannot be read safely.*re-save its weights"):
        sg2hoi.load_detr_weights(model, path)


def test_bbseg_targets_use_the_backbone_stride_on_an_odd_canvas():
    """A 1,199 px high padded batch (ResNet: 38 rows of stride 32, not 1199 / 38 = 31.55): cell i is centred at
    (i + 0.5) * 32, and a cell is padding when its whole 32-pixel block is."""
    model = sg2hoi.build_model(toy_cfg(backbone="resnet50"))
    crit = sg2hoi.build_criterion(model)
    assert crit.stride == model.backbone.stride == 32
    fm = torch.zeros(1, 38, 20, dtype=torch.bool)
    t = [dict(boxes=torch.tensor([[0., 1150, 600, 1199]]), labels=torch.tensor([2]), size=torch.tensor([1199, 640]))]
    y = crit.seg_targets({"feat_mask": fm}, t, "sgg")
    rows = y[0, 1 + int(model.entity_to_seg[2])].any(1).nonzero().flatten().tolist()
    assert rows == [36]  # centres 1136, 1168, 1200: only 1168 lies in [1150, 1199] (31.55 would add row 37)
    # mask: an image 1,010 px high in the 1,199 px canvas has ceil(1010 / 32) = 32 valid rows (DETR's nearest
    # interpolation would give 33)
    mask = torch.zeros(1, 1199, 640, dtype=torch.bool)
    mask[0, 1010:] = True
    fmask = sg2hoi.downsample_mask(mask, (38, 20), 32)
    assert (~fmask[0]).all(1).nonzero().flatten().tolist() == list(range(32)) and fmask[0, 32:].all()
    # the toy model on an odd canvas: stride 8, ceil(203 / 8) = 26 rows; the second image (150 px) has 19
    toy = sg2hoi.build_model(toy_cfg())
    x, m = torch.randn(2, 3, 203, 64), torch.zeros(2, 203, 64, dtype=torch.bool)
    m[1, 150:] = True
    out = toy(x, m)
    assert out["feat_mask"].shape == (2, 26, 8) and (~out["feat_mask"][1]).all(1).sum() == 19
    tt = [dict(boxes=torch.tensor([[0., 196, 64, 203]]), labels=torch.tensor([1]), rels=torch.zeros(0, 3).long(),
               size=torch.tensor([203, 64]))] * 2
    y = sg2hoi.build_criterion(toy).seg_targets(out, tt, "sgg")
    assert y[0, 1 + int(toy.entity_to_seg[1])].any(1).nonzero().flatten().tolist() == [24]  # centre 196, not 25 (204)


@pytest.mark.parametrize("field,value", [
    ("lr_backbone", -1.0), ("lr_text_classifier", float("nan")), ("lr", float("inf")), ("loss_seg", -0.5),
    ("cost_rel", -1.0), ("weight_decay", -1e-4), ("batch_size", 0), ("num_rel_queries", 0), ("num_hoi_queries", -1),
    ("enc_layers", 0), ("hoi_dec_layers", 0), ("image_size", 0), ("max_size", 0), ("d_model", 0), ("nheads", 0),
    ("sgg_epochs", -1), ("joint_epochs", 1.5), ("lr_drop", 0.0), ("lr_drop", 1.5), ("dropout", 1.0),
    ("use_r2i", "yes"), ("backbone", "vgg16"), ("aux_loss", 1), ("align_loss", "l3"), ("seg_norm", "layer")])
def test_every_config_value_is_validated_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        sg2hoi.make_config("toy", **{field: value})
    sg2hoi.make_config("toy", lr_drop=1.0, sgg_epochs=0, loss_seg=0.0, dropout=0.0)  # the edges are allowed


def test_the_toy_backbone_computes_the_same_function_for_any_batch_split():
    torch.manual_seed(0)
    net = sg2hoi.TinyBackbone().train()
    x = torch.randn(4, 3, 32, 32)
    whole = net(x)
    halves = torch.cat([net(x[:2]), net(x[2:])])
    assert torch.allclose(whole, halves, atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_non_finite_matching_costs_raise_a_named_floating_point_error():
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    crit = sg2hoi.build_criterion(model)
    out = model(*batch())
    out["rel"]["sub_logits"] = out["rel"]["sub_logits"].detach().clone()
    out["rel"]["sub_logits"][0, 1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite matching cost: model outputs contain NaN/Inf "
                                                 r"\(relation matching"):
        crit(out, sgg_targets(), "sgg")
    out["hoi"]["obj_boxes"] = out["hoi"]["obj_boxes"].detach().clone()
    out["hoi"]["obj_boxes"][-1, 0, 2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"HOI matching"):
        crit(out, hoi_targets(), "hoi")


# ==================================================================================================== your own images (issue 12)


def _names_cfg(**kw):
    """A toy config with small hand-named vocabularies (relations: person, horse, dog; HOIs: person, horse)."""
    return sg2hoi.make_config("toy", num_entity_classes=3, entity_names=["person", "horse", "dog"], num_predicates=2,
                              predicate_names=["riding", "near"], num_hoi_objects=2,
                              hoi_object_names=["person", "horse"], num_verbs=2, verb_names=["ride", "feed"], **kw)


def _one_hot_logits(rows, width, big=12.0):
    """(1, 1, Q, width): one layer, one image; row q is `big` at rows[q] (None = all zeros, an unsure query)."""
    x = torch.zeros(1, 1, len(rows), width)
    for q, c in enumerate(rows):
        if c is not None:
            x[0, 0, q, c] = big
    return x


def _hand_made_output():
    """Two relation queries and two HOI queries with known normalised (cx, cy, w, h) boxes: query 0 sure
    ("person riding horse", "person ride horse"), query 1 unsure (uniform logits, score far below 0.1)."""
    boxes_s = torch.tensor([[[[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.1, 0.1]]]])  # (L=1, B=1, Q=2, 4)
    boxes_o = torch.tensor([[[[0.95, 0.5, 0.2, 0.2], [0.6, 0.6, 0.1, 0.1]]]])  # query 0: x2 = 1.05 W, clipped
    rel = dict(sub_logits=_one_hot_logits([0, None], 4), obj_logits=_one_hot_logits([1, None], 4),
               pred_logits=_one_hot_logits([0, None], 3), sub_boxes=boxes_s, obj_boxes=boxes_o)
    verbs = torch.full((1, 1, 2, 2), -12.0)
    verbs[0, 0, 0, 0] = 12.0  # query 0 "ride"
    hoi = dict(human_logits=_one_hot_logits([0, None], 2), obj_logits=_one_hot_logits([1, None], 3),
               verb_logits=verbs, human_boxes=boxes_s, obj_boxes=boxes_o)
    return {"rel": rel, "hoi": hoi}


def test_image_predictions_boxes_in_original_pixels_after_the_resize():
    # a 300 x 500 image goes through the toy preset's test resize (shorter side 128 -> 128 x 213); the model
    # normalises its boxes by that resized image, so the JSON boxes must come back in the 300 x 500 pixels
    cfg, seen = _names_cfg(), {}

    def fake_model(images, mask):
        seen["shape"], seen["padded"] = tuple(images.shape), bool(mask.any())
        return _hand_made_output()

    image = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8)
    out, resized = ev._forward_one(fake_model, cfg, image, torch.device("cpu"))
    result = ev.image_predictions(out, cfg, (300, 500), top=10, threshold=0.1)
    assert resized == (128, 213) and seen == {"shape": (1, 3, 128, 213), "padded": False}
    assert len(result["relations"]) == 1 and len(result["hois"]) == 1  # query 1 scores < 0.1: dropped
    r = result["relations"][0]
    assert (r["subject"]["name"], r["predicate"]["name"], r["object"]["name"]) == ("person", "riding", "horse")
    assert (r["subject"]["label"], r["predicate"]["index"], r["object"]["label"]) == (0, 0, 1)
    # cx, cy, w, h = .5, .5, .2, .4 of 500 x 300 -> x 200..300, y 90..210
    np.testing.assert_allclose(r["subject"]["box"], [200, 90, 300, 210], atol=0.01)
    # cx = .95, w = .2 -> x 425..525, clipped to the image's width 500; cy = .5, h = .2 -> y 120..180
    np.testing.assert_allclose(r["object"]["box"], [425, 120, 500, 180], atol=0.01)
    assert r["score"] == pytest.approx(1.0, abs=1e-3)
    h = result["hois"][0]
    assert (h["human"]["name"], h["verb"]["name"], h["object"]["name"]) == ("person", "ride", "horse")
    np.testing.assert_allclose(h["human"]["box"], [200, 90, 300, 210], atol=0.01)
    np.testing.assert_allclose(h["object"]["box"], [425, 120, 500, 180], atol=0.01)
    # the threshold and --top
    everything = ev.image_predictions(_hand_made_output(), cfg, (300, 500), top=10, threshold=0.0)
    assert len(everything["relations"]) == 2 and len(everything["hois"]) == 4  # 2 queries x 2 verbs
    assert len(ev.image_predictions(_hand_made_output(), cfg, (300, 500), top=1, threshold=0.0)["hois"]) == 1
    # a checkpoint trained for one task gives only that task's predictions
    only_hoi = ev.image_predictions(_hand_made_output(), _names_cfg(tasks="hoi"), (300, 500))
    assert only_hoi["relations"] == [] and len(only_hoi["hois"]) == 1


def _ent(name, box, score, label=0):
    return {"box": box, "label": label, "name": name, "score": score}


def _hand_made_result():
    """Three relations and one HOI. Person boxes A [10,10,50,100] and A' [12,10,50,98] (IoU 0.93) and the HOI's
    human [11,10,50,100] (IoU 0.975 with A) are one person; B [200,10,240,100] is another; C [30,10,70,100] has
    IoU 0.33 with A: a third. The two horse boxes (IoU 0.95) and the HOI's horse are one horse; the dog shares
    the horse's box but not its class, so it stays apart."""
    A, A2, B, C = [10, 10, 50, 100], [12, 10, 50, 98], [200, 10, 240, 100], [30, 10, 70, 100]
    horse, horse2 = [0, 50, 120, 120], [2, 52, 118, 120]
    rel = lambda s, p, o, score: {"subject": s, "predicate": {"index": 0, "name": p}, "object": o, "score": score}
    relations = [rel(_ent("person", A, 0.9), "riding", _ent("horse", horse, 0.8, 1), 0.7),
                 rel(_ent("person", A2, 0.7), "on", _ent("horse", horse2, 0.85, 1), 0.5),
                 rel(_ent("person", B, 0.6), "near", _ent("dog", horse, 0.8, 2), 0.4),
                 rel(_ent("person", C, 0.5), "near", _ent("horse", horse, 0.8, 1), 0.3)]
    hois = [{"human": _ent("person", [11, 10, 50, 100], 0.95), "verb": {"index": 0, "name": "ride"},
             "object": _ent("horse", [1, 50, 120, 121], 0.9, 1), "score": 0.8}]
    return {"relations": relations, "hois": hois}


def test_merge_entities_one_node_per_object_on_a_hand_made_prediction():
    graph = ev.merge_entities(_hand_made_result(), iou_threshold=0.7)
    names = {e["id"]: e["display_name"] for e in graph["entities"]}
    # persons numbered by score: A's cluster (best = the HOI human, 0.95), B (0.6), C (0.5)
    assert sorted(names.values()) == ["dog", "horse", "person 1", "person 2", "person 3"]
    by_name = {e["display_name"]: e for e in graph["entities"]}
    assert by_name["person 1"]["box"] == [11, 10, 50, 100] and by_name["person 1"]["score"] == 0.95
    assert sorted(map(tuple, by_name["person 1"]["members"])) == [
        ("hois", 0, "human"), ("relations", 0, "subject"), ("relations", 1, "subject")]
    assert by_name["person 2"]["box"] == [200, 10, 240, 100] and by_name["person 3"]["box"] == [30, 10, 70, 100]
    assert by_name["horse"]["box"] == [1, 50, 120, 121] and len(by_name["horse"]["members"]) == 4
    edges = {(names[d["source"]], d["label"], names[d["target"]], d["kind"]) for d in graph["edges"]}
    assert edges == {("person 1", "riding", "horse", "relation"), ("person 1", "on", "horse", "relation"),
                     ("person 2", "near", "dog", "relation"), ("person 3", "near", "horse", "relation"),
                     ("person 1", "ride", "horse", "hoi")}
    # brute force: every member has its entity's class name and IoU > 0.7 with its entity's box
    result = _hand_made_result()
    for e in graph["entities"]:
        for key, i, role in e["members"]:
            member = result[key][i][role]
            assert member["name"] == e["name"]
            assert box_iou(torch.tensor([member["box"]], dtype=torch.float), torch.tensor([e["box"]], dtype=torch.float)) > 0.7
    # a stricter threshold splits the horse boxes: IoU(horse, horse2) = 0.95, IoU(horse, HOI horse) = 0.99
    assert sum(e["name"] == "horse" for e in ev.merge_entities(_hand_made_result(), 0.96)["entities"]) == 2


def test_scene_graph_dot_parses_as_the_graph():
    import re

    result = _hand_made_result()
    result["relations"][2]["predicate"]["name"] = 'says "hi" to'  # a quote inside a name must be escaped
    graph = ev.merge_entities(result)
    dot = ev.scene_graph_dot(graph, (200, 300), title="hand made")
    assert dot.startswith("digraph scene_graph {") and dot.rstrip().endswith("}")
    string = r'"((?:[^"\\]|\\.)*)"'
    nodes = dict(re.findall(r"^\s*(n\d+) \[label=" + string, dot, re.M))
    edges = {(s, t, re.sub(r"\\(.)", r"\1", label), style)
             for s, t, label, style in re.findall(r"^\s*(n\d+) -> (n\d+) \[label=" + string + r", style=(\w+)", dot, re.M)}
    assert nodes == {e["id"]: e["display_name"] for e in graph["entities"]}
    assert edges == {(d["source"], d["target"], d["label"], "solid" if d["kind"] == "relation" else "dashed")
                     for d in graph["edges"]}
    assert any(label == 'says "hi" to' for _, _, label, _ in edges)
    # node positions are the boxes' centres with y up (Graphviz points): person 2 = [200, 10, 240, 100] in H = 200
    person2 = next(e["id"] for e in graph["entities"] if e["display_name"] == "person 2")
    assert re.search(rf'^\s*{person2} \[.*pos="220\.0,145\.0!"', dot, re.M)


def test_graph_and_prediction_pictures_draw_nodes_edges_and_boxes():
    # a flat grey 128 x 128 image, upscaled x5 to 640 for drawing; person at the left, horse at the right
    image = torch.full((3, 128, 128), 100, dtype=torch.uint8)
    result = {"relations": [{"subject": _ent("person", [0, 40, 30, 90], 0.9), "predicate": {"index": 0, "name": "riding"},
                             "object": _ent("horse", [80, 40, 128, 90], 0.8, 1), "score": 0.72}], "hois": []}
    graph = ev.merge_entities(result)
    colours = ev._palette(2)
    pic = np.asarray(ev.draw_scene_graph(image, graph)).astype(int)  # (640, 640, 3), nodes on a circle
    assert pic.shape == (640, 640, 3)
    assert (pic[635, 320] == 255).all()  # white where nothing is drawn
    # two nodes: person at the top (320, 48), horse at the bottom (320, 592) (radius 320 - 3 x 16 px font)
    assert np.abs(pic[48, 320] - colours[0]).max() <= 1 and np.abs(pic[592, 320] - colours[1]).max() <= 1
    assert (np.abs(pic[100:200, 320] - (30, 30, 30)).max(-1) <= 1).all()  # the arrow between them, dark
    assert (np.abs(pic[560:578, 310:331] - (30, 30, 30)).max(-1) <= 1).sum() >= 15  # its arrowhead at the horse
    assert (np.abs(pic[250:290, 300:340] - (30, 30, 30)).max(-1) <= 60).sum() > 0  # the label "riding 0.72"
    pred = np.asarray(ev.draw_image_predictions(image, result, graph)).astype(int)
    assert pred.shape[0] > 640 and pred.shape[1] == 640  # the image, then the legend under it
    assert np.abs(pred[325, 0] - colours[0]).max() <= 1 and np.abs(pred[325, 639] - colours[1]).max() <= 1  # box edges
    assert np.abs(pred[600, 320] - 100).max() <= 1  # inside no box: the image itself
    legend = pred[640:]
    assert (legend != 255).any(axis=-1).sum() > 200  # the legend has text
    assert (np.abs(legend - ev._darker(colours[0])).max(-1) <= 1).any()  # "person" written in its box's colour


def test_image_inputs_folders_globs_and_bad_files(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    torchvision.io.write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(folder / "b.png"))
    torchvision.io.write_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8), str(folder / "a.JPG"))
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    found = ev.expand_image_args([str(folder), str(folder / "*.png"), str(tmp_path / "*.gif"), str(tmp_path / "empty"),
                                  str(folder / "notes.txt")])
    assert [(os.path.basename(p), e is None) for p, e in found] == [
        ("a.JPG", True), ("b.png", True), ("b.png", True), ("*.gif", False), ("empty", False), ("notes.txt", True)]
    assert "no file matches" in found[3][1] and "holds no image" in found[4][1]
    assert ev.read_image(str(folder / "a.JPG")).shape == (3, 8, 8)
    with pytest.raises(ev.InputError, match="notes.txt: not an image"):
        ev.read_image(str(folder / "notes.txt"))
    with pytest.raises(ev.InputError, match="missing.png: no such image file"):
        ev.read_image(str(folder / "missing.png"))


def test_image_command_bad_checkpoints_name_the_file(tmp_path, capsys):
    image = str(tmp_path / "x.png")
    torchvision.io.write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), image)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    import dataclasses
    nameless, weightless = str(tmp_path / "nameless.pt"), str(tmp_path / "weightless.pt")
    torch.save({"config": dataclasses.asdict(sg2hoi.make_config("toy")), "model": {}}, nameless)
    torch.save({"config": dataclasses.asdict(_names_cfg()), "model": {}}, weightless)
    out = str(tmp_path / "out")
    for ckpt, message in [(str(tmp_path / "missing.pt"), "missing.pt: checkpoint not found"),
                          (str(garbage), "garbage.pt: cannot read the checkpoint"),
                          (nameless, "nameless.pt: the checkpoint's config lacks the class names entity_names"),
                          (weightless, "weightless.pt: the weights do not fit the checkpoint's config")]:
        assert ev.run_on_images(ckpt, [image], out) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing written


def test_image_cli_writes_pictures_graph_and_json_and_goes_on_after_a_bad_image(tiny_toy, tiny_ckpt, tmp_path):
    import re

    with open(os.path.join(tiny_toy, "vg", "test.json")) as f:
        files = [os.path.join(tiny_toy, "vg", "images", im["file_name"]) for im in json.load(f)["images"][:2]]
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a jpeg")
    out = str(tmp_path / "out")
    r = _run(["eval.py", "--ckpt", tiny_ckpt, "--image", files[0], str(bad), files[1],
              str(tmp_path / "missing.png"), "--out_dir", out, "--top", "3", "--threshold", "0"])
    assert r.returncode == 1, r.stderr[-3000:]  # two bad inputs: reported, the others done, non-zero exit
    assert "bad.jpg: not an image" in r.stderr and "missing.png: no such image file" in r.stderr
    assert "2 image(s) done, 2 failed" in r.stdout
    for path in files:
        stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
        with open(stem + ".json") as f:
            record = json.load(f)
        H, W = torchvision.io.decode_image(path).shape[-2:]
        assert (record["height"], record["width"], record["image"]) == (H, W, path)
        assert record["settings"]["top"] == 3 and record["settings"]["threshold"] == 0.0
        assert record["settings"]["tasks"] == "both" and record["checkpoint"].endswith("ckpt.pt")
        assert len(record["relations"]) == 3 and len(record["hois"]) == 3  # threshold 0: exactly --top of each
        for t in record["relations"]:
            for role in ("subject", "object"):
                x1, y1, x2, y2 = t[role]["box"]
                assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H
        assert record["entities"] and record["edges"]
        with open(stem + "_graph.dot") as f:
            dot = f.read()
        assert set(re.findall(r"^\s*(n\d+) \[label=", dot, re.M)) == {e["id"] for e in record["entities"]}
        assert len(re.findall(r"^\s*n\d+ -> n\d+ ", dot, re.M)) == len(record["edges"])
        for suffix in ("_pred.png", "_graph.png"):
            picture = torchvision.io.decode_image(stem + suffix)
            assert picture.shape[0] == 3 and picture.shape[-1] == ev.MIN_DRAW_SIDE  # toy images are drawn x5


def test_hoi_without_object_becomes_an_action_of_its_human():
    # V-COCO's agent-only actions ("stand") have no object box: the human node carries them, no edge is added
    result = {"relations": [], "hois": [
        {"human": _ent("person", [10, 10, 50, 100], 0.9), "verb": {"index": 0, "name": "stand"}, "object": None,
         "score": 0.6},
        {"human": _ent("person", [11, 10, 50, 100], 0.8), "verb": {"index": 1, "name": "hold"},
         "object": _ent("cup", [40, 40, 50, 50], 0.7, 41), "score": 0.5}]}
    graph = ev.merge_entities(result)
    person = next(e for e in graph["entities"] if e["name"] == "person")
    assert person["actions"] == ["stand"] and len(graph["entities"]) == 2
    assert [(d["label"], d["kind"]) for d in graph["edges"]] == [("hold", "hoi")]
    assert 'label="person\\n(stand)"' in ev.scene_graph_dot(graph, (120, 120))


# ---------------------------------------------------------------- the paths that only run on GPUs (issue 26)


def test_two_processes_evaluate_a_test_split_of_one_image(tiny_ckpt, tmp_path):
    """Rank 1's shard of a one-image test split is empty: it predicts nothing and still joins the gather."""
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py", "--ckpt", tiny_ckpt,
              "--limit", "1", "--save-predictions", str(tmp_path / "p.pt"), "--json", str(tmp_path / "m.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    p = bootstrap.load_predictions(str(tmp_path / "p.pt"))
    assert len(p["sgg"]["preds"]) == len(p["hoi"]["preds"]) == 1
    assert ev.predict(None, toy_cfg(), [], torch.device("cpu")) == []  # no model call, no records[0]


def test_box_branches_compute_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = sg2hoi.build_model(toy_cfg()).eval()
    x, mask = batch()
    with torch.no_grad():
        reference = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, mask)
    assert out["rel"]["pred_logits"].dtype == torch.bfloat16  # autocast is on for the rest of the model
    for head, key in (("rel", "sub_boxes"), ("rel", "obj_boxes"), ("hoi", "human_boxes"), ("hoi", "obj_boxes")):
        assert out[head][key].dtype == torch.float32, key
        assert reference[head][key].dtype == torch.float32
    # the box head itself in float32: fed the same (bf16-rounded) features, autocast changes nothing
    f = torch.randn(5, 64).bfloat16().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model.rel_sub_box(f)
    assert torch.equal(inside, model.rel_sub_box(f))


def test_deterministic_sets_the_cublas_workspace_and_every_cross_entropy_is_two_dimensional(monkeypatch):
    calls = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: calls.append(mode))
    train.make_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and calls == [True]
    # nll_loss2d (a 3-D cross-entropy input) has no deterministic CUDA kernel: the criterion never asks for it
    dims, cross_entropy = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda x, *a, **k: dims.append(x.dim()) or
                        cross_entropy(x, *a, **k))
    cfg = toy_cfg()
    model = sg2hoi.build_model(cfg)
    criterion = sg2hoi.build_criterion(model)
    for task, targets in (("sgg", sgg_targets()), ("hoi", hoi_targets())):
        criterion(model(*batch()), targets, task)
    assert dims and set(dims) == {2}


def test_batch_norm_is_synchronised_across_gpus_and_left_per_process_on_cpu(monkeypatch, capsys):
    model = sg2hoi.build_model(toy_cfg(seg_norm="batch"))
    names, params = list(model.state_dict()), list(model.parameters())
    assert train.synchronise_batch_norm(model, torch.device("cuda")) is model  # one process: nothing to do
    monkeypatch.setattr(train, "world_size", lambda: 2)
    monkeypatch.setattr(train, "is_master", lambda: True)
    same = train.synchronise_batch_norm(model, torch.device("cpu"))
    assert "SyncBatchNorm needs CUDA" in capsys.readouterr().out
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in same.modules())
    synced = train.synchronise_batch_norm(model, torch.device("cuda"))  # conversion only; no CUDA call
    norms = [m for m in synced.bbseg.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 5 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert list(synced.state_dict()) == names and all(a is b for a, b in zip(synced.parameters(), params))
    group_norm = sg2hoi.build_model(toy_cfg())  # the toy preset's GroupNorm needs nothing
    assert train.synchronise_batch_norm(group_norm, torch.device("cuda")) is group_norm
    assert "SyncBatchNorm" not in capsys.readouterr().out


def test_gradient_accumulation_skips_the_all_reduce_also_under_torch_compile(tmp_path):
    import contextlib
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(3, 2))
        for wrapped in (ddp, torch.compile(ddp)):  # compiling is lazy: nothing is compiled here
            with train.gradient_sync(wrapped, last=False):
                assert ddp.require_backward_grad_sync is False  # DDP's no_sync is in force
            assert ddp.require_backward_grad_sync is True
            assert isinstance(train.gradient_sync(wrapped, last=True), contextlib.nullcontext)
    finally:
        dist.destroy_process_group()
    assert isinstance(train.gradient_sync(torch.nn.Linear(3, 2), last=False), contextlib.nullcontext)


def test_rng_states_hold_the_process_own_gpu_and_restore_on_a_node_with_fewer_gpus(monkeypatch):
    torch.manual_seed(123)
    cpu_state = torch.get_rng_state()
    expected = torch.rand(3)
    saved_by_8_gpu_node = torch.full((16,), 7, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_by_8_gpu_node.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [saved_by_8_gpu_node] * 8)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    def one_gpu_node(states):
        if len(states) > 1:
            raise RuntimeError("invalid device ordinal")  # what torch says for a device this node lacks
        restored.extend(states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu_node)
    states = train.rng_states()  # the states of a one-process run: its CPU and its own GPU
    assert len(states) == 1 and torch.equal(states[0]["cuda"], saved_by_8_gpu_node)
    torch.rand(5)
    train.restore_rng_states([{"torch": cpu_state, "cuda": saved_by_8_gpu_node}])
    assert torch.equal(torch.rand(3), expected)  # the CPU stream continues where it was saved
    assert len(restored) == 1 and torch.equal(restored[0], saved_by_8_gpu_node)


def test_eval_process_group_gets_the_collective_timeout(monkeypatch):
    import datetime
    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    assert ev.init_distributed(90.0) == torch.device("cpu")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    assert ev.parse_args(["--ckpt", "c.pt"]).dist_timeout == 60.0
    with pytest.raises(SystemExit):
        ev.parse_args(["--ckpt", "c.pt", "--dist_timeout", "0"])


def test_text_tables_and_the_clip_cache_load_onto_the_cpu(monkeypatch, tmp_path):
    table = {"cat": torch.ones(4), "dog": -torch.ones(4)}
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: seen.append(kw.get("map_location")) or load(path, **kw))
    torch.save(table, tmp_path / "text.pt")
    emb = sg2hoi.class_text_embeddings(["dog", "cat"], 4, str(tmp_path / "text.pt"))
    assert torch.allclose(emb, torch.stack([-torch.ones(4), torch.ones(4)]) / 2)  # unit rows, in the names' order
    torch.save({"1.jpg": torch.ones(4)}, tmp_path / "clip.pt")
    args = SimpleNamespace(clip_cache=str(tmp_path / "clip.pt"), text_teacher="auto", vg="data/vg", hoi="")
    data = {"sgg": {"train": ([{"file": "/data/vg/images/1.jpg"}], {})}}
    teachers = train.eq5_teachers(args, toy_cfg(text_dim=4), data)
    assert torch.equal(teachers["sgg"]["1.jpg"], torch.ones(4))
    assert seen == ["cpu", "cpu"]


def test_real_data_without_a_clip_image_cache_is_refused_unless_a_teacher_is_chosen():
    cfg = toy_cfg(entity_names=[f"e{i}" for i in range(9)])
    data = {"sgg": {"train": ([], {})}}
    real = dict(clip_cache="", vg="data/vg", hoi="")
    with pytest.raises(SystemExit, match=r"--clip_cache.*tools/prepare_clip.py images.*--text_teacher objects"):
        train.eq5_teachers(SimpleNamespace(text_teacher="auto", **real), cfg, data)
    chosen = train.eq5_teachers(SimpleNamespace(text_teacher="objects", **real), cfg, data)
    assert torch.equal(chosen["sgg"], sg2hoi.class_text_embeddings(cfg.entity_names, cfg.text_dim))
    assert train.eq5_teachers(SimpleNamespace(text_teacher="none", **real), cfg, data) == {"sgg": None}
    toy = train.eq5_teachers(SimpleNamespace(text_teacher="auto", clip_cache="", vg="", hoi=""), cfg, data)
    assert torch.equal(toy["sgg"], chosen["sgg"])  # the toy scenes keep their stand-in teacher
    off = train.eq5_teachers(SimpleNamespace(text_teacher="auto", **real), toy_cfg(use_vl_distill=False), data)
    assert off == {"sgg": None}  # -VLpool needs no teacher


@pytest.mark.parametrize("variant", ["rand", "clip", "cls", "pool"])
def test_each_variant_preset_builds_the_model_its_name_promises(variant):
    """Sec. IV-E: +rand random classifiers; +clip, +cls, +pool CLIP-initialised ones; +cls aligns [CLS], +pool the
    pooled encoder output (Eq. 5); +rand and +clip align nothing (the reading stated beside sg2hoi.VARIANTS)."""
    sizes = {k: v for k, v in sg2hoi.PRESETS["toy"].items() if k not in sg2hoi.PRESETS[variant]}
    sizes.update(num_entity_classes=9, num_predicates=10, num_hoi_objects=9, num_verbs=7, num_rel_queries=8,
                 num_hoi_queries=8)
    cfg = sg2hoi.make_config(variant, **sizes)
    model = sg2hoi.build_model(cfg).eval()
    text = variant != "rand"
    for branch in (model.rel_sub, model.rel_obj, model.rel_pred, model.hoi_obj, model.hoi_verb):
        assert isinstance(branch.classifier, sg2hoi.TextClassifier) == text
    if text:  # the class rows start as the classes' (normalised) text embeddings
        names = [f"class {i}" for i in range(9)]  # make_classifier's names without a vocabulary
        assert torch.allclose(model.rel_sub.classifier.weight, sg2hoi.class_text_embeddings(names, cfg.text_dim))
    assert hasattr(model, "align_proj") == (variant in ("cls", "pool"))
    encoded = []
    model.encoder.register_forward_hook(lambda m, i, o: encoded.append(o))
    x, mask = batch()
    with torch.no_grad():
        out = model(x, mask)
    assert ("align" in out) == (variant in ("cls", "pool"))
    if "align" in out:
        f_en = encoded[0]  # (B, 1 + h*w, d)
        valid = (~out["feat_mask"]).flatten(1).unsqueeze(-1).float()
        f_vl = f_en[:, 0] if variant == "cls" else (f_en[:, 1:] * valid).sum(1) / valid.sum(1)
        assert torch.allclose(out["align"], model.align_proj(f_vl), atol=1e-6)
    assert sg2hoi.PRESETS["paper"] == sg2hoi.PRESETS["cls"] and sg2hoi.PRESETS["full"] == sg2hoi.PRESETS["pool"]


def test_an_animated_gif_gives_its_first_frame_and_the_images_after_it_still_run(tiny_toy, tiny_ckpt, tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = ev.read_image(str(gif))
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [255, 0, 0]  # the first frame
    with open(os.path.join(tiny_toy, "vg", "test.json")) as f:
        jpg = os.path.join(tiny_toy, "vg", "images", json.load(f)["images"][0]["file_name"])
    out = str(tmp_path / "out")
    status = ev.run_on_images(tiny_ckpt, [str(gif), jpg], out, top=2, threshold=0.0)
    assert status == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == sorted(
        ["anim.json", os.path.splitext(os.path.basename(jpg))[0] + ".json"])


def test_gpu_check_dry_run_writes_every_section_of_its_report(tmp_path):
    """tools/gpu_check.py --dry: the GPU check's steps on the CPU at toy sizes (a stop and a resume in phase 2,
    two --deterministic runs, the step and inference timings) and its one report file."""
    import gpu_check  # tools/

    report = gpu_check.main(["--dry", "--out", str(tmp_path)])
    assert report["main"]["steps"] == 18 and report["main"]["resumed_at_step"] == 9  # 6 SGG + 12 joint steps
    assert "SGDet R@50" in report["main"] and "HICO mAP Full" in report["main"]
    assert report["deterministic"] == {"steps": 2, "identical_losses": True}
    (row,) = report["bench"]["training"]
    assert row["s_per_step"] > 0 and report["bench"]["inference"][0]["ms_per_image"] > 0
    text = (tmp_path / "report.md").read_text()
    for section in ("## 1. Main command", "## 2. --deterministic", "## 3. Training step", "## 4. torch.compile",
                    "## 5. Inference", "## Raw figures"):
        assert section in text


def test_checkpoints_of_earlier_versions_load_when_their_retired_fields_hold_what_this_code_computes(tiny_ckpt,
                                                                                                      tmp_path):
    """Earlier versions saved ema_decay, query_transform_memory, relq_queries and unmatched_loss. With the value this
    code computes they are dropped and the checkpoint loads; another value, a field no version had, or a value this
    code refuses stops eval.py and train.py --resume with the file and the field, never a traceback in setup."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    old = dict(ckpt, config=dict(ckpt["config"], ema_decay=0.0, query_transform_memory="decoded",
                                 relq_queries="decoded", unmatched_loss=True))
    torch.save(old, tmp_path / "old.pt")
    _, cfg, _ = ev.read_checkpoint(str(tmp_path / "old.pt"), torch.device("cpu"))
    assert cfg == sg2hoi.Config(**ckpt["config"])
    assert train.load_checkpoint(str(tmp_path / "old.pt"))["config"]["unmatched_loss"] is True
    for field, value in (("ema_decay", 0.9), ("unmatched_loss", False), ("relq_queries", "learnable"),
                         ("query_transform_memory", "learnable"), ("no_such_field", 1), ("align_loss", "l3")):
        path = str(tmp_path / f"old_{field}.pt")
        torch.save(dict(ckpt, config=dict(ckpt["config"], **{field: value})), path)
        with pytest.raises(ev.InputError, match=f"old_{field}.pt.*{field}"):
            ev.read_checkpoint(path, torch.device("cpu"))
        with pytest.raises(SystemExit, match=f"old_{field}.pt.*{field}"):
            train.load_checkpoint(path)


def test_prepare_clip_images_needs_only_the_datasets_given(tiny_toy, tmp_path, monkeypatch):
    """tools/prepare_clip.py images --vg alone encodes the VG training images (no HOI root needed)."""
    import prepare_clip  # tools/

    monkeypatch.setattr(prepare_clip, "clip_image_teacher", lambda *a, **k: lambda im: torch.ones(4))
    out = str(tmp_path / "clip.pt")
    prepare_clip.main(["images", "--vg", os.path.join(tiny_toy, "vg"), "--out", out])
    records, _ = sg2hoi.load_dataset("vg", os.path.join(tiny_toy, "vg"), "train")
    assert sorted(torch.load(out, weights_only=True)) == sorted(sg2hoi.clip_image_key(r["file"]) for r in records)


# ---------------------------------------------------------------- the README's picture, the course exercises (issue 29)
# README.md draws the model as a Mermaid flowchart whose nodes name the code in backticks; docs/exercises.md names
# `pytest -k` selections. Both must follow the code when it is renamed: these tests fail when they do not.


def _mermaid_block():
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"```mermaid\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 1, f"README.md should hold one ```mermaid block, found {len(blocks)}"
    return blocks[0]


def test_every_code_name_in_the_readme_diagram_exists_in_sg2hoi():
    """Each `name` of the diagram is an attribute of sg2hoi (`Class.method`: getattr step by step), every equation
    Eq. 1-10 has a node, and the ablations of Tables VI-VIII label the edges they cut."""
    import re
    block = _mermaid_block()
    names = sorted(set(re.findall(r"`([^`]*)`", block)))
    assert len(names) >= 20, names  # the picture names the code of every step
    missing = []
    for name in names:
        assert re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name), f"not a code name: `{name}`"
        obj = sg2hoi
        for part in name.split("."):
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert missing == [], f"README.md's diagram names what sg2hoi.py does not have: {missing}"
    assert {int(n) for n in re.findall(r"Eq\. (\d+):", block)} == set(range(1, 11))
    edges = "\n".join(line for line in block.splitlines() if "-->" in line or "-.->" in line)
    for ablation in ("-HSS", "HSSD", "HSSG", "-VLpool", "VLl2", "-FETR", "-QUTR", "-R2ITR", "RELQ"):
        assert ablation in edges, f"no edge of the diagram is marked {ablation}"
    for line in block.splitlines():  # what breaks Mermaid's parser: a quote inside a label, a label opening with `
        assert line.count('"') % 2 == 0 and '"`' not in line, line


def test_readme_runs_the_tests_with_the_command_ci_runs():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read().splitlines()
    with open(os.path.join(HERE, ".ci", "run")) as f:
        ci = f.read().splitlines()
    command = "python3 -m pytest -q test_sg2hoi.py tools/test_tools.py"
    assert command in readme and command in ci


# Run in a fresh process: collect the test file once, then evaluate each -k expression with pytest's own keyword
# matching (the code behind `pytest -k`), and print {expression: number of tests selected}.
_COUNT_SELECTED = r"""
import json, sys
import pytest
from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression

class Count:
    result = {}
    def pytest_collection_finish(self, session):
        for expr in json.loads(sys.argv[2]):
            keep = Expression.compile(expr)
            self.result[expr] = sum(bool(keep.evaluate(KeywordMatcher.from_item(i))) for i in session.items)

count = Count()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]], plugins=[count])
print("SELECTED " + json.dumps(count.result))
sys.exit(int(code))
"""


def test_every_pytest_selection_in_the_exercises_selects_tests():
    """docs/exercises.md gives each exercise a `python3 -m pytest -q test_sg2hoi.py -k "..."` command: each selection
    picks at least one test of that file, and not most of the suite."""
    import re
    with open(os.path.join(HERE, "docs", "exercises.md")) as f:
        commands = re.findall(r"python3? -m pytest -q (\S+) -k \"([^\"]+)\"", f.read())
    assert len(commands) >= 5, commands
    assert {file for file, _ in commands} == {"test_sg2hoi.py"}
    expressions = [expr for _, expr in commands]
    run = subprocess.run([sys.executable, "-c", _COUNT_SELECTED, "test_sg2hoi.py", json.dumps(expressions)],
                         cwd=HERE, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("SELECTED ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    selected = json.loads(lines[-1][len("SELECTED "):])
    assert all(0 < selected[expr] <= 40 for expr in expressions), selected
