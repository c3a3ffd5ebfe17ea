"""Tests for ``fgvce_lightning.engine.transformers``: ViT/DeiT/Swin splits reproduce the logits."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from fgvce_lightning.engine.split import ModelSplit, split_model
from fgvce_lightning.engine.transformers import (
    map_to_tokens,
    split_swin_transformer,
    split_transformer,
    split_vision_transformer,
    tokens_to_map,
)


def _tv_vit(num_layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)   # torchvision zero-initialises it: logits would be 0
    return model


def _tv_swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[2, 2], num_classes=5).eval()


def _check(model: nn.Module, split: ModelSplit, x: torch.Tensor) -> torch.Tensor:
    """Exact logits, and the tap (hook) capture during the model's own forward equals F."""
    tapped = []
    handle = split.tap_module.register_forward_hook(
        lambda _m, _i, out: tapped.append(split.features_from_tap(out).detach().clone()))
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        feats = split.features(x)
        logits = split.head(feats)
    assert logits.abs().max() > 1e-3, "degenerate model: constant logits prove nothing"
    assert torch.equal(logits, expected), (logits - expected).abs().max()
    assert len(tapped) == 1 and torch.equal(tapped[0], feats)
    if split.hook_module is not None:
        hooked = []
        handle = split.hook_module.register_forward_hook(lambda _m, _i, out: hooked.append(out.clone()))
        with torch.no_grad():
            model(x)
        handle.remove()
        assert torch.equal(hooked[0], feats)
    return feats


def test_tokens_map_round_trip_and_mean_of_swapped_prefix():
    torch.manual_seed(0)
    tokens = torch.randn(3, 2 + 4 * 5, 6)
    fmap = tokens_to_map(tokens, 2, (4, 5))
    assert fmap.shape == (3, 6 + 12, 4, 5)
    torch.testing.assert_close(fmap[:, :6].flatten(2).transpose(1, 2), tokens[:, 2:], rtol=0, atol=0)
    assert torch.equal(map_to_tokens(fmap, 2), tokens)
    # a whole cell of row 0 swapped from row 1 (prefix channels included): the prefix becomes the
    # mean over the grid, row 1 and 2 are untouched
    edited = fmap.clone()
    edited[0, :, 1, 2] = fmap[1, :, 0, 0]
    back = map_to_tokens(edited, 2)
    torch.testing.assert_close(back[0, :2], (19 * tokens[0, :2] + tokens[1, :2]) / 20)
    assert torch.equal(back[0, 2 + 1 * 5 + 2], tokens[1, 2])
    assert torch.equal(back[1:], tokens[1:])
    assert torch.equal(map_to_tokens(tokens_to_map(tokens[:, 2:], 0, (4, 5)), 0), tokens[:, 2:])


def test_tokens_map_errors():
    with pytest.raises(ValueError, match=r"Expected 1 prefix tokens plus a 4x4 patch grid \(17 tokens\), but got 16"):
        tokens_to_map(torch.zeros(1, 16, 8), 1, (4, 4))
    with pytest.raises(ValueError, match=r"\(1 \+ 2\) \* D channels.*got 10"):
        map_to_tokens(torch.zeros(1, 10, 2, 2), 2)


@pytest.mark.parametrize("blocks_in_head", [0, 1, 2])
def test_torchvision_vit_exact_for_every_k(blocks_in_head):
    model = _tv_vit()
    split = split_vision_transformer(model, blocks_in_head=blocks_in_head)
    feats = _check(model, split, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32 + 32, 4, 4)          # 32x32 image, 8x8 patches: 4x4 grid
    assert split.prefix_channels == 32 and split.hook_module is None


def test_torchvision_vit_patch_cells_are_patch_tokens():
    model = _tv_vit()
    split = split_model(model)
    x = torch.randn(1, 3, 32, 32)
    tokens = []
    handle = model.encoder.layers[0].register_forward_hook(lambda _m, _i, out: tokens.append(out))
    with torch.no_grad():
        model(x)
        feats = split.features(x)
    handle.remove()
    # cell (i, j) is patch token 1 + i * 4 + j; the class token is in the prefix channels
    assert torch.equal(feats[0, :32, 2, 3], tokens[0][0, 1 + 2 * 4 + 3])
    assert torch.equal(feats[0, 32:, 1, 1], tokens[0][0, 0])


