"""Transfer to new tasks with a per-tensor plan, and export to each framework's own format, on real HF
transformers, timm and torchvision models built offline from configs. Tensors are compared exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DetrConfig,
    DetrForObjectDetection,
)

import ckptkit
from ckptkit import CheckpointManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bert(num_labels: int, seed: int = 0, **kw: Any) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=num_labels, **kw)  # fmt: skip
    return BertForSequenceClassification(cfg)


def _equal(a: torch.nn.Module, b: torch.nn.Module, prefix_a: str = "", prefix_b: str | None = None) -> list[str]:
    """Keys under prefix_a in `a` whose tensors differ from `b`'s (under prefix_b, default the same prefix)."""
    prefix_b = prefix_a if prefix_b is None else prefix_b
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix_a)]
    assert keys
    return [k for k in keys if not torch.equal(sa[k], sb[prefix_b + k[len(prefix_a):]])]


def pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence pairs (two 8-token sentences with [SEP]) and a similarity score: the fraction of shared tokens."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(5, 60, (n, 8), generator=g)
    b = torch.where(torch.rand(n, 8, generator=g) < torch.rand(n, 1, generator=g), a, torch.randint(5, 60, (n, 8), generator=g))
    ids = torch.cat([torch.full((n, 1), 1), a, torch.full((n, 1), 2), b, torch.full((n, 1), 2)], dim=1)
    return ids, (a == b).float().mean(dim=1, keepdim=True)


def _rank(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).float()


def metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    p, t = pred.flatten(), y.flatten()
    pearson = torch.corrcoef(torch.stack([p, t]))[0, 1]
    spearman = torch.corrcoef(torch.stack([_rank(p), _rank(t)]))[0, 1]
    return {"rmse": float((p - t).pow(2).mean().sqrt()), "pearson": float(pearson), "spearman": float(spearman)}


def test_hf_classifier_to_regression_on_sentence_pairs(tmp_path: Path) -> None:
    src_url, dst_url = str(tmp_path / "cls"), str(tmp_path / "reg")
    source = bert(num_labels=2)
    opt = torch.optim.AdamW(source.parameters(), lr=1e-3)
    ids, y = pairs(64, 0)
    for _ in range(3):  # a little classification training, so the encoder is not the fresh init
        loss = source(input_ids=ids, labels=(y.squeeze(1) > 0.5).long()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    CheckpointManager(src_url, {"model": source, "optimizer": opt}).save(3)

    target = bert(num_labels=1, seed=1, problem_type="regression")
    fresh_head = target.classifier.weight.clone()
    mgr = CheckpointManager(dst_url, {"model": target})
    plan = mgr.transfer_from(src_url)
    assert plan.keys("reinit_shape") == ["classifier.weight", "classifier.bias"]
    assert not plan.keys("missing") and not plan.unused
    assert _equal(source, target, "bert.") == []  # encoder identical
    assert torch.equal(target.classifier.weight, fresh_head)  # head fresh
    assert any("forgotten" in w for w in plan.warnings)

    test_ids, test_y = pairs(128, 1)
    target.eval()
    with torch.no_grad():
        before = metrics(target(input_ids=test_ids).logits, test_y)
    target.train()
    opt2 = torch.optim.AdamW(target.parameters(), lr=2e-3)
    step = 40
    for _ in range(step):
        batch = torch.randint(0, 64, (16,))
        loss = target(input_ids=ids[batch], labels=y[batch]).loss
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    target.eval()
    with torch.no_grad():
        after = metrics(target(input_ids=test_ids).logits, test_y)
    saved = mgr.save(step, metrics=after)
    assert after["rmse"] < before["rmse"]
    assert all(torch.isfinite(torch.tensor(v)) for v in after.values())
    assert saved is not None and saved.lineage.relation == "transfer"
    parent = saved.lineage.parents[0]
    assert parent.id == ckptkit.inspect(src_url).id and parent.url == src_url
    assert parent.changes["plan"]["counts"]["reinit_shape"] == 2


def test_timm_resnet_1000_to_10_classes(tmp_path: Path) -> None:
    url = str(tmp_path / "r")
    source = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    ckptkit.save(url, {"model": source}, "imagenet")
    target = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    plan = ckptkit.transfer(url, target)
    assert plan.keys("reinit_shape") == ["fc.weight", "fc.bias"]
    assert plan.counts()["loaded"] == len(target.state_dict()) - 2
    assert [k for k in _equal(source, target) if not k.startswith("fc.")] == []


@pytest.mark.parametrize(("arch", "kwargs", "head"), [
    ("convnext_atto", {}, ["head.fc.weight", "head.fc.bias"]),
    ("vit_tiny_patch16_224", {"img_size": 32}, ["head.weight", "head.bias"]),
])  # fmt: skip
def test_timm_head_named_differently_is_found_from_timm_metadata(tmp_path: Path, arch: str, kwargs: Any, head: list[str]) -> None:
    url = str(tmp_path / arch)
    source = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    ckptkit.save(url, {"model": source}, "a")
    target = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)  # same shapes: only metadata tells
    plan = ckptkit.transfer(url, target, reset_heads=True)
    assert plan.keys("reinit_head") == head
    if arch.startswith("convnext"):
        assert plan.tensors["head.norm.weight"].action == "loaded"  # timm names head.fc, not the whole head


