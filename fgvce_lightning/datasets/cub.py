"""CUB-200-2011 reader: images, labels, splits, bounding boxes and part keypoints.

Reads the official folder layout (Wah et al. 2011)::

    CUB_200_2011/
        images.txt               <image_id> <path under images/>
        image_class_labels.txt   <image_id> <class_id>
        train_test_split.txt     <image_id> <is_training_image>
        bounding_boxes.txt       <image_id> <x> <y> <width> <height>    (needed for crop="bbox")
        classes.txt              <class_id> <class_name>                (optional)
        parts/parts.txt          <part_id> <part name>
        parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>
        images/<class folder>/<file>.jpg

All ids are 1-based in the files; labels and part indices are 0-based here.

**Keypoint convention.** Coordinates are pixel-centre coordinates: pixel ``i`` covers
``[i - 0.5, i + 0.5)``, so the pixel under keypoint ``(x, y)`` is ``image[:, round(y), round(x)]``.
The geometric transforms map keypoints exactly as they map pixels: a crop ``(top, left, h, w)``
resized to ``S × S`` sends ``x ↦ (x - left + 0.5)·S/w - 0.5`` (the sampling grid of
``interpolate(align_corners=False)``), and a horizontal flip sends ``x ↦ S - 1 - x``.
(torchvision's ``tv_tensors.KeyPoints`` are not used: older torchvision releases that this package
supports lack them, their resize scales ``x·s`` while their flip uses ``W - 1 - x``, half a pixel
apart, and they cannot swap left/right part ids.) A keypoint is visible in the output when it was
annotated visible and its pixel lies inside the output image. A keypoint cropped away keeps its
projected position, outside ``[-0.5, S - 0.5)`` (as in :class:`SyntheticBirds`); one not annotated
has x = y = 0, as in CUB's own ``part_locs.txt``. Always read the visibility flag.

**Randomness.** ``crop="random"`` and ``hflip=True`` draw from a ``torch.Generator`` seeded from
``(seed, index, epoch)``: the same item is the same every time it is read (in any worker), and
:meth:`CUB200.set_epoch` changes the draw between epochs. With persistent DataLoader workers,
``set_epoch`` in the main process does not reach the workers' copies; recreate the loader instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fgvce_lightning.datasets._cub_files import (
    LAYOUT,
    as_ids,
    class_names,
    left_right_pairs,
    merge_left_right,
    read_named,
    read_part_locs,
    read_per_image,
    resolve_root,
)

__all__ = [
    "CUB200",
    "CropGeometry",
    "make_fake_cub",
    "CUB_PART_NAMES",
    "FAKE_PART_COLOURS",
    "FAKE_BACKGROUND",
    "FAKE_DOT_RADIUS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

CUB_PART_NAMES: tuple[str, ...] = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
    "nape", "right eye", "right leg", "right wing", "tail", "throat")
"""The 15 parts of ``parts/parts.txt``, in file order."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SPLITS = ("train", "test", "all")
_CROPS = ("center", "random", "bbox", None)


# --------------------------------------------------------------------------------- selection

def _chosen_classes(class_subset: Union[int, Sequence[int], None], num: int) -> list[int]:
    if class_subset is None:
        return list(range(num))
    if isinstance(class_subset, int) and not isinstance(class_subset, bool):
        if not 1 <= class_subset <= num:
            raise ValueError(f"Expected `class_subset` between 1 and {num}, but got "
                             f"{class_subset}.")
        return list(range(class_subset))
    chosen = [int(c) for c in class_subset]
    if not chosen or len(set(chosen)) != len(chosen) or min(chosen) < 0 or max(chosen) >= num:
        raise ValueError(f"Expected `class_subset` to be distinct 0-based class indices in "
                         f"[0, {num}), but got {list(class_subset)}.")
    return chosen


def _balanced(rows: np.ndarray, labels: np.ndarray, max_images: Optional[int]) -> np.ndarray:
    """At most ``max_images`` of ``rows``, taken round-robin over their classes."""
    if max_images is None or len(rows) <= max_images:
        return rows
    lab = labels[rows]
    order = np.argsort(lab, kind="stable")
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - np.searchsorted(lab[order], lab[order])  # within class
    return np.sort(rows[np.lexsort((lab, rank))[:max_images]])


