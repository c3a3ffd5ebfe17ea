"""Issue 19: a bank whose slots go to the classes that occur, and search memory from a budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank, RowTable
from fgvce_lightning.engine.memory import head_activation_bytes, plan_search, query_bytes
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search
from fgvce_lightning.monitor import pending as pending_module
from fgvce_lightning.monitor import stores as stores_module
from fgvce_lightning.monitor.config import DEFAULT_MEMORY_BUDGET_MB
from fgvce_lightning.monitor.batches import small_images

from cell_heads import C, H, S_CELLS, W, CellLinearHead as _CellHead


def CellLinearHead() -> _CellHead:
    return _CellHead(true_bias=-2.0)


def _ids(labels: torch.Tensor, batch: int) -> torch.Tensor:
    n = labels.numel()
    return torch.stack([torch.zeros(n), torch.full((n,), batch), torch.arange(n)], 1).long()


def test_row_table_hands_rings_to_classes_on_first_sight_and_runs_out_cleanly():
    table = RowTable(num_classes=6, num_rows=2, device=torch.device("cpu"))
    assert table.assign(torch.tensor([4, 4, 1])).tolist() == [1, 1, 0]   # new ones in class order
    assert table.assign(torch.tensor([5, 1])).tolist() == [-1, 0]       # no ring left for 5
    full = RowTable(num_classes=3, num_rows=3, device=torch.device("cpu"))
    assert full.row_of.tolist() == [0, 1, 2]                            # one per class: fixed


def test_bank_with_fewer_rings_than_classes_stores_the_classes_that_come():
    bank = ReferenceBank(200, 4, (2, 1, 1), num_rows=3)
    feats = torch.arange(10, dtype=torch.float32)[:, None, None, None].expand(10, 2, 1, 1)
    labels = torch.tensor([150, 7, 150, 7, 42, 99, 99, 150, 7, 7])
    bank.add(feats, labels, _ids(labels, 0))
    # rings go to the new classes in class order: 7, 42, 99; none is left for 150
    assert bank.counts()[[7, 42, 99]].tolist() == [4, 1, 2] and int(bank.counts()[150]) == 0
    assert bank.seen()[150] == 3                                # offered, but no ring was left
    maps, ids = bank.get(7)
    assert maps[:, 0, 0, 0].tolist() == [1.0, 3.0, 8.0, 9.0] and ids[:, 2].tolist() == [1, 3, 8, 9]
    assert bank.get(150)[0].shape[0] == 0
    got, got_ids, valid = bank.gather(torch.tensor([150, 42]))
    assert valid.tolist() == [[False], [True]] and got[1, 0, 0, 0, 0] == 4.0
    assert bool((got[0] == 0).all()) and bool((got_ids[0] == -1).all())
    bank.reset(capacity_per_class=6)                            # the same 12 slots, two rings
    assert bank.num_rows == 2 and bank.capacity_per_class == 6 and len(bank) == 0


def _store(num_classes: int, budget_mb: float, max_per_class=64):
    return stores_module.Stores.build(
        num_classes=num_classes, feature_shape=(16, 2, 2), input_size=(8, 8),
        device=torch.device("cpu"), dtype=torch.float32, feature_dtype=torch.float32, mistakes=4,
        budget_bytes=int(budget_mb * 2 ** 20), max_per_class=max_per_class, thumbnail_size=8,
        part_source="prototypes", num_annotated=0, seed=0, bank_device=torch.device("cpu"))


def _epoch(store, classes: torch.Tensor, per_class: int, batch: int = 0) -> None:
    labels = classes.repeat_interleave(per_class)
    n = labels.numel()
    feats = torch.randn(n, 16, 2, 2, generator=torch.Generator().manual_seed(batch))
    store.add(pending_module.BatchSet(feats, torch.zeros(n, 200), labels, None, None,
                                      small_images(torch.rand(n, 3, 8, 8), 8), _ids(labels, batch)),
              labels.clone(), torch.zeros(n, dtype=torch.bool))


def test_a_200_class_bank_gives_its_slots_to_the_20_classes_that_occur():
    store = _store(200, 1.0)
    first = store.bank.capacity_per_class                      # every class may occur at first
    slots = store.bank.num_slots
    assert first * 200 <= slots < (first + 1) * 200 and first < 64
    seen = torch.arange(0, 200, 10)                            # 20 classes in the validation set
    _epoch(store, seen, per_class=64)
    assert store.bank.counts()[seen].tolist() == [first] * 20
    memory = store.memory_bytes
    store.reset()
    cap = store.bank.capacity_per_class
    assert cap == min(64, slots // 20) and cap >= 8 * first
    _epoch(store, seen, per_class=64, batch=1)
    assert store.bank.counts()[seen].tolist() == [cap] * 20 and len(store.bank) == 20 * cap
    for c in seen.tolist():                                   # the extras follow the rings
        _, ids = store.bank.get(c)
        thumbs, found = store.extras.rows_of("thumb", c, ids)
        assert bool(found.all()) and thumbs.shape[0] == cap
    assert store.memory_bytes <= memory                        # the same memory, used better
    _epoch(store, torch.tensor([5]), per_class=3, batch=2)     # a class never seen before
    assert int(store.bank.counts()[5]) == 0 or store.bank.num_rows > 20   # (no ring left)
    store.reset()                                              # counts from the next epoch on
    assert store.bank.capacity_per_class == min(64, slots // 21)


def test_default_budget_keeps_the_targets_on_a_200_class_resnet50():
    budget = int(DEFAULT_MEMORY_BUDGET_MB * 2 ** 20)
    for grid, target in ((7, 32), (14, 8)):
        plan = stores_module.plan_stores(
            num_classes=200, feature_shape=(2048, grid, grid), dtype=torch.float32, mistakes=64,
            budget_bytes=budget, max_per_class=64, thumbnail_size=64, num_annotated=0,
            batch_bytes=64 * 2048 * grid * grid * 4, batch_size=64)
        assert plan.capacity >= target


class _ConvHead(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.fc = nn.Linear(4 * c, k)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_the_budget_bounds_the_head_chunk_and_the_query_groups():
    head = _ConvHead(8, 5)
    x = torch.randn(1, 8, 6, 6)
    act = head_activation_bytes(head, x)
    assert act >= 4 * x.numel() * 4                            # the conv's output: 4× channels
    # a plain function calling into a model (as the monitor's head wrapper does) is measured
    # through the model's modules: only those the head runs report
    other = _ConvHead(8, 5)
    assert head_activation_bytes(lambda m: other(m), x, modules=(other,)) == \
        head_activation_bytes(other, x)
    assert head_activation_bytes(lambda m: other(m), x) == 4 * x.numel() * 4   # nothing to hook
    bank = ReferenceBank(5, 16, (8, 6, 6))
    bank.add(torch.randn(40, 8, 6, 6), torch.arange(5).repeat(8))
    queries, true = torch.randn(32, 8, 6, 6), torch.arange(32) % 5
    per_query = query_bytes((8, 6, 6), 8, SearchConfig())
    small = SearchConfig(search_memory_mb=4 * per_query / 2 ** 20)
    plan = plan_search(head, queries, true, bank, small)
    assert plan.query_bytes == per_query and plan.map_bytes == act + 2 * x.numel() * 4
    assert plan.chunk == per_query // plan.map_bytes < small.chunk_size      # a quarter
    assert plan.group == 3                                     # the rest: three queries at once
    assert plan.group * plan.query_bytes + plan.chunk * plan.map_bytes <= plan.budget_bytes
    tiny = plan_search(head, queries, true, bank, SearchConfig(search_memory_mb=1e-3))
    assert tiny.chunk == 1 and tiny.group == 1                 # never refuses to run
    big = plan_search(head, queries, true, bank, SearchConfig(search_memory_mb=1e5))
    assert big.group == 32 and big.chunk == 1024
    with pytest.raises(ValueError, match="search_memory_mb"):
        SearchConfig(search_memory_mb=0)


def test_grouped_search_explains_each_query_as_the_whole_batch_does():
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(6, C, H, W)
    q[:, 2:] = 0.5 + 0.5 * torch.rand(6, 2, H, W, generator=gen)
    for r, c in S_CELLS:
        q[:, :, r, c] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    refs = torch.zeros(3, C, H, W)
    refs[:, 2:] = 0.5 + 0.5 * torch.rand(3, 2, H, W, generator=gen)
    for r, c in S_CELLS:
        refs[:, :, r, c] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    bank = ReferenceBank(3, 4, (C, H, W))
    bank.add(refs, torch.zeros(3, dtype=torch.long))
    t, p = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    whole = counterfactual_search(CellLinearHead(), q, t, p, bank, SearchConfig(search_memory_mb=None))
    one_by_one = counterfactual_search(CellLinearHead(), q, t, p, bank,
                                       SearchConfig(search_memory_mb=1e-3))
    assert [e.query_index for e in one_by_one] == list(range(6))
    assert [e.edited_cells for e in one_by_one] == [e.edited_cells for e in whole]
    assert all(e.success for e in whole) and \
        [e.head_evaluations for e in one_by_one] == [e.head_evaluations for e in whole]
    assert dataclasses.replace(SearchConfig(), search_memory_mb=None).search_memory_mb is None


def test_grouped_search_of_a_non_additive_head_matches_the_whole_batch():
    head = _ConvHead(8, 5).eval()
    gen = torch.Generator().manual_seed(3)
    bank = ReferenceBank(5, 8, (8, 5, 5))
    bank.add(torch.randn(40, 8, 5, 5, generator=gen), torch.arange(5).repeat(8))
    q = torch.randn(7, 8, 5, 5, generator=gen)
    with torch.no_grad():
        pred = head(q).argmax(1)
    true = (pred + 1) % 5
    whole = counterfactual_search(head, q, true, pred, bank, SearchConfig(search_memory_mb=None))
    plan = plan_search(head, q, true, bank, SearchConfig(search_memory_mb=0.6))
    assert 1 < plan.group < 7                                  # several groups
    grouped = counterfactual_search(head, q, true, pred, bank, SearchConfig(search_memory_mb=0.6))
    assert [e.query_index for e in grouped] == list(range(7))
    for a, b in zip(whole, grouped):     # the same choices (numbers up to the batch size's rounding)
        assert [(e.query_cells, e.reference_slot, e.reference_cells) for e in a.edits] == \
            [(e.query_cells, e.reference_slot, e.reference_cells) for e in b.edits]
        assert a.success == b.success
        assert [e.p_true_after for e in a.edits] == pytest.approx([e.p_true_after for e in b.edits],
                                                                  abs=1e-5)
        assert torch.allclose(a.contributions, b.contributions, atol=1e-5)
    # the first group shows the head is not additive (4 evaluations of the check); the later
    # groups skip the check and draw the same Shapley orders
    first = plan.group
    assert [b.head_evaluations for b in grouped[:first]] == \
        [a.head_evaluations for a in whole[:first]]
    assert [b.head_evaluations for b in grouped[first:]] == \
        [a.head_evaluations - 4 for a in whole[first:]]


def test_a_new_epoch_started_in_inference_mode_stores_the_next_epoch():
    # Lightning runs the validation loop (and so the epoch start) in inference mode, while the
    # monitor stores batches outside it: re-laid-out buffers must be normal tensors
    store = _store(200, 1.0)
    seen = torch.arange(0, 200, 10)
    _epoch(store, seen, per_class=64)
    first = store.bank.capacity_per_class
    with torch.inference_mode():
        store.reset()
    assert store.bank.capacity_per_class > first
    _epoch(store, seen, per_class=64, batch=1)                 # raised before the fix
    assert store.bank.counts()[seen].tolist() == [store.bank.capacity_per_class] * 20
    with torch.inference_mode():
        store.reset()                                          # the same layout: nothing new
    _epoch(store, seen, per_class=64, batch=2)
    assert len(store.bank) == 20 * store.bank.capacity_per_class
