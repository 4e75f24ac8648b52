"""A geometric judge of shapes images: measured shape and colour, no training, thresholds fitted on rendered data.

The shipped classifier (``examples/shapes/classifier.py``) is a CNN trained on clean renders; on generated images it
is lenient (it calls oval blobs circles). This judge measures instead:

* segmentation: the background colour is the median of the image's 2-pixel border; every pixel gets a coverage
  ``c`` in [0, 1] by projecting ``pixel - background`` on ``foreground - background`` (the anti-aliasing model of
  ``data.render``); the shape is the largest 8-connected region of ``c > 0.5``, plus its 1-pixel rim;
* features of that region: its area (the sum of ``c``), the convex hull (monotone chain) of its sub-pixel 0.5
  contour, ``fill`` = area / area of the circle around the centroid through the farthest hull vertex (circle 1,
  square 0.64, star 0.47, triangle 0.41), ``solidity`` = area / hull area (star 0.62, the others 1),
  ``rectangularity`` = area / area of the smallest rectangle around the hull (square 1, circle and every ellipse
  0.79, triangle 0.5), ``elongation`` = sqrt of the ratio of the second moments' eigenvalues (1 for every regular
  shape, 1.6 for an ellipse of aspect 1.6), ``arms`` = the number of outward peaks of the contour's radial profile
  around the centroid (circle 0, triangle 3, square up to 4, star 5), and ``holes`` = area of background enclosed
  by the shape / area;
* colour: the hue of every core pixel (``c > 0.75``) classed against hue boundaries; the colour is the majority
  class if it holds ``colour_share`` of the core and the core is saturated enough, else -1.

Verdicts (``GeometryJudge.predict``): shape index into :data:`~examples.shapes.data.SHAPES` and colour index into
:data:`~examples.shapes.data.COLOURS`, or -1 for "none": both are -1 for an image with no single clear object
(blank, noise, several blobs, a noisy background); shape alone is -1 for an object that is none of the four shapes
(elongated like an oval, with holes, concave without a star's arms, or neither cornered nor round), colour alone
for a mixed or grey object. The decision for a clear object is a cascade of calibrated thresholds:

    holes > max_holes                                     -> -1
    solidity < star_solidity (concave)                    -> star if arms in star_arms and fill < circle_fill;
                                                             triangle if arms in triangle_arms, solidity >=
                                                             min_triangle_solidity, fill < triangle_fill and not
                                                             elongated (bowed-in sides); else -1 (a crescent, a Y)
    elongation > max_elongation                           -> -1 (an oval, a rectangle, a long triangle)
    fill < triangle_fill                                  -> triangle if arms in triangle_arms and rect < square_rect,
                                                             else -1 (a half-disc, a sliver)
    rect >= square_rect                                   -> square (corners rounded or not)
    fill >= circle_fill                                   -> circle
    otherwise                                             -> -1 (neither cornered nor round: a pentagon, a blob)

:func:`calibrate` fits the thresholds on rendered images (``data.make_batch``, fixed seed, with mild noise, blur,
contrast and background augmentation) and reports the accuracy on held-out renders; the result is stored in
``benchmarks/results/geometry_judge_calibration.json`` (``python examples/shapes/calibrate_geometry.py``), which
:func:`load_geometry_judge` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from examples.shapes.data import COLOUR_RGB, COLOURS, SHAPES, make_batch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = ROOT / "benchmarks" / "results" / "geometry_judge_calibration.json"
FEATURES = ("area", "fill", "solidity", "rectangularity", "elongation", "arms", "holes", "component_share", "contrast",
            "border_noise", "saturation")  # fmt: skip
_BORDER = 2


@dataclass
class Thresholds:
    """The judge's decision thresholds (see the module docstring). The defaults are the values :func:`calibrate`
    fits with its defaults (stored in ``geometry_judge_calibration.json``); those marked "policy" are chosen, not
    fitted: how far from a clean render an object may be and still get a verdict."""

    min_contrast: float = 0.25  # policy: |foreground - background| (RGB in [0, 1]) below this: no object
    max_border_noise: float = 0.2  # policy: median distance of border pixels from the background colour: noise
    min_area: float = 9.0  # policy: pixels of the object (a 24x24 render has 38-142)
    max_area: float = 290.0  # policy
    min_component_share: float = 0.8  # policy: the largest region's share of all foreground coverage
    max_elongation: float = 1.2  # policy: renders stay below 1.05; an ellipse of aspect 1.2 passes, 1.25 does not
    max_holes: float = 0.1  # policy: enclosed background / area (renders: 0)
    min_triangle_solidity: float = 0.8  # policy: a three-armed object this solid is a triangle with bowed-in sides
    star_solidity: float = 0.9398  # fitted: stars below (renders: stars <= 0.92, the others >= 0.96)
    triangle_fill: float = 0.6437  # fitted: triangles below (renders: triangles <= 0.62, squares >= 0.66)
    circle_fill: float = 0.8471  # fitted: circles above (renders: squares <= 0.80, circles >= 0.92)
    square_rect: float = 0.8604  # fitted: squares above (renders: circles <= 0.82, squares >= 0.91)
    star_arms: tuple = (4, 5)  # fitted: the range of arms of rendered stars
    triangle_arms: tuple = (3, 3)  # fitted: the arms of rendered triangles
    min_saturation: float = 0.35  # policy: (max - min) / max of the core's median colour (renders: >= 0.77)
    min_colour_share: float = 0.6  # policy: the majority hue class's share of the core pixels
    hue_bounds: tuple = (26.47, 88.61, 176.52, 294.37)  # fitted: red|yellow, yellow|green, green|blue, blue|red


def _palette_hues() -> dict[str, float]:
    out = {}
    for name in COLOURS:
        r, g, b = COLOUR_RGB[name]
        out[name] = float(_hue(np.array([[r, g, b]]))[0])
    return out


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of (..., 3) RGB."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn > 1e-9, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return (h * 60.0) % 360.0


def hue_class(hue: np.ndarray, bounds) -> np.ndarray:
    """COLOURS index of each hue given the four boundaries red|yellow, yellow|green, green|blue, blue|red."""
    ry, yg, gb, br = bounds
    out = np.full(hue.shape, COLOURS.index("red"), dtype=np.int64)
    out[(hue >= ry) & (hue < yg)] = COLOURS.index("yellow")
    out[(hue >= yg) & (hue < gb)] = COLOURS.index("green")
    out[(hue >= gb) & (hue < br)] = COLOURS.index("blue")
    return out


# ---------------------------------------------------------------------------------------------------- geometry
def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of (m, 2) points, counter-clockwise, by Andrew's monotone chain (collinear points dropped)."""
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)  # sorted by x, then y
    if len(pts) <= 2:
        return pts

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 1e-12:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon (m, 2) (absolute value)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def min_area_rectangle(hull: np.ndarray) -> float:
    """Area of the smallest rectangle around a convex polygon (one side lies on a hull edge)."""
    if len(hull) < 3:
        return 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    norms = np.linalg.norm(edges, axis=1)
    u = edges[norms > 1e-12] / norms[norms > 1e-12, None]  # (e, 2) edge directions
    v = np.stack([-u[:, 1], u[:, 0]], 1)
    pu, pv = hull @ u.T, hull @ v.T  # (m, e)
    areas = (pu.max(0) - pu.min(0)) * (pv.max(0) - pv.min(0))
    return float(areas.min())