# ------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class CropGeometry:
    """Where an item's output pixels come from in its original image.

    Attributes:
        box: ``(top, left, height, width)`` of the crop in original pixels; may extend past the
            image, which is then zero-padded.
        output_size: side ``S`` of the square output.
        flipped: whether the output was mirrored left-right after the resize.
    """

    box: tuple[int, int, int, int]
    output_size: int
    flipped: bool

    def to_output(self, xy: torch.Tensor) -> torch.Tensor:
        """Map original pixel-centre coordinates ``(..., 2)`` (x, y) to output coordinates."""
        top, left, height, width = self.box
        size = self.output_size
        x = (xy[..., 0] - left + 0.5) * (size / width) - 0.5
        y = (xy[..., 1] - top + 0.5) * (size / height) - 0.5
        if self.flipped:
            x = (size - 1) - x
        return torch.stack([x, y], dim=-1)


def _random_square(height: int, width: int, scale: tuple[float, float],
                   generator: torch.Generator) -> tuple[int, int, int, int]:
    area = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item()
    side = max(1, round(min(height, width) * area ** 0.5))
    top = int(torch.randint(0, height - side + 1, (), generator=generator))
    left = int(torch.randint(0, width - side + 1, (), generator=generator))
    return top, left, side, side


def _crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``image[:, top:top+h, left:left+w]`` of a ``(C, H, W)`` image, zero-padded outside it."""
    top, left, height, width = box
    if 0 <= top <= image.shape[-2] - height and 0 <= left <= image.shape[-1] - width:
        return image[:, top:top + height, left:left + width]
    out = image.new_zeros(image.shape[0], height, width)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, image.shape[-2]), min(left + width, image.shape[-1])
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
    return out


def _bbox_square(bbox: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    x, y, w, h = (float(v) for v in bbox)
    side = max(1, round(max(w, h)))
    left = round(x + w / 2 - side / 2)
    top = round(y + h / 2 - side / 2)
    if side <= width:            # shift inside the image where the square fits
        left = min(max(left, 0), width - side)
    if side <= height:
        top = min(max(top, 0), height - side)
    return top, left, side, side


# ------------------------------------------------------------------------------- dataset

class CUB200(Dataset):
    """CUB-200-2011 with labels, part keypoints carried through crop, resize and flip.

    Args:
        root: the ``CUB_200_2011`` folder or its parent.
        split: ``"train"``, ``"test"`` (the official split) or ``"all"``.
        image_size: side ``S`` of the square output images.
        crop: ``"center"`` (largest centred square), ``"random"`` (a random square covering
            ``random_crop_scale`` of the largest square's area; train augmentation), ``"bbox"``
            (the square of side max(w, h) centred on the bird's bounding box, shifted inside the
            image where it fits, else zero-padded) or ``None`` (whole image, aspect not kept).
        hflip: mirror left-right with probability 0.5 (train augmentation). Without merging,
            left/right part ids are swapped so that "left eye" still names a left eye.
        merge_left_right: merge "left X"/"right X" into one part "X" (12 parts for CUB): the merged
            keypoint is the mean of the visible ones, visible when either is.
        normalize: subtract ImageNet mean / divide by std; otherwise values are in ``[0, 1]``.
        seed: seed of the random crop / flip (see the module docstring).
        class_subset: an int ``k`` keeps the first ``k`` classes; a sequence keeps those 0-based
            class indices, in that order. Labels are renumbered ``0..len-1``.
        max_images: keep at most this many images, taken round-robin over classes (balanced).
        random_crop_scale: area range of ``crop="random"``, as fractions of the largest square.

    Items are dicts: ``image`` (3, S, S) float32, ``label`` int64 tensor (0-based), ``keypoints``
    (P, 3) float32 ``(x, y, visible)`` in output pixels, ``index`` int.

    Attributes:
        part_names: names of the P parts, in keypoint order.
        class_names: class names without the ``"001."`` prefix, underscores as spaces.
        num_classes: number of classes after ``class_subset``.
        labels: ``(N,)`` int64 numpy array of item labels.
    """

    def __init__(self, root: Union[str, Path], split: Literal["train", "test", "all"] = "train",
                 image_size: int = 224,
                 crop: Optional[Literal["center", "random", "bbox"]] = "center",
                 hflip: bool = False, merge_left_right: bool = True, normalize: bool = True,
                 seed: int = 0, class_subset: Union[int, Sequence[int], None] = None,
                 max_images: Optional[int] = None,
                 random_crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        if split not in _SPLITS:
            raise ValueError(f"Expected `split` to be one of {_SPLITS}, but got {split!r}.")
        if crop not in _CROPS:
            raise ValueError(f"Expected `crop` to be one of {_CROPS}, but got {crop!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"Expected `image_size` to be a positive int, but got {image_size!r}.")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"Expected `max_images` to be a positive int or None, but got "
                             f"{max_images!r}.")
        lo, hi = random_crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"Expected `random_crop_scale` to be (lo, hi) with 0 < lo <= hi <= 1, "
                             f"but got {random_crop_scale!r}.")
        self.root = resolve_root(root)
        self.split, self.image_size, self.crop = split, image_size, crop
        self.hflip, self.merge_left_right, self.normalize = hflip, merge_left_right, normalize
        self.seed, self.random_crop_scale, self.epoch = int(seed), (lo, hi), 0
        self._load(class_subset, max_images)

    # ---------------------------------------------------------------------- annotations
    def _load(self, class_subset: Union[int, Sequence[int], None],
              max_images: Optional[int]) -> None:
        r = self.root
        image_ids, paths = read_named(r / "images.txt", "<image_id> <relative image path>")
        if len(image_ids) == 0 or len(np.unique(image_ids)) != len(image_ids):
            raise ValueError(f"Expected `{r / 'images.txt'}` to list images with unique ids, but "
                             f"got {len(image_ids)} lines with {len(np.unique(image_ids))} ids.")
        labels_file = r / "image_class_labels.txt"
        class_ids = as_ids(read_per_image(labels_file, image_ids, "<image_id> <class_id>")[:, 0],
                           labels_file, "class id")
        is_train = read_per_image(r / "train_test_split.txt", image_ids,
                                  "<image_id> <is_training_image>")[:, 0]
        if not np.isin(is_train, (0, 1)).all():
            raise ValueError(f"Expected <is_training_image> in `{r / 'train_test_split.txt'}` to "
                             f"be 0 or 1, but got {np.setdiff1d(is_train, (0, 1))[:3].tolist()}.")
        bboxes = np.full((len(image_ids), 4), np.nan)
        if (r / "bounding_boxes.txt").is_file() or self.crop == "bbox":
            bboxes = read_per_image(r / "bounding_boxes.txt", image_ids,
                                    "<image_id> <x> <y> <width> <height>")
            if (bboxes[:, 2:] <= 0).any():
                raise ValueError(f"Expected positive bounding-box widths and heights in "
                                 f"`{r / 'bounding_boxes.txt'}`, but some are <= 0.")
        all_names = class_names(r, class_ids, paths)

        part_ids, part_names = read_named(r / "parts" / "parts.txt", "<part_id> <part name>")
        if len(part_ids) == 0 or not np.array_equal(part_ids, np.arange(1, len(part_ids) + 1)):
            raise ValueError(f"Expected part ids 1..P in order in `{r / 'parts' / 'parts.txt'}`, "
                             f"but got {part_ids.tolist()}.")
        keypoints = read_part_locs(r / "parts" / "part_locs.txt", image_ids, len(part_ids))
        flip_perm = np.arange(len(part_names))
        if self.merge_left_right:
            keypoints, part_names = merge_left_right(keypoints, part_names)
            flip_perm = np.arange(len(part_names))
        else:
            for left, right in left_right_pairs(part_names):
                flip_perm[left], flip_perm[right] = right, left
        self.part_names: tuple[str, ...] = tuple(part_names)
        self._flip_perm = torch.as_tensor(flip_perm)

        chosen = _chosen_classes(class_subset, len(all_names))
        remap = np.full(len(all_names) + 1, -1, dtype=np.int64)
        remap[np.asarray(chosen) + 1] = np.arange(len(chosen))
        labels = remap[class_ids]
        keep = np.ones(len(image_ids), dtype=bool) if self.split == "all" else \
            (is_train == 1) if self.split == "train" else (is_train == 0)
        rows = np.flatnonzero(keep & (labels >= 0))
        rows = _balanced(rows[np.argsort(image_ids[rows], kind="stable")], labels, max_images)
        if len(rows) == 0:
            raise ValueError(f"No images left in split {self.split!r} with class_subset "
                             f"{class_subset!r}; check the split file and `class_subset`.")

        self.class_names: tuple[str, ...] = tuple(all_names[c] for c in chosen)
        self.num_classes = len(chosen)
        self.image_ids = image_ids[rows]
        self.labels = labels[rows]
        self._paths = [paths[i] for i in rows]
        self._bboxes = bboxes[rows]
        self._keypoints = torch.from_numpy(np.ascontiguousarray(keypoints[rows], dtype=np.float32))

    # -------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self._paths)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crop / flip draw (deterministic per ``(seed, index, epoch)``)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        """Path of item ``index``'s original image."""
        return self.root / "images" / self._paths[index]

    def _generator(self, index: int) -> torch.Generator:
        entropy = [self.seed % 2 ** 64, index, self.epoch % 2 ** 64]
        state = np.random.SeedSequence(entropy).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def geometry(self, index: int, height: Optional[int] = None,
                 width: Optional[int] = None) -> CropGeometry:
        """Crop box and flip of item ``index`` (reads the image header when no size is given)."""
        if height is None or width is None:
            with Image.open(self.image_path(index)) as im:
                width, height = im.size
        generator = self._generator(index)
        if self.crop == "center":
            side = min(height, width)
            box = ((height - side) // 2, (width - side) // 2, side, side)
        elif self.crop == "random":
            box = _random_square(height, width, self.random_crop_scale, generator)
        elif self.crop == "bbox":
            box = _bbox_square(self._bboxes[index], height, width)
        else:
            box = (0, 0, height, width)
        flipped = self.hflip and bool(torch.rand((), generator=generator) < 0.5)
        return CropGeometry(box=box, output_size=self.image_size, flipped=flipped)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} out of range for CUB200 of length {len(self)}.")
        index = index % len(self)
        path = self.image_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"Missing image `{path}` (listed in images.txt). {LAYOUT}")
        with Image.open(path) as im:          # CUB holds a few greyscale and CMYK images
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        geo = self.geometry(index, image.shape[-2], image.shape[-1])
        size = self.image_size
        image = _crop(image, geo.box).float()
        image = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=True)[0]
        if geo.flipped:
            image = image.flip(-1)
        image = image.div_(255.0).clamp_(0.0, 1.0)
        if self.normalize:
            image = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / \
                torch.tensor(IMAGENET_STD)[:, None, None]

        keypoints = self._keypoints[index].clone()
        xy = geo.to_output(keypoints[:, :2])
        inside = ((xy >= -0.5) & (xy < size - 0.5)).all(dim=1)
        visible = (keypoints[:, 2] > 0) & inside
        annotated = keypoints[:, 2:] > 0
        keypoints[:, :2] = torch.where(annotated, xy, torch.zeros_like(xy))
        keypoints[:, 2] = visible.float()
        if geo.flipped:
            keypoints = keypoints[self._flip_perm]
        return {"image": image, "label": torch.tensor(int(self.labels[index])),
                "keypoints": keypoints, "index": index}

    def __repr__(self) -> str:
        return (f"CUB200(root='{self.root}', split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, parts={len(self.part_names)}, "
                f"image_size={self.image_size}, crop={self.crop!r}, hflip={self.hflip})")


