"""CounterfactualMonitor under DDP: two CPU processes (gloo), ranks with different mistake counts."""

from __future__ import annotations

import json
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from _callback_fixtures import PlantedModel, planted_val
from fgvce_lightning.callback import CounterfactualMonitor
from fgvce_lightning.reporting.schema import validate_report

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available")


def test_ddp_ranks_with_different_mistake_counts_gather_and_rank0_writes(tmp_path):
    data = planted_val(32)
    wrong = [i for i in range(len(data)) if int(data[i][1]) != i % 3]
    assert wrong and all(i % 2 == 0 for i in wrong)          # every mistake lands on rank 0
    monitor = CounterfactualMonitor(max_samples=6, log_images=0, report_html=False,
                                    report_dir=tmp_path / "reports")
    trainer = L.Trainer(
        accelerator="cpu", devices=2,
        # a hang would surface as a gloo timeout error instead of blocking the suite
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        callbacks=[monitor], logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False)
    trainer.validate(PlantedModel(), DataLoader(data, batch_size=4))

    reports = sorted((tmp_path / "reports").glob("epoch_*/report.json"))
    assert [p.parent.name for p in reports] == ["epoch_000"]   # written once, by rank 0 only
    report = json.loads(reports[0].read_text())
    validate_report(report)
    assert report["num_misclassified"] == len(wrong)           # gathered from both ranks
    assert len(report["samples"]) == 3                         # rank 0's share: 6 / 2 processes
    assert report["num_explained"] >= 1
    assert report["failures"] == []
    positions = {(s["batch_idx"], s["position"]) for s in report["samples"]}
    # rank 0 sees dataset indices 0, 2, 4, ... in batches of 4: index = 2 * (4 * batch + position)
    assert all(2 * (4 * b + p) in wrong for b, p in positions)
