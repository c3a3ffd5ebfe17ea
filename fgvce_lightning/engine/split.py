"""Split a classifier into ``features`` (image -> spatial feature map) and ``head`` (map -> logits).

The counterfactual engine edits the spatial feature map ``F = features(x)`` of shape
``(N, C, H, W)`` and scores edits with ``head(F)``. :func:`split_model` finds that split, in this
order:

1. explicit callables: ``split_model(model, features=f, head=h)``;
2. an explicit layer name: ``split_model(model, layer="layer4.0")`` splits the traced graph
   (torch.fx) at that module or node;
3. the timm convention: ``forward_features`` / ``forward_head`` on the model or on a wrapped
   model (``model``, ``net``, ``backbone``, ``network``, ``classifier`` attribute, or the only
   child module of a LightningModule). Vision transformers (torchvision or timm) are handled by
   :mod:`fgvce_lightning.engine.transformers`;
4. known torchvision families: ResNet (ResNeXt, WideResNet), ConvNeXt, EfficientNet (v1, v2),
   MobileNet v2/v3, VGG, DenseNet and RegNet.

By default (``at="penultimate"``) a family is split one block *before* the last stage output, so
the head keeps a spatial block and stays non-linear (a pooling + linear head makes every cell
additive). ``at="last"`` splits at the last stage output (the head is pooling + classifier).

All splits share the model's live modules (no copies): they follow training and ``.to(device)``.
Neither ``features`` nor ``head`` changes any module's training flag; callers put the model in
eval mode (see :func:`fgvce_lightning.engine._util.preserved_training_flags`).
"""

from __future__ import annotations

import difflib
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

from .model_split import SPLIT_OPTIONS, WRAPPER_ATTRIBUTES, ModelSplit, _CheckedFeatures, _Pipeline
from .transformers import split_transformer

__all__ = ["ModelSplit", "split_model", "locate_hook_module", "SPLIT_OPTIONS", "WRAPPER_ATTRIBUTES"]


def _flatten(x: Tensor) -> Tensor:
    return torch.flatten(x, 1)


def _relu(x: Tensor) -> Tensor:
    return torch.relu(x)  # never in place: the head must not modify the engine's feature maps


def _global_avg_pool(x: Tensor) -> Tensor:
    return nn.functional.adaptive_avg_pool2d(x, (1, 1))


