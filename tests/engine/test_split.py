"""Tests for ``fgvce_lightning.engine.split``: every split reproduces the model's logits."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet, mobilenetv3, regnet
from torchvision.models import vgg as tv_vgg

from fgvce_lightning.engine.split import ModelSplit, locate_hook_module, split_model


def _capture(module: nn.Module, model: nn.Module, x: torch.Tensor,
             transform=None) -> torch.Tensor:
    """Output of ``module`` during ``model(x)``, captured with a forward hook (then removed)."""
    captured = []

    def hook(_m, _inp, out):
        captured.append((out if transform is None else transform(out)).detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert len(captured) == 1, "the hook module must run exactly once per forward"
    return captured[0]


def _check_split(model: nn.Module, split: ModelSplit, x: torch.Tensor, *, hook: bool = True) -> torch.Tensor:
    """head(features(x)) == model(x); hook/tap captures during model(x) equal features(x)."""
    hooked, tapped = [], []
    handles = []
    if hook:
        assert split.hook_module is not None
        handles.append(split.hook_module.register_forward_hook(
            lambda _m, _i, out: hooked.append(out.detach().clone())))
    assert split.tap_module is not None
    handles.append(split.tap_module.register_forward_hook(
        lambda _m, _i, out: tapped.append(split.features_from_tap(out).detach().clone())))
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        feats = split.features(x)
        logits = split.head(feats)
    assert feats.dim() == 4 and feats.shape[0] == x.shape[0]
    assert (expected - expected.mean()).abs().max() > 1e-6, "degenerate model: constant logits"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    if hook:
        assert len(hooked) == 1
        torch.testing.assert_close(hooked[0], feats, rtol=0, atol=0)
    assert len(tapped) == 1
    torch.testing.assert_close(tapped[0], feats, rtol=0, atol=0)
    return feats


def _tiny_convnext() -> nn.Module:
    cfg = [tv_convnext.CNBlockConfig(8, 16, 2), tv_convnext.CNBlockConfig(16, None, 2)]
    return tv_convnext.ConvNeXt(cfg, num_classes=5)


def _tiny_vgg() -> nn.Module:
    # a real VGG instance (same forward) without the 25088x4096 classifier of the full model
    model = tv_vgg.VGG.__new__(tv_vgg.VGG)
    nn.Module.__init__(model)
    model.features = tv_vgg.make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=True)
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(32, 5))
    return model


def _tiny_efficientnet() -> nn.Module:
    cfg = [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(4, 3, 2, 8, 16, 2)]
    return efficientnet.EfficientNet(cfg, dropout=0.0, num_classes=5, last_channel=32)


def _tiny_efficientnet_v2() -> nn.Module:
    cfg = [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(4, 3, 2, 8, 16, 1)]
    return efficientnet.EfficientNet(cfg, dropout=0.0, num_classes=5, last_channel=32)


def _tiny_mobilenet_v2() -> nn.Module:
    return torchvision.models.MobileNetV2(num_classes=5, inverted_residual_setting=[
        [1, 8, 1, 1], [4, 16, 2, 2]])


def _tiny_mobilenet_v3() -> nn.Module:
    cfg = [mobilenetv3.InvertedResidualConfig(16, 3, 16, 16, True, "RE", 2, 1, 1.0),
           mobilenetv3.InvertedResidualConfig(16, 3, 32, 24, False, "HS", 1, 1, 1.0),
           mobilenetv3.InvertedResidualConfig(24, 5, 48, 24, True, "HS", 1, 1, 1.0)]
    return mobilenetv3.MobileNetV3(cfg, last_channel=32, num_classes=5)


def _tiny_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1, 1, 2), num_init_features=8,
                                       bn_size=2, num_classes=5)


def _tiny_regnet() -> nn.Module:
    params = regnet.BlockParams(depths=[1, 2], widths=[8, 16], group_widths=[8, 8],
                                bottleneck_multipliers=[1.0, 1.0], strides=[2, 2])
    return regnet.RegNet(params, num_classes=5, stem_width=8)


def _tiny_resnext() -> nn.Module:
    return torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 2], num_classes=5,
                                     groups=4, width_per_group=4)


_RESNET18: list[nn.Module] = []


def _resnet18() -> nn.Module:
    """One randomly initialised resnet18 shared by the read-only tests (built once: it is the
    slowest model here)."""
    if not _RESNET18:
        torch.manual_seed(0)
        _RESNET18.append(torchvision.models.resnet18(weights=None, num_classes=5).eval())
    return _RESNET18[0]


# family: (builder, input size, penultimate hook module, last hook module)
FAMILIES = {
    "resnet18": (lambda: _resnet18(), 64,
                 "layer4.0", "layer4.1"),
    "resnext": (_tiny_resnext, 64, "layer4.0", "layer4.1"),
    "convnext": (_tiny_convnext, 32, "features.3.0", "features.3.1"),
    "efficientnet": (_tiny_efficientnet, 32, "features.2.0", "features.3"),
    "efficientnet_v2": (_tiny_efficientnet_v2, 32, "features.1.0", "features.3"),
    "mobilenet_v2": (_tiny_mobilenet_v2, 32, "features.2", "features.4"),
    "mobilenet_v3": (_tiny_mobilenet_v3, 32, "features.2", "features.4"),
    "vgg": (_tiny_vgg, 32, "features.10", "features.14"),
    "densenet": (_tiny_densenet, 64, "features.transition3", None),
    "regnet": (_tiny_regnet, 32, "trunk_output.block2.block2-0", "trunk_output.block2.block2-1"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torchvision_family_penultimate_and_last(family):
    torch.manual_seed(0)
    build, size, penult_hook, last_hook = FAMILIES[family]
    model = build().eval()
    x = torch.randn(2, 3, size, size)

    split = split_model(model)
    feats = _check_split(model, split, x)
    assert split.hook_module is model.get_submodule(penult_hook)
    assert split.prefix_channels == 0 and family.split("_")[0][:4].lower() in split.description.lower()

    last = split_model(model, at="last")
    last_feats = _check_split(model, last, x, hook=last_hook is not None)
    if last_hook is not None:
        assert last.hook_module is model.get_submodule(last_hook)
    # the penultimate head contains a spatial block: its map is taken earlier than the last one
    assert "avgpool" in str(last.head) or "adaptive_avg_pool2d" in str(last.head)
    assert feats.shape != last_feats.shape or not torch.equal(feats, last_feats)


def test_resnet_penultimate_head_is_last_block_plus_classifier():
    model = _resnet18()
    split = split_model(model)
    assert str(split.head) == "layer4.1 -> avgpool -> flatten -> fc"
    assert str(split_model(model, at="last").head) == "avgpool -> flatten -> fc"


def test_densenet_last_has_no_exact_hook_but_a_tap():
    # DenseNet applies an in-place ReLU after `features` in its forward: no module outputs F.
    torch.manual_seed(0)
    model = _tiny_densenet().eval()
    split = split_model(model, at="last")
    assert split.hook_module is None
    assert split.tap_module is model.features.norm5


def test_split_shares_live_modules():
    torch.manual_seed(0)
    model = _tiny_resnext().eval()
    split = split_model(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
        torch.testing.assert_close(split(x), model(x))


def test_head_does_not_modify_features_in_place():
    torch.manual_seed(0)
    model = _tiny_mobilenet_v3().eval()
    split = split_model(model)
    with torch.no_grad():
        feats = split.features(torch.randn(2, 3, 32, 32))
        before = feats.clone()
        split.head(feats)
    assert torch.equal(feats, before)


# ---------------------------------------------------------------------------------------------
# timm convention and wrappers
# ---------------------------------------------------------------------------------------------

class TimmStyle(nn.Module):
    """forward_features -> (N, 8, 4, 4), non-linear forward_head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return self.body(self.stem(x))

    def forward_head(self, f):
        return self.fc(torch.relu(self.mix(f)).amax(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class Wrapper(nn.Module):
    """A LightningModule-like wrapper: the classifier lives in an attribute, plus a loss module."""

    def __init__(self, inner: nn.Module, attribute: str = "net") -> None:
        super().__init__()
        setattr(self, attribute, inner)
        self.criterion = nn.CrossEntropyLoss()
        self.attribute = attribute

    def forward(self, x):
        return getattr(self, self.attribute)(x)


def test_timm_style_model():
    torch.manual_seed(0)
    model = TimmStyle().eval()
    split = split_model(model)
    assert split.hook_module is None and "forward_features" in split.description
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split.head(split.features(x)), model(x))
    found = locate_hook_module(model, split, x)
    assert found is model.body
    torch.testing.assert_close(_capture(found, model, x), split.features(x))


@pytest.mark.parametrize("attribute", ["model", "net", "backbone", "network", "classifier"])
def test_wrapper_attribute_discovery_timm_style(attribute):
    torch.manual_seed(0)
    wrapper = Wrapper(TimmStyle(), attribute).eval()
    split = split_model(wrapper)
    assert f"`{attribute}`" in split.description
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split(x), wrapper(x))


