import ast
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import fgvce_lightning.reporting as reporting
from fgvce_lightning.parts.types import EpochStats
from fgvce_lightning.reporting.figures import (class_label, confusion_part_heatmap,
                                               figure_to_image, part_error_figure)


def _check_image(image):
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    assert image.dim() == 3 and image.shape[0] == 3 and min(image.shape[1:]) > 50
    assert image.float().std() > 5   # something is drawn


def test_part_error_figure(result):
    fig = part_error_figure(result.stats)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["head", "left wing"]
    assert sorted(p.get_width() for p in ax.patches) == pytest.approx([0.4, 0.5, 0.5, 0.6])
    _check_image(figure_to_image(fig))


def test_confusion_part_heatmap(result):
    fig = confusion_part_heatmap(result.stats, result.class_names)
    data = fig.axes[0].images[0].get_array()
    assert data.shape == (2, 2)
    assert data.tolist() == [[1.0, 0.0], [0.0, 1.0]]   # pair (1→2) touched head, (3→4) left wing
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("1 (frigatebird) → 2")
    _check_image(figure_to_image(fig))
    assert len(confusion_part_heatmap(result.stats, max_pairs=1).axes[0].images[0].get_array()) == 1
    with pytest.raises(ValueError, match="max_pairs"):
        confusion_part_heatmap(result.stats, max_pairs=0)


def test_empty_statistics_give_a_note_not_an_error():
    empty = EpochStats(num_misclassified=0, num_explained=0, num_skipped=0, flip_rate=float("nan"),
                       mean_edits=float("nan"))
    for fig in (part_error_figure(empty), confusion_part_heatmap(empty)):
        _check_image(figure_to_image(fig))
    with pytest.raises(TypeError, match="Figure"):
        figure_to_image("not a figure")
    assert class_label(3, ["a"]) == "3" and class_label(0, ["a"]) == "0 (a)"


def test_reporting_layer_imports_no_lightning_pyplot_or_tensorboard():
    root = Path(reporting.__file__).parent
    forbidden = ("lightning", "pytorch_lightning", "matplotlib.pyplot", "tensorboard",
                 "torch.utils.tensorboard", "pylab")
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


def test_epoch_figures_are_drawn_once_per_result(monkeypatch, make_result):
    from fgvce_lightning.reporting import figures
    from fgvce_lightning.reporting.html import render_html

    build_result = make_result
    calls = []
    real = figures._part_errors
    monkeypatch.setattr(figures, "_part_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = build_result()
    first = figures.epoch_figure_images(result)
    assert set(first) == {"part_errors", "confusion_parts"}
    assert first["part_errors"].dtype == torch.uint8 and first["part_errors"].shape[0] == 3
    html = render_html(result)                       # the HTML report reuses the same images
    assert calls == [1] and html.count("data:image/png;base64,") == 2
    figures.epoch_figure_images(build_result())      # another epoch's result: drawn again
    assert calls == [1, 1]


def test_figures_show_at_most_max_parts(result):
    import dataclasses

    from fgvce_lightning.reporting.figures import confusion_part_heatmap, part_error_figure

    many = dataclasses.replace(result.stats, part_stats=tuple(
        dataclasses.replace(result.stats.part_stats[0], part=f"p{k}") for k in range(40)))
    bars = part_error_figure(many, max_parts=5).axes[0]
    assert len(bars.get_yticks()) == 5 and "first 5 of 40 parts" in bars.get_title()
    assert len(part_error_figure(result.stats).axes[0].get_yticks()) == len(result.stats.part_stats)
    heat = confusion_part_heatmap(many, max_parts=7).axes[0]
    assert len(heat.get_xticks()) == 7
