import pytest
import torch

from fgvce_lightning.models import SmallCNN


def test_features_on_an_eighth_grid_and_head_of_features_is_forward():
    torch.manual_seed(0)
    model = SmallCNN(5, width=8).eval()
    x = torch.rand(3, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (3, 32, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(model.forward_head(feats), logits)
    assert model.forward_features(torch.rand(1, 3, 56, 56)).shape == (1, 32, 7, 7)


def test_head_is_not_additive_over_cells():
    # swapping two cells separately vs together must not add up for a non-linear head
    torch.manual_seed(0)
    model = SmallCNN(3, width=4).eval()
    with torch.no_grad():
        for module in model.modules():             # non-trivial BN statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
        f = torch.randn(1, 16, 8, 8)
        g = torch.randn(1, 16, 8, 8)
        a, b = f.clone(), f.clone()
        a[..., 3, 3] = g[..., 3, 3]
        b[..., 3, 4] = g[..., 3, 4]
        ab = a.clone()
        ab[..., 3, 4] = g[..., 3, 4]
        h = model.forward_head
        interaction = h(ab) - h(a) - h(b) + h(f)
    assert interaction.abs().max() > 1e-4


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Expected `num_classes`"):
        SmallCNN(1)
    with pytest.raises(ValueError, match="Expected `width`"):
        SmallCNN(4, width=0)
    with pytest.raises(ValueError, match=r"Expected images of shape \(N, C, H, W\)"):
        SmallCNN(4).forward_features(torch.rand(3, 64, 64))