def test_wrapper_discovery_torchvision_family_and_only_child():
    torch.manual_seed(0)
    resnet = _resnet18()
    wrapper = Wrapper(resnet, "backbone").eval()
    split = split_model(wrapper)
    assert split.hook_module is resnet.layer4[0] and "`backbone`" in split.description
    x = torch.randn(2, 3, 64, 64)
    _check_split(wrapper, split, x)

    class OnlyChild(nn.Module):
        def __init__(self):
            super().__init__()
            self.whatever = TimmStyle()

        def forward(self, x):
            return self.whatever(x)

    only = OnlyChild().eval()
    split = split_model(only)
    assert "`whatever`" in split.description
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split(x), only(x))


# ---------------------------------------------------------------------------------------------
# explicit layer (FX) and explicit callables
# ---------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.block(x)
        y = self.conv2(x) + x          # a skip connection around conv2
        return self.fc(torch.flatten(nn.functional.adaptive_max_pool2d(y, 1), 1))


def test_fx_split_at_module():
    torch.manual_seed(0)
    model = SmallNet().eval()
    split = split_model(model, layer="block")
    assert split.hook_module is model.block
    assert "'block'" in split.description
    feats = _check_split(model, split, torch.randn(3, 3, 16, 16))
    assert feats.shape == (3, 8, 8, 8)