# ------------------------------------------------------------------------- fake dataset

def _part_colours(num_parts: int) -> torch.Tensor:
    """Distinct saturated colours on the {0, 128, 255}^3 grid, never the grey background."""
    levels = (0, 128, 255)
    grid = [(r, g, b) for r in levels for g in levels for b in levels
            if (r, g, b) != (128, 128, 128)]
    grid.sort(key=lambda c: (-(max(c) - min(c)), c))    # most saturated first
    return torch.tensor(grid[:num_parts], dtype=torch.uint8)


FAKE_PART_COLOURS = _part_colours(len(CUB_PART_NAMES))
"""``(15, 3)`` uint8 colour of each part's dot in :func:`make_fake_cub` images (parts.txt order)."""
FAKE_BACKGROUND = (128, 128, 128)
FAKE_DOT_RADIUS = 3


def make_fake_cub(root: Union[str, Path], num_classes: int = 3, images_per_class: int = 4,
                  image_size: tuple[int, int] = (80, 60), seed: int = 0) -> Path:
    """Write a tiny CUB-200-2011 folder (official layout, real JPEGs) for tests and examples.

    Each image is grey with one ``(2r+1)²`` dot per annotated part, coloured
    ``FAKE_PART_COLOURS[part]``, centred on the part's keypoint; about one part in five is
    annotated invisible (x = y = 0, no dot). Every third image is portrait (width and height
    swapped). Half the images of each class are training images. The bounding box covers the
    middle of the image, so some visible parts fall outside it.

    Args:
        root: folder to create ``CUB_200_2011/`` in.
        num_classes: number of classes.
        images_per_class: images per class.
        image_size: ``(width, height)`` of landscape images; both at least 30.
        seed: seed of the keypoint placement.

    Returns:
        The path of the ``CUB_200_2011`` folder.
    """
    width, height = image_size
    if num_classes < 1 or images_per_class < 1 or min(width, height) < 30:
        raise ValueError(f"Expected num_classes >= 1, images_per_class >= 1 and image sides >= 30, "
                         f"but got {num_classes}, {images_per_class}, {image_size}.")
    out = Path(root) / "CUB_200_2011"
    (out / "parts").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    step, num_parts = 2 * FAKE_DOT_RADIUS + 4, len(CUB_PART_NAMES)
    classes, images, labels, split, boxes, locs = [], [], [], [], [], []
    for c in range(1, num_classes + 1):
        folder = f"{c:03d}.Fake_Bird_{c}"
        classes.append(f"{c} {folder}")
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
        for k in range(images_per_class):
            image_id = len(images) + 1
            w, h = (height, width) if image_id % 3 == 0 else (width, height)
            cols, rows = (w - 2) // step, (h - 2) // step
            if cols * rows < num_parts:
                raise ValueError(f"Expected images large enough for {num_parts} separate dots, "
                                 f"but got image_size={image_size}.")
            cells = torch.randperm(cols * rows, generator=generator)[:num_parts]
            xs = 1 + step // 2 + (cells % cols) * step
            ys = 1 + step // 2 + (cells // cols) * step
            visible = torch.rand(num_parts, generator=generator) > 0.2
            picture = torch.tensor(FAKE_BACKGROUND, dtype=torch.uint8)[:, None, None]
            picture = picture.repeat(1, h, w)
            r = FAKE_DOT_RADIUS
            for p in range(num_parts):
                x, y, v = int(xs[p]), int(ys[p]), bool(visible[p])
                if v:
                    colour = FAKE_PART_COLOURS[p][:, None, None]
                    picture[:, y - r:y + r + 1, x - r:x + r + 1] = colour
                locs.append(f"{image_id} {p + 1} {x if v else 0}.0 {y if v else 0}.0 {int(v)}")
            name = f"{folder}/Fake_Bird_{c}_{k:04d}.jpg"
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(
                out / "images" / name, format="JPEG", quality=95, subsampling=0)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
            boxes.append(f"{image_id} {w * 0.25:.1f} {h * 0.2:.1f} {w * 0.5:.1f} {h * 0.6:.1f}")
    files = {"classes.txt": classes, "images.txt": images, "image_class_labels.txt": labels,
             "train_test_split.txt": split, "bounding_boxes.txt": boxes,
             "parts/parts.txt": [f"{i + 1} {n}" for i, n in enumerate(CUB_PART_NAMES)],
             "parts/part_locs.txt": locs}
    for name, lines in files.items():
        (out / name).write_text("\n".join(lines) + "\n")
    return out