def test_torchvision_faster_rcnn_91_to_5_classes(tmp_path: Path) -> None:
    url = str(tmp_path / "det")
    torch.manual_seed(0)
    source = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    ckptkit.save(url, {"model": source}, "coco")
    target = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    )
    plan = ckptkit.transfer(url, target)
    assert sorted(plan.keys("reinit_shape")) == sorted(
        f"roi_heads.box_predictor.{n}.{p}" for n in ("cls_score", "bbox_pred") for p in ("weight", "bias")
    )
    assert _equal(source, target, "backbone.") == [] and _equal(source, target, "rpn.") == []
    assert ckptkit.inspect(url).components["model"].meta["num_classes"] == 91


def detr(num_labels: int, seed: int) -> DetrForObjectDetection:
    torch.manual_seed(seed)
    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                     backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 8, 8, 8],
                                      "depths": [1, 1, 1, 1], "out_features": ["stage4"]},
                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                     num_labels=num_labels, id2label={i: f"c{i}" for i in range(num_labels)})  # fmt: skip
    return DetrForObjectDetection(cfg)


def test_hf_detr_to_a_new_label_set(tmp_path: Path) -> None:
    url = str(tmp_path / "detr")
    source = detr(num_labels=8, seed=0)
    ckptkit.save(url, {"model": source}, "a")
    assert ckptkit.inspect(url).components["model"].meta["labels"]["7"] == "c7"
    target = detr(num_labels=3, seed=1)
    plan = ckptkit.transfer(url, target)
    assert plan.keys("reinit_shape") == ["class_labels_classifier.weight", "class_labels_classifier.bias"]
    assert _equal(source, target, "bbox_predictor.") == []  # box head kept
    assert _equal(source, target, "model.") == []
    plan = ckptkit.transfer(url, detr(num_labels=8, seed=1), reset_heads=True)  # same label count, new labels
    assert plan.keys("reinit_head") == ["class_labels_classifier.weight", "class_labels_classifier.bias"]


