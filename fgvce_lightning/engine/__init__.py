"""The pure-torch FG-VCE engine: model split, reference bank, local Shapley contributions,
saliency partition and the batched counterfactual searches. No Lightning in here."""

from .bank import ReferenceBank
from .contributions import ContributionResult, exact_local_shapley, is_additive_head, local_shapley
from .greedy import greedy_search
from .partition import grow_regions
from .results import Cell, Edit, Explanation
from .search import REGION_ORDERS, SearchConfig, counterfactual_search
from .split import ModelSplit, split_model

__all__ = [
    "Cell",
    "ContributionResult",
    "Edit",
    "Explanation",
    "ModelSplit",
    "REGION_ORDERS",
    "ReferenceBank",
    "SearchConfig",
    "counterfactual_search",
    "exact_local_shapley",
    "greedy_search",
    "grow_regions",
    "is_additive_head",
    "local_shapley",
    "split_model",
]
