"""The monitor's threads on a GPU: the background job on a CUDA stream of its own, ordered after
the work queued before it; the collection thread on the stream its task was submitted from.
(The GPU precisions are in ``test_setups.py``.) Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from fgvce_lightning.monitor.threads import BackgroundJob, SerialWorker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_background_job_runs_on_its_own_stream_after_the_queued_work():
    device = torch.device("cuda")
    x = torch.zeros(4096, 4096, device=device)
    x.add_(1.0)                                       # queued on the current stream, not waited for
    seen = {}

    def job(stop):
        seen["stream"] = torch.cuda.current_stream(device)
        return float(x.sum())

    out = BackgroundJob(job, device=device).wait(60)
    assert out == 4096.0 * 4096.0                     # it saw the queued work finished
    assert seen["stream"] != torch.cuda.default_stream(device)


def test_a_collection_task_runs_on_the_stream_it_was_submitted_from():
    device = torch.device("cuda")
    side = torch.cuda.Stream(device=device)
    seen = []
    worker = SerialWorker(max_pending=2)
    with torch.cuda.stream(side):
        worker.submit(lambda: seen.append(torch.cuda.current_stream(device)))
    assert worker.drain(60) and seen == [side]