def min_enclosing_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Smallest circle (cx, cy, r) around (m, 2) points (incremental Welzl; exact, fine for hull-sized sets)."""
    pts = [tuple(p) for p in np.asarray(points, dtype=np.float64)]

    def inside(c, p) -> bool:
        return (p[0] - c[0]) ** 2 + (p[1] - c[1]) ** 2 <= c[2] ** 2 * (1 + 1e-9) + 1e-12

    def two(a, b):
        return ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, math.dist(a, b) / 2)

    def three(a, b, c):
        d = 2 * (a[0] * (b[1] - c[1]) + b[0] * (c[1] - a[1]) + c[0] * (a[1] - b[1]))
        if abs(d) < 1e-12:  # collinear: the widest pair
            return max((two(a, b), two(a, c), two(b, c)), key=lambda t: t[2])
        sa, sb, sc = a[0] ** 2 + a[1] ** 2, b[0] ** 2 + b[1] ** 2, c[0] ** 2 + c[1] ** 2
        ux = (sa * (b[1] - c[1]) + sb * (c[1] - a[1]) + sc * (a[1] - b[1])) / d
        uy = (sa * (c[0] - b[0]) + sb * (a[0] - c[0]) + sc * (b[0] - a[0])) / d
        return (ux, uy, math.dist((ux, uy), a))

    if not pts:
        return (0.0, 0.0, 0.0)
    c = (pts[0][0], pts[0][1], 0.0)
    for i in range(1, len(pts)):
        if inside(c, pts[i]):
            continue
        c = (pts[i][0], pts[i][1], 0.0)
        for j in range(i):
            if inside(c, pts[j]):
                continue
            c = two(pts[i], pts[j])
            for k in range(j):
                if not inside(c, pts[k]):
                    c = three(pts[i], pts[j], pts[k])
    return c


def count_arms(points: np.ndarray, centre, bins: int = 48, prominence: float = 0.2) -> int:
    """Number of outward peaks of the radial profile of contour points around `centre`: the farthest point per
    angular bin (empty bins filled from their neighbours), circularly smoothed; a peak counts when it rises at least
    `prominence` x the largest radius above the lowest point on either side before a higher peak (5 for a star,
    3 for a triangle, 4 for a square at most, 0 for a circle)."""
    d = points - np.asarray(centre)[None]
    ang = np.arctan2(d[:, 1], d[:, 0])
    rad = np.hypot(d[:, 0], d[:, 1])
    b = ((ang + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    prof = np.full(bins, np.nan)
    for k in range(bins):
        if (b == k).any():
            prof[k] = rad[b == k].max()
    if np.isnan(prof).all():
        return 0
    idx = np.arange(bins)
    good = ~np.isnan(prof)
    prof = np.interp(idx, np.concatenate([idx[good] - bins, idx[good], idx[good] + bins]), np.tile(prof[good], 3))
    prof = (np.roll(prof, 1) + 2 * prof + np.roll(prof, -1)) / 4
    need = prominence * prof.max()
    arms = 0
    for k in range(bins):
        if not (prof[k] > prof[k - 1] and prof[k] >= prof[(k + 1) % bins]):
            continue
        lows = []
        for step in (1, -1):  # walk each way until a higher point; the lowest point on the way
            low, j = prof[k], k
            for _ in range(bins - 1):
                j = (j + step) % bins
                if prof[j] > prof[k]:
                    break
                low = min(low, prof[j])
            lows.append(low)
        if prof[k] - max(lows) >= need:
            arms += 1
    return arms


def _components(mask: np.ndarray, eight: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of a boolean image: (labels (H, W) with 0 = off, 1..k; k)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    k = 0
    for i0, j0 in zip(*np.nonzero(mask), strict=True):
        if labels[i0, j0]:
            continue
        k += 1
        labels[i0, j0] = k
        stack = [(i0, j0)]
        while stack:
            i, j = stack.pop()
            for di, dj in steps:
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and mask[a, b] and not labels[a, b]:
                    labels[a, b] = k
                    stack.append((a, b))
    return labels, k


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _contour_points(cov: np.ndarray, mask: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Sub-pixel points of the level contour of `cov` (linear interpolation between 4-neighbours that straddle it),
    plus the centres of `mask` pixels on the image edge (where the contour leaves the image). (m, 2) as (x, y)."""
    pts = []
    for axis in (0, 1):
        a = cov[:-1, :] if axis == 0 else cov[:, :-1]
        b = cov[1:, :] if axis == 0 else cov[:, 1:]
        ii, jj = np.nonzero((a > level) != (b > level))
        t = (level - a[ii, jj]) / (b[ii, jj] - a[ii, jj])
        y = ii + 0.5 + (t if axis == 0 else 0.0)
        x = jj + 0.5 + (t if axis == 1 else 0.0)
        pts.append(np.stack([x, y], 1))
    edge = mask.copy()
    edge[1:-1, 1:-1] = False
    ii, jj = np.nonzero(edge)
    pts.append(np.stack([jj + 0.5, ii + 0.5], 1).astype(np.float64))
    return np.concatenate(pts)


