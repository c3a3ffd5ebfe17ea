"""Tests of ``fgvce_lightning.evaluate``: strategy comparison, table, determinism, CLI round trip."""

from __future__ import annotations

import argparse
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fgvce_lightning.datasets import PART_NAMES, SyntheticBirds
from fgvce_lightning.demo import DemoClassifier
from fgvce_lightning.evaluate import (STRATEGIES, add_evaluate_parser, cell_majority_parts,
                                      evaluate_model, format_table, prototype_purity, run_evaluate)

NUM_CLASSES = 4
SIZE = 32


@pytest.fixture(scope="module")
def trained():
    """A DemoClassifier (width 8) trained for a few seconds on 32-px SyntheticBirds, and val data."""
    torch.manual_seed(0)
    train = SyntheticBirds(256, num_classes=NUM_CLASSES, image_size=SIZE, seed=1, split="train")
    val = SyntheticBirds(96, num_classes=NUM_CLASSES, image_size=SIZE, seed=1, split="val")
    module = DemoClassifier(num_classes=NUM_CLASSES, width=8, lr=1e-2)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    loader = DataLoader(train, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    module.train()
    for _ in range(3):
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(module(batch["image"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.train()          # evaluate_model must restore this flag
    return module, DataLoader(val, batch_size=16, shuffle=False)


@pytest.fixture(scope="module")
def result(trained):
    module, loader = trained
    return evaluate_model(module, loader, max_queries=12, bank_per_class=4, seed=3)


def test_all_strategies_measured_in_range(trained, result):
    module, _ = trained
    assert all(m.training for m in module.modules())          # flags restored
    assert [s.name for s in result.strategies] == list(STRATEGIES)
    assert result.num_val == 96 and 0.0 < result.accuracy < 1.0
    assert result.num_mistakes == round(96 * (1 - result.accuracy))
    assert result.num_queries == min(12, result.num_mistakes)
    # the monitor's labels: keypoints first (Near-KP), masks kept for the ceiling
    assert result.label_source == "keypoints" and result.part_names == PART_NAMES
    assert result.grid == (SIZE // 8, SIZE // 8)
    assert 0.0 < result.distinguishing_cell_share < 1.0
    for s in result.strategies:
        assert s.num_explained > 0, s.name
        assert len(s.explanations) == result.num_queries
        assert {e.method for e in s.explanations if not e.skipped} == {s.name.split("-")[0]}
        for rate in (s.flip_rate, s.near_part, s.same_part, s.distinguishing_hit,
                     s.distinguishing_chance, s.consistency):
            assert 0.0 <= rate <= 1.0, (s.name, rate)
        # the known answers: the same first edits, scored against the separating parts
        assert s.separating is not None and s.separating.first_edit.total == s.num_explained
        assert s.separating.first_edit.value == pytest.approx(s.distinguishing_hit)
        assert s.separating.edits_unlabelled.hits == 0
        assert sum(r.total for k, r in s.causes.items() if k != "known") == s.num_explained
        assert s.same_part <= 1.0 and s.head_evaluations >= 1 and s.seconds >= 0
        if not math.isnan(s.edits_to_flip):
            assert 1.0 <= s.edits_to_flip <= s.cells_to_flip
    for name in ("fgvce", "gradcam", "random"):
        s = result.strategy(name)
        assert 0.0 <= s.deletion_auc <= 1.0 and 0.0 <= s.insertion_auc <= 1.0
    greedy = result.strategy("greedy")
    assert math.isnan(greedy.deletion_auc) and greedy.edits_to_flip == greedy.cells_to_flip or \
        math.isnan(greedy.edits_to_flip)
    assert 0 <= result.ceiling.hits <= result.ceiling.total == result.num_queries
    assert sum(result.cause_counts.values()) == result.num_queries
    with pytest.raises(KeyError, match="Expected one of"):
        result.strategy("nope")


def test_distinguishing_hit_rate_matches_a_direct_count(trained, result):
    _, loader = trained
    ds = loader.dataset
    keypoints = torch.stack([ds[i]["keypoints"] for i in result.query_indices])
    from fgvce_lightning.parts.annotations import keypoints_to_cell_parts
    cells = keypoints_to_cell_parts(keypoints, (SIZE, SIZE), result.grid, radius=1.0)
    s = result.strategy("fgvce")
    hits, n = 0, 0
    for e in s.explanations:
        if e.skipped:
            continue
        n += 1
        parts = {PART_NAMES.index(p) for p in ds.distinguishing_parts(e.true, e.pred)}
        hits += any(bool(cells[e.query_index, p, i, j]) for p in parts
                    for i, j in e.edits[0].query_cells) if e.edits else 0
    assert s.distinguishing_hit == pytest.approx(hits / n)


def test_table_lists_every_strategy_and_metric(result):
    table = format_table(result)
    for name in STRATEGIES:
        assert name in table
    for metric in ("flip rate", "edits to flip", "head evals", "Near-part", "Same-part",
                   "first edit names separating part", "chance", "deletion AUC", "insertion AUC",
                   "accuracy", "per-cell chance", "semantic consistency", "known cause",
                   "pairs >= 5", "ceiling:", "causes ("):
        assert metric in table
    rows = [line for line in table.splitlines() if line.startswith(("flip rate", "edits to",
                                                                     "insertion", "  most"))]
    assert len(rows) == 4 and len({len(line) for line in rows}) == 1   # aligned columns


def test_deterministic_by_seed(trained, result):
    module, loader = trained
    again = evaluate_model(module, loader, max_queries=12, bank_per_class=4, seed=3)
    assert again.query_indices == result.query_indices
    for a, b in zip(again.strategies, result.strategies):
        assert repr(a.explanations) == repr(b.explanations)     # nan != nan in ==
        for attr in ("flip_rate", "near_part", "same_part", "distinguishing_hit", "deletion_auc",
                     "insertion_auc", "head_evaluations"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert (math.isnan(x) and math.isnan(y)) or x == y, attr
    other = evaluate_model(module, loader, max_queries=12, bank_per_class=4, seed=4,
                           strategies=("random",))
    assert other.query_indices != result.query_indices


def test_keypoint_labels_and_input_errors(trained):
    module, loader = trained

    class Keypoints(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            item = loader.dataset[i]
            return {"image": item["image"], "label": item["label"], "keypoints": item["keypoints"]}

    res = evaluate_model(module, DataLoader(Keypoints(), batch_size=16), max_queries=4,
                         bank_per_class=4, strategies=("fgvce",), part_names=PART_NAMES)
    assert res.label_source == "keypoints"
    assert math.isnan(res.distinguishing_cell_share)      # no distinguishing_parts on the wrapper
    assert math.isnan(res.strategies[0].distinguishing_hit)
    with pytest.raises(ValueError, match="strategies"):
        evaluate_model(module, loader, strategies=("beam",))
    with pytest.raises(ValueError, match="max_queries"):
        evaluate_model(module, loader, max_queries=0)
    with pytest.raises(ValueError, match="part names"):
        evaluate_model(module, loader, max_queries=2, part_names=("a", "b"), strategies=("random",))


def test_prototype_purity_counts():
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    parts = torch.tensor([0, 0, 1, 1, 1, 2])
    res = prototype_purity(clusters, parts, 3, ("a", "b", "background"))
    assert res.purity == pytest.approx((2 + 2 + 1) / 6)
    assert res.majority_baseline == pytest.approx(3 / 6)
    assert res.best_cluster == (0, 1, 2)
    assert res.precision == pytest.approx((2 / 3, 1.0, 1.0))
    assert res.recall == pytest.approx((1.0, 2 / 3, 1.0))
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True            # part 0 fills cell (0, 0) of a 2×2 grid
    masks[0, 1, 2:, 2:3] = True           # part 1 covers half of cell (1, 1)
    assert cell_majority_parts(masks, (2, 2)).tolist() == [[[0, 2], [2, 1]]] or \
        cell_majority_parts(masks, (2, 2)).tolist() == [[[0, 2], [2, 2]]]
    with pytest.raises(ValueError, match="same shape"):
        prototype_purity(clusters, parts[:3], 3, ("a", "b", "c"))


def test_checkpoint_round_trip_through_cli(tmp_path, capsys):
    L.seed_everything(0, verbose=False)
    train = SyntheticBirds(64, num_classes=8, seed=0, split="train")
    val = SyntheticBirds(32, num_classes=8, seed=0, split="val")
    module = DemoClassifier(num_classes=8, width=8)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    ckpt = tmp_path / "demo.ckpt"
    trainer.save_checkpoint(ckpt)

    parser = argparse.ArgumentParser(prog="fgvce")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--checkpoint", str(ckpt), "--num-val", "48",
                              "--max-queries", "4", "--strategies", "fgvce,random"])
    assert args.handler is run_evaluate and args.data == "synthetic" and args.seed == 0
    assert run_evaluate(args) == 0
    out = capsys.readouterr().out
    assert "48 samples" in out and "fgvce" in out and "random" in out and "greedy" not in out
    bad = parser.parse_args(["evaluate", "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert run_evaluate(bad) == 2
    assert "does not exist" in capsys.readouterr().err
