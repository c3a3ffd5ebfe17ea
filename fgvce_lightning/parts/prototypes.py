"""Discovered parts: cosine k-means over the reference bank's cells, stable across epochs.

With no part annotations, every feature-grid cell is labelled by its nearest *part prototype*:
the ``K`` centroids of a cosine k-means over the cells of the correctly classified reference
samples. The prototypes are refitted every explained epoch, warm-started from last epoch's, so
that "part 3" keeps meaning the same thing while the features drift. One cluster may be flagged
as background (the one whose cells have the lowest mean activation norm). A person names the parts
from strips of their most typical image patches (:meth:`PartPrototypes.patch_strip`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .types import PartInfo

__all__ = ["PartPrototypes"]

_EPS = 1e-8


class PartPrototypes:
    """Cosine k-means part prototypes with warm start, names and typical patches.

    Args:
        num_parts: number of clusters ``K`` (the background cluster included when ``background``).
        background: flag the cluster with the lowest mean activation norm as ``"background"``.
        seed: seed of the module's own ``torch.Generator`` (initialisation and subsampling are
            deterministic given the seed and the data; the global RNG is never touched).
        iterations: Lloyd iterations per fit.
        max_cells: most cells used per fit; more are subsampled (deterministically).
        device: where the clustering runs; ``None`` = the device of the cells given.

    Example::

        protos = PartPrototypes(num_parts=6)
        protos.update(bank_feats)            # (n, C, H, W) or (M, C) cells, once per epoch
        ids = protos.assign(query_feats)     # (N, H, W) part ids
        protos.set_names({2: "beak"})
    """

    def __init__(self, num_parts: int = 8, background: bool = True, seed: int = 0,
                 iterations: int = 20, max_cells: Optional[int] = 65536,
                 device: Optional[torch.device | str] = None) -> None:
        if not isinstance(num_parts, int) or isinstance(num_parts, bool) or num_parts < 1:
            raise ValueError(f"Expected `num_parts` to be a positive integer, but got {num_parts!r}.")
        if background and num_parts < 2:
            raise ValueError("Expected `num_parts` >= 2 when `background=True` (one cluster is the "
                             f"background), but got {num_parts}. Raise `num_parts` or pass "
                             "`background=False`.")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"Expected `iterations` to be a positive integer, but got {iterations!r}.")
        if max_cells is not None and (not isinstance(max_cells, int) or max_cells < num_parts):
            raise ValueError(f"Expected `max_cells` to be None or an integer >= num_parts "
                             f"({num_parts}), but got {max_cells!r}.")
        self.num_parts = num_parts
        self.background = bool(background)
        self.seed = int(seed)
        self.iterations = iterations
        self.max_cells = max_cells
        self.device = torch.device(device) if device is not None else None
        self.prototypes: Optional[torch.Tensor] = None   # (K, C), unit norm
        self.background_index: Optional[int] = None
        self.num_fits = 0
        self._names: dict[int, str] = {}
        self._generator = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ naming
    @property
    def fitted(self) -> bool:
        """Whether prototypes exist (after the first :meth:`fit`/:meth:`update`)."""
        return self.prototypes is not None

    @property
    def names(self) -> list[str]:
        """Part names by id: user-given, else ``"background"`` for the flagged cluster, else
        ``"part k"``."""
        out = []
        for k in range(self.num_parts):
            if k in self._names:
                out.append(self._names[k])
            elif self.background and k == self.background_index:
                out.append("background")
            else:
                out.append(f"part {k}")
        return out

    def set_names(self, names: Mapping[int, str] | Sequence[str]) -> None:
        """Name parts, e.g. ``set_names({3: "beak"})`` or a full list of ``num_parts`` names."""
        items = names.items() if isinstance(names, Mapping) else enumerate(names)
        new = {}
        for k, name in items:
            if not isinstance(k, int) or not 0 <= k < self.num_parts:
                raise ValueError(f"Expected part ids in [0, {self.num_parts}), but got {k!r}.")
            if not isinstance(name, str) or not name:
                raise ValueError(f"Expected part {k}'s name to be a non-empty string, but got {name!r}.")
            new[k] = name
        self._names.update(new)
        if len(set(self.names)) != self.num_parts:
            raise ValueError(f"Expected distinct part names, but got {self.names}. Part statistics "
                             "are keyed by name; give each part its own.")

    def parts(self) -> tuple[PartInfo, ...]:
        """The parts as :class:`PartInfo` (``source="prototypes"``)."""
        return tuple(PartInfo(id=k, name=n, source="prototypes") for k, n in enumerate(self.names))

    # ------------------------------------------------------------------ clustering
    def _cells(self, cells: torch.Tensor) -> torch.Tensor:
        if not isinstance(cells, torch.Tensor):
            raise TypeError(f"Expected `cells` to be a torch.Tensor, but got {type(cells).__name__}.")
        if cells.dim() == 4:   # feature maps (n, C, H, W) -> cells (n·H·W, C)
            cells = cells.permute(0, 2, 3, 1).reshape(-1, cells.shape[1])
        if cells.dim() != 2:
            raise ValueError(f"Expected `cells` of shape (M, C) or feature maps (n, C, H, W), but "
                             f"got {tuple(cells.shape)}.")
        cells = cells.detach()
        if self.device is not None:
            cells = cells.to(self.device)
        cells = cells.float()
        cells = cells[torch.isfinite(cells).all(dim=1)]
        if cells.shape[0] < self.num_parts:
            raise ValueError(f"Expected at least `num_parts`={self.num_parts} finite cells to cluster, "
                             f"but got {cells.shape[0]}. Collect more reference samples first.")
        if self.max_cells is not None and cells.shape[0] > self.max_cells:
            keep = torch.randperm(cells.shape[0], generator=self._generator)[:self.max_cells]
            cells = cells[keep.sort().values.to(cells.device)]
        return cells

    def _init_plus_plus(self, x: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding with cosine distance, drawn from the module's generator."""
        m = x.shape[0]
        first = int(torch.randint(m, (1,), generator=self._generator))
        centers = [x[first]]
        dist = (1.0 - x @ x[first]).clamp_min(0.0)
        for _ in range(1, self.num_parts):
            weights = dist.double().cpu()
            if float(weights.sum()) <= 0:   # all points identical to a centre: take any unused one
                weights = torch.ones(m, dtype=torch.double)
            idx = int(torch.multinomial(weights, 1, generator=self._generator))
            centers.append(x[idx])
            dist = torch.minimum(dist, (1.0 - x @ x[idx]).clamp_min(0.0))
        return torch.stack(centers)

    def fit(self, cells: torch.Tensor, init: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cosine k-means on ``cells``.

        Args:
            cells: ``(M, C)`` cell features, or feature maps ``(n, C, H, W)`` (all their cells).
            init: ``(K, C)`` starting prototypes (warm start); ``None`` = k-means++ seeding.

        Returns:
            ``(K, C)`` unit-norm prototypes (also stored in ``self.prototypes``).
        """
        raw = self._cells(cells)
        x = F.normalize(raw, dim=1, eps=_EPS)
        k = self.num_parts
        if init is None:
            centers = self._init_plus_plus(x)
        else:
            if init.shape != (k, x.shape[1]):
                raise ValueError(f"Expected `init` of shape ({k}, {x.shape[1]}), but got "
                                 f"{tuple(init.shape)}. The feature width changed? Call `reset()`.")
            centers = F.normalize(init.to(x.device, torch.float32), dim=1, eps=_EPS)
        for _ in range(self.iterations):
            onehot = F.one_hot((x @ centers.T).argmax(dim=1), k).to(x.dtype)   # (M, K)
            sums = onehot.T @ x                  # per-cluster sums as a matmul (fast everywhere)
            counts = onehot.sum(dim=0)
            empty = counts == 0
            if bool(empty.any()):
                # Re-seed empty clusters at the points farthest from their centres (deterministic).
                best = (x @ centers.T).max(dim=1).values
                far = best.argsort()[: int(empty.sum())]
                sums[empty] = x[far]
            new = F.normalize(sums, dim=1, eps=_EPS)
            converged = torch.allclose(new, centers, atol=1e-6)
            centers = new
            if converged:
                break
        labels = (x @ centers.T).argmax(dim=1)
        self.prototypes = centers
        if self.background:
            onehot = F.one_hot(labels, k).to(x.dtype)
            counts = onehot.sum(dim=0)
            mean_norm = (onehot.T @ raw.norm(dim=1)) / counts.clamp_min(1)
            mean_norm[counts == 0] = float("inf")
            self.background_index = int(mean_norm.argmin())
        self.num_fits += 1
        return centers

    def update(self, bank_cells: torch.Tensor) -> torch.Tensor:
        """Refit on this epoch's bank cells, warm-started from the current prototypes.

        Warm start keeps ids stable: each prototype moves to the centre of the cells nearest to it,
        so "part k" follows its cells as features drift instead of being relabelled.
        """
        init = self.prototypes if self.fitted else None
        if init is not None and init.shape[1] != self._feature_width(bank_cells):
            init = None   # feature width changed (new split): start over
        return self.fit(bank_cells, init=init)

    @staticmethod
    def _feature_width(cells: torch.Tensor) -> int:
        return int(cells.shape[1])

    def similarities(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every cell to every prototype: ``(N, C, H, W)`` → ``(N, K, H, W)``."""
        if not self.fitted:
            raise RuntimeError("The part prototypes are not fitted yet. Call `update(bank_cells)` "
                               "(or `fit`) first.")
        if not isinstance(feature_maps, torch.Tensor) or feature_maps.dim() != 4:
            raise ValueError("Expected `feature_maps` of shape (N, C, H, W), but got "
                             f"{tuple(getattr(feature_maps, 'shape', ())) or type(feature_maps).__name__}.")
        if feature_maps.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"Expected feature maps with {self.prototypes.shape[1]} channels (as the "
                             f"prototypes), but got {feature_maps.shape[1]}.")
        x = F.normalize(feature_maps.detach().float(), dim=1, eps=_EPS)
        protos = self.prototypes.to(x.device)
        return torch.einsum("nchw,kc->nkhw", x, protos)

    def assign(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Part id of every cell: ``(N, C, H, W)`` → ``(N, H, W)`` int64 (nearest prototype)."""
        return self.similarities(feature_maps).argmax(dim=1)

    # ------------------------------------------------------------------ typical patches
    def _typical(self, feature_maps: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per part, the images and cells of its ``k`` most typical patches (one similarity pass
        over all parts): ``(K, t)`` image indices, flat cell indices and whether each is valid
        (a part with fewer images than ``t = min(k, N)`` has invalid entries last)."""
        sims = self.similarities(feature_maps)                          # (N, K, H, W)
        n, kk, gh, gw = sims.shape
        own = sims.argmax(dim=1, keepdim=True) == torch.arange(kk, device=sims.device).view(1, kk, 1, 1)
        scored = sims.masked_fill(~own, float("-inf")).reshape(n, kk, gh * gw)
        best, where = scored.max(dim=2)                                 # per image and part
        top_val, top_img = best.T.topk(min(k, n), dim=1)                # (K, t)
        return top_img, where.T.gather(1, top_img), torch.isfinite(top_val)

    def typical_patches(self, feature_maps: torch.Tensor, k: int = 8
                        ) -> list[list[tuple[int, tuple[int, int]]]]:
        """The most typical patches of each part: at most one cell per image, most similar first.

        One similarity pass over all parts (``O(N K H W C)``), whatever the number of parts.

        Args:
            feature_maps: ``(N, C, H, W)`` (e.g. the bank's feature maps).
            k: most patches per part.

        Returns:
            per part, a list of ``(index into feature_maps, (row, col))`` of cells assigned to the
            part, ranked by their similarity to its prototype.
        """
        gw = feature_maps.shape[-1]
        imgs, cells, valid = (t.tolist() for t in self._typical(feature_maps, k))
        return [[(i, (c // gw, c % gw)) for i, c, good in zip(img, cell, ok) if good]
                for img, cell, ok in zip(imgs, cells, valid)]

    def patch_strips(self, feature_maps: torch.Tensor, thumbnails: torch.Tensor, k: int = 8,
                     size: int = 48, context: float = 0.5, padding: int = 2,
                     parts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Strips of every part's ``k`` most typical image patches, for TensorBoard.

        The patches of all parts are found in one pass (:meth:`typical_patches`) and cropped and
        resized together (bilinear, as ``F.interpolate`` resizes each crop): the work grows
        linearly with the number of parts.

        Args:
            feature_maps: ``(N, C, H, W)``.
            thumbnails: ``(N, 3, h, w)`` images of the same samples (uint8, or float in [0, 1]).
            k: patches per strip.
            size: side of each patch in the strip, in pixels.
            context: extra margin around the cell, as a fraction of the cell size on each side.
            padding: pixels between patches.
            parts: the part ids to draw (default: all, in id order).

        Returns:
            ``(P, 3, size + 2 * padding, k * (size + padding) + padding)`` uint8 strips (white
            padding, grey tiles where a part has fewer than ``k`` patches).
        """
        chosen = list(range(self.num_parts)) if parts is None else [int(p) for p in parts]
        for part in chosen:
            if not 0 <= part < self.num_parts:
                raise ValueError(f"Expected part ids in [0, {self.num_parts}), but got {part}.")
        if thumbnails.dim() != 4 or thumbnails.shape[0] != feature_maps.shape[0] or thumbnails.shape[1] != 3:
            raise ValueError(f"Expected `thumbnails` of shape ({feature_maps.shape[0]}, 3, h, w) to "
                             f"match the feature maps, but got {tuple(thumbnails.shape)}.")
        gh, gw = feature_maps.shape[-2:]
        imgs, cells, valid = (t[chosen].cpu() for t in self._typical(feature_maps, k))
        images = thumbnails.float() / 255.0 if not thumbnails.is_floating_point() else thumbnails.float()
        images = images.cpu()
        h, w = images.shape[-2:]
        rows, cols = (cells // gw).double(), (cells % gw).double()
        top = ((rows - context) * h / gh).long().clamp(0, h - 1)
        bottom = torch.maximum(top + 1, ((rows + 1 + context) * h / gh).round().long().clamp(max=h))
        left = ((cols - context) * w / gw).long().clamp(0, w - 1)
        right = torch.maximum(left + 1, ((cols + 1 + context) * w / gw).round().long().clamp(max=w))
        tiles = torch.full((len(chosen), imgs.shape[1], 3, size, size), 0.5)
        if bool(valid.any()):
            tiles[valid] = _resized_crops(images, imgs[valid], top[valid], bottom[valid],
                                          left[valid], right[valid], size)
        if tiles.shape[1] < k:                                    # fewer images than patches
            grey = torch.full((len(chosen), k - tiles.shape[1], 3, size, size), 0.5)
            tiles = torch.cat([tiles, grey], 1)
        strips = torch.ones(len(chosen), 3, size + 2 * padding, k * (size + padding) + padding)
        body = strips[:, :, padding:padding + size, padding:].unflatten(3, (k, size + padding))
        body[..., :size] = tiles.clamp(0, 1).permute(0, 2, 3, 1, 4)
        return (strips * 255).round().to(torch.uint8)

    def patch_strip(self, part: int, feature_maps: torch.Tensor, thumbnails: torch.Tensor,
                    k: int = 8, size: int = 48, context: float = 0.5, padding: int = 2) -> torch.Tensor:
        """One part's strip of :meth:`patch_strips`: ``(3, h', w')`` uint8 (``k`` tiles; grey
        tiles where the part has fewer patches)."""
        if not 0 <= part < self.num_parts:
            raise ValueError(f"Expected `part` in [0, {self.num_parts}), but got {part}.")
        return self.patch_strips(feature_maps, thumbnails, k=k, size=size, context=context,
                                 padding=padding, parts=[part])[0]

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the prototypes (names are kept) and restart the generator from the seed."""
        self.prototypes = None
        self.background_index = None
        self.num_fits = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Prototypes, background flag, names and generator state (CPU tensors)."""
        return {
            "num_parts": self.num_parts,
            "background": self.background,
            "seed": self.seed,
            "prototypes": None if self.prototypes is None else self.prototypes.detach().cpu().clone(),
            "background_index": self.background_index,
            "names": dict(self._names),
            "num_fits": self.num_fits,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults (old checkpoints load)."""
        num_parts = state.get("num_parts", self.num_parts)
        if num_parts != self.num_parts:
            raise ValueError(f"Expected a state with num_parts={self.num_parts}, but got {num_parts}. "
                             "Construct PartPrototypes with the checkpoint's `num_parts`.")
        protos = state.get("prototypes")
        self.prototypes = None if protos is None else protos.float().to(self.device or "cpu")
        self.background_index = state.get("background_index")
        self._names = {int(k): str(v) for k, v in state.get("names", {}).items()}
        self.num_fits = int(state.get("num_fits", 0))
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])


_CROP_CHUNK = 512     # tiles cropped together by :func:`_resized_crops`


def _resized_crops(images: torch.Tensor, index: torch.Tensor, top: torch.Tensor,
                   bottom: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   size: int) -> torch.Tensor:
    """Crops ``images[index[m], :, top[m]:bottom[m], left[m]:right[m]]`` resized to ``size`` x
    ``size``, a chunk of tiles at a time (four gathers and a blend), with the sampling of
    ``F.interpolate(mode="bilinear", align_corners=False)`` on each crop (never reading outside
    it).

    Args:
        images: ``(N, 3, h, w)`` float images.
        index: ``(M,)`` image of each crop; ``top``/``bottom``/``left``/``right``: ``(M,)`` bounds.
        size: side of the output tiles.

    Returns:
        ``(M, 3, size, size)`` tiles.
    """
    def taps(start: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = stop - start
        pos = ((torch.arange(size, dtype=torch.float32) + 0.5)[None] * (length[:, None] / size)
               - 0.5).clamp_min(0)
        low = pos.floor().long()
        frac = pos - low
        last = (length - 1)[:, None]
        return start[:, None] + low.minimum(last), start[:, None] + (low + 1).minimum(last), frac

    y0, y1, fy = taps(top, bottom)                                       # (M, size)
    x0, x1, fx = taps(left, right)
    out = torch.empty(index.shape[0], images.shape[1], size, size, dtype=images.dtype)
    for lo in range(0, index.shape[0], _CROP_CHUNK):    # (bounded memory: a chunk of tiles at once)
        sl = slice(lo, lo + _CROP_CHUNK)
        img = index[sl, None, None]

        def at(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:     # (m, size, size, C)
            return images[img, :, ys[sl, :, None], xs[sl, None, :]]

        wy, wx = fy[sl, :, None, None], fx[sl, None, :, None]
        top_row = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
        bottom_row = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
        out[sl] = (top_row * (1 - wy) + bottom_row * wy).permute(0, 3, 1, 2)
    return out
