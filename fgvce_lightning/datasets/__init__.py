"""Data sets: :class:`SyntheticBirds`, a procedural fine-grained demo shipped with the package, and
:class:`CUB200`, a reader for a local copy of CUB-200-2011 (official layout, part keypoints)."""

from fgvce_lightning.datasets.cub import CUB200, CUB_PART_NAMES, CropGeometry, make_fake_cub

from fgvce_lightning.datasets.synthetic import (
    ATTRIBUTES,
    CLASS_SPECS,
    PART_NAMES,
    Attribute,
    ClassSpec,
    SyntheticBirds,
    class_specs,
    confusable_pairs,
    distinguishing_parts,
    make_dataloaders,
)

__all__ = [
    "CUB200",
    "CUB_PART_NAMES",
    "CropGeometry",
    "make_fake_cub",
    "ATTRIBUTES",
    "CLASS_SPECS",
    "PART_NAMES",
    "Attribute",
    "ClassSpec",
    "SyntheticBirds",
    "class_specs",
    "confusable_pairs",
    "distinguishing_parts",
    "make_dataloaders",
]
