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

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import box_iou, generalized_box_iou

import eval as ev
import sg2hoi

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency here); they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
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


def test_matcher_equals_brute_force():
    """The Hungarian matching has the minimum total Eq. 9 cost over all injective assignments."""
    torch.manual_seed(0)
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


def test_hoi_matcher_equals_brute_force_and_ignores_missing_object_box():
    torch.manual_seed(1)
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
    "HOI-only": dict(tasks="hoi"), "paper-literal-unmatched": dict(unmatched_loss=False),
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
    for step in range(240):
        task = "sgg" if step % 2 == 0 else "hoi"
        images, mask, targets = batches[task]
        loss = crit(model(images, mask), targets, task)["loss"]
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
    gc = sg2hoi.relation_triplets(pred, graph_constraint=True)
    # pair (0, 2): 0.9 * 0.8 * 0.6 = 0.432 with predicate 1; pair (1, 3): 0.5 * 1.0 * 0.8 = 0.4 with predicate 2
    assert [(s, p, o) for s, p, o, _ in gc] == [(0, 1, 2), (1, 2, 3)]
    assert [round(x, 4) for *_, x in gc] == [0.432, 0.4]
    ng = sg2hoi.relation_triplets(pred, graph_constraint=False)
    # candidates: 0.432 (0,1,2), 0.216 (0,2,2), 0.1 (1,1,3), 0.4 (1,2,3)
    assert [(s, p, o) for s, p, o, _ in ng] == [(0, 1, 2), (1, 2, 3), (0, 2, 2), (1, 1, 3)]
    assert len(sg2hoi.relation_triplets(pred, graph_constraint=False, top_k=3)) == 3


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
    trips = sg2hoi.hoi_triplets(hoi[0], mask, top_k=100)
    assert len(trips) == 56 and all(v == 2 for *_, v, s in trips if s > 0)  # masked verbs score 0


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
    generated = sg2hoi.write_toy_datasets(str(root), num_train=600, num_test=120, seed=5)
    return str(root), generated


def test_toy_round_trip_through_the_real_loaders_is_exact(toy_root):
    root, generated = toy_root
    for kind, split in [("vg", "train"), ("vg", "test"), ("hico", "train"), ("hico", "test"), ("vcoco", "train")]:
        records, _ = sg2hoi.load_dataset(kind, os.path.join(root, kind), split)
        key = "rels" if kind == "vg" else "hois"
        assert len(records) == len(generated[(kind, split)])
        for r in records:
            boxes, labels, pairs = generated[(kind, split)][r["file"]]
            np.testing.assert_array_equal(r["boxes"], boxes)
            np.testing.assert_array_equal(r["labels"], labels)
            np.testing.assert_array_equal(r[key], pairs)


def test_toy_data_has_long_tail_rare_hois_and_zero_shot_triplets(toy_root):
    root, _ = toy_root
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


def test_horizontal_flip_moves_boxes_and_keeps_indices(tmp_path):
    _png(str(tmp_path / "a.png"), 100, 50)
    rec = dict(file=str(tmp_path / "a.png"), image_id=1, width=100, height=50,
               boxes=np.array([[10, 5, 30, 25], [60, 10, 100, 50]], np.float32), labels=np.array([3, 4]),
               rels=np.array([[0, 1, 2]]))
    flip = torchvision.transforms.v2.RandomHorizontalFlip(1.0)
    ds = sg2hoi.DetectionDataset([rec], {"task": "sgg"}, flip)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[70, 5, 90, 25], [0, 10, 40, 50]]  # x -> 100 - x
    assert t["rels"].tolist() == [[0, 1, 2]] and t["labels"].tolist() == [3, 4]


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


