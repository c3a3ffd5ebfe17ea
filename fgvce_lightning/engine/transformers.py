"""Split vision transformers (torchvision and timm ViT, DeiT, Swin) into features and head.

The split point is after block ``L - k`` (``k = blocks_in_head``, default 1), so the head keeps
``k`` transformer blocks and stays non-linear; ``k = 0`` splits after the final norm.

**Swin** (torchvision ``SwinTransformer``, timm ``SwinTransformer``): the tokens already live on a
grid, ``(N, H, W, C)``; ``features`` permutes them to ``F (N, C, H, W)`` and ``head`` permutes
back. ``k`` counts Swin blocks from the end (a patch-merging layer between them joins the head).

**ViT / DeiT** (torchvision ``VisionTransformer``, timm ``VisionTransformer`` and
``VisionTransformerDistilled``): after block ``L - k`` the sequence is ``P`` prefix tokens
(class, register and distillation tokens) followed by ``h*w`` patch tokens. The patch tokens
become the map ``(N, D, h, w)`` on the patch grid. The prefix tokens are per-image state, not
spatial evidence, but the head needs them. They travel *inside* ``F`` as extra channels:

    F = cat([patch map (N, D, h, w), prefix tokens broadcast over the grid (N, P*D, h, w)], dim=1)

and :attr:`ModelSplit.prefix_channels` ``= P*D`` tells the engine which trailing channels they are.
The head reads the prefix tokens from the map, per row: when the prefix channels are the same in
every cell (always true for ``features(x)``, and for edits that leave those channels alone — what
an engine honouring ``prefix_channels`` does), it uses them as they are, so
``head(features(x)) == model(x)`` exactly and an edited map keeps the query's own class token.
When whole cells were swapped (prefix channels included) it uses their mean over the grid: the
image summary moves towards the references in proportion to the swapped cells. Either way the
engine can treat ``F`` as a plain ``(N, C, h, w)`` map whose cells can be swapped. Models without
prefix tokens (``class_token=False`` with average pooling) have ``prefix_channels = 0``.

``hook_module`` is ``None`` for these splits except where a module outputs ``F`` itself (torchvision
Swin with ``k = 0``); ``tap_module`` + ``tap_transform`` capture ``F`` from the block before the
split (tokens -> map) during the model's own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .model_split import ModelSplit, _CheckedFeatures, _Pipeline

__all__ = [
    "split_transformer",
    "split_vision_transformer",
    "split_swin_transformer",
    "tokens_to_map",
    "map_to_tokens",
]


def tokens_to_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Pack a token sequence into a feature map with broadcast prefix channels.

    Args:
        tokens: ``(N, P + h*w, D)`` with the ``P = num_prefix`` prefix tokens first.
        num_prefix: number of prefix tokens ``P``.
        grid: the patch grid ``(h, w)``.

    Returns:
        ``(N, D + P*D, h, w)``: the patch map, then the prefix tokens repeated in every cell.
    """
    n, length, dim = tokens.shape
    h, w = grid
    if length != num_prefix + h * w:
        raise ValueError(f"Expected {num_prefix} prefix tokens plus a {h}x{w} patch grid "
                         f"({num_prefix + h * w} tokens), but got {length} tokens.")
    patches = tokens[:, num_prefix:].transpose(1, 2).reshape(n, dim, h, w)
    if num_prefix == 0:
        return patches.contiguous()
    prefix = tokens[:, :num_prefix].reshape(n, num_prefix * dim, 1, 1).expand(-1, -1, h, w)
    return torch.cat([patches, prefix], dim=1)


