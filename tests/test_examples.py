"""The example scripts in ``examples/`` run end to end on tiny data and write valid epoch reports.

Each script is imported from its file and its ``main(argv)`` run with size options small enough for
a few seconds on a CPU (32–64 pixel images, one or two epochs of two batches). Nothing is
downloaded: the CUB example reads a fake CUB-200-2011 folder (``make_fake_cub``) and loads a
ResNet-50 ``state_dict`` from a local file.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fgvce_lightning.datasets import CUB_PART_NAMES, PART_NAMES, make_fake_cub
from fgvce_lightning.reporting import validate_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _tiny(epochs: int = 1, image_size: int = 32, html: bool = False) -> list[str]:
    """Size options shared by the SyntheticBirds examples: 2 batches of 16 per epoch."""
    return ["--epochs", str(epochs), "--num-train", "32", "--num-val", "32", "--image-size", str(image_size),
            "--batch-size", "16", "--limit-batches", "2", "--max-samples", "4"] + ([] if html else ["--no-html"])


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fgvce_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses / pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def _reports(output_dir: Path, monitor) -> list[dict]:
    """Every epoch report under ``output_dir``, validated; the monitor's last one among them."""
    paths = sorted(output_dir.rglob("report.json"))
    assert paths, f"no report.json under {output_dir}"
    assert monitor.last_report is not None and Path(monitor.last_report) / "report.json" in paths
    reports = []
    for path in paths:
        report = json.loads(path.read_text())
        validate_report(report)
        assert report["failures"] == [], report["failures"]
        reports.append(report)
    return reports


def test_synthetic_demo(tmp_path):
    out = tmp_path / "run"
    monitor = _load("synthetic_demo").main(_tiny(epochs=2, html=True) + ["--output-dir", str(out)])
    reports = _reports(out, monitor)
    assert [r["epoch"] for r in reports] == [0, 1]
    for report in reports:
        assert report["feature_grid"] == [4, 4] and report["input_size"] == [32, 32]   # SmallCNN: S/8
        assert [p["name"] for p in report["parts"]] == list(PART_NAMES)
        assert {p["source"] for p in report["parts"]} == {"keypoints"}
        assert report["num_misclassified"] > 0
    assert (Path(monitor.last_report) / "report.html").is_file()


def test_cub_resnet50_from_local_weights(tmp_path):
    root = make_fake_cub(tmp_path / "data", num_classes=3, images_per_class=4)
    torch.manual_seed(0)
    imagenet = _load("cub_resnet50").build_resnet50(1000)          # stands in for ImageNet weights
    weights = tmp_path / "resnet50.pth"
    torch.save(imagenet.state_dict(), weights)
    out = tmp_path / "run"
    monitor = _load("cub_resnet50").main([
        "--root", str(root), "--weights", str(weights), "--epochs", "1", "--limit-batches", "2",
        "--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--every-n-epochs", "1",
        "--max-samples", "4", "--no-html", "--accelerator", "cpu", "--output-dir", str(out)])
    (report,) = _reports(out, monitor)
    assert report["feature_grid"] == [2, 2] and report["input_size"] == [64, 64]  # layer4[:-1] at 64 px
    merged = [n.removeprefix("left ") for n in CUB_PART_NAMES if not n.startswith("right ")]
    assert [p["name"] for p in report["parts"]] == merged
    assert report["class_names"] == ["Fake Bird 1", "Fake Bird 2", "Fake Bird 3"]


def test_cub_resnet50_weights_are_loaded_and_never_downloaded(tmp_path, monkeypatch):
    example = _load("cub_resnet50")
    torch.manual_seed(1)
    source = example.build_resnet50(1000)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict()}, path)       # a checkpoint-style wrapper works too
    model = example.build_resnet50(7, weights=str(path))
    assert model.fc.out_features == 7
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="local state_dict"):
        example.build_resnet50(7, weights=str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        example.build_resnet50(7, torchvision_weights=True)
    with pytest.raises(ValueError, match="at most one"):
        example.build_resnet50(7, weights=str(path), torchvision_weights=True)


@pytest.mark.parametrize("layer", [None, "model.layer4.0"])
def test_timm_model(tmp_path, layer):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    monitor = _load("timm_model").main(_tiny(image_size=64) + ["--output-dir", str(out)]
                                       + (["--layer", layer] if layer else []))
    (report,) = _reports(out, monitor)
    assert report["feature_grid"] == [2, 2] and report["input_size"] == [64, 64]    # resnet18 stride 32
    assert [p["name"] for p in report["parts"]] == list(PART_NAMES)


@pytest.mark.parametrize("split", ["callables", "layer"])
def test_custom_backbone(tmp_path, split):
    out = tmp_path / "run"
    monitor = _load("custom_backbone").main(_tiny() + ["--split", split, "--output-dir", str(out)])
    (report,) = _reports(out, monitor)
    assert report["feature_grid"] == [4, 4]
    assert report["num_misclassified"] > 0


@pytest.mark.parametrize("use_timm", [False, True])
def test_vit_synthetic(tmp_path, use_timm):
    if use_timm:
        pytest.importorskip("timm")
    out = tmp_path / "run"
    monitor = _load("vit_synthetic").main(_tiny() + ["--depth", "2", "--dim", "32", "--heads", "2",
                                                  "--output-dir", str(out)] + (["--timm"] if use_timm else []))
    (report,) = _reports(out, monitor)
    assert report["feature_grid"] == [4, 4]                                        # 32 px / 8 px patches
    assert monitor.search_config.protected_channels == 32                          # the class token


def test_limit_batches_option_is_int_or_fraction():
    example = _load("synthetic_demo")
    assert example._batches("2") == 2 and isinstance(example._batches("2"), int)
    assert example._batches("0.25") == 0.25
