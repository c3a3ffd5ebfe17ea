"""Parsing of the CUB-200-2011 annotation files (private helpers of :mod:`.cub`).

Every table is read once, vectorised with NumPy's C parser (``part_locs.txt`` of the real dataset
has 176,820 lines); a file that does not parse is scanned again only to name the first bad line.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence, Union

import numpy as np

__all__ = [
    "LAYOUT",
    "resolve_root",
    "read_numbers",
    "read_named",
    "read_per_image",
    "read_part_locs",
    "as_ids",
    "class_names",
    "left_right_pairs",
    "merge_left_right",
]

LAYOUT = (
    "Expected the official CUB-200-2011 layout: a folder `CUB_200_2011/` holding images.txt, "
    "image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, (optional) classes.txt, "
    "parts/parts.txt, parts/part_locs.txt and images/; pass that folder or its parent as `root`.")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing CUB-200-2011 file `{path}`. {LAYOUT}")
    return path


def _bad_line(path: Path, lines: list[tuple[int, str]], ncols: int, form: str) -> ValueError:
    for number, line in lines:
        fields = line.split()
        try:
            good = len(fields) == ncols and bool(np.isfinite([float(f) for f in fields]).all())
        except ValueError:
            good = False
        if not good:
            return ValueError(
                f"Malformed line {number} in `{path}`: {line.strip()!r}. Expected `{form}` "
                f"({ncols} numbers separated by spaces). Restore the file from the official "
                "archive.")
    return ValueError(f"Could not parse `{path}`; expected lines `{form}`.")


def read_numbers(path: Path, ncols: int, form: str) -> np.ndarray:
    """Parse a whitespace-separated numeric table with NumPy's C parser; ``(n, ncols)`` float64."""
    text = _require(path).read_text()
    if not text.strip():
        raise ValueError(f"Expected lines `{form}` in `{path}`, but the file is empty. Restore it "
                         "from the official archive.")
    try:
        values = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2, comments=None)
    except ValueError:
        values = None
    if values is None or values.shape[1:] != (ncols,) or not np.isfinite(values).all():
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        raise _bad_line(path, lines, ncols, form)
    return values