# --------------------------------------------------------------------------------------------
# torchvision CNN families
# --------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """A family's forward as a flat list of steps, and where its two split points are.

    ``features = steps[:penultimate]`` (resp. ``steps[:last]``) and ``head`` = the rest.
    """

    family: str
    steps: list[tuple[str, Callable[[Tensor], Tensor]]]
    penultimate: int
    last: int


def _expand(prefix: str, seq: nn.Module, is_stage: Callable[[nn.Module], bool]
            ) -> list[tuple[str, nn.Module]]:
    """Children of ``seq``; stages (per ``is_stage``) are expanded into their blocks."""
    out = []
    for name, child in seq.named_children():
        if is_stage(child):
            out += [(f"{prefix}.{name}.{sub}", blk) for sub, blk in child.named_children()]
        else:
            out.append((f"{prefix}.{name}", child))
    return out


def _torchvision_plan(model: nn.Module) -> Optional[_Plan]:
    try:
        from torchvision import models as tvm
        from torchvision.models import convnext, densenet, efficientnet, mobilenetv2, mobilenetv3
    except ImportError:  # pragma: no cover - torchvision is a dependency, but stay importable
        return None

    if isinstance(model, tvm.ResNet):
        steps = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for i in range(1, 5):
            steps += [(f"layer{i}.{j}", b) for j, b in getattr(model, f"layer{i}").named_children()]
        last = len(steps)
        steps += [("avgpool", model.avgpool), ("flatten", _flatten), ("fc", model.fc)]
        return _Plan("ResNet", steps, last - 1, last)

    if isinstance(model, tvm.RegNet):
        steps = [("stem", model.stem)]
        for name, stage in model.trunk_output.named_children():
            steps += [(f"trunk_output.{name}.{j}", b) for j, b in stage.named_children()]
        last = len(steps)
        steps += [("avgpool", model.avgpool), ("flatten", _flatten), ("fc", model.fc)]
        return _Plan("RegNet", steps, last - 1, last)

    if isinstance(model, tvm.ConvNeXt):
        steps = _expand("features", model.features,
                        lambda m: len(m) > 0 and all(isinstance(b, convnext.CNBlock) for b in m)
                        if isinstance(m, nn.Sequential) else False)
        last = len(steps)
        steps += [("avgpool", model.avgpool), ("classifier", model.classifier)]
        return _Plan("ConvNeXt", steps, last - 1, last)

    if isinstance(model, (tvm.EfficientNet, tvm.MobileNetV2, tvm.MobileNetV3)):
        blocks = (efficientnet.MBConv, efficientnet.FusedMBConv, mobilenetv2.InvertedResidual,
                  mobilenetv3.InvertedResidual)
        steps = _expand("features", model.features,
                        lambda m: isinstance(m, nn.Sequential) and len(m) > 0
                        and all(isinstance(b, blocks) for b in m))
        block_idx = [i for i, (_, m) in enumerate(steps) if isinstance(m, blocks)]
        if not block_idx:
            return None
        last = len(steps)
        pool = (("adaptive_avg_pool2d", _global_avg_pool) if isinstance(model, tvm.MobileNetV2)
                else ("avgpool", model.avgpool))
        steps += [pool, ("flatten", _flatten), ("classifier", model.classifier)]
        family = type(model).__name__
        return _Plan(family, steps, block_idx[-1], last)

    if isinstance(model, tvm.VGG):
        steps = [(f"features.{n}", m) for n, m in model.features.named_children()]
        convs = [i for i, (_, m) in enumerate(steps) if isinstance(m, nn.Conv2d)]
        if not convs:
            return None
        last = len(steps)
        steps += [("avgpool", model.avgpool), ("flatten", _flatten), ("classifier", model.classifier)]
        return _Plan("VGG", steps, convs[-1], last)

    if isinstance(model, tvm.DenseNet):
        steps = [(f"features.{n}", m) for n, m in model.features.named_children()]
        dense = [i for i, (_, m) in enumerate(steps) if isinstance(m, densenet._DenseBlock)]
        if not dense:
            return None
        steps.append(("relu", _relu))
        last = len(steps)
        steps += [("adaptive_avg_pool2d", _global_avg_pool), ("flatten", _flatten),
                  ("classifier", model.classifier)]
        return _Plan("DenseNet", steps, dense[-1], last)
    return None


def _plan_split(plan: _Plan, at: str, model: nn.Module) -> ModelSplit:
    cut = plan.penultimate if at == "penultimate" else plan.last
    if cut < 1:
        raise ValueError(f"Expected the {plan.family} to have at least two blocks to split "
                         f"`at={at!r}`, but it has none before its last block. Use `at=\"last\"` "
                         f"or one of: {SPLIT_OPTIONS}")
    feat_steps, head_steps = plan.steps[:cut], plan.steps[cut:]
    # The module whose output is F: the last feature step if it is a module; otherwise the last
    # module before it, followed by the trailing functions (e.g. DenseNet's final ReLU).
    tail: list[tuple[str, Callable]] = []
    tap: Optional[nn.Module] = None
    for name, step in reversed(feat_steps):
        if isinstance(step, nn.Module):
            tap = step
            break
        tail.insert(0, (name, step))
    hook = tap if not tail else None
    tap_transform = _Pipeline(tail) if tail else None
    features, head = _Pipeline(feat_steps), _Pipeline(head_steps)
    description = (f"torchvision {plan.family} split at={at!r}: features = {feat_steps[0][0]} .. "
                   f"{feat_steps[-1][0]}; head = {head}")
    return ModelSplit(_CheckedFeatures(features, description), head, hook, description,
                      tap_module=tap, tap_transform=tap_transform)


# --------------------------------------------------------------------------------------------
# timm convention and wrappers
# --------------------------------------------------------------------------------------------

def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model`` itself, then wrapped models (common attributes, then the only child)."""
    out: list[tuple[str, nn.Module]] = [("", model)]
    seen = {id(model)}
    for attr in WRAPPER_ATTRIBUTES:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module) and id(sub) not in seen:
            out.append((attr, sub))
            seen.add(id(sub))
    children = list(model.named_children())
    if len(children) == 1 and id(children[0][1]) not in seen:
        out.append(children[0])
    return out