def map_to_tokens(features: Tensor, num_prefix: int) -> Tensor:
    """Inverse of :func:`tokens_to_map`: ``(N, D + P*D, h, w) -> (N, P + h*w, D)``.

    A row whose prefix channels are equal in every cell gives those prefix tokens exactly; a row
    whose cells differ there (cells swapped from other images) gives their mean over the grid.
    """
    n, channels, h, w = features.shape
    if channels % (num_prefix + 1):
        raise ValueError(f"Expected the feature map to have (1 + {num_prefix}) * D channels (patch "
                         f"map + {num_prefix} prefix tokens), but got {channels} channels.")
    dim = channels // (num_prefix + 1)
    patches = features[:, :dim].flatten(2).transpose(1, 2)
    if num_prefix == 0:
        return patches
    prefix_map = features[:, dim:].flatten(2)                     # (N, P*D, h*w)
    first = prefix_map[:, :, :1]
    uniform = (prefix_map == first).all(dim=2).all(dim=1)         # (N,)
    prefix = torch.where(uniform[:, None], first[:, :, 0], prefix_map.mean(dim=2))
    return torch.cat([prefix.reshape(n, num_prefix, dim), patches], dim=1)


def _check_k(blocks_in_head: int, num_blocks: int, family: str) -> None:
    if not isinstance(blocks_in_head, int) or not 0 <= blocks_in_head <= num_blocks:
        raise ValueError(f"Expected `blocks_in_head` to be an integer in [0, {num_blocks}] for this "
                         f"{family} with {num_blocks} blocks, but got {blocks_in_head!r}.")


# --------------------------------------------------------------------------------------------
# ViT / DeiT
# --------------------------------------------------------------------------------------------

def split_vision_transformer(model: nn.Module, blocks_in_head: int = 1) -> ModelSplit:
    """Split a torchvision or timm ViT/DeiT after block ``L - blocks_in_head``.

    Args:
        model: ``torchvision.models.VisionTransformer`` or timm ``VisionTransformer`` (also
            ``VisionTransformerDistilled``).
        blocks_in_head: transformer blocks kept in the head; ``0`` splits after the final norm.

    Returns:
        A :class:`ModelSplit` with ``F (N, D * (1 + P), h, w)`` on the patch grid and
        ``prefix_channels = P * D`` (see the module docstring).
    """
    tv_vit = _torchvision_class("vision_transformer", "VisionTransformer")
    if tv_vit is not None and isinstance(model, tv_vit):
        return _split_torchvision_vit(model, blocks_in_head)
    timm_vit = _timm_class("vision_transformer", "VisionTransformer")
    if timm_vit is not None and isinstance(model, timm_vit):
        return _split_timm_vit(model, blocks_in_head)
    raise TypeError(f"Expected a torchvision or timm VisionTransformer, but got "
                    f"{type(model).__name__}. Use `split_model`, which knows more models.")