def test_vg_h5_loader_decodes_sgb_boxes(tmp_path):
    h5py = pytest.importorskip("h5py")
    root = str(tmp_path)
    vocab = sg2hoi.load_vocab()
    dicts = {"idx_to_label": {str(i + 1): n for i, n in enumerate(vocab["vg150_objects"])},
             "idx_to_predicate": {str(i + 1): n for i, n in enumerate(vocab["vg150_predicates"])}}
    json.dump(dicts, open(f"{root}/VG-SGG-dicts-with-attri.json", "w"))
    info = [{"image_id": 1, "width": 512, "height": 256}, {"image_id": 1592, "width": 1, "height": 1},
            {"image_id": 2, "width": 100, "height": 100}, {"image_id": 3, "width": 100, "height": 100}]
    json.dump(info, open(f"{root}/image_data.json", "w"))
    with h5py.File(f"{root}/VG-SGG-with-attri.h5", "w") as h5:
        h5["split"] = np.array([2, 2, 2], np.int32)
        h5["img_to_first_box"], h5["img_to_last_box"] = np.array([0, 2, -1], np.int32), np.array([1, 2, -1], np.int32)
        h5["img_to_first_rel"], h5["img_to_last_rel"] = np.array([0, -1, -1], np.int32), np.array([0, -1, -1], np.int32)
        h5["labels"] = np.array([[5], [7], [9]])
        h5["boxes_1024"] = np.array([[100, 50, 40, 21], [300, 200, 100, 100], [10, 10, 4, 4]], np.int32)
        h5["relationships"] = np.array([[0, 1]], np.int32)
        h5["predicates"] = np.array([[31]])
    for i in (1, 2, 3):
        _png(f"{root}/images/{i}.jpg", 8, 8)
    records, meta = sg2hoi.load_vg_h5(root, "test")
    assert len(records) == 1  # image 2 has no relations, image 3 no boxes
    # (100, 50, 40, 21): x1 = 100 - 20 = 80, y1 = int(50 - 10.5) = 39, x2 = 120, y2 = 60; x 512 / 1024
    np.testing.assert_allclose(records[0]["boxes"][0], [40, 19.5, 60, 30])
    assert records[0]["labels"].tolist() == [4, 6] and records[0]["rels"].tolist() == [[0, 1, 30]]


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

TINY = ["--toy_train", "48", "--toy_test", "8", "--batch_size", "8", "--sgg_epochs", "1", "--joint_epochs", "1",
        "--workers", "0", "--log_every", "1", "--num_rel_queries", "8", "--num_hoi_queries", "8"]


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tinytoy"))
    sg2hoi.ensure_toy_datasets(root, num_train=48, num_test=8)
    return root


def _run(args, cwd=HERE, timeout=300, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_schedule_phases_and_alternation_from_the_log(tiny_toy, tmp_path):
    out = str(tmp_path / "run")
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", out, "--no_eval"] + TINY)
    assert r.returncode == 0, r.stderr[-3000:]
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
    ref = str(tmp_path / "ref")
    r = _run(common + ["--out", ref])
    assert r.returncode == 0, r.stderr[-3000:]
    reference = {x["step"]: x["loss"] for x in _log(ref)}
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable] + common + ["--out", killed], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it has passed the checkpoint of step 8
        time.sleep(0.2)
        if os.path.exists(os.path.join(killed, "log.jsonl")) and len(_log(killed)) >= 10:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_log(killed))
    assert 10 <= done < 18, "the run should have been killed mid-way"
    r = _run(["train.py", "--resume", os.path.join(killed, "ckpt.pt"), "--out", killed, "--no_eval",
              "--ckpt_every", "4", "--deterministic", "--log_every", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    resumed = {}
    for x in _log(killed):  # later lines (after the resume) win
        resumed[x["step"]] = x["loss"]
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_non_finite_loss_stops_naming_the_step_and_term_or_is_skipped(tiny_toy, tmp_path):
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", str(tmp_path / "a"), "--no_eval", "--loss_align", "nan"]
             + TINY)
    assert r.returncode != 0
    assert "step 0" in r.stderr and "'align'" in r.stderr and "non-finite" in r.stderr
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", str(tmp_path / "b"), "--no_eval", "--loss_align", "nan",
              "--nonfinite", "skip", "--max_steps", "3"] + TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "non-finite steps skipped: 3" in r.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(tiny_toy, tmp_path):
    out = str(tmp_path / "ddp")
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--toy_root", tiny_toy,
              "--out", out, "--max_steps", "8", "--eval_limit", "4"] + TINY, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 process(es)" in r.stdout and "Table I" in r.stdout
    log = _log(out)  # rank 0 only: one line per step; 48 images / (8 x 2 ranks) = 3 batches per epoch
    assert [x["step"] for x in log] == list(range(1, 9))
    assert [x["phase"] for x in log] == [1, 1, 1, 2, 2, 2, 2, 2]
    assert os.path.exists(os.path.join(out, "metrics.json"))


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