def _has_timm_methods(obj: nn.Module) -> bool:
    return callable(getattr(obj, "forward_features", None)) and callable(
        getattr(obj, "forward_head", None))


def _timm_split(obj: nn.Module, path: str) -> ModelSplit:
    where = f"`{path}`" if path else "the model"
    description = (f"forward_features/forward_head of {where} ({type(obj).__name__}); no hook "
                   "module is known (find one with `locate_hook_module`)")
    return ModelSplit(_CheckedFeatures(obj.forward_features, description), obj.forward_head,
                      None, description)


def locate_hook_module(model: nn.Module, split: ModelSplit, example: Tensor) -> Optional[nn.Module]:
    """Find a module of ``model`` whose forward output equals ``split.features(example)``.

    Runs ``split.features(example)`` and then ``model(example)`` once each (no grad, eval mode,
    training flags restored) with a temporary forward hook on every submodule, and returns the
    outermost module that ran exactly once and whose output equalled the feature map when it was
    produced. Use it for splits without a ``hook_module`` (e.g. the timm convention), so ``F``
    can be captured during the model's own forward.

    Args:
        model: the model whose forward is hooked.
        split: its split.
        example: a small input batch ``(N, 3, H, W)`` for ``model``.

    Returns:
        The module, or ``None`` when no module outputs exactly the feature map.
    """
    from ._util import preserved_training_flags

    calls: dict[int, int] = {}
    matches: list[nn.Module] = []
    handles = []
    with torch.no_grad(), preserved_training_flags(model):
        target = split.features(example).detach().clone()

        def hook(module: nn.Module, _inp: object, out: object) -> None:
            calls[id(module)] = calls.get(id(module), 0) + 1
            if (isinstance(out, Tensor) and out.shape == target.shape and out.dtype == target.dtype
                    and torch.equal(out, target)):
                matches.append(module)

        try:
            for module in model.modules():
                if module is not model:
                    handles.append(module.register_forward_hook(hook))
            model(example)
        finally:
            for handle in handles:
                handle.remove()
    # Hooks fire inner-first; the last match is the outermost module.
    for module in reversed(matches):
        if calls.get(id(module)) == 1:
            return module
    return None


# --------------------------------------------------------------------------------------------
# explicit layer name: torch.fx
# --------------------------------------------------------------------------------------------

