"""Data sets shipped with the package: :class:`SyntheticBirds`, a procedural fine-grained demo."""

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
