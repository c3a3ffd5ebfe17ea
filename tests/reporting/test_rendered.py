"""An epoch's pictures are drawn and encoded once, and TensorBoard and report.html get the same ones."""

import base64
import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from fgvce_lightning.reporting import figures, rendered
from fgvce_lightning.reporting.html import render_html
from fgvce_lightning.reporting.images import sample_panel
from fgvce_lightning.reporting.rendered import (EpochImages, encode_jpeg, encode_png,
                                                epoch_images)
from fgvce_lightning.reporting.tensorboard import TensorBoardReporter, image_summary


def _decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def _events(path):
    ea = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.mark.parametrize("sample_format", ["jpeg", "png"])
def test_tensorboard_images_decode_to_the_drawn_pictures(tmp_path, make_result, sample_format):
    result = make_result()
    writer = SummaryWriter(str(tmp_path))
    TensorBoardReporter(writer, sample_format=sample_format).log_epoch(result, step=3)
    writer.close()
    ea = _events(tmp_path)
    for name, expected in figures.epoch_figure_images(result).items():      # figures: PNG, exact
        (event,) = ea.Images(f"fgvce/figures/{name}")
        assert event.step == 3 and event.encoded_image_string.startswith(b"\x89PNG")
        assert (event.height, event.width) == tuple(expected.shape[1:])
        assert torch.equal(_decode(event.encoded_image_string), expected)
    for slot, index in enumerate((0, 1)):                                   # the skipped one: none
        expected = sample_panel(result.samples[index], result.feature_grid)
        (event,) = ea.Images(f"fgvce/samples/{slot}")
        decoded = _decode(event.encoded_image_string)
        assert (event.height, event.width) == tuple(decoded.shape[1:]) == tuple(expected.shape[1:])
        if sample_format == "png":
            assert event.encoded_image_string.startswith(b"\x89PNG")
            assert torch.equal(decoded, expected)
        else:                                     # quality 88, 4:4:4: close, not equal
            assert event.encoded_image_string.startswith(b"\xff\xd8\xff")
            error = (decoded.float() - expected.float()).abs()
            assert error.mean() < 2.0 and not torch.equal(decoded, expected)
    assert "fgvce/samples/2" not in ea.Tags()["images"]


def test_html_embeds_the_bytes_tensorboard_wrote(tmp_path, make_result):
    result = make_result()
    writer = SummaryWriter(str(tmp_path))
    TensorBoardReporter(writer).log_epoch(result, step=1)
    writer.close()
    html = render_html(result)
    ea = _events(tmp_path)
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    jpegs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)
    written = [ea.Images(f"fgvce/figures/{n}")[0].encoded_image_string
               for n in ("part_errors", "confusion_parts")]
    assert [base64.b64decode(p) for p in pngs] == written
    samples = [ea.Images(f"fgvce/samples/{k}")[0].encoded_image_string for k in (0, 1)]
    assert [base64.b64decode(j) for j in jpegs] == samples
    shapes = [tuple(_decode(base64.b64decode(j)).shape) for j in jpegs]
    assert shapes == [tuple(sample_panel(result.samples[i], result.feature_grid).shape)
                      for i in (0, 1)]
    assert shapes[0][2] > 3 * shapes[1][2] and shapes[0][1] == 164      # 4 panels vs 1, 160 px


