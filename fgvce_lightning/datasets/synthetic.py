"""``SyntheticBirds``: a procedurally generated fine-grained data set with part annotations.

Every image shows one "bird" built from parts (:data:`PART_NAMES`) in a random pose, on a
cluttered background, sometimes half hidden behind a leaf, with sensor noise. The species
(classes) differ in a few small parts only: class ``k``'s binary code picks, part by part, one of
two variants (bill colour and length, wing bar, tail fork, crest, eye colour, breast colour, leg
colour; see :data:`ATTRIBUTES`). Classes whose codes differ in one bit are *confusable pairs*:
they differ in exactly one part, which :func:`distinguishing_parts` names — so a counterfactual
explanation of a mistake between them should edit that part.

Each variant is drawn with per-sample jitter (``attribute_noise``) so that neighbouring species
overlap a little and a small CNN makes genuine mistakes. Pose, clutter, colours and noise are
drawn from a per-sample random stream seeded by ``(seed, split, index)`` independently of the
class, so :meth:`SyntheticBirds.render` can draw the very same scene for any class.

Nothing is downloaded; a few thousand 64×64 images take a few seconds on a laptop CPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fgvce_lightning.datasets._render import (CONTEXT_ID, HEAD_COLOUR, PART_NAMES, TAIL_COLOUR, WING_COLOUR,
                                              render_birds)

__all__ = [
    "PART_NAMES",
    "ATTRIBUTES",
    "Attribute",
    "ClassSpec",
    "CLASS_SPECS",
    "class_specs",
    "distinguishing_parts",
    "confusable_pairs",
    "SyntheticBirds",
    "make_dataloaders",
]


@dataclass(frozen=True)
class Attribute:
    """A two-variant trait that lives on one part.

    Attributes:
        part: the part it changes (one of :data:`PART_NAMES`).
        description: what changes.
        variants: the adjective for variant 0 and variant 1 (used in class names).
    """

    part: str
    description: str
    variants: tuple[str, str]


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("beak", "bill colour and length", ("yellow-billed", "red-billed")),
    Attribute("wing", "pale wing bar", ("plain-winged", "bar-winged")),
    Attribute("tail", "forked tail", ("round-tailed", "fork-tailed")),
    Attribute("head", "crest", ("smooth-headed", "crested")),
    Attribute("eye", "eye colour", ("dark-eyed", "red-eyed")),
    Attribute("body", "breast colour", ("buff", "grey")),
    Attribute("legs", "leg colour", ("pale-legged", "black-legged")),
)
"""Bit ``a`` of a class index selects the variant of ``ATTRIBUTES[a]``."""

MAX_CLASSES = 2 ** len(ATTRIBUTES)


@dataclass(frozen=True)
class ClassSpec:
    """One synthetic species.

    Attributes:
        index: class id.
        name: readable name, e.g. ``"yellow-billed bar-winged round-tailed finch"``.
        variants: the variant (0 or 1) of every attribute in :data:`ATTRIBUTES` order.
        num_varying: how many leading attributes vary among the species of this problem.
    """

    index: int
    name: str
    variants: tuple[int, ...]
    num_varying: int

    @property
    def traits(self) -> dict[str, str]:
        """Part name → adjective of this species' variant (only the attributes that vary)."""
        return {a.part: a.variants[v] for a, v in zip(ATTRIBUTES[:self.num_varying], self.variants)}


def _num_used_attributes(num_classes: int) -> int:
    return max(1, math.ceil(math.log2(max(num_classes, 2))))


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"Expected `num_classes` to be an integer in [2, {MAX_CLASSES}], but got "
                         f"{num_classes!r}. Each class is a combination of {len(ATTRIBUTES)} two-variant "
                         "part attributes.")


def class_specs(num_classes: int = 8) -> tuple[ClassSpec, ...]:
    """The species of a ``num_classes``-way problem (class ``k``'s variants = the bits of ``k``).

    Only the first ``ceil(log2(num_classes))`` attributes vary; the others stay at variant 0.
    """
    _check_num_classes(num_classes)
    used = _num_used_attributes(num_classes)
    specs = []
    for k in range(num_classes):
        variants = tuple((k >> a) & 1 for a in range(len(ATTRIBUTES)))
        name = " ".join(ATTRIBUTES[a].variants[variants[a]] for a in range(used)) + " finch"
        specs.append(ClassSpec(index=k, name=name, variants=variants, num_varying=used))
    return tuple(specs)