def image_features(img: np.ndarray) -> dict:
    """Features of one image, (3, H, W) RGB in [0, 1] (see the module docstring). Missing geometry is NaN."""
    img = np.asarray(img, dtype=np.float64)
    _, h, w = img.shape
    rgb = img.transpose(1, 2, 0)  # (H, W, 3)
    frame = np.ones((h, w), dtype=bool)
    frame[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    bg = np.median(rgb[frame], axis=0)
    diff = rgb - bg
    dist = np.linalg.norm(diff, axis=-1)
    border_noise = float(np.median(dist[frame]))
    feats = dict.fromkeys(FEATURES, float("nan"))
    feats.update(border_noise=border_noise, area=0.0, contrast=0.0, component_share=0.0)
    peak = float(np.quantile(dist, 0.98))
    if peak <= 1e-6:
        feats["core_rgb"] = [float("nan")] * 3
        return feats
    fg = np.median(rgb[dist >= 0.6 * peak], axis=0)
    axis_vec = fg - bg
    contrast = float(np.linalg.norm(axis_vec))
    feats["contrast"] = contrast
    cov = np.clip(diff @ axis_vec / max(contrast**2, 1e-12), 0.0, 1.0)
    mask = cov > 0.5
    labels, k = _components(mask)
    if k == 0:
        feats["core_rgb"] = [float("nan")] * 3
        return feats
    sizes = np.bincount(labels.ravel(), weights=cov.ravel(), minlength=k + 1)[1:]
    best = int(np.argmax(sizes)) + 1
    obj = labels == best
    region = _dilate(obj)
    # the object's rim may hold other regions' pixels only through their own (dropped) components
    region &= ~((labels > 0) & (labels != best))
    cov_obj = np.where(region, cov, 0.0)
    area = float(cov_obj.sum())
    total = area + float(np.where((cov > 0.25) & ~region, cov, 0.0).sum())
    feats.update(area=area, component_share=area / max(total, 1e-12))
    # holes: background regions enclosed by the object (not reaching the image edge)
    bg_labels, kb = _components(~obj, eight=False)
    edge_labels = set(np.unique(np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])))
    hole = np.isin(bg_labels, [lab for lab in range(1, kb + 1) if lab not in edge_labels])
    feats["holes"] = float((1 - cov[hole]).sum()) / max(area, 1e-12)
    # colour of the core
    core = obj & (cov > 0.75)
    if not core.any():
        core = obj
    core_rgb = rgb[core]
    med = np.median(core_rgb, axis=0)
    feats["core_rgb"] = [float(v) for v in med]
    feats["saturation"] = float((med.max() - med.min()) / max(med.max(), 1e-12))
    feats["core_hues"] = _hue(core_rgb)
    # geometry
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((cov_obj * xx).sum() / area), float((cov_obj * yy).sum() / area)
    dx, dy = xx - cx, yy - cy
    mxx, myy = (cov_obj * dx * dx).sum() / area, (cov_obj * dy * dy).sum() / area
    mxy = (cov_obj * dx * dy).sum() / area
    sigma = np.array([[mxx, mxy], [mxy, myy]])
    ev, vecs = np.linalg.eigh(sigma)
    if ev[0] <= 1e-12:
        return feats
    feats["elongation"] = float(math.sqrt(ev[1] / ev[0]))
    # whitening with determinant 1 (areas kept): an ellipse becomes a circle, a rectangle a square; the shape class
    # is read from these affine-invariant figures and the distortion from the elongation alone
    white = vecs @ np.diag((ev.prod() ** 0.25) / np.sqrt(ev)) @ vecs.T
    pts = (_contour_points(np.where(region, cov, 0.0), obj) - [cx, cy]) @ white.T
    hull = convex_hull(pts)
    hull_area = polygon_area(hull)
    if hull_area <= 1e-9:
        return feats
    _, _, radius = min_enclosing_circle(hull)
    feats["fill"] = area / (math.pi * max(radius, 1e-6) ** 2)
    feats["solidity"] = area / hull_area
    feats["rectangularity"] = area / max(min_area_rectangle(hull), 1e-12)
    feats["arms"] = float(count_arms(pts, (0.0, 0.0)))
    return feats