def test_fx_split_at_inner_module_and_node():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 16, 16)
    # block.0 is followed by an in-place ReLU: the head must clone F, not modify it
    split = split_model(model, layer="block.0")
    with torch.no_grad():
        feats = split.features(x)
        before = feats.clone()
        torch.testing.assert_close(split.head(feats), model(x))
    assert torch.equal(feats, before)
    assert split.hook_module is model.block[0]
    # a function node ('relu' after conv1) has no hook module
    node_split = split_model(model, layer="relu")
    assert node_split.hook_module is None
    with torch.no_grad():
        torch.testing.assert_close(node_split(x), model(x))


def test_fx_split_resnet_block_matches():
    torch.manual_seed(0)
    model = _resnet18()
    split = split_model(model, layer="layer3")
    feats = _check_split(model, split, torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 256, 2, 2)


def test_fx_split_errors():
    model = SmallNet().eval()
    with pytest.raises(ValueError, match=r"Expected `layer` to name a module.*Close matches: \['block'"):
        split_model(model, layer="blok")
    with pytest.raises(ValueError, match="not .*cut point|cut point"):
        split_model(model, layer="conv2")          # x skips around conv2
    with pytest.raises(ValueError, match=r"spatial feature map.*\(N, C, H, W\).*split the model earlier"):
        split_model(model, layer="flatten").features(torch.randn(1, 3, 16, 16))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:                           # data-dependent control flow
                return self.conv(x).mean((2, 3))
            return self.conv(x).amax((2, 3))

    with pytest.raises(TypeError, match=r"torch.fx can trace.*forward_features.*torchvision family"
                                        r".*layer=.*features=. and .head="):
        split_model(Untraceable(), layer="conv")


def test_explicit_callables():
    torch.manual_seed(0)
    model = SmallNet().eval()

    def features(x):
        return model.block(torch.relu(model.conv1(x)))

    def head(f):
        y = model.conv2(f) + f
        return model.fc(torch.flatten(nn.functional.adaptive_max_pool2d(y, 1), 1))

    split = split_model(model, features=features, head=head)
    assert split.hook_module is None and split.description.startswith("explicit")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x))
    with_hook = split_model(model, features=features, head=head, layer="block")
    assert with_hook.hook_module is model.block
    _check_split(model, with_hook, x)
    # callables take precedence over a known family and need no nn.Module
    assert split_model(None, features=features, head=head).hook_module is None


def test_explicit_callable_errors():
    model = SmallNet()
    with pytest.raises(ValueError, match="both `features` and `head`.*only `features`"):
        split_model(model, features=lambda x: x)
    with pytest.raises(ValueError, match="only `head`"):
        split_model(model, head=lambda x: x)
    with pytest.raises(TypeError, match="Expected `head` to be callable"):
        split_model(model, features=lambda x: x, head=3)
    with pytest.raises(ValueError, match=r"submodule of SmallNet.*Close matches: .*'conv1'"):
        split_model(model, features=lambda x: x, head=lambda f: f, layer="conv")
    flat = split_model(model, features=lambda x: x.mean((2, 3)), head=lambda f: f)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\).*non-spatial.*split the model earlier"):
        flat.features(torch.randn(2, 3, 8, 8))


def test_unknown_model_and_argument_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no known split for Sequential.*\(1\) define `forward_features"
                                         r".*\(2\) use a known torchvision family.*\(3\) pass `layer="
                                         r".*\(4\) pass explicit `features=` and `head="):
        split_model(model)
    with pytest.raises(ValueError, match="Expected `at` to be 'penultimate' or 'last'"):
        split_model(model, at="middle")
    with pytest.raises(TypeError, match="Expected `model` to be a torch.nn.Module"):
        split_model(lambda x: x)
    # the Sequential is FX-traceable: a layer name works
    split = split_model(model, layer="0")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x))


def test_model_split_is_frozen_and_callable():
    split = ModelSplit(lambda x: x, lambda f: f.mean((2, 3)), None, "identity")
    with pytest.raises(AttributeError):
        split.description = "changed"  # type: ignore[misc]
    assert split(torch.ones(1, 2, 2, 2)).shape == (1, 2)
    assert split.tap_module is None and split.features_from_tap(torch.ones(1)).shape == (1,)
    with pytest.raises(ValueError, match="prefix_channels"):
        ModelSplit(lambda x: x, lambda f: f, None, "bad", prefix_channels=-1)