def test_each_picture_is_drawn_and_encoded_once(tmp_path, make_result, monkeypatch):
    calls = {"panel": 0, "png": 0, "jpeg": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(rendered, "sample_panel", counting("panel", rendered.sample_panel))
    monkeypatch.setattr(rendered, "encode_png", counting("png", rendered.encode_png))
    monkeypatch.setattr(rendered, "encode_jpeg", counting("jpeg", rendered.encode_jpeg))
    result = make_result()
    writer = SummaryWriter(str(tmp_path))
    TensorBoardReporter(writer).log_epoch(result, step=1)
    render_html(result)
    writer.close()
    # samples 0 and 1 have panels (TensorBoard and the page), the skipped sample 2 none
    assert calls == {"panel": 2, "png": 2, "jpeg": 2}
    images = epoch_images(result)
    assert images is epoch_images(result) and set(images.timings) == {
        "figures", "sample panels", "encoding"}
    assert epoch_images(make_result()) is not images                    # another epoch
    assert epoch_images(result, panel_size=96) is not images            # another size


class _ImageRecorder:
    def __init__(self):
        self.images = {}

    def add_image(self, tag, image, step, dataformats="CHW"):
        assert dataformats == "CHW"
        self.images[tag] = image


class _OwnAddImage(SummaryWriter):
    """A SummaryWriter whose add_image is its own: it must be called, not bypassed."""

    def __init__(self, log_dir):
        super().__init__(log_dir)
        self.tags = []

    def add_image(self, tag, img_tensor, global_step=None, walltime=None, dataformats="CHW"):
        self.tags.append(tag)
        super().add_image(tag, img_tensor, global_step, walltime, dataformats)


def test_other_writers_get_add_image_with_the_tensors(tmp_path, make_result):
    result = make_result()
    recorder = _ImageRecorder()
    TensorBoardReporter(recorder).log_epoch(result, step=2, scalars=False)
    assert set(recorder.images) == {"fgvce/samples/0", "fgvce/samples/1",
                                    "fgvce/figures/part_errors", "fgvce/figures/confusion_parts"}
    assert torch.equal(recorder.images["fgvce/samples/0"],
                       sample_panel(result.samples[0], result.feature_grid))
    own = _OwnAddImage(str(tmp_path))
    TensorBoardReporter(own).log_epoch(make_result(), step=2, scalars=False)
    own.close()
    assert sorted(own.tags) == sorted(recorder.images)
    assert _events(tmp_path).Images("fgvce/samples/0")[0].encoded_image_string.startswith(
        b"\x89PNG")                                   # torch's own encoding, through add_image


def _stats_without_parts(result):
    return dataclasses.replace(result, stats=dataclasses.replace(
        result.stats, part_stats=(), pair_stats=()))


def test_reused_figures_draw_like_new_ones(make_result):
    """epoch_figure_images draws each epoch into the last epoch's figures: the pixels must be
    those of new figures, whatever the epoch before showed (more parts, a note, a heat map of
    another size)."""
    base = make_result()
    many = dataclasses.replace(base, stats=dataclasses.replace(base.stats, part_stats=tuple(
        dataclasses.replace(base.stats.part_stats[k % 2], part=f"part number {k}",
                            error_share=0.1 * k) for k in range(7))))
    for result in (base, many, _stats_without_parts(base), base, many, base):
        result = dataclasses.replace(result)            # a new result object: drawn again
        images = figures.epoch_figure_images(result)
        if not result.stats.part_stats:
            assert images == {}
            continue
        fresh = {"part_errors": figures.part_error_figure(result.stats),
                 "confusion_parts": figures.confusion_part_heatmap(result.stats,
                                                                   result.class_names)}
        assert set(images) == set(fresh)
        for name, figure in fresh.items():
            assert torch.equal(images[name], figures.figure_to_image(figure)), name
    # the public functions always return new figures, never the kept ones
    assert figures.part_error_figure(base.stats) is not figures._kept["part_errors"]


def test_margins_hold_long_labels(make_result):
    result = make_result()
    names = tuple(f"a class with a rather long name number {k}" for k in range(5))
    figure = figures.confusion_part_heatmap(result.stats, names)
    image = figures.figure_to_image(figure)
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    for label in ax.get_yticklabels():                # every row label inside the figure
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.width > 150
    assert image.shape[2] > 500


def test_encoders_and_bad_input(make_result):
    image = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(_decode(encode_png(image)), image)                  # lossless
    assert Image.open(io.BytesIO(encode_jpeg(image))).format == "JPEG"
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(image, quality=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        encode_png(image[:1])
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = image_summary("t", encode_png(image), 9, 13, Summary)
    assert summary.value[0].image.width == 13 and summary.value[0].tag == "t"
    with pytest.raises(ValueError, match="PNG- or JPEG-encoded"):
        image_summary("t", b"GIF89a....", 9, 13, Summary)
    with pytest.raises(ValueError, match="PNG- or JPEG-encoded"):
        image_summary("t", "not bytes", 9, 13, Summary)
    with pytest.raises(ValueError, match="positive image size"):
        image_summary("t", encode_png(image), 0, 13, Summary)
    result = make_result()
    with pytest.raises(TypeError, match="EpochResult"):
        EpochImages({"epoch": 1})
    with pytest.raises(ValueError, match="panel_size"):
        EpochImages(result, panel_size=8)
    images = EpochImages(result)
    with pytest.raises(IndexError, match="sample index in 0..2"):
        images.panel(3)
    with pytest.raises(KeyError, match="part_errors"):
        images.figure_png("histogram")
    assert images.panel(2) is None and images.panel_png(2) is None      # skipped, no thumbnail
    with pytest.raises(ValueError, match="sample_format"):
        TensorBoardReporter(_ImageRecorder(), sample_format="gif")