class TextImage(torch.nn.Module):
    """A fusion model: a BERT text branch, a timm image branch, a head of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.text = BertModel(bert(2).config, add_pooling_layer=True)
        self.image = timm.create_model("resnet10t", pretrained=False, num_classes=0)
        self.head = torch.nn.Linear(32 + 512, 2)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.text(input_ids=ids).pooler_output, self.image(img)], dim=1))


def test_fusion_branches_from_two_checkpoints(tmp_path: Path) -> None:
    text_url, image_url, fused_url = (str(tmp_path / n) for n in ("text", "image", "fused"))
    text_src = bert(2)
    image_src = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    ckptkit.save(text_url, {"model": text_src}, "bert")
    ckptkit.save(image_url, {"model": image_src}, "resnet")
    model = TextImage()
    fresh_head = model.head.weight.clone()
    mgr = CheckpointManager(fused_url, {"model": model})
    p1 = mgr.transfer_from(text_url, key_map={"text.{}": "bert.{}"}, include=["text.*"])
    p2 = mgr.transfer_from(image_url, key_map={"image.{}": "{}"}, include=["image.*"])
    assert _equal(model, text_src, "text.", "bert.") == []
    assert _equal(model, image_src, "image.", "") == []
    assert torch.equal(model.head.weight, fresh_head)
    assert p1.unused == ["classifier.bias", "classifier.weight"] and p2.unused == ["fc.bias", "fc.weight"]
    assert not p1.keys("missing") and not p2.keys("missing")
    saved = mgr.save(0)
    assert saved is not None and saved.lineage.relation == "transfer"
    assert [p.url for p in saved.lineage.parents] == [text_url, image_url]
    meta = saved.components["model"].meta
    assert meta["framework"] == "fusion" and set(meta["branches"]) == {"text", "image"}
    model(torch.randint(5, 60, (2, 8)), torch.randn(2, 3, 32, 32))  # still a working model


def test_strict_transfer_and_no_match_are_clear_errors(tmp_path: Path) -> None:
    url = str(tmp_path)
    ckptkit.save(url, {"model": bert(2)}, "a")
    with pytest.raises(ckptkit.errors.StateMismatchError, match="reinit_shape"):
        ckptkit.transfer(url, bert(1), strict=True)
    with pytest.raises(ckptkit.errors.StateMismatchError, match="no tensor matched"):
        ckptkit.transfer(url, torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="same number"):
        ckptkit.transfer(url, bert(2), key_map={"{}.weight": "x"})


# --- export -------------------------------------------------------------------------------------------------


def test_export_hf_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    url, folder = str(tmp_path / "r"), str(tmp_path / "hf")
    model = bert(3).eval()
    ckptkit.save(url, {"model": model}, "a")
    files = ckptkit.export(url, folder)
    assert any(f.endswith("config.json") for f in files) and any(f.endswith("model.safetensors") for f in files)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.randint(5, 60, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    plan = ckptkit.transfer(folder, bert(3, seed=5))  # an exported folder is a transfer source too,
    assert plan.source_id == ckptkit.inspect(url).id  # linked to the checkpoint it came from


def test_export_timm_file_loads_with_pretrained_cfg_overlay(tmp_path: Path) -> None:
    url, folder = str(tmp_path / "r"), str(tmp_path / "timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    ckptkit.save(url, {"model": model}, "a")
    ckptkit.export(url, folder)
    with open(os.path.join(folder, "config.json")) as f:
        num_classes = json.load(f)["num_classes"]
    overlay = {"file": os.path.join(folder, "model.safetensors"), "num_classes": num_classes}
    loaded = timm.create_model("resnet10t", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_export_torchvision_state_dict(tmp_path: Path) -> None:
    url, folder = str(tmp_path / "r"), str(tmp_path / "tv")
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()
    ckptkit.save(url, {"model": model}, "a")
    ckptkit.export(url, folder)
    fresh = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()
    fresh.load_state_dict(torch.load(os.path.join(folder, "model.pth"), weights_only=True))
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        a, b = model(x)[0], fresh(x)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        ckptkit.export(url, folder)  # never writes over an earlier export


def test_export_fusion_writes_each_branch_in_its_format(tmp_path: Path) -> None:
    url, folder = str(tmp_path / "r"), str(tmp_path / "fused")
    ckptkit.save(url, {"model": TextImage()}, "a")
    files = [os.path.relpath(f, folder) for f in ckptkit.export(url, folder)]
    assert "image/model.safetensors" in files and "fusion/model.safetensors" in files
    assert "text/config.json" in files


def test_tokenizer_saved_with_the_model_is_exported_and_restored(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertTokenizerFast

    from ckptkit.adapters.hf import Tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "check", "##point"]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    url, folder = str(tmp_path / "r"), str(tmp_path / "hf")
    ckptkit.save(url, {"model": bert(2), "tokenizer": Tokenizer(tok)}, "a")
    ckptkit.export(url, folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded("hello checkpoint")["input_ids"] == tok("hello checkpoint")["input_ids"]
    back = Tokenizer()
    ckptkit.restore(url, {"tokenizer": back}, "a", strict=False)
    assert back.tokenizer("world")["input_ids"] == tok("world")["input_ids"]
    from ckptkit.adapters.hf import write_files

    with pytest.raises(ValueError, match="plain file name"):
        write_files({"files": {"../evil": b"x"}}, str(tmp_path / "x"))