def test_draw_prediction_panels_boxes_segmentation_and_legend():
    image = torch.full((3, 64, 64), 100, dtype=torch.uint8)
    gt = dict(boxes=np.array([[8, 8, 40, 40]], np.float32), labels=np.array([1]))
    seg_map = torch.zeros(8, 8, dtype=torch.long)
    seg_map[:4, :4] = 2  # class 2 of seg_names ("dog") in the top-left quarter, background elsewhere
    triplets = [(np.array([8, 8, 40, 40]), "person", "holding", np.array([30, 30, 60, 60]), "cup", 0.9)]
    pic = ev.draw_prediction(image, gt, seg_map, triplets, ["cup", "person"], ["person", "dog"], max_side=384)
    legend_h = 14 * (len(triplets) + 1 // 6 + 2) + 4
    assert pic.shape == (3, 384 + legend_h, 3 * 384) and pic.dtype == torch.uint8  # 64 px x 6, three panels
    assert pic[:, 8 * 6, 20 * 6].tolist() == [255, 255, 255]  # panel 1: the GT box's top edge, in white
    assert pic[:, 200, 200].tolist() == [100, 100, 100]  # inside the box: the image untouched
    assert pic[:, 10, 384 + 10].tolist() != [100, 100, 100]  # panel 2: the dog's region is painted
    assert pic[:, 300, 384 + 300].tolist() == [100, 100, 100]  # background left as it is
    colour = list(ev._palette(1)[0])
    assert pic[:, 30 * 6, 2 * 384 + 45 * 6].tolist() == colour  # panel 3: the object box's top edge, triplet colour
    assert (pic[:, 384:] != 255).any()  # the legend has text


def test_eval_cli_tables_pictures_and_saved_predictions(tiny_toy, tmp_path):
    out = str(tmp_path / "run")
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", out, "--max_steps", "2", "--no_eval"] + TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt, pics, preds = os.path.join(out, "ckpt.pt"), str(tmp_path / "pics"), str(tmp_path / "preds.pt")
    r = _run(["eval.py", "--ckpt", ckpt, "--visualize", pics, "--num_visualize", "2", "--save-predictions", preds])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Table I" in r.stdout and "Table IV" in r.stdout and "wrote 4 pictures" in r.stdout
    assert sorted(f[:3] for f in os.listdir(pics)) == ["hoi", "hoi", "sgg", "sgg"]
    with open(os.path.join(out, "metrics.json")) as f:
        from_model = json.load(f)
    r = _run(["eval.py", "--predictions", preds, "--json", str(tmp_path / "again.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "again.json") as f:
        again = json.load(f)
    assert again["sgg"]["R@50"] == from_model["sgg"]["R@50"] and again["hico"] == from_model["hico"]


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
    result, resized = ev.predict_image(fake_model, cfg, image, torch.device("cpu"), top=10, threshold=0.1)
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
    pic = np.asarray(ev.draw_scene_graph(image, graph)).astype(int)  # (640, 640, 3)
    assert pic.shape == (640, 640, 3)
    dimmed = round(100 * 0.4 + 255 * 0.6)
    assert np.abs(pic[630, 5] - dimmed).max() <= 1  # untouched background: the dimmed image
    assert np.abs(pic[325, 75] - colours[0]).max() <= 1 and np.abs(pic[325, 520] - colours[1]).max() <= 1  # nodes
    assert (np.abs(pic[325, 190:211] - (30, 30, 30)).max(-1) <= 1).all()  # the arrow between them, dark
    assert (np.abs(pic[300:351, 480:500] - (30, 30, 30)).max(-1) <= 1).sum() >= 15  # its arrowhead near the horse
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


def test_image_cli_writes_pictures_graph_and_json_and_goes_on_after_a_bad_image(tiny_toy, tmp_path):
    import re

    run = str(tmp_path / "run")
    r = _run(["train.py", "--toy_root", tiny_toy, "--out", run, "--max_steps", "2", "--no_eval"] + TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(tiny_toy, "vg", "test.json")) as f:
        files = [os.path.join(tiny_toy, "vg", "images", im["file_name"]) for im in json.load(f)["images"][:2]]
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a jpeg")
    out = str(tmp_path / "out")
    r = _run(["eval.py", "--ckpt", os.path.join(run, "ckpt.pt"), "--image", files[0], str(bad), files[1],
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
