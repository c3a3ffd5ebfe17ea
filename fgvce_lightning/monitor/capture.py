"""Capture, during the user's own validation (or test) step, what the monitor keeps of each batch.

:class:`Capture` puts forward hooks on the split point (the feature maps ``F (B, C, H, W)``) and on
the model (its logits ``(B, K)``, reused where they equal ``head(F)``), once per epoch, and
captures only between a batch's start and end. Feature maps are captured in the dtype they have.

:class:`HeadPrecision` says how the head is evaluated on captured maps so that it computes what
the model computes under the trainer's precision: under the same autocast as the user's model
for ``"16-mixed"`` / ``"bf16-mixed"`` and on maps cast to the features' own dtype for the
``"*-true"`` precisions (``head_precision="model"``, the default), or in float32 on a float32 copy
of the head without autocast (``head_precision="float32"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Optional

import torch

from ..engine._util import check_feature_map, preserved_rng_state, preserved_training_flags
from ..engine.split import WRAPPER_ATTRIBUTES, ModelSplit, locate_hook_module
from .batches import ParsedBatch

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["HeadPrecision", "Capture", "model_call", "check_logits"]


@contextlib.contextmanager
def model_call(module: torch.nn.Module) -> Iterator[None]:
    """Run (part of) the user's model during collection: training flags as they are, the global
    RNG restored afterwards (a head with dropout in train mode would draw from it)."""
    with preserved_training_flags(module, eval_mode=False), preserved_rng_state([module.device]):
        yield


def check_logits(logits: Any, n: int) -> torch.Tensor:
    """``logits`` if they are ``(n, K)``, else an error that points at the model split."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"Expected the head to return logits of shape ({n}, num_classes), but "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}. Check the model "
                         "split (`layer`/`features`/`head`).")
    return logits


