"""Reporting: TensorBoard panels, images, figures and the on-disk epoch report.

Lightning-free (it knows results and statistics only); TensorBoard writers are duck-typed and
matplotlib is used without ``pyplot``.
"""

from .epoch import EpochResult, ExplainedSample
from .export import edits_csv, report_dict, write_epoch_report
from .figures import confusion_part_heatmap, epoch_figure_images, figure_to_image, part_error_figure
from .html import png_data_uri, render_html
from .images import (contribution_panel, query_panel, reference_panel, sample_panel, sample_panels,
                     trajectory_figure, trajectory_image)
from .scalars import custom_scalars_layout, epoch_scalars, part_tag
from .schema import SCHEMA_VERSION, report_schema, validate_report
from .tensorboard import TensorBoardReporter, markdown_summary

__all__ = [
    "EpochResult", "ExplainedSample", "epoch_scalars", "custom_scalars_layout", "part_tag",
    "query_panel", "contribution_panel", "reference_panel", "trajectory_figure",
    "trajectory_image", "sample_panel", "sample_panels", "figure_to_image", "epoch_figure_images",
    "part_error_figure",
    "confusion_part_heatmap", "TensorBoardReporter", "markdown_summary", "report_dict",
    "report_schema", "validate_report", "write_epoch_report", "edits_csv", "render_html",
    "png_data_uri", "SCHEMA_VERSION",
]