def read_named(path: Path, form: str) -> tuple[np.ndarray, list[str]]:
    """Parse ``<id> <text possibly with spaces>`` lines; returns ids (n,) int64 and texts."""
    ids, texts = [], []
    for number, line in enumerate(_require(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"Malformed line {number} in `{path}`: {line.strip()!r}. Expected "
                             f"`{form}`. Restore the file from the official archive.")
        ids.append(int(fields[0]))
        texts.append(fields[1].strip())
    return np.asarray(ids, dtype=np.int64), texts


def as_ids(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Check that ``values`` (from ``path``) are 1-based integer ids; returns them as int64."""
    bad = (values != np.round(values)) | (values < 1)
    if bad.any():
        raise ValueError(f"Expected every {what} in `{path}` to be a positive integer (ids are "
                         f"1-based), but got {values[bad][:3].tolist()}.")
    return values.astype(np.int64)


def resolve_root(root: Union[str, Path]) -> Path:
    """The folder holding images.txt: ``root`` itself or ``root/CUB_200_2011``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CUB-200-2011 root `{root}` does not exist or is not a folder. "
                                f"{LAYOUT}")
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise FileNotFoundError(f"Missing CUB-200-2011 file `{root / 'images.txt'}` (also looked in "
                            f"`{root / 'CUB_200_2011'}`). {LAYOUT}")


def read_per_image(path: Path, image_ids: np.ndarray, form: str) -> np.ndarray:
    """Read ``<image_id> <values...>`` lines into ``(n, columns - 1)`` rows in images.txt order."""
    table = read_numbers(path, len(form.split()), form)
    ids = as_ids(table[:, 0], path, "image id")
    if len(ids) != len(image_ids) or len(np.unique(ids)) != len(ids) or \
            not np.array_equal(np.sort(ids), np.sort(image_ids)):
        missing = np.setdiff1d(image_ids, ids)[:5].tolist()
        extra = np.setdiff1d(ids, image_ids)[:5].tolist()
        raise ValueError(
            f"Expected `{path}` to list every image id of images.txt exactly once, but got "
            f"{len(ids)} lines ({len(np.unique(ids))} distinct ids); missing ids {missing}, "
            f"unknown ids {extra}. The annotation files come from different copies of the dataset.")
    order = np.argsort(image_ids)
    out = np.empty((len(ids), table.shape[1] - 1))
    out[order[np.searchsorted(image_ids[order], ids)]] = table[:, 1:]
    return out


def read_part_locs(path: Path, image_ids: np.ndarray, num_parts: int) -> np.ndarray:
    """``(n, P, 3)`` float32 keypoints (x, y, visible) in images.txt order; invisible: x=y=0."""
    table = read_numbers(path, 5, "<image_id> <part_id> <x> <y> <visible>")
    ids = as_ids(table[:, 0], path, "image id")
    parts = as_ids(table[:, 1], path, "part id")
    if parts.max(initial=1) > num_parts:
        raise ValueError(f"Part id {int(parts.max())} in `{path}` is out of range: "
                         f"parts/parts.txt lists {num_parts} parts (ids 1..{num_parts}).")
    if not np.isin(table[:, 4], (0, 1)).all():
        raise ValueError(f"Expected <visible> in `{path}` to be 0 or 1, but got "
                         f"{np.setdiff1d(table[:, 4], (0, 1))[:3].tolist()}.")
    order = np.argsort(image_ids)
    pos = np.minimum(np.searchsorted(image_ids[order], ids), len(order) - 1)
    known = image_ids[order][pos] == ids
    if not known.all():
        raise ValueError(f"Unknown image ids in `{path}` (not in images.txt): "
                         f"{np.unique(ids[~known])[:5].tolist()}.")
    key = order[pos] * num_parts + (parts - 1)
    if np.bincount(key, minlength=1).max() > 1:
        raise ValueError(f"Expected each (image id, part id) at most once in `{path}`, but "
                         f"some pairs repeat.")
    keypoints = np.zeros((len(image_ids) * num_parts, 3), dtype=np.float32)
    keypoints[key] = table[:, 2:5]                # missing pairs stay invisible
    keypoints[keypoints[:, 2] == 0, :2] = 0.0
    return keypoints.reshape(len(image_ids), num_parts, 3)


def class_names(root: Path, class_ids: np.ndarray, paths: list[str]) -> list[str]:
    """Names from classes.txt (else the image folders), without "001." and with spaces."""
    num = int(class_ids.max())
    if (root / "classes.txt").is_file():
        ids, names = read_named(root / "classes.txt", "<class_id> <class_name>")
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)) or num > len(ids):
            raise ValueError(f"Expected class ids 1..K in order in `{root / 'classes.txt'}` "
                             f"covering class id {num} of image_class_labels.txt, but got ids "
                             f"{ids[:5].tolist()}... ({len(ids)} classes).")
    else:
        names = [f"{k:03d}" for k in range(1, num + 1)]
        for k, p in zip(class_ids, paths):
            names[k - 1] = p.split("/", 1)[0] if "/" in p else names[k - 1]
    names = [n.split(".", 1)[1] if "." in n and n.split(".", 1)[0].isdigit() else n for n in names]
    return [n.replace("_", " ") for n in names]


def left_right_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs ``(left X, right X)`` among part names."""
    index = {name: i for i, name in enumerate(names)}
    return [(i, index["right " + name[5:]]) for i, name in enumerate(names)
            if name.startswith("left ") and "right " + name[5:] in index]


def merge_left_right(keypoints: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Merge each "left X"/"right X" pair into "X" at the first one's place.

    The merged keypoint is the mean of the pair's visible keypoints, visible when either is.
    ``keypoints`` (n, P, 3) -> (n, P', 3).
    """
    partner = {}
    for left, right in left_right_pairs(names):
        partner[left], partner[right] = right, left
    merged_names, groups = [], []
    for i, name in enumerate(names):
        if partner.get(i, i) >= i:
            merged_names.append(name.split(" ", 1)[1] if i in partner else name)
            groups.append(sorted({i, partner.get(i, i)}))
    xy, vis = keypoints[..., :2], keypoints[..., 2:]
    merged = np.zeros((len(keypoints), len(groups), 3), dtype=np.float32)
    for j, group in enumerate(groups):    # loop over parts, vectorised over images
        count = vis[:, group].sum(1)
        merged[:, j, :2] = (xy[:, group] * vis[:, group]).sum(1) / np.maximum(count, 1)
        merged[:, j, 2] = count[:, 0] > 0
    return merged, merged_names
