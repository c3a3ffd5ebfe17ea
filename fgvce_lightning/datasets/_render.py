"""Vectorised rendering of synthetic birds: shapes as coordinate-grid tests, painter's compositing.

Everything here works on a batch of ``N`` samples at once; there are no loops over pixels or
samples. A bird is described in a *canonical frame* (body centre at the origin, facing ``+u``,
``v`` pointing down, one unit ≈ half a body length); the pose maps that frame onto the image.

Pixel convention: pixel ``(row i, column j)`` has its centre at ``x = j``, ``y = i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PART_NAMES", "CONTEXT_ID", "render_birds"]

PART_NAMES: tuple[str, ...] = ("body", "head", "beak", "eye", "wing", "tail", "legs")
"""Annotated parts, in the order of the ``keypoints`` rows and ``masks`` channels."""

_BODY, _HEAD, _BEAK, _EYE, _WING, _TAIL, _LEGS = range(len(PART_NAMES))
CONTEXT_ID = -2
"""``part_ids`` of the background blobs and the occluding leaf (the branch and the sky are -1)."""

# Colours, RGB in [0, 1]. Attribute level 0 → first colour, level 1 → second (interpolated).
_BEAK_COLOURS = ((0.95, 0.82, 0.15), (0.80, 0.22, 0.08))
_EYE_COLOURS = ((0.05, 0.05, 0.05), (0.85, 0.10, 0.05))
_BODY_COLOURS = ((0.78, 0.64, 0.42), (0.55, 0.58, 0.64))
_LEG_COLOURS = ((0.85, 0.62, 0.50), (0.10, 0.10, 0.10))
HEAD_COLOUR = (0.36, 0.30, 0.22)        # base colours, jittered per sample by the data set
WING_COLOUR = (0.30, 0.24, 0.18)
TAIL_COLOUR = (0.28, 0.23, 0.18)
WING_BAR_COLOUR = (0.95, 0.93, 0.85)


def _c(x: Tensor) -> Tensor:
    """``(N,)`` → ``(N, 1, 1)`` for broadcasting against ``(N, S, S)`` grids."""
    return x[:, None, None]


def _lerp_colour(colours: tuple[tuple[float, ...], tuple[float, ...]], t: Tensor) -> Tensor:
    """Colour between ``colours[0]`` (t=0) and ``colours[1]`` (t=1): ``(N,)`` → ``(N, 3)``."""
    a = torch.tensor(colours[0], dtype=t.dtype, device=t.device)
    b = torch.tensor(colours[1], dtype=t.dtype, device=t.device)
    return a + t.clamp(-0.25, 1.25)[:, None] * (b - a)


def _ellipse(u: Tensor, v: Tensor, cu: Tensor, cv: Tensor, a: Tensor | float, b: Tensor | float,
             angle: Tensor | None = None) -> Tensor:
    """Pixels inside a rotated ellipse. ``u, v``: ``(N, S, S)``; parameters ``(N,)`` or scalars."""
    du, dv = u - _c(cu), v - _c(cv)
    if angle is not None:
        cos, sin = _c(torch.cos(angle)), _c(torch.sin(angle))
        du, dv = du * cos + dv * sin, dv * cos - du * sin
    inv_a2 = _c(1.0 / a ** 2) if isinstance(a, Tensor) else 1.0 / a ** 2
    inv_b2 = _c(1.0 / b ** 2) if isinstance(b, Tensor) else 1.0 / b ** 2
    return du.square_().mul_(inv_a2).add_(dv.square_().mul_(inv_b2)) <= 1.0


def _triangle(u: Tensor, v: Tensor, p0: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
    """Pixels inside the triangle ``p0 p1 p2`` (each ``(N, 2)`` as ``(u, v)``); empty if degenerate."""
    def side(a: Tensor, b: Tensor) -> Tensor:
        return (_c(b[:, 0] - a[:, 0]) * (v - _c(a[:, 1]))
                - _c(b[:, 1] - a[:, 1]) * (u - _c(a[:, 0])))

    area = ((p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1])
            - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0]))
    sign = _c(torch.sign(area))
    inside = (side(p0, p1) * sign >= 0) & (side(p1, p2) * sign >= 0) & (side(p2, p0) * sign >= 0)
    return inside & _c(area.abs() > 1e-6)


def _capsule(u: Tensor, v: Tensor, p0: Tensor, p1: Tensor, width: Tensor | float) -> Tensor:
    """Pixels within ``width / 2`` of the segment ``p0 p1`` (each ``(N, 2)``)."""
    d = p1 - p0
    length2 = (d ** 2).sum(dim=1).clamp_min(1e-12)
    t = (((u - _c(p0[:, 0])) * _c(d[:, 0]) + (v - _c(p0[:, 1])) * _c(d[:, 1])) / _c(length2))
    t = t.clamp(0.0, 1.0)
    dist2 = (u - _c(p0[:, 0]) - t * _c(d[:, 0])) ** 2 + (v - _c(p0[:, 1]) - t * _c(d[:, 1])) ** 2
    half = _c(width) / 2 if isinstance(width, Tensor) else width / 2
    return dist2 <= half ** 2


def _pt(u: Tensor | float, v: Tensor | float, like: Tensor) -> Tensor:
    """Stack per-sample canonical points into ``(N, 2)``."""
    u = torch.as_tensor(u, dtype=like.dtype).expand_as(like)
    v = torch.as_tensor(v, dtype=like.dtype).expand_as(like)
    return torch.stack([u, v], dim=1)


class _Canvas:
    """Painter's algorithm on layer ids: masks are painted as integers, colours gathered once.

    Layer 0 is the background; each :meth:`paint` adds a layer with one colour per sample.
    """

    def __init__(self, n: int, s: int) -> None:
        self.layer = torch.zeros(n, s, s, dtype=torch.int64)
        self.colours: list[Tensor] = [torch.zeros(n, 3)]
        self.parts: list[int] = [-1]

    def paint(self, mask: Tensor, colour: Tensor, part: int) -> None:
        """Paint ``colour`` ``(N, 3)`` where ``mask`` ``(N, S, S)``; ``part`` -1 for scenery."""
        self.layer.masked_fill_(mask, len(self.colours))
        self.colours.append(colour.float().clamp(0.0, 1.0))
        self.parts.append(part)

    def part_ids(self) -> Tensor:
        return torch.tensor(self.parts)[self.layer]

    def image(self, background: Tensor) -> Tensor:
        """Composite over ``background`` ``(N, 3, S, S)``."""
        n, s = self.layer.shape[0], self.layer.shape[-1]
        table = torch.stack(self.colours, dim=1)                               # (N, L, 3)
        flat = self.layer.reshape(n, s * s, 1).expand(n, s * s, 3)
        image = table.gather(1, flat).reshape(n, s, s, 3).permute(0, 3, 1, 2)
        return torch.where((self.layer == 0)[:, None], background, image)


def render_birds(p: dict[str, Tensor], image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Render a batch of birds from their parameters.

    Args:
        p: per-sample parameters (see ``SyntheticBirds._sample_params``); every value is ``(N,)``
            or ``(N, k)``, ``"noise"`` is ``(N, 3, S, S)``, ``"t"`` the attribute levels ``(N, A)``.
        image_size: ``S``.

    Returns:
        ``image`` ``(N, 3, S, S)`` float32 in [0, 1]; ``part_ids`` ``(N, S, S)`` int64 with the part
        index whose pixels are visible there (``-1``: background or branch, ``CONTEXT_ID``: a
        background blob or the occluding leaf); ``anchors``
        ``(N, P, 2)`` float32 part anchor points ``(x, y)`` in pixels.
    """
    n, s = p["cx"].shape[0], image_size
    coords = torch.arange(s, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(n, s, s), y.expand(n, s, s)
    xn, yn = x / (s - 1), y / (s - 1)                      # normalised image coordinates

    # canonical frame of the bird
    cos, sin, scale = torch.cos(p["angle"]), torch.sin(p["angle"]), p["scale"]
    dx, dy = x - _c(p["cx"]), y - _c(p["cy"])
    u = (dx * _c(cos) + dy * _c(sin)) / _c(scale) * _c(p["flip"])
    v = (dy * _c(cos) - dx * _c(sin)) / _c(scale)
    zero = torch.zeros(n)
    canvas = _Canvas(n, s)

    # --- scenery: clutter blobs, a branch -------------------------------------------------
    clutter = p["clutter"]                                 # (N, M, 9)
    for k in range(clutter.shape[1]):                      # a fixed handful of layers
        c = clutter[:, k]
        m = _ellipse(xn, yn, c[:, 0], c[:, 1], c[:, 2], c[:, 3], c[:, 4]).logical_and_(_c(c[:, 8] > 0.5))
        canvas.paint(m, c[:, 5:8], CONTEXT_ID)

    hu, hv, hr = 0.5 + p["head_du"], -0.32 + p["head_dv"], p["head_r"]
    beak_len = (0.22 + 0.2 * p["t"][:, 0].clamp(-0.25, 1.25)) * p["beak_scale"]
    beak_u0 = hu + 0.8 * hr
    wu, wv = -0.08 + p["wing_du"], -0.06 + p["wing_dv"]
    leg_top0, leg_end0 = _pt(0.02, 0.2, zero), _pt(-0.03 + p["leg_dx"], 0.52, zero)
    leg_top1, leg_end1 = _pt(0.15, 0.2, zero), _pt(0.12 + p["leg_dx"], 0.52, zero)

    # the branch the bird perches on: through the leg ends, random tilt
    perch = _canonical_to_pixels((leg_end0 + leg_end1) / 2, p)
    along = torch.stack([torch.cos(p["branch_angle"]), torch.sin(p["branch_angle"])], 1) * 2 * s
    canvas.paint(_capsule(x, y, perch - along, perch + along, p["branch_width"] * s), p["branch_colour"], -1)

    # --- the bird, back to front ------------------------------------------------------------
    t = p["t"]                                             # (N, A) attribute levels
    tail_w = 0.2 + p["tail_spread"]
    a, b = _pt(-0.35, -0.09, zero), _pt(-0.35, 0.09, zero)
    c, d = _pt(-1.0, tail_w, zero), _pt(-1.0, -tail_w, zero)
    notch = 0.32 * t[:, 2].clamp(0, 1.25)
    tail = ((_triangle(u, v, a, b, c) | _triangle(u, v, a, c, d))
            & ~_triangle(u, v, _pt(-1.05, -0.16, zero), _pt(-1.05, 0.16, zero),
                         torch.stack([-1.0 + notch, zero], 1)))
    canvas.paint(tail, p["tail_colour"], _TAIL)

    legs = _capsule(u, v, leg_top0, leg_end0, 0.09) | _capsule(u, v, leg_top1, leg_end1, 0.09)
    canvas.paint(legs, _lerp_colour(_LEG_COLOURS, t[:, 6]), _LEGS)

    body = _ellipse(u, v, zero, zero, p["body_a"], p["body_b"])
    canvas.paint(body, _lerp_colour(_BODY_COLOURS, t[:, 5]) + p["body_jitter"], _BODY)

    wing = _ellipse(u, v, wu, wv, 0.36, 0.15, p["wing_angle"])
    wing_axis = (u - _c(wu)) * _c(torch.cos(p["wing_angle"])) + (v - _c(wv)) * _c(torch.sin(p["wing_angle"]))
    bar = wing & (wing_axis >= -0.10) & (wing_axis <= 0.14)
    bar_t = t[:, 1].clamp(0, 1.25)[:, None] * 0.9
    canvas.paint(wing, p["wing_colour"], _WING)
    canvas.paint(bar, p["wing_colour"] + bar_t * (torch.tensor(WING_BAR_COLOUR) - p["wing_colour"]), _WING)

    crest_h = 0.3 * t[:, 3].clamp(0, 1.25)
    crest = _triangle(u, v, torch.stack([hu - 0.17, hv - 0.10], 1), torch.stack([hu + 0.04, hv - 0.19], 1),
                      torch.stack([hu - 0.22, hv - 0.17 - crest_h], 1))
    canvas.paint(_ellipse(u, v, hu, hv, hr, hr) | crest, p["head_colour"], _HEAD)

    eye = _ellipse(u, v, hu + 0.09, hv - 0.05, 0.075, 0.075)
    canvas.paint(eye, _lerp_colour(_EYE_COLOURS, t[:, 4]), _EYE)

    beak = _triangle(u, v, torch.stack([beak_u0, hv - 0.09], 1), torch.stack([beak_u0, hv + 0.075], 1),
                     torch.stack([beak_u0 + beak_len, hv - 0.005], 1))
    canvas.paint(beak, _lerp_colour(_BEAK_COLOURS, t[:, 0]), _BEAK)
    on_bird = (canvas.layer > 0) & (torch.tensor(canvas.parts)[canvas.layer] >= 0)

    # --- an occluding leaf in front -----------------------------------------------------------
    o = p["occluder"]
    leaf = _ellipse(xn, yn, o[:, 0], o[:, 1], o[:, 2], o[:, 3], o[:, 4]).logical_and_(_c(o[:, 8] > 0.5))
    canvas.paint(leaf, o[:, 5:8], CONTEXT_ID)
    on_bird &= ~leaf

    # --- background gradient, light from above (pose only, never the class), sensor noise ----
    g = (xn * _c(torch.cos(p["bg_dir"])) + yn * _c(torch.sin(p["bg_dir"]))).clamp_(0, 1)[:, None]
    background = p["bg0"][:, :, None, None] + g * (p["bg1"] - p["bg0"])[:, :, None, None]
    image = canvas.image(background)
    shade = torch.where(on_bird, 1.0 - 0.25 * v.clamp(-0.6, 0.6), 1.0)[:, None]
    gain = (p["contrast"])[:, None, None, None]
    image = (image * shade - 0.5).mul_(gain).add_(0.5 + p["brightness"][:, None, None, None])
    image.add_(p["noise"] * p["noise_std"][:, None, None, None]).clamp_(0.0, 1.0)

    anchors_c = torch.stack([
        _pt(0.12, 0.17, zero),                              # body: belly, below the wing
        torch.stack([hu - 0.07, hv + 0.03], 1),             # head: crown, away from the eye
        torch.stack([beak_u0 + 0.45 * beak_len, hv - 0.005], 1),
        torch.stack([hu + 0.09, hv - 0.05], 1),             # eye
        torch.stack([wu, wv], 1),                           # wing
        _pt(-0.6, 0.0, zero),                               # tail, before any fork
        (leg_top1 + 2 * leg_end1) / 3,                      # legs: the front leg
    ], dim=1)                                               # (N, P, 2) canonical
    anchors = _canonical_to_pixels(anchors_c.reshape(-1, 2), p, repeat=len(PART_NAMES)).reshape(n, -1, 2)
    return image, canvas.part_ids(), anchors


def _canonical_to_pixels(points: Tensor, p: dict[str, Tensor], repeat: int = 1) -> Tensor:
    """Map canonical points ``(N * repeat, 2)`` to pixel ``(x, y)`` with each sample's pose."""
    def r(t: Tensor) -> Tensor:
        return t.repeat_interleave(repeat)

    cos, sin, scale = r(torch.cos(p["angle"])), r(torch.sin(p["angle"])), r(p["scale"])
    uu = points[:, 0] * r(p["flip"]) * scale
    vv = points[:, 1] * scale
    return torch.stack([r(p["cx"]) + cos * uu - sin * vv, r(p["cy"]) + sin * uu + cos * vv], dim=1)