CLASS_SPECS: tuple[ClassSpec, ...] = class_specs(8)
"""The species of the default 8-class problem."""


def _check_class(value: Any, name: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CLASSES:
        raise ValueError(f"Expected `{name}` to be a class index in [0, {MAX_CLASSES}), but got {value!r}.")
    return value


def distinguishing_parts(true: int | Tensor, pred: int | Tensor) -> set[str]:
    """Parts whose variant differs between two species: where an explanation should edit.

    Args:
        true: a class index.
        pred: another class index.

    Returns:
        The part names (subset of :data:`PART_NAMES`); empty when ``true == pred``.
    """
    diff = _check_class(true, "true") ^ _check_class(pred, "pred")
    return {a.part for i, a in enumerate(ATTRIBUTES) if (diff >> i) & 1}


def confusable_pairs(num_classes: int = 8) -> list[tuple[int, int]]:
    """All ``(a, b)`` with ``a < b < num_classes`` whose species differ in exactly one part."""
    _check_num_classes(num_classes)
    return [(a, a | (1 << i)) for a in range(num_classes) for i in range(len(ATTRIBUTES))
            if not (a >> i) & 1 and (a | (1 << i)) < num_classes]


_SPLITS = {"train": 1, "val": 2, "test": 3}
_MASK64 = (1 << 64) - 1
_NUM_CLUTTER = 6
_NUM_UNIFORMS = 41 + 9 * _NUM_CLUTTER + 9 + 3


def _sample_seed(seed: int, split: int, index: int) -> int:
    """SplitMix64 of ``(seed, split, index)``: independent streams for every sample."""
    x = (seed * 0x9E3779B97F4A7C15 + split * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Render on one intra-op thread: the elementwise ops are memory bound, and two threads on a
    busy 2-core machine are several times slower than one. Restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SyntheticBirds(Dataset):
    """Procedural fine-grained "bird species" with keypoints and part masks.

    Items are dicts (the default ``DataLoader`` collate stacks them):

    - ``"image"``: ``(3, S, S)`` float32 in [0, 1];
    - ``"label"``: int64 scalar tensor;
    - ``"keypoints"``: ``(P, 3)`` float32 ``(x, y, visible)`` in input pixels (pixel ``(i, j)`` has
      its centre at ``x = j, y = i``); a visible keypoint's rounded position lies in its part's mask;
      an invisible one keeps its projected position;
    - ``"masks"``: ``(P, S, S)`` bool, the *visible* pixels of each part (disjoint);
    - ``"index"``: int64 scalar tensor, the item's index.

    Args:
        num_samples: number of items.
        num_classes: number of species, in [2, 128].
        image_size: ``S``, at least 32.
        seed: data seed; with ``split`` and the index it fixes every item.
        split: ``"train"``, ``"val"`` or ``"test"`` (independent streams).
        attribute_noise: per-sample jitter of every trait, in units of the gap between its two
            variants; higher means more overlap between neighbouring species (harder).
        noise_std: pixel noise standard deviation (scaled per sample by 0.5–1.5).
        clutter_prob: probability of each of the 6 background blobs.
        occluder_prob: probability of a leaf in front of the bird.
        cache: render everything once at construction (fast epochs) instead of on every access.
        chunk_size: samples rendered per vectorised call.
    """

    def __init__(self, num_samples: int, num_classes: int = 8, image_size: int = 64, seed: int = 0,
                 split: str = "train", *, attribute_noise: float = 0.15, noise_std: float = 0.05,
                 clutter_prob: float = 0.4, occluder_prob: float = 0.15, cache: bool = True,
                 chunk_size: int = 256) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"Expected `num_samples` to be a non-negative integer, but got {num_samples!r}.")
        _check_num_classes(num_classes)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"Expected `image_size` to be an integer >= 32 (smaller birds lose their "
                             f"parts), but got {image_size!r}.")
        if split not in _SPLITS:
            raise ValueError(f"Expected `split` to be one of {sorted(_SPLITS)}, but got {split!r}.")
        for name, value, hi in (("attribute_noise", attribute_noise, math.inf), ("noise_std", noise_std, math.inf),
                                ("clutter_prob", clutter_prob, 1.0), ("occluder_prob", occluder_prob, 1.0)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= hi:
                raise ValueError(f"Expected `{name}` to be a number in [0, {hi}], but got {value!r}.")
        if chunk_size < 1:
            raise ValueError(f"Expected `chunk_size` to be a positive integer, but got {chunk_size!r}.")
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.seed, self.split = int(seed), split
        self.attribute_noise, self.noise_std = float(attribute_noise), float(noise_std)
        self.clutter_prob, self.occluder_prob = float(clutter_prob), float(occluder_prob)
        self.chunk_size = chunk_size
        self.class_specs = class_specs(num_classes)
        self._levels = torch.tensor([s.variants for s in self.class_specs], dtype=torch.float32)
        self._cache: dict[str, Tensor] | None = None
        if cache:
            parts = [self.render(range(i, min(i + chunk_size, num_samples)))
                     for i in range(0, num_samples, chunk_size)]
            self._cache = ({k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts
                           else self.render([]))

    part_names: tuple[str, ...] = PART_NAMES

    @property
    def class_names(self) -> list[str]:
        """Readable species names, indexed by class."""
        return [s.name for s in self.class_specs]

    def distinguishing_parts(self, true: int | Tensor, pred: int | Tensor) -> set[str]:
        """See :func:`distinguishing_parts`; checks that both classes exist in this data set."""
        for name, c in (("true", true), ("pred", pred)):
            if _check_class(c, name) >= self.num_classes:
                raise ValueError(f"Expected `{name}` to be a class index in [0, {self.num_classes}), but got {c!r}.")
        return distinguishing_parts(true, pred)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"Index {index} out of range for a data set of {self.num_samples} samples.")
        if self._cache is not None:
            return {k: v[index] for k, v in self._cache.items()}
        return {k: v[0] for k, v in self.render([index]).items()}

    def render(self, indices: Iterable[int], labels: Sequence[int] | Tensor | None = None, *,
               exact_parts: Iterable[str] = (), clutter: bool = True, occluder: bool = True,
               context: bool = False) -> dict[str, Tensor]:
        """Render items as a batch, optionally forcing their classes or taking parts of the scene
        away: the counterfactual images that say what caused a mistake.

        The pose, background, clutter, colour jitter, trait jitter and noise of item ``i`` depend
        only on ``(seed, split, i)``; ``labels`` only changes the species' traits. Rendering the
        same index with two classes therefore changes only the pixels of the parts that
        :func:`distinguishing_parts` names. Likewise ``exact_parts`` draws those parts' traits at
        their species' exact variant (no ``attribute_noise``), and ``clutter=False`` /
        ``occluder=False`` leave the background blobs / the leaf out, everything else unchanged.

        Args:
            indices: item indices (any non-negative integers).
            labels: classes to draw instead of the items' own (same length as ``indices``).
            exact_parts: parts (of :data:`PART_NAMES`) whose trait is drawn without jitter.
            clutter: draw the background blobs.
            occluder: draw the occluding leaf.
            context: also return ``"context"`` ``(N, S, S)`` bool, the visible pixels of the
                blobs and the leaf (the scenery that is not the bird and not the branch).

        Returns:
            A batch dict like a collated ``DataLoader`` batch (``image``, ``label``, ``keypoints``,
            ``masks``, ``index``, and ``context`` when asked for), with ``N = len(indices)``.
        """
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise ValueError(f"Expected non-negative `indices`, but got {indices}.")
        exact = tuple(exact_parts)
        unknown = sorted(set(exact) - {a.part for a in ATTRIBUTES})
        if unknown:
            raise ValueError(f"Expected `exact_parts` among the parts with a trait "
                             f"{[a.part for a in ATTRIBUTES]}, but got {unknown}.")
        p, own_labels = self._sample_params(indices, labels, exact=exact)
        if not clutter:
            p["clutter"][..., 8] = 0.0
        if not occluder:
            p["occluder"][:, 8] = 0.0
        n, s, parts = len(indices), self.image_size, len(PART_NAMES)
        if n == 0:
            out = {"image": torch.zeros(0, 3, s, s), "label": torch.zeros(0, dtype=torch.int64),
                   "keypoints": torch.zeros(0, parts, 3), "masks": torch.zeros(0, parts, s, s, dtype=torch.bool),
                   "index": torch.zeros(0, dtype=torch.int64)}
            if context:
                out["context"] = torch.zeros(0, s, s, dtype=torch.bool)
            return out
        with _single_thread():
            image, part_ids, anchors = render_birds(p, s)
        masks = part_ids[:, None] == torch.arange(parts)[None, :, None, None]
        keypoints = _snap_keypoints(anchors, masks, radius=0.25 * p["scale"])
        out = {"image": image, "label": own_labels, "keypoints": keypoints, "masks": masks,
               "index": torch.tensor(indices, dtype=torch.int64)}
        if context:
            out["context"] = part_ids == CONTEXT_ID
        return out

    def _sample_params(self, indices: list[int], labels: Sequence[int] | Tensor | None,
                       exact: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], Tensor]:
        """Draw every random quantity of the items from their own streams (fixed draw counts)."""
        n, s, split = len(indices), self.image_size, _SPLITS[self.split]
        uni = torch.empty(n, _NUM_UNIFORMS)
        gauss = torch.empty(n, len(ATTRIBUTES))
        noise = torch.empty(n, 3, s, s)
        g = torch.Generator()
        for row, index in enumerate(indices):   # per-sample streams: item i never depends on the batch
            g.manual_seed(_sample_seed(self.seed, split, index))
            uni[row] = torch.rand(_NUM_UNIFORMS, generator=g)
            gauss[row] = torch.randn(len(ATTRIBUTES), generator=g)
            noise[row] = torch.randn(3, s, s, generator=g)
        own = (uni[:, 0] * self.num_classes).long().clamp_max(self.num_classes - 1)
        if labels is None:
            drawn = own
        else:
            drawn = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
            if drawn.numel() != n or (n and (drawn.min() < 0 or drawn.max() >= self.num_classes)):
                raise ValueError(f"Expected `labels` to hold {n} class indices in [0, {self.num_classes}), "
                                 f"but got {labels!r}.")
        it = iter(range(1, _NUM_UNIFORMS))

        def take(lo: float, hi: float, k: int = 0) -> Tensor:
            cols = [next(it) for _ in range(max(k, 1))]
            out = lo + (hi - lo) * uni[:, cols]
            return out if k else out[:, 0]

        deg = math.pi / 180.0
        p: dict[str, Tensor] = {
            "cx": take(0.44, 0.56) * (s - 1), "cy": take(0.42, 0.52) * (s - 1), "scale": take(0.30, 0.37) * s,
            "angle": take(-20 * deg, 20 * deg), "flip": torch.where(take(0, 1) < 0.5, -1.0, 1.0),
            "body_a": take(0.46, 0.54), "body_b": take(0.27, 0.33),
            "head_du": take(-0.04, 0.04), "head_dv": take(-0.04, 0.04), "head_r": take(0.19, 0.24),
            "beak_scale": take(0.85, 1.15), "wing_du": take(-0.04, 0.04), "wing_dv": take(-0.03, 0.03),
            "wing_angle": take(-0.25, 0.05), "leg_dx": take(-0.05, 0.05), "tail_spread": take(-0.04, 0.06),
            "body_jitter": take(-0.07, 0.07, 3),
            "head_colour": torch.tensor(HEAD_COLOUR) + take(-0.08, 0.08, 3),
            "wing_colour": torch.tensor(WING_COLOUR) + take(-0.07, 0.07, 3),
            "tail_colour": torch.tensor(TAIL_COLOUR) + take(-0.07, 0.07, 3),
            "bg0": take(0.15, 0.85, 3), "bg1": take(0.15, 0.85, 3), "bg_dir": take(0, 2 * math.pi),
            "branch_angle": take(-0.35, 0.35), "branch_width": take(0.03, 0.06),
            "branch_colour": torch.tensor([0.25, 0.18, 0.10]) + take(0.0, 0.2, 3),
        }
        clutter = take(0.0, 1.0, 9 * _NUM_CLUTTER).reshape(n, _NUM_CLUTTER, 9)
        clutter[..., 2] = 0.05 + 0.15 * clutter[..., 2]           # semi-axes, image fractions
        clutter[..., 3] = 0.03 + 0.09 * clutter[..., 3]
        clutter[..., 4] *= math.pi
        clutter[..., 8] = (clutter[..., 8] < self.clutter_prob).float()
        p["clutter"] = clutter
        occ = take(0.0, 1.0, 9)
        occ[:, 0] = p["cx"] / (s - 1) + 0.5 * (occ[:, 0] - 0.5)  # near the bird
        occ[:, 1] = p["cy"] / (s - 1) + 0.5 * (occ[:, 1] - 0.5)
        occ[:, 2] = 0.07 + 0.08 * occ[:, 2]
        occ[:, 3] = 0.04 + 0.05 * occ[:, 3]
        occ[:, 4] *= math.pi
        occ[:, 5:8] = torch.tensor([0.15, 0.35, 0.10]) + 0.3 * occ[:, 5:8]   # leafy greens
        occ[:, 8] = (occ[:, 8] < self.occluder_prob).float()
        p["occluder"] = occ
        p["brightness"], p["contrast"] = take(-0.08, 0.08), take(0.8, 1.15)
        p["noise_std"] = self.noise_std * take(0.5, 1.5)
        p["noise"] = noise
        jitter = torch.tensor([0.0 if a.part in exact else 1.0 for a in ATTRIBUTES])
        p["t"] = self._levels[drawn] + self.attribute_noise * gauss * jitter
        return p, drawn


