"""The ``fgvce`` command line: argument parsing and a (small) end-to-end demo run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fgvce_lightning.cli import build_parser, main
from fgvce_lightning.reporting.schema import validate_report


def test_demo_options_parse():
    args = build_parser().parse_args(["demo", "--epochs", "2", "--output-dir", "out", "--seed", "3",
                                      "--max-samples", "5", "--accelerator", "cpu"])
    assert (args.command, args.epochs, args.output_dir, args.seed, args.max_samples,
            args.accelerator) == ("demo", 2, "out", 3, 5, "cpu")


@pytest.mark.parametrize("argv", [[], ["demo", "--epochs", "0"], ["demo", "--max-samples", "x"],
                                  ["train"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: fgvce" in capsys.readouterr().err


def test_demo_trains_explains_and_prints_where_outputs_are(tmp_path, capsys):
    code = main(["demo", "--epochs", "1", "--output-dir", str(tmp_path), "--max-samples", "4",
                 "--num-train", "64", "--num-val", "48", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path / 'lightning_logs'}" in out
    latest = Path(out.split("latest report:")[1].split()[0])
    assert latest.name == "report.html" and latest.is_file()
    report = json.loads((latest.parent / "report.json").read_text())
    validate_report(report)
    assert report["epoch"] == 0 and report["parts"][0]["source"] == "keypoints"
    assert list((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))
    # the known answers of that report, counted over its explained samples
    explained = sum(s["skipped_reason"] is None and bool(s["edits"]) for s in report["samples"])
    assert f"Known answers, epoch 0 ({explained} explained mistakes" in out
    assert "first edit names a separating part" in out and "ceiling:" in out
    assert "what caused the mistakes" in out


def test_python_dash_m_entry_point_shows_help():
    done = subprocess.run([sys.executable, "-m", "fgvce_lightning", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for option in ("--epochs", "--output-dir", "--seed", "--max-samples", "--accelerator"):
        assert option in done.stdout


def test_evaluate_subcommand_is_wired_and_reports_a_missing_checkpoint(tmp_path, capsys):
    from fgvce_lightning.cli import main

    missing = tmp_path / "nope.ckpt"
    assert main(["evaluate", "--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