def _fx_split(model: nn.Module, layer: str) -> ModelSplit:
    try:
        import torchvision.ops
        from torchvision.models.feature_extraction import NodePathTracer
    except ImportError as err:  # pragma: no cover
        raise TypeError(f"Splitting by `layer=` needs torchvision's FX tracer ({err}). Use one of: "
                        f"{SPLIT_OPTIONS}") from None
    from torch import fx

    leaf_types = [obj for _, obj in inspect.getmembers(torchvision.ops)
                  if inspect.isclass(obj) and issubclass(obj, nn.Module)]

    class _Tracer(NodePathTracer):
        def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
            return module_qualname == layer or super().is_leaf_module(m, module_qualname)

    tracer = _Tracer(autowrap_modules=(math, torchvision.ops), leaf_modules=leaf_types)
    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # trace the inference branches
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not FX-traceable"
        raise TypeError(
            f"Expected a model that torch.fx can trace to split it at `layer={layer!r}`, but "
            f"tracing {type(model).__name__} failed: {type(err).__name__}: {err}. Use one of: "
            f"{SPLIT_OPTIONS}") from None
    finally:
        for m, flag in was_training:
            m.training = flag

    names = {node: tracer.node_to_qualname.get(node, node.name) for node in graph.nodes}
    split_node = next((n for n in graph.nodes if n.op == "call_module" and n.target == layer), None)
    if split_node is None:
        split_node = next((n for n in graph.nodes if names[n] == layer and n.op != "output"), None)
    if split_node is None or split_node.op == "placeholder":
        available = [names[n] for n in graph.nodes if n.op not in ("placeholder", "output")]
        modules = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, available + modules, n=5, cutoff=0.5)
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"Expected `layer` to name a module or a traced node of {type(model).__name__}, but "
            f"got {layer!r}. Close matches: {close or 'none'}; top-level modules: {top[:12]}; "
            f"traced nodes include: {available[:4] + ['...'] + available[-4:]}. Call "
            "`torchvision.models.feature_extraction.get_graph_node_names(model)` for all names.")

    root = tracer.root
    # features: the graph up to the split node.
    feat_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            break
        env[node] = feat_graph.node_copy(node, lambda n: env[n])
        if node is split_node:
            break
    feat_graph.output(env[split_node])
    features_gm = fx.GraphModule(root, feat_graph, f"{type(model).__name__}Features")
    features_gm.graph.eliminate_dead_code()
    features_gm.recompile()

    # head: the rest of the graph, fed from the split node.
    head_graph = fx.Graph()
    env = {}
    feat_in = head_graph.placeholder("features")
    if any(_modifies_in_place(user, root) for user in split_node.users):
        feat_in = head_graph.call_function(torch.clone, (feat_in,))
    env[split_node] = feat_in
    for node in graph.nodes:
        if node is split_node or node in env:
            continue
        if node.op == "placeholder":
            env[node] = head_graph.placeholder(node.name)
            continue
        env[node] = head_graph.node_copy(node, lambda n: env[n])
    head_gm = fx.GraphModule(root, head_graph, f"{type(model).__name__}Head")
    head_graph = head_gm.graph
    head_graph.eliminate_dead_code()
    used_inputs = [n for n in head_graph.nodes if n.op == "placeholder" and n.name != "features"
                   and len(n.users) > 0]
    if used_inputs:
        raise ValueError(
            f"Expected `layer={layer!r}` to be a cut point of the graph (everything after it "
            f"computed from its output alone), but later operations also read the model input "
            f"through another path (e.g. a skip connection around it). Choose a layer at a block "
            f"boundary (e.g. a whole residual block such as 'layer4.0'), or use one of: "
            f"{SPLIT_OPTIONS}")
    for node in [n for n in head_graph.nodes if n.op == "placeholder" and n.name != "features"]:
        head_graph.erase_node(node)
    head_gm.recompile()

    hook_module: Optional[nn.Module] = None
    note = "no hook module (the split point is not a module called once)"
    if split_node.op == "call_module":
        calls = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == split_node.target)
        if calls == 1:
            hook_module = root.get_submodule(split_node.target)
            note = f"hook module = {split_node.target}"
    description = f"torch.fx split of {type(model).__name__} after {names[split_node]!r}; {note}"
    return ModelSplit(_CheckedFeatures(features_gm, description), head_gm, hook_module, description)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _modifies_in_place(node: "torch.fx.Node", root: nn.Module) -> bool:
    """Whether ``node`` may modify its first argument in place (then the head clones ``F``)."""
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
                or (name.endswith("_") and not name.endswith("__")))
    return False


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def split_model(model: nn.Module, *, layer: Optional[str] = None,
                features: Optional[Callable[[Tensor], Tensor]] = None,
                head: Optional[Callable[[Tensor], Tensor]] = None,
                at: Literal["penultimate", "last"] = "penultimate") -> ModelSplit:
    """Split ``model`` into ``features`` (image -> ``(N, C, h, w)`` map) and ``head`` (map -> logits).

    Args:
        model: the classifier, or a LightningModule-like wrapper around it.
        layer: qualified name of a module (e.g. ``"layer4.0"``) or traced node after which to
            split the graph with torch.fx.
        features: explicit ``x -> F`` callable (needs ``head`` too).
        head: explicit ``F -> logits`` callable (needs ``features`` too).
        at: for known families: ``"penultimate"`` (one block before the last stage output, the
            head stays non-linear) or ``"last"`` (the last stage output; pooling + classifier
            head). For vision transformers: one block (resp. no block) in the head. Ignored for
            explicit callables, ``layer`` and the timm convention.

    Returns:
        The :class:`ModelSplit`; ``split.head(split.features(x))`` equals ``model(x)`` for the
        families, the timm convention and FX splits (for a wrapper: the wrapped model's output).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a callable is not callable, or the model
            cannot be traced for ``layer``.
        ValueError: invalid ``at``, only one of ``features``/``head``, an unknown ``layer``, or a
            model none of the four options applies to.
    """
    if at not in ("penultimate", "last"):
        raise ValueError(f"Expected `at` to be 'penultimate' or 'last', but got {at!r}.")
    if (features is None) != (head is None):
        given, missing = ("features", "head") if head is None else ("head", "features")
        raise ValueError(f"Expected both `features` and `head` callables, but got only `{given}`. "
                         f"Pass `{missing}=` as well, or neither to split automatically.")
    if features is not None:
        for name, fn in (("features", features), ("head", head)):
            if not callable(fn):
                raise TypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
        hook = None
        if layer is not None:
            if not isinstance(model, nn.Module):
                raise TypeError("Expected `model` to be an nn.Module to look up `layer`, but got "
                                f"{type(model).__name__}.")
            hook = _get_module(model, layer)
        description = "explicit features/head callables" + (f"; hook module = {layer}" if layer else "")
        return ModelSplit(_CheckedFeatures(features, description), head, hook, description)

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}. "
                        f"Or pass explicit `features=` and `head=` callables.")
    if layer is not None:
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"Expected `layer` to be a non-empty module or node name, but got {layer!r}.")
        return _fx_split(model, layer)

    candidates = _candidates(model)
    blocks_in_head = 1 if at == "penultimate" else 0
    for path, obj in candidates:
        split = split_transformer(obj, blocks_in_head=blocks_in_head)
        if split is not None:
            return _with_path(split, path)
        if _has_timm_methods(obj):
            return _timm_split(obj, path)
    for path, obj in candidates:
        plan = _torchvision_plan(obj)
        if plan is not None:
            return _with_path(_plan_split(plan, at, obj), path)
    checked = ", ".join(f"`{p}` ({type(o).__name__})" if p else type(o).__name__
                        for p, o in candidates)
    raise ValueError(f"Expected a model that can be split into features and head, but found no "
                     f"known split for {checked}. Use one of: {SPLIT_OPTIONS}")


def _with_path(split: ModelSplit, path: str) -> ModelSplit:
    if not path:
        return split
    return ModelSplit(split.features, split.head, split.hook_module,
                      f"{split.description} (of wrapped `{path}`)", split.tap_module,
                      split.tap_transform, split.prefix_channels)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        modules = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, modules, n=5, cutoff=0.5)
        raise ValueError(f"Expected `layer` to name a submodule of {type(model).__name__} (the hook "
                         f"module), but got {name!r}. Close matches: {close or 'none'}; top-level "
                         f"modules: {[n for n, _ in model.named_children()][:12]}.") from None