def _snap_keypoints(anchors: Tensor, masks: Tensor, radius: Tensor) -> Tensor:
    """Keypoints ``(N, P, 3)`` from part anchors ``(N, P, 2)`` and visible masks ``(N, P, S, S)``.

    An anchor whose pixel lies in its mask is kept; otherwise it moves to the nearest mask pixel
    within ``radius`` ``(N,)`` pixels; with none there, the part is marked invisible.
    """
    s = masks.shape[-1]
    coords = torch.arange(s, dtype=torch.float32)
    ax, ay = anchors[..., 0], anchors[..., 1]
    d2 = (coords[None, None, None, :] - ax[..., None, None]) ** 2 + (coords[None, None, :, None] - ay[..., None, None]) ** 2
    d2 = d2.masked_fill(~masks, math.inf).flatten(2)
    best, flat = d2.min(dim=2)
    snapped = torch.stack([(flat % s).float(), (flat // s).float()], dim=-1)
    ix, iy = ax.round().long(), ay.round().long()
    inside = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
    on_mask = torch.zeros_like(inside)
    if inside.any():
        nn_, pp = torch.nonzero(inside, as_tuple=True)
        on_mask[nn_, pp] = masks[nn_, pp, iy[nn_, pp], ix[nn_, pp]]
    visible = on_mask | (best <= radius[:, None] ** 2)
    xy = torch.where(on_mask[..., None] | ~visible[..., None], anchors, snapped)
    return torch.cat([xy, visible[..., None].float()], dim=-1)


def make_dataloaders(num_train: int, num_val: int, batch_size: int = 64, seed: int = 0, num_workers: int = 0,
                     **dataset_kwargs: Any) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over :class:`SyntheticBirds`.

    The train loader shuffles with a generator seeded by ``seed``; the validation loader does not
    shuffle, so ``dataset index = batch_idx * batch_size + position`` (what the epoch report uses).

    Args:
        num_train: training items.
        num_val: validation items.
        batch_size: items per batch.
        seed: data seed (the two splits use independent streams of it).
        num_workers: ``DataLoader`` worker processes.
        **dataset_kwargs: forwarded to :class:`SyntheticBirds` (``num_classes``, ``image_size``,
            ``attribute_noise``, …).

    Returns:
        ``(train_loader, val_loader)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
    train = SyntheticBirds(num_train, seed=seed, split="train", **dataset_kwargs)
    val = SyntheticBirds(num_val, seed=seed, split="val", **dataset_kwargs)
    generator = torch.Generator().manual_seed(int(seed))
    common = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    return (DataLoader(train, shuffle=True, generator=generator, **common),
            DataLoader(val, shuffle=False, **common))
