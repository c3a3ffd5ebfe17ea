import math
import pickle

import pytest
import torch
from torch import nn

from fgvce_lightning.engine._util import (
    check_feature_map,
    evaluate_head,
    margin,
    preserved_rng_state,
    preserved_training_flags,
)
from fgvce_lightning.engine.results import Edit, Explanation


def _head(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def test_evaluate_head_chunks_equal_one_call():
    head = _head()
    feats = torch.randn(10, 4, 3, 3)
    full = head(feats)
    chunked = evaluate_head(head, feats, chunk_size=3)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full)


def test_evaluate_head_rejects_bad_outputs():
    feats = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="Expected the head to return 5 class logits, but got 3"):
        evaluate_head(_head(3), feats, num_classes=5)
    with pytest.raises(ValueError, match=r"logits of shape \(2, num_classes\)"):
        evaluate_head(lambda f: f.mean(dim=(2, 3)).flatten(), feats)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_head(_head(), feats, chunk_size=0)


def test_margin_is_pred_minus_true():
    logits = torch.tensor([[1.0, 3.0, 0.0], [0.5, 0.0, 2.0]])
    m = margin(logits, torch.tensor([0, 2]), torch.tensor([1, 0]))
    torch.testing.assert_close(m, torch.tensor([2.0, -1.5]))


def test_training_flags_restored_after_exception():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with preserved_training_flags(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_rng_state_restored():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with preserved_rng_state():
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), state)


def test_check_feature_map_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_feature_map([1, 2])
    with pytest.raises(ValueError, match="non-spatial"):
        check_feature_map(torch.randn(2, 8))
    with pytest.raises(ValueError, match="at least 2 cells"):
        check_feature_map(torch.randn(2, 8, 1, 1))
    x = torch.randn(1, 2, 2, 2)
    assert check_feature_map(x) is x


def test_explanation_trajectory_and_pickle():
    e1 = Edit(((0, 0),), 1, (0, 2, 3), ((1, 1),), 0.9, 0.5, 0.4, 0.5)
    e2 = Edit(((0, 1), (1, 1)), 0, (0, 1, 0), ((0, 1), (1, 0)), 0.8, 0.2, 0.7, 0.2)
    ex = Explanation(0, 1, 2, True, 1, (e1, e2), 0.1, 0.8, torch.zeros(2, 2), None, 12)
    assert ex.trajectory_true == (0.1, 0.4, 0.7)
    assert ex.trajectory_pred == (0.8, 0.5, 0.2)
    assert ex.edited_cells == ((0, 0), (0, 1), (1, 1))
    assert ex.num_edits == 2 and not ex.skipped
    assert pickle.loads(pickle.dumps(ex)).edits == ex.edits
    skipped = Explanation.skipped_query(3, 1, 2, "empty bank for class 1")
    assert skipped.skipped and not skipped.success and math.isnan(skipped.p_true_before)
    with pytest.raises(Exception):
        ex.success = False  # frozen


def test_evaluate_head_halves_chunks_on_out_of_memory_and_remembers():
    from fgvce_lightning.engine import _util

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    head = _head()
    sizes = []

    def tight_head(x):          # "runs out of memory" above 3 maps per call
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise oom("CUDA out of memory (simulated)")
        return head(x)

    feats = torch.randn(10, 4, 3, 5)          # a shape no other test uses
    _util._chunk_caps.clear()
    out = evaluate_head(tight_head, feats, chunk_size=16)
    torch.testing.assert_close(out, head(feats))
    assert sizes[:3] == [10, 8, 4] and max(sizes[3:]) <= 3
    sizes.clear()
    evaluate_head(tight_head, feats, chunk_size=16)        # starts at the learnt size
    assert max(sizes) <= 3
    with pytest.raises(oom):
        evaluate_head(lambda x: (_ for _ in ()).throw(oom("always")), feats, chunk_size=4)
    _util._chunk_caps.clear()