# ---------------------------------------------------------------------------------------------------- decisions
def decide(feats: dict, th: Thresholds) -> tuple[int, int]:
    """(shape index or -1, colour index or -1) of one image's features."""
    valid = (
        feats["contrast"] >= th.min_contrast
        and feats["border_noise"] <= th.max_border_noise
        and th.min_area <= feats["area"] <= th.max_area
        and feats["component_share"] >= th.min_component_share
        and np.isfinite(feats["fill"])
    )
    if not valid:
        return -1, -1
    # colour
    colour = -1
    hues = feats["core_hues"]
    if feats["saturation"] >= th.min_saturation and len(hues):
        votes = np.bincount(hue_class(hues, th.hue_bounds), minlength=len(COLOURS))
        top = int(votes.argmax())
        if votes[top] >= th.min_colour_share * len(hues):
            colour = top
    # shape: every class needs all its figures to agree; an object between them is none of the four
    fill, rect, arms = feats["fill"], feats["rectangularity"], feats["arms"]
    round_, cornered = fill >= th.circle_fill, rect >= th.square_rect
    three, long_ = th.triangle_arms[0] <= arms <= th.triangle_arms[1], feats["elongation"] > th.max_elongation
    if feats["holes"] > th.max_holes:
        shape = -1
    elif feats["solidity"] < th.star_solidity:  # concave: a star, a triangle with bowed-in sides, or neither
        if th.star_arms[0] <= arms <= th.star_arms[1] and not round_:
            shape = SHAPES.index("star")
        elif three and feats["solidity"] >= th.min_triangle_solidity and fill < th.triangle_fill and not long_:
            shape = SHAPES.index("triangle")
        else:
            shape = -1
    elif long_:  # an oval, a rectangle, a long triangle
        shape = -1
    elif fill < th.triangle_fill:
        shape = SHAPES.index("triangle") if th.triangle_arms[0] <= arms <= th.triangle_arms[1] and not cornered else -1
    elif cornered:  # rectangularity, not fill, tells a square with rounded corners from a circle
        shape = SHAPES.index("square")
    elif round_:
        shape = SHAPES.index("circle")
    else:
        shape = -1
    return shape, colour


