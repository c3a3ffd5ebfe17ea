"""The monitor's threads on a GPU: the background job on a CUDA stream of its own, ordered after
the work queued before it; the collection thread on the stream its task was submitted from.
(The GPU precisions are in ``test_setups.py``.) Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pinned_host_bank_explains_as_a_bank_on_the_gpu(dtype):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    head = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 6)).to(device).eval()
    maps = torch.randn(60, 16, 7, 7, generator=gen).relu()
    labels = torch.arange(6).repeat(10)
    host = ReferenceBank(6, 10, (16, 7, 7), dtype=dtype, pin_memory=True)
    gpu = ReferenceBank(6, 10, (16, 7, 7), device=device, dtype=dtype)
    host.add(maps, labels)
    gpu.add(maps.to(device), labels.to(device))
    assert host.pinned and host.device.type == "cpu"
    q = torch.randn(12, 16, 7, 7, generator=gen).relu().to(device)
    with torch.no_grad():
        pred = head(q).argmax(1)
    true = (pred + 1) % 6
    a = counterfactual_search(head, q, true, pred, host, SearchConfig())
    b = counterfactual_search(head, q, true, pred, gpu, SearchConfig())
    assert [e.edits for e in a] == [e.edits for e in b]
    assert [e.success for e in a] == [e.success for e in b]
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    counterfactual_search(head, q, true, pred, host, SearchConfig(search_memory_mb=16))
    assert torch.cuda.max_memory_allocated(device) - base <= 16 * 2 ** 20   # within the budget