def test_vit_edit_of_spatial_channels_keeps_the_query_class_token():
    """Swapping only a cell's patch channels equals running the last block on edited tokens."""
    model = _tv_vit()
    split = split_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = split.features(x)
        edited = feats.clone()
        edited[0, :32, 1, 2] = feats[1, :32, 3, 0]              # spatial channels only
        logits = split.head(edited)
        tokens = []
        handle = model.encoder.layers[0].register_forward_hook(lambda _m, _i, out: tokens.append(out))
        model(x)
        handle.remove()
        seq = tokens[0].clone()
        seq[0, 1 + 1 * 4 + 2] = tokens[0][1, 1 + 3 * 4 + 0]
        expected = model.heads(model.encoder.ln(model.encoder.layers[1](seq))[:, 0])
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits[0], model(x)[0])


def test_split_model_dispatches_transformers_and_wrappers():
    vit = _tv_vit()
    assert split_model(vit).description.startswith("torchvision VisionTransformer")
    last = split_model(vit, at="last")
    assert "final norm" in last.description

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

    wrapped = Wrapper(vit)
    split = split_model(wrapped)
    assert "`model`" in split.description
    _check(wrapped, split, torch.randn(1, 3, 32, 32))
    assert split_transformer(nn.Linear(2, 2)) is None


def test_transformer_errors():
    with pytest.raises(ValueError, match=r"`blocks_in_head` to be an integer in \[0, 2\].*got 3"):
        split_vision_transformer(_tv_vit(), blocks_in_head=3)
    with pytest.raises(TypeError, match="Expected a torchvision or timm VisionTransformer"):
        split_vision_transformer(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="Expected a torchvision or timm SwinTransformer"):
        split_swin_transformer(_tv_vit())
    with pytest.raises(ValueError, match=r"\[0, 4\].*got -1"):
        split_swin_transformer(_tv_swin(), blocks_in_head=-1)


@pytest.mark.parametrize("blocks_in_head", [0, 1, 3])
def test_torchvision_swin_exact(blocks_in_head):
    model = _tv_swin()
    split = split_swin_transformer(model, blocks_in_head=blocks_in_head)
    x = torch.randn(2, 3, 32, 32)
    feats = _check(model, split, x)
    # 32x32 / patch 4 = 8x8 tokens of 16 channels; the last stage merges them to 4x4x32
    expected_shape = {0: (2, 32, 4, 4), 1: (2, 32, 4, 4), 3: (2, 16, 8, 8)}[blocks_in_head]
    assert feats.shape == expected_shape
    assert split.prefix_channels == 0
    assert (split.hook_module is model.permute) == (blocks_in_head == 0)


def test_swin_default_split_and_features_are_nchw():
    model = _tv_swin()
    split = split_model(model)
    x = torch.randn(1, 3, 32, 32)
    nhwc = []
    handle = model.features[3][0].register_forward_hook(lambda _m, _i, out: nhwc.append(out))
    with torch.no_grad():
        model(x)
        feats = split.features(x)
    handle.remove()
    assert torch.equal(feats, nhwc[0].permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------

def _timm_vit(**kwargs) -> nn.Module:
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    return timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=5, **kwargs).eval()


@pytest.mark.parametrize("kwargs, num_prefix", [
    ({}, 1),                                                   # class token
    ({"global_pool": "avg", "class_token": False}, 0),        # no prefix token
    ({"global_pool": "avg"}, 1),                               # class token, average pooling
    ({"reg_tokens": 2}, 3),                                    # class + register tokens
])
@pytest.mark.parametrize("at", ["penultimate", "last"])
def test_timm_vit_exact(kwargs, num_prefix, at):
    model = _timm_vit(**kwargs)
    split = split_model(model, at=at)
    assert split.description.startswith("timm VisionTransformer")
    feats = _check(model, split, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32 * (1 + num_prefix), 4, 4)
    assert split.prefix_channels == 32 * num_prefix


def test_timm_vit_blocks_in_head_configurable():
    model = _timm_vit()
    x = torch.randn(1, 3, 32, 32)
    maps = [_check(model, split_vision_transformer(model, blocks_in_head=k), x) for k in (0, 1, 2)]
    assert not torch.equal(maps[1], maps[2])


def test_timm_deit_distilled_exact():
    deit = pytest.importorskip("timm.models.deit")
    torch.manual_seed(0)
    model = deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                            num_heads=2, num_classes=5).eval()
    split = split_model(model)
    feats = _check(model, split, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32 * 3, 4, 4) and split.prefix_channels == 64   # class + dist token


@pytest.mark.parametrize("blocks_in_head", [0, 1, 2])
def test_timm_swin_exact(blocks_in_head):
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    model = swin.SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2),
                                 num_heads=(2, 2), window_size=2, num_classes=5).eval()
    split = split_model(model) if blocks_in_head == 1 else split_swin_transformer(model, blocks_in_head)
    feats = _check(model, split, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32, 4, 4)
    assert split.description.startswith("timm SwinTransformer")
