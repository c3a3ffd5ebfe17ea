"""Issue 6: ``CounterfactualMonitor`` on vision transformers (torchvision + timm ViT, DeiT, Swin).

Small randomly initialised transformers of each family train for two short epochs on tiny planted
images (32×32: a class-coloured square in a random quadrant, in noise; colour, not position,
carries the class, which a transformer with near-zero position embeddings learns in a few steps;
parts come from discovered prototypes); every epoch's report must be valid, its
feature grid must be the patch grid (the last stage's grid for Swin), every edited cell must lie
inside it, and the search must leave the class/distillation tokens — carried as the trailing
``ModelSplit.prefix_channels`` channels of the map — alone (``protected_channels``).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torchvision.models as tvm
from torch.nn import functional as nnf
from torch.utils.data import DataLoader, TensorDataset

import fgvce_lightning.engine.search as engine_search
from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.reporting import validate_report

SIZE, NUM_CLASSES, DIM = 32, 4, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _tv_vit():
    return tvm.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=DIM,
                                 mlp_dim=2 * DIM, num_classes=NUM_CLASSES)


def _timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=DIM, depth=2, num_heads=2,
                             num_classes=NUM_CLASSES, **kwargs)


def _timm_deit():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=SIZE, patch_size=8, embed_dim=DIM, depth=2, num_heads=2,
                                      num_classes=NUM_CLASSES)


def _tv_swin():
    return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=DIM, depths=[2, 2], num_heads=[2, 2],
                               window_size=[2, 2], num_classes=NUM_CLASSES)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=SIZE, patch_size=4, window_size=2, embed_dim=DIM, depths=(2, 2),
                           num_heads=(2, 2), num_classes=NUM_CLASSES)


# (factory, needs timm, grid of the report, prefix channels = prefix tokens x width)
FAMILIES = {
    "torchvision-vit": (_tv_vit, False, [4, 4], DIM),                        # 8x8 patches
    "timm-vit-cls": (_timm_vit, True, [4, 4], DIM),
    "timm-vit-avgpool": (lambda: _timm_vit(class_token=False, global_pool="avg"), True, [4, 4], 0),
    "timm-deit-distilled": (_timm_deit, True, [4, 4], 2 * DIM),             # class + distillation
    "torchvision-swin": (_tv_swin, False, [4, 4], 0),                       # 4x4 patches, merged once
    "timm-swin": (_timm_swin, True, [4, 4], 0),
}


def _planted(n: int, seed: int, noise: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_CLASSES, (n,), generator=g)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g) * noise
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    quadrant = torch.randint(4, (n,), generator=g)
    half = SIZE // 2
    for q in range(4):
        r, c = (q // 2) * half, (q % 2) * half
        rows = quadrant == q
        images[rows, :, r:r + half, c:c + half] += colours[labels[rows]][:, :, None, None]
    return TensorDataset(images, labels)


class _Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nnf.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nnf.cross_entropy(self(batch[0]), batch[1]), batch_size=len(batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_monitor_explains_transformer_on_patch_grid(family, tmp_path, monkeypatch):
    factory, needs_timm, grid, prefix_channels = FAMILIES[family]
    if needs_timm:
        pytest.importorskip("timm")
    seen_configs = []
    search = engine_search.counterfactual_search

    def recording_search(head, queries, true, pred, bank, config=engine_search.SearchConfig(), **kwargs):
        seen_configs.append((config, tuple(queries.shape)))
        return search(head, queries, true, pred, bank, config, **kwargs)

    monkeypatch.setattr(engine_search, "counterfactual_search", recording_search)
    L.seed_everything(0, verbose=False)
    train = DataLoader(_planted(128, 1), batch_size=16, shuffle=True)
    val = DataLoader(_planted(48, 2), batch_size=16)
    monitor = CounterfactualMonitor(max_samples=12, report_dir=tmp_path / "fgvce", report_html=False,
                                    num_parts=4, max_references_per_class=8)
    trainer = L.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_train_batches=8, num_sanity_val_steps=1, default_root_dir=tmp_path)
    trainer.fit(_Classifier(factory()), train, val)

    reports = sorted((tmp_path / "fgvce").glob("epoch_*/report.json"))
    assert [p.parent.name for p in reports] == ["epoch_000", "epoch_001"]
    edited_cells = 0
    for path in reports:
        report = json.loads(path.read_text())
        validate_report(report)
        assert report["feature_grid"] == grid and report["input_size"] == [SIZE, SIZE]
        assert report["failures"] == []
        assert {p["source"] for p in report["parts"]} == {"prototypes"}
        for sample in report["samples"]:
            for edit in sample["edits"]:
                for r, c in edit["query_cells"] + edit["reference"]["cells"]:
                    assert 0 <= r < grid[0] and 0 <= c < grid[1], (family, r, c)
                edited_cells += len(edit["query_cells"])
    assert edited_cells > 0, f"{family}: no edit in two epochs of reports; nothing on the grid was checked"
    # the maps the search saw: patch map (+ prefix tokens as channels) on the patch grid
    assert seen_configs, f"{family}: the search never ran"
    for config, shape in seen_configs:
        assert shape[2:] == tuple(grid)
        assert config.protected_channels == prefix_channels, (
            f"{family}: expected the callback to pass protected_channels=split.prefix_channels "
            f"({prefix_channels}) to the search, but it passed {config.protected_channels}")
        # part prototypes describe cells by their patch channels only, not the prefix tokens
        assert monitor._ctx.prototypes.prototypes.shape[1] == shape[1] - prefix_channels