class GeometryJudge:
    """Shape and colour by measurement; mirrors ``ShapesClassifier.predict`` but returns indices (-1: none)."""

    def __init__(self, thresholds: Thresholds | None = None):
        self.thresholds = thresholds or Thresholds()

    def features(self, x: torch.Tensor) -> list[dict]:
        """Per-image feature dicts of images in [-1, 1], (n, 3, H, W)."""
        arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
        return [image_features(a) for a in arr]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shape_idx (n,), colour_idx (n,))`` int64 for images in [-1, 1] (as the classifier takes them)."""
        out = [decide(f, self.thresholds) for f in self.features(x)]
        shape = torch.tensor([s for s, _ in out], dtype=torch.int64).reshape(-1)
        colour = torch.tensor([c for _, c in out], dtype=torch.int64).reshape(-1)
        return shape, colour


def load_geometry_judge(path=DEFAULT_CALIBRATION) -> GeometryJudge:
    """The judge with the thresholds stored by :func:`calibrate` (defaults of :class:`Thresholds` when absent)."""
    p = Path(path)
    if not p.is_file():
        return GeometryJudge()
    th = json.loads(p.read_text())["thresholds"]
    th["hue_bounds"] = tuple(th["hue_bounds"])
    th["triangle_arms"] = tuple(th["triangle_arms"])
    th["star_arms"] = tuple(th["star_arms"])
    return GeometryJudge(Thresholds(**th))


# ---------------------------------------------------------------------------------------------------- calibration
def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Mild corruptions of [-1, 1] renders, per image: Gaussian blur (sigma 0-0.8 px), contrast 0.75-1.05, a
    background offset (grey up to 0.12), pixel noise (sigma 0-0.06), all in [0, 1] units, times `strength`."""
    n, c, h, w = images.shape
    x = (images + 1) / 2
    u = torch.rand(n, 5, generator=generator)
    sig = 0.8 * strength * u[:, 0]
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-(k[None] ** 2) / (2 * sig[:, None].clamp_min(1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (n, 5)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    rows = sum(ker[:, i, None, None, None] * xp[:, :, :, i : i + w] for i in range(5))
    x = sum(ker[:, i, None, None, None] * rows[:, :, i : i + h, :] for i in range(5))
    contrast = 1 - strength * (0.25 * u[:, 1] - 0.05)
    offset = 0.12 * strength * u[:, 2]
    x = x * contrast[:, None, None, None] + offset[:, None, None, None] * (1 - x.mean(1, keepdim=True).clamp(0, 1))
    noise = 0.06 * strength * u[:, 3]
    x = x + noise[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 2 - 1).float()


def rendered_set(n: int, seed: int, size: int = 24, augmented: bool = True):
    """(images in [-1, 1], shape_idx, colour_idx) of `n` renders (half of them augmented when `augmented`)."""
    images, s, c = make_batch(n, seed, size=size)
    if augmented:
        g = torch.Generator().manual_seed(seed + 7919)
        half = n // 2
        images = torch.cat([images[:half], augment(images[half:], g)])
    return images, s, c


def _best_split(a: np.ndarray, b: np.ndarray) -> float:
    """Threshold t maximising the balanced accuracy of "a < t, b >= t" (midpoint between neighbouring values)."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    vals = np.unique(np.concatenate([a, b]))
    cands = (vals[:-1] + vals[1:]) / 2
    acc = (a[:, None] < cands[None]).mean(0) + (b[:, None] >= cands[None]).mean(0)
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float((cands[best[0]] + cands[best[-1]]) / 2)  # the middle of the best plateau


def _accuracy_report(shape_pred, colour_pred, s, c) -> dict:
    s, c = np.asarray(s), np.asarray(c)
    sp, cp = np.asarray(shape_pred), np.asarray(colour_pred)
    rep = {
        "images": int(len(s)),
        "shape": float((sp == s).mean()),
        "colour": float((cp == c).mean()),
        "both": float(((sp == s) & (cp == c)).mean()),
        "shape_none": float((sp == -1).mean()),
        "colour_none": float((cp == -1).mean()),
        "per_shape": {name: float((sp[s == i] == i).mean()) for i, name in enumerate(SHAPES)},
        "per_colour": {name: float((cp[c == i] == i).mean()) for i, name in enumerate(COLOURS)},
    }
    confusion = np.zeros((len(SHAPES), len(SHAPES) + 1), dtype=int)
    for t, p in zip(s, sp, strict=True):
        confusion[t, p if p >= 0 else len(SHAPES)] += 1
    rep["shape_confusion"] = {SHAPES[i]: dict(zip([*SHAPES, "none"], map(int, row), strict=True))
                              for i, row in enumerate(confusion)}  # fmt: skip
    return rep


def calibrate(n_fit: int = 4000, n_test: int = 4000, seed: int = 0, size: int = 24) -> dict:
    """Fit the shape and hue thresholds on `n_fit` renders (seed `seed`; half augmented), report held-out accuracy on
    `n_test` fresh renders (seed `seed + 1`): clean, augmented as in the fit, and augmented 1.5 times as strongly
    (blur up to 1.2 px, noise up to 0.09: more than the fit saw). Returns a JSON-ready dict."""
    th = Thresholds()
    images, s, c = rendered_set(n_fit, seed, size)
    judge = GeometryJudge(th)
    feats = judge.features(images)
    s, c = s.numpy(), c.numpy()
    col = {k: np.array([f[k] for f in feats], dtype=np.float64) for k in FEATURES}
    idx = {name: s == i for i, name in enumerate(SHAPES)}
    # stars by solidity; then triangles by fill; then circle / square by fill and by rectangularity
    th.star_solidity = _best_split(col["solidity"][idx["star"]], col["solidity"][~idx["star"]])
    solid = ~idx["star"]
    th.triangle_fill = _best_split(col["fill"][idx["triangle"]], col["fill"][solid & ~idx["triangle"]])
    th.circle_fill = _best_split(col["fill"][idx["square"]], col["fill"][idx["circle"]])
    th.square_rect = _best_split(col["rectangularity"][idx["circle"]], col["rectangularity"][idx["square"]])
    # arm counts: the range seen on the renders of each
    star, tri = col["arms"][idx["star"]], col["arms"][idx["triangle"]]
    th.star_arms = (int(np.nanmin(star)), int(np.nanmax(star)))
    th.triangle_arms = (int(np.nanmin(tri)), int(np.nanmax(tri)))
    # hue boundaries: circular midpoints between the colours' median core hues
    hues = {}
    for i, name in enumerate(COLOURS):
        hs = np.concatenate([feats[j]["core_hues"] for j in np.flatnonzero(c == i)])
        ang = np.deg2rad(hs)
        hues[name] = float(np.rad2deg(math.atan2(np.median(np.sin(ang)), np.median(np.cos(ang)))) % 360)
    order = ["red", "yellow", "green", "blue"]
    bounds = []
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        ha, hb = hues[a], hues[b]
        hb = hb + 360 if hb < ha else hb
        bounds.append(round(((ha + hb) / 2) % 360, 2))
    th.hue_bounds = tuple(sorted(bounds))
    for name in ("star_solidity", "triangle_fill", "circle_fill", "square_rect"):
        setattr(th, name, round(getattr(th, name), 4))
    judge = GeometryJudge(th)
    report = {"fit": _accuracy_report(*[t.numpy() for t in judge.predict(images)], s, c)}
    clean, ts, tc = make_batch(n_test, seed + 1, size=size)
    report["held_out_clean"] = _accuracy_report(*[t.numpy() for t in judge.predict(clean)], ts.numpy(), tc.numpy())
    for name, strength in (("held_out_augmented", 1.0), ("held_out_augmented_x1.5", 1.5)):
        aug = augment(clean, torch.Generator().manual_seed(seed + 2), strength)
        report[name] = _accuracy_report(*[t.numpy() for t in judge.predict(aug)], ts.numpy(), tc.numpy())
    stats = {
        name: {k: [round(float(np.nanquantile(col[k][idx[name]], q)), 4) for q in (0.01, 0.5, 0.99)]
               for k in ("fill", "solidity", "rectangularity", "elongation", "arms", "area")}
        for name in SHAPES
    }  # fmt: skip
    return {
        "thresholds": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(th).items()},
        "palette_hues": {k: round(v, 2) for k, v in _palette_hues().items()},
        "median_core_hues": {k: round(v, 2) for k, v in hues.items()},
        "feature_quantiles_1_50_99": stats,
        "config": {"n_fit": n_fit, "n_test": n_test, "seed": seed, "size": size},
        "report": report,
    }
