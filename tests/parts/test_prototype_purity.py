"""Discovered part prototypes recover ground-truth parts on a planted SyntheticBirds fixture.

Features are fixed (not trained): each cell of a 16×16 grid gets the mean colour of its pixels
(centred over the data set), and the parts of a SyntheticBirds bird have distinct colours. Cosine
k-means (:class:`PartPrototypes`) on the bird cells must then be far purer than the majority-part
baseline, and far purer than the same clustering on shuffled (uninformative) cell features. The
bird covers only ~10% of the cells, so the score is taken on the bird's cells (ground truth: the
part covering most of the cell, :func:`cell_majority_parts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fgvce_lightning.datasets import PART_NAMES, SyntheticBirds
from fgvce_lightning.evaluate import cell_majority_parts, prototype_purity
from fgvce_lightning.parts import PartPrototypes

GRID = 16
NAMES = PART_NAMES + ("background",)


def _purity(feats: torch.Tensor, truth: torch.Tensor, bird: torch.Tensor, k: int = 8):
    protos = PartPrototypes(num_parts=k, background=False, seed=0)
    protos.fit(feats.permute(0, 2, 3, 1)[bird])
    clusters = protos.assign(feats)
    return prototype_purity(clusters[bird], truth[bird], k, NAMES)


def test_prototypes_on_colour_features_are_purer_than_baselines():
    torch.manual_seed(0)
    data = SyntheticBirds(64, num_classes=8, seed=0, split="val", clutter_prob=0.0,
                          occluder_prob=0.0, cache=False)
    batch = data.render(range(64))
    colour = F.adaptive_avg_pool2d(batch["image"], GRID)                # (N, 3, 16, 16)
    feats = colour - colour.mean((0, 2, 3), keepdim=True)
    truth = cell_majority_parts(batch["masks"], (GRID, GRID))
    bird = truth != len(PART_NAMES)
    assert 0.02 < bird.float().mean() < 0.5

    planted = _purity(feats, truth, bird)
    counts = torch.bincount(truth[bird], minlength=len(NAMES)).double()
    assert planted.majority_baseline == float(counts.max() / counts.sum())
    assert planted.purity >= planted.majority_baseline + 0.1, planted

    # control: the same clustering on cell features shuffled across cells carries no part signal
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    perm = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = flat[perm].reshape(feats.shape[0], GRID, GRID, 3).permute(0, 3, 1, 2)
    control = _purity(shuffled, truth, bird)
    assert control.purity < planted.purity - 0.1, (control.purity, planted.purity)
    assert control.purity < planted.majority_baseline + 0.05

    # the body (the biggest part) has a cluster that is mostly body
    body = NAMES.index("body")
    assert planted.precision[body] > 0.5 and planted.best_cluster[body] >= 0