def _split_torchvision_vit(model: nn.Module, k: int) -> ModelSplit:
    layers = model.encoder.layers
    num_blocks = len(layers)
    _check_k(k, num_blocks, "VisionTransformer")
    cut = num_blocks - k
    grid = (model.image_size // model.patch_size,) * 2
    num_prefix = 1

    def features(x: Tensor) -> Tensor:
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = model.encoder.dropout(tokens + model.encoder.pos_embedding)
        tokens = layers[:cut](tokens)
        if k == 0:
            tokens = model.encoder.ln(tokens)
        return tokens_to_map(tokens, num_prefix, (x.shape[-2] // model.patch_size,
                                                  x.shape[-1] // model.patch_size))

    def head(feature_map: Tensor) -> Tensor:
        tokens = map_to_tokens(feature_map, num_prefix)
        if k > 0:
            tokens = model.encoder.ln(layers[cut:](tokens))
        return model.heads(tokens[:, 0])

    tap = model.encoder.ln if k == 0 else (layers[cut - 1] if cut > 0 else model.encoder.dropout)
    description = (f"torchvision VisionTransformer: features = patch tokens after encoder block "
                   f"{cut}/{num_blocks}{' and the final norm' if k == 0 else ''} on the "
                   f"{grid[0]}x{grid[1]} patch grid + class token as {model.hidden_dim} prefix "
                   f"channels; head = {k} block(s) + norm + class token -> heads")
    return ModelSplit(_CheckedFeatures(features, description), head, None, description,
                      tap_module=tap, tap_transform=_TokensToMap(num_prefix, grid),
                      prefix_channels=num_prefix * model.hidden_dim)


def _split_timm_vit(model: nn.Module, k: int) -> ModelSplit:
    blocks = model.blocks
    num_blocks = len(blocks)
    _check_k(k, num_blocks, "timm VisionTransformer")
    cut = num_blocks - k
    num_prefix = int(model.num_prefix_tokens)
    dynamic = bool(getattr(model, "dynamic_img_size", False))

    def features(x: Tensor) -> Tensor:
        tokens = model.patch_embed(x)
        if tokens.dim() == 4:                       # dynamic image size: (N, h, w, D)
            grid = (tokens.shape[1], tokens.shape[2])
        else:
            grid = tuple(model.patch_embed.grid_size)
            if grid[0] * grid[1] != tokens.shape[1] and hasattr(model.patch_embed, "dynamic_feat_size"):
                grid = tuple(model.patch_embed.dynamic_feat_size(x.shape[-2:]))
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))
        tokens = blocks[:cut](tokens)
        if k == 0:
            tokens = model.norm(tokens)
        return tokens_to_map(tokens, num_prefix, grid)

    def head(feature_map: Tensor) -> Tensor:
        tokens = map_to_tokens(feature_map, num_prefix)
        if k > 0:
            tokens = model.norm(blocks[cut:](tokens))
        return model.forward_head(tokens)

    tap: Optional[nn.Module] = None
    transform = None
    if not dynamic:
        tap = model.norm if k == 0 else (blocks[cut - 1] if cut > 0 else model.norm_pre)
        transform = _TokensToMap(num_prefix, tuple(model.patch_embed.grid_size))
    name = type(model).__name__
    description = (f"timm {name}: features = patch tokens after block {cut}/{num_blocks}"
                   f"{' and the final norm' if k == 0 else ''} on the patch grid + {num_prefix} "
                   f"prefix token(s) as {num_prefix * model.embed_dim} prefix channels; head = "
                   f"{k} block(s) + norm + forward_head")
    return ModelSplit(_CheckedFeatures(features, description), head, None, description,
                      tap_module=tap, tap_transform=transform,
                      prefix_channels=num_prefix * int(model.embed_dim))


class _TokensToMap:
    """``tap_transform`` for ViTs: block output tokens -> ``F``."""

    def __init__(self, num_prefix: int, grid: tuple[int, int]) -> None:
        self.num_prefix, self.grid = num_prefix, grid

    def __call__(self, tokens: Tensor) -> Tensor:
        return tokens_to_map(tokens, self.num_prefix, self.grid)


# --------------------------------------------------------------------------------------------
# Swin
# --------------------------------------------------------------------------------------------

def _nhwc_to_nchw(x: Tensor) -> Tensor:
    # a view in channels-last memory format: copying would change the head's float rounding
    return x.permute(0, 3, 1, 2)


def _nchw_to_nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def split_swin_transformer(model: nn.Module, blocks_in_head: int = 1) -> ModelSplit:
    """Split a torchvision or timm Swin transformer ``blocks_in_head`` Swin blocks before the end.

    Args:
        model: ``torchvision.models.SwinTransformer`` or timm ``SwinTransformer``.
        blocks_in_head: Swin blocks kept in the head; ``0`` splits after the final norm.

    Returns:
        A :class:`ModelSplit` with ``F (N, C, H, W)`` (the channels-last tokens permuted).
    """
    tv_swin = _torchvision_class("swin_transformer", "SwinTransformer")
    timm_swin = _timm_class("swin_transformer", "SwinTransformer")
    if tv_swin is not None and isinstance(model, tv_swin):
        from torchvision.models.swin_transformer import SwinTransformerBlock

        steps: list[tuple[str, nn.Module]] = []
        for name, child in model.features.named_children():
            if isinstance(child, nn.Sequential) and len(child) > 0 and all(
                    isinstance(b, SwinTransformerBlock) for b in child):
                steps += [(f"features.{name}.{j}", b) for j, b in child.named_children()]
            else:
                steps.append((f"features.{name}", child))
        is_block = [isinstance(m, SwinTransformerBlock) for _, m in steps]
        last_steps = [("norm", model.norm)]
        tail = [("permute", model.permute), ("avgpool", model.avgpool),
                ("flatten", model.flatten), ("head", model.head)]
        family = "torchvision SwinTransformer"
    elif timm_swin is not None and isinstance(model, timm_swin):
        steps = [("patch_embed", model.patch_embed)]
        for i, stage in enumerate(model.layers):
            steps.append((f"layers.{i}.downsample", stage.downsample))
            steps += [(f"layers.{i}.blocks.{j}", b) for j, b in stage.blocks.named_children()]
        is_block = [".blocks." in name for name, _ in steps]
        last_steps = [("norm", model.norm)]
        tail = [("forward_head", model.forward_head)]
        family = "timm SwinTransformer"
    else:
        raise TypeError(f"Expected a torchvision or timm SwinTransformer, but got "
                        f"{type(model).__name__}. Use `split_model`, which knows more models.")

    block_idx = [i for i, b in enumerate(is_block) if b]
    _check_k(blocks_in_head, len(block_idx), family)
    if blocks_in_head == 0:
        feat_steps, head_steps = steps + last_steps, []
    else:
        cut = block_idx[-blocks_in_head]
        feat_steps, head_steps = steps[:cut], steps[cut:] + last_steps
    if not feat_steps:
        raise ValueError(f"Expected at least one step before the split of this {family}, but "
                         f"`blocks_in_head={blocks_in_head}` leaves none. Use a smaller value.")
    tv_last = blocks_in_head == 0 and family.startswith("torchvision")
    if tv_last:  # model.permute outputs F itself: an exact hook module
        features = _Pipeline(feat_steps + [("permute", model.permute)])
        head = _Pipeline(tail[1:])
        hook, tap, transform = model.permute, model.permute, None
    else:
        features = _Pipeline(feat_steps + [("to_nchw", _nhwc_to_nchw)])
        head_tail = tail if family.startswith("timm") else [("to_nchw", _nhwc_to_nchw)] + tail[1:]
        head = _Pipeline([("to_nhwc", _nchw_to_nhwc)] + head_steps + head_tail)
        hook, tap, transform = None, feat_steps[-1][1], _nhwc_to_nchw
    description = (f"{family}: features = {feat_steps[0][0]} .. {feat_steps[-1][0]} "
                   f"(channels-last tokens permuted to (N, C, H, W)); head = {head}")
    return ModelSplit(_CheckedFeatures(features, description), head, hook, description,
                      tap_module=tap, tap_transform=transform)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

def split_transformer(model: nn.Module, blocks_in_head: int = 1) -> Optional[ModelSplit]:
    """Split ``model`` if it is a known vision transformer, else return ``None``.

    Used by :func:`fgvce_lightning.engine.split.split_model` (``at="penultimate"`` is
    ``blocks_in_head=1``, ``at="last"`` is ``0``).
    """
    for module, name, fn in (("vision_transformer", "VisionTransformer", split_vision_transformer),
                             ("swin_transformer", "SwinTransformer", split_swin_transformer)):
        for cls in (_torchvision_class(module, name), _timm_class(module, name)):
            if cls is not None and isinstance(model, cls):
                return fn(model, blocks_in_head)
    return None


def _torchvision_class(module: str, name: str) -> Optional[type]:
    try:
        import importlib

        return getattr(importlib.import_module(f"torchvision.models.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _timm_class(module: str, name: str) -> Optional[type]:
    """A timm class, only if timm is already imported (a timm model exists only then)."""
    import sys

    mod = sys.modules.get(f"timm.models.{module}")
    return getattr(mod, name, None) if mod is not None else None

