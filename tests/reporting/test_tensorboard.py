import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from fgvce_lightning.reporting.tensorboard import (TensorBoardReporter, markdown_summary,
                                                   select_samples)


def _read(path):
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_summary_writer_round_trip(tmp_path, make_result):
    writer = SummaryWriter(str(tmp_path))
    reporter = TensorBoardReporter(writer, max_images=8)
    reporter.log_epoch(make_result(epoch=3), step=5)
    reporter.log_epoch(make_result(epoch=4), step=10)
    writer.close()
    ea = _read(tmp_path)
    tags = ea.Tags()

    flips = ea.Scalars("fgvce/flip_rate")
    assert [(e.step, e.value) for e in flips] == [(5, 0.5), (10, 0.5)]
    assert ea.Scalars("fgvce/part_error_share/left_wing")[0].value == 0.5
    assert ea.Scalars("fgvce/misclassified")[-1].value == 10

    # one image per sample, its panels side by side: sample 0 has every panel (query,
    # contributions, reference, trajectory), sample 1 only a trajectory; the skipped sample none
    for tag in ("fgvce/samples/0", "fgvce/samples/1", "fgvce/figures/part_errors",
                "fgvce/figures/confusion_parts"):
        assert tag in tags["images"], tag
    assert "fgvce/samples/2" not in tags["images"] and "fgvce/query/0" not in tags["images"]
    image, single = ea.Images("fgvce/samples/0")[0], ea.Images("fgvce/samples/1")[0]
    assert image.step == 5 and image.width > image.height > 100
    assert image.width > 3 * single.width and 0 <= image.height - single.height <= 4   # (padding)
    assert image.encoded_image_string.startswith(b"\xff\xd8\xff")             # sample: JPEG
    assert ea.Images("fgvce/figures/part_errors")[0].encoded_image_string.startswith(b"\x89PNG")

    text = ea.Tensors("fgvce/summary/text_summary")
    assert [t.step for t in text] == [5, 10]
    markdown = tensor_util.make_ndarray(text[0].tensor_proto).item().decode()
    assert ("| 1 (frigatebird) → 2 (&lt;b&gt;gull &amp; tern&lt;/b&gt;) | 1 | head 1.000 "
            "(0.21–1.00), too few to tell (n &lt; 5) | head (1) | 0/5/17 |") in markdown

    # the custom-scalars layout is written once, and matches the scalar tags
    assert "custom_scalars__config__" in ea.PluginTagToContent("custom_scalars")
    configs = ea.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(configs[0].tensor_proto).item())
    (category,) = layout.category
    assert category.title == "part-error panels"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    assert charts["part error share (all parts)"] == [r"^fgvce/part_error_share/.*"]
    margin = next(c.margin for c in category.chart if c.title == "part: left wing")
    (series,) = margin.series
    assert (series.value, series.lower, series.upper) == (
        "fgvce/part_error_share/left_wing", "fgvce/part_error_share_low/left_wing",
        "fgvce/part_error_share_high/left_wing")
    assert ea.Scalars("fgvce/part_error_share_low/left_wing")[0].value == pytest.approx(0.0945,
                                                                                       abs=1e-3)


class _Recorder:
    """A writer with scalars and text only (no images, no custom scalars)."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))


class _Logger:
    def __init__(self, experiment):
        self.experiment = experiment


def test_duck_typed_writers_and_logger_unwrapping(result):
    recorder = _Recorder()
    reporter = TensorBoardReporter(_Logger(recorder), prefix="cf")
    assert reporter.writer is recorder
    reporter.log_epoch(result)                    # step defaults to the global step
    kinds = {c[0] for c in recorder.calls}
    assert kinds == {"scalar", "text"}
    assert ("scalar", "cf/flip_rate", 0.5, 1200) in recorder.calls
    recorder.calls.clear()
    reporter.log_epoch(result, step=7, scalars=False)   # scalars went through log_metrics
    assert [c[:2] for c in recorder.calls] == [("text", "cf/summary")]


def test_bad_arguments(result):
    with pytest.raises(TypeError, match="SummaryWriter-like"):
        TensorBoardReporter(object())
    with pytest.raises(ValueError, match="max_images"):
        TensorBoardReporter(_Recorder(), max_images=-1)
    with pytest.raises(ValueError, match="prefix"):
        TensorBoardReporter(_Recorder(), prefix="")
    with pytest.raises(TypeError, match="EpochResult"):
        TensorBoardReporter(_Recorder()).log_epoch({"epoch": 1}, 0)


def test_select_samples_and_summary(result):
    assert select_samples(result, 8) == [0, 1]        # skipped sample 2 has nothing to show
    assert select_samples(result, 1) == [0]
    text = markdown_summary(result)
    assert "2 of 10 mistakes explained" in text and "| 0.500 | 2.00 | 0.750 |" in text
    assert "| left wing | 0.500 | 0.09–0.91 | 1 | 0.400 |" in text
    assert "non-finite features" in text
