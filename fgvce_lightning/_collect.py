"""The validation pass of :mod:`fgvce_lightning.evaluate`: features, the reference bank and the part
labels of every mistake and reference, as the monitor makes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from .engine import ModelSplit, ReferenceBank
from .engine._util import evaluate_head
from .parts.annotations import keypoints_to_cell_parts, masks_to_cell_parts

__all__ = ["Collected", "collect"]


@dataclass
class Collected:
    """The validation pass: query candidates (mistakes), their labels and the references' labels."""

    feats: list = field(default_factory=list)        # mistakes' feature maps
    true: list = field(default_factory=list)
    pred: list = field(default_factory=list)
    position: list = field(default_factory=list)     # loader-order index of each mistake
    parts: list = field(default_factory=list)        # mistakes' (P, H, W) cell labels
    ref_parts: dict = field(default_factory=dict)    # bank id -> (P, H, W) cell labels
    mask_parts: list = field(default_factory=list)   # the same from the masks (the ceiling)
    ref_mask_parts: dict = field(default_factory=dict)
    num_val: int = 0
    num_correct: int = 0
    label_source: Optional[str] = None


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                 Optional[torch.Tensor]]:
    """Images, labels, keypoints and masks (``None`` where the batch has none)."""
    if isinstance(batch, dict):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"Expected a batch dict with 'image' and 'label', but got keys "
                             f"{sorted(batch)}.")
        return batch["image"], batch["label"], batch.get("keypoints"), batch.get("masks")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], None, None
    raise TypeError(f"Expected batches as dicts with 'image' and 'label' or (images, labels) pairs, "
                    f"but got {type(batch).__name__}.")


def collect(split: ModelSplit, loader: Iterable, bank_per_class: int, device: torch.device,
             min_coverage: float, radius: float) -> tuple[Collected, Optional[ReferenceBank]]:
    """One pass over the loader. Part labels as the monitor makes them (keypoints first, else
    masks); the mask labels are kept on their own too, for the ceiling."""
    out, bank = Collected(), None
    for batch_idx, batch in enumerate(loader):
        images, labels, keypoints, masks = _unpack(batch)
        images, labels = images.to(device), labels.to(device).long()
        feats = split.features(images)
        logits = evaluate_head(split.head, feats)
        pred = logits.argmax(1)
        grid = tuple(feats.shape[2:])
        if bank is None:
            bank = ReferenceBank(logits.shape[1], bank_per_class, tuple(feats.shape[1:]),
                                 device=device, id_width=3)
        correct = pred == labels
        b = labels.numel()
        ids = torch.stack([torch.zeros(b, dtype=torch.long), torch.full((b,), batch_idx),
                           torch.arange(b)], 1)
        bank.add(feats[correct], labels[correct], ids[correct.cpu()].to(device), replace=False)
        mask_cells = cells = None
        if masks is not None:
            cells = masks_to_cell_parts(masks.to(device), grid, min_coverage=min_coverage).cpu()
            # the ceiling swaps every cell a part touches at all
            mask_cells = masks_to_cell_parts(masks.to(device), grid, min_coverage=1e-6).cpu()
        if keypoints is not None:
            cells = keypoints_to_cell_parts(keypoints.to(device), tuple(images.shape[2:]), grid,
                                            radius=radius).cpu()
        wrong = (~correct).nonzero().flatten()
        for found, store, per_ref in ((cells, out.parts, out.ref_parts),
                                      (mask_cells, out.mask_parts, out.ref_mask_parts)):
            if found is None:
                continue
            for pos in correct.nonzero().flatten().tolist():
                per_ref[(0, batch_idx, pos)] = found[pos]
            store.append(found[wrong.cpu()])
        if cells is not None:
            out.label_source = "keypoints" if keypoints is not None else "masks"
        out.feats.append(feats[wrong].float())
        out.true.append(labels[wrong].cpu())
        out.pred.append(pred[wrong].cpu())
        out.position.append(wrong.cpu() + out.num_val)
        out.num_val += b
        out.num_correct += int(correct.sum())
    if bank is None:
        raise ValueError("Expected a validation loader with at least one batch, but it was empty.")
    return out, bank