class HeadPrecision:
    """How the head is evaluated on feature maps, matching the trainer's precision.

    Args:
        autocast: a factory of the user's autocast context (mixed precision), or ``None``.
        float32: evaluate in float32 (on a float32 copy of the head; no autocast).
    """

    def __init__(self, autocast: Optional[Callable[[], ContextManager]] = None,
                 float32: bool = False, global_dtype: Optional[str] = None) -> None:
        self.global_dtype = global_dtype    # the precision that sets torch's default dtype
        self._factory = autocast
        self._autocast = None if float32 else autocast
        self.float32 = float32

    @classmethod
    def of(cls, trainer: "pl.Trainer", mode: str = "model") -> "HeadPrecision":
        """The trainer's precision: its plugin's autocast for mixed precision (a fresh,
        thread-local context each time, so it is safe on the background thread too)."""
        from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision

        plugin = trainer.precision_plugin
        autocast = plugin.autocast_context_manager if isinstance(plugin, MixedPrecision) else None
        # these set torch's process-wide default dtype during every forward of the training
        # thread: a thread beside it would create its tensors in that dtype now and then
        global_dtype = str(trainer.precision) if isinstance(plugin, (HalfPrecision, DoublePrecision)) else None
        return cls(autocast, float32=mode == "float32", global_dtype=global_dtype)

    def as_model(self) -> "HeadPrecision":
        """The model's own precision (its autocast; no float32 copy)."""
        return HeadPrecision(self._factory, global_dtype=self.global_dtype)

    @property
    def mixed(self) -> bool:
        return self._autocast is not None

    def context(self) -> ContextManager:
        """The autocast the user's model runs under (or nothing)."""
        return self._autocast() if self._autocast is not None else contextlib.nullcontext()

    def head(self, head: Callable[[torch.Tensor], torch.Tensor], feature_dtype: torch.dtype
             ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``head`` as the search calls it: ``(N, C, H, W)`` maps of any float dtype in, float32
        ``(N, K)`` logits out; the maps are cast to ``feature_dtype`` (the dtype the model's
        features have; float32 with ``float32=True``) and the head runs under :meth:`context`."""
        dtype = torch.float32 if self.float32 else feature_dtype

        def run(maps: torch.Tensor) -> torch.Tensor:
            with self.context():
                logits = head(maps.to(dtype))
            return logits.float() if isinstance(logits, torch.Tensor) else logits

        return run


class Capture:
    """Forward hooks that capture a batch's feature maps and logits during the user's step.

    Args:
        split: the model's split (its ``tap_module`` is hooked).
        reuse_logits: use the model's own output as the logits where it equals ``head(F)``
            (checked on two samples each epoch).
    """

    def __init__(self, split: ModelSplit, reuse_logits: bool = True) -> None:
        self.split = split
        self.reuse = reuse_logits
        # None: not yet checked this epoch; True: the model's output equals head(F), reuse it;
        # False: it does not (another output format, test-time augmentation, ...), recompute
        self.reuse_logits: Optional[bool] = None if reuse_logits else False
        self.located = split.tap_module is not None   # the module outputting F is known
        self._handles: list = []
        self._hooked: Optional[tuple] = None    # (split, logit hooks?, module) the hooks are on
        self._armed = False
        self._slot: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
        self._feats: Optional[torch.Tensor] = None
        self._logits: Optional[torch.Tensor] = None
        self._warned = False

    # ------------------------------------------------------------------ hooks
    def new_epoch(self) -> None:
        """Check the model's output against the head again this epoch."""
        if self.reuse_logits:
            self.reuse_logits = None

    def remove(self) -> None:
        """Remove every hook (the model is left as it was found)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked, self._armed = [], None, False
        self._feats = self._logits = None

    @property
    def hooked(self) -> bool:
        return self._hooked is not None

    def arm(self, pl_module: torch.nn.Module,
            slot: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None) -> None:
        """Capture during the next forward (the batch's step); ``slot(F)`` may give the rows the
        feature maps are to be written into. Hooks are registered on the first batch of an epoch
        (or when the split, the model or the logits check changed)."""
        if self.split.tap_module is None:
            return
        logits = self.reuse_logits is not False
        hooked = self._hooked
        if hooked is None or hooked[0] is not self.split or hooked[1] != logits \
                or hooked[2] is not pl_module:
            self.remove()
            self._register(pl_module, logits)
        self._slot, self._feats, self._logits, self._armed = slot, None, None, True

    def disarm(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Stop capturing; the batch's ``(feature maps, logits)`` captured (or ``None``)."""
        out = (self._feats, self._logits)
        self._armed, self._slot, self._feats, self._logits = False, None, None, None
        return out

    def _register(self, pl_module: torch.nn.Module, logits: bool) -> None:
        split = self.split

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            # first call of the batch only; a detached copy (the forward may modify its output in
            # place later), made outside inference mode so it can be stored and searched later
            if self._armed and self._feats is None:
                with torch.inference_mode(False), torch.no_grad():
                    out = split.features_from_tap(output)
                    if isinstance(out, torch.Tensor):
                        out = out.detach()
                        rows = self._slot(out) if self._slot is not None and out.dim() == 4 else None
                        self._feats = out.clone() if rows is None else rows.copy_(out)

        self._handles.append(split.tap_module.register_forward_hook(hook))
        if logits:
            # the logits of the user's own forward (the outermost module call that returns a
            # (B, K) tensor), so the head need not run a second time
            def logit_hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
                if self._armed and isinstance(output, torch.Tensor) and output.dim() == 2:
                    with torch.inference_mode(False), torch.no_grad():
                        self._logits = output.detach().clone()

            seen: set[int] = set()
            for owner in (pl_module, *(getattr(pl_module, a, None) for a in WRAPPER_ATTRIBUTES)):
                if isinstance(owner, torch.nn.Module) and id(owner) not in seen:
                    seen.add(id(owner))
                    self._handles.append(owner.register_forward_hook(logit_hook))
        self._hooked = (split, logits, pl_module)

    # ------------------------------------------------------------------ one batch
    def features(self, parsed: ParsedBatch, captured: Optional[torch.Tensor],
                 pl_module: "pl.LightningModule", precision: HeadPrecision) -> torch.Tensor:
        """The batch's ``(B, C, H, W)`` feature maps: the captured ones, else (no module outputs
        them, or the step did not call it) recomputed with ``split.features``."""
        b = parsed.images.shape[0]
        hooked = self.split.tap_module is not None
        if not self.located:
            with model_call(pl_module):
                self._locate(pl_module, parsed.images)
        if captured is None or captured.dim() != 4 or captured.shape[0] != b:
            if captured is not None:
                raise ValueError(
                    f"Expected the split module to output feature maps of shape ({b}, C, H, W) for "
                    f"the batch, but it produced {tuple(captured.shape)}. Split at a layer with a "
                    "spatial output (`layer=`).")
            if hooked and not self._warned:
                warnings.warn("CounterfactualMonitor: the split module was not called by the "
                              "step; recomputing the features with a second forward pass.",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            with model_call(pl_module), precision.context():
                captured = self.split.features(parsed.images.to(pl_module.device))
        return check_feature_map(captured, "features").detach()

    def logits(self, feats: torch.Tensor, captured: Optional[torch.Tensor],
               pl_module: "pl.LightningModule", precision: HeadPrecision) -> torch.Tensor:
        """The batch's float32 ``(B, K)`` logits: the model's own output where it equals
        ``head(F)`` (checked once per epoch, on two samples), else ``head(F)`` under the model's
        precision."""
        head = precision.head(self.split.head, feats.dtype)
        usable = captured is not None and captured.shape[0] == feats.shape[0]
        if usable and self.reuse_logits is None:
            with model_call(pl_module):
                probe = head(feats[:2])
            mine = captured[:2]
            self.reuse_logits = (isinstance(probe, torch.Tensor) and probe.shape == mine.shape
                                 and bool(torch.allclose(mine.float(), probe, rtol=1e-4, atol=1e-4)))
        if usable and self.reuse_logits:
            logits = captured.float()
        else:
            with model_call(pl_module):
                logits = head(feats)
        return check_logits(logits, feats.shape[0])

    def _locate(self, pl_module: "pl.LightningModule", images: torch.Tensor) -> None:
        """For splits without a hook module (e.g. ``forward_features``), find the module whose
        output is the feature map, once, so later batches are captured without a second forward."""
        self.located = True
        found = None
        for owner in (pl_module, *(getattr(pl_module, a, None) for a in WRAPPER_ATTRIBUTES)):
            if not isinstance(owner, torch.nn.Module):
                continue
            try:
                found = locate_hook_module(owner, self.split, images[:2])
            except Exception:  # noqa: BLE001 - e.g. a LightningModule without `forward`
                found = None
            if found is not None:
                break
        if found is None:
            warnings.warn("CounterfactualMonitor: no module of the model outputs the split's feature "
                          "maps, so they are recomputed with a second forward pass of `features` "
                          "(slower). Split at a module (`layer=`) to avoid it.",
                          RuntimeWarning, stacklevel=4)
            self._warned = True
            return
        self.split = dataclasses.replace(self.split, hook_module=found, tap_module=found,
                                         tap_transform=None)
