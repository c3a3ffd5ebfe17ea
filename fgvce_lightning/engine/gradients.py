"""Gradients of the true-class margin at the feature map: the first-order view of a swap, and the
Grad-CAM ranking of the evaluation baseline.

Gradients are taken with :func:`torch.autograd.grad` on a float32 clone of the input only
(parameters' ``.grad`` are never touched), with autograd re-enabled even inside
``torch.inference_mode()`` / ``torch.no_grad()`` (Lightning validates under inference mode).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._util import Head

__all__ = ["gradcam_scores", "margin_gradient"]


def gradcam_scores(head: Head, query: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, *,
                   chunk_size: int = 1024, channels: Optional[int] = None) -> torch.Tensor:
    """Grad-CAM of the mistake at the feature map: ``ReLU(sum_c mean_hw(∂s/∂F_c) · F_c)``.

    ``s = logit_pred - logit_true``; used to rank regions for the Grad-CAM-ordered baseline.

    Args:
        head: the classifier head.
        query: ``(N, C, H, W)`` feature maps.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted classes.
        chunk_size: most maps per head call.
        channels: only the first ``channels`` channels count (``None``: all).

    Returns:
        ``(N, H, W)`` float32 (zeros where the head is not differentiable).
    """
    grad = margin_gradient(head, query, true, pred, chunk_size=chunk_size)
    if grad is None:
        return torch.zeros(query.shape[0], *query.shape[2:], device=query.device)
    # Grad-CAM explains the mistake: the gradient of logit_pred - logit_true, i.e. -grad
    weights = -grad[:, :channels].mean((2, 3), keepdim=True)
    return torch.relu((weights * query.detach().float()[:, :channels]).sum(1)).float()


def margin_gradient(head: Head, x: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, *,
                    chunk_size: int = 1024) -> Optional[torch.Tensor]:
    """Gradient of ``logit_true - logit_pred`` with respect to the feature maps ``x (N, C, H, W)``.

    Taken in chunks of ``chunk_size`` maps with :func:`torch.autograd.grad` on a float32 clone of
    the input (parameters' ``.grad`` untouched), with autograd re-enabled even under
    ``torch.inference_mode()``.

    Returns:
        ``(N, C, H, W)`` float32, or ``None`` when the head is not differentiable.
    """
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        true, pred = true.clone(), pred.clone()
        for start in range(0, x.shape[0], chunk_size):
            xi = x[start:start + chunk_size].float().clone().requires_grad_(True)
            t, p = true[start:start + chunk_size], pred[start:start + chunk_size]
            logits = head(xi)
            s = logits.gather(1, t[:, None]) - logits.gather(1, p[:, None])
            try:
                (g,) = torch.autograd.grad(s.sum(), (xi,))
            except RuntimeError:  # not differentiable (e.g. the head detaches its output)
                return None
            out.append(g.detach().float())
    return torch.cat(out) if out else torch.zeros_like(x, dtype=torch.float32)
