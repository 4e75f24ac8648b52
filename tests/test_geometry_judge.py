"""The geometric shapes judge (examples/shapes/geometry.py): accuracy on fresh renders, "none" verdicts for blank,
noisy and oval images, its geometry helpers, and determinism."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from examples.shapes import geometry as geo
from examples.shapes.data import COLOUR_RGB, COLOURS, SHAPES, make_batch


@pytest.fixture(scope="module")
def judge():
    return geo.load_geometry_judge()


def test_stored_calibration_matches_the_defaults():
    stored = json.loads(geo.DEFAULT_CALIBRATION.read_text())
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(geo.Thresholds()).items()}
    assert stored["thresholds"] == defaults
    assert stored["report"]["held_out_clean"]["both"] >= 0.99
    assert stored["report"]["held_out_augmented"]["both"] >= 0.98


def test_accuracy_on_fresh_renders(judge):
    """Renders the calibration never saw (another seed), half of them blurred, dimmed and noisy."""
    images, s, c = geo.rendered_set(400, seed=12345)
    shape, colour = judge.predict(images)
    assert (shape == s).float().mean() >= 0.97
    assert (colour == c).float().mean() >= 0.99
    for k in range(len(SHAPES)):
        assert (shape[s == k] == k).float().mean() >= 0.93, SHAPES[k]
    # at 32x32 too (the classifier's other training size), clean
    images, s, c = make_batch(200, 777, size=32)
    shape, colour = judge.predict(images)
    assert (shape == s).float().mean() >= 0.95 and (colour == c).float().mean() >= 0.99


def test_blank_and_noise_images_get_no_verdict(judge):
    g = torch.Generator().manual_seed(0)
    blank = [torch.full((1, 3, 24, 24), v) for v in (-1.0, 0.0, 1.0)]  # black, grey, white
    noise = [torch.rand(4, 3, 24, 24, generator=g) * 2 - 1, torch.randn(4, 3, 24, 24, generator=g).clamp(-1, 1)]
    grey_noise = -1 + 0.3 * torch.rand(2, 1, 24, 24, generator=g).expand(-1, 3, -1, -1)  # dark speckle, no object
    for x in [*blank, *noise, grey_noise]:
        shape, colour = judge.predict(x)
        assert shape.eq(-1).all() and colour.eq(-1).all()


def render_ellipse(a: float, b: float, theta: float, rgb, size: int = 24, ss: int = 8) -> torch.Tensor:
    """An anti-aliased filled ellipse (semi-axes a, b pixels, rotated by theta) at the centre, in [-1, 1]."""
    coords = (torch.arange(size * ss, dtype=torch.float64) + 0.5) / ss - size / 2
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    inside = ((u / a) ** 2 + (v / b) ** 2 <= 1).to(torch.float32)[None, None]
    cov = torch.nn.functional.avg_pool2d(inside, ss)[0, 0]
    img = torch.tensor(rgb, dtype=torch.float32)[:, None, None] * cov[None]
    return img[None] * 2 - 1


def test_an_oval_is_not_a_circle(judge):
    circle = SHAPES.index("circle")
    for k, colour in enumerate(COLOURS):
        for theta in (0.0, 0.4, 1.1, 2.0):
            oval = render_ellipse(8.0, 5.0, theta, COLOUR_RGB[colour])  # aspect 1.6
            shape, col = judge.predict(oval)
            assert int(shape) != circle and int(shape) == -1
            assert int(col) == k  # the colour is still read
            disc = render_ellipse(6.0, 6.0, theta, COLOUR_RGB[colour])  # the same renderer, aspect 1: a circle
            assert judge.predict(disc)[0].item() == circle


def test_geometry_helpers():
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2], [1, 1], [1, 0], [0.5, 1.5]], dtype=float)
    hull = geo.convex_hull(square)
    assert len(hull) == 4 and geo.polygon_area(hull) == pytest.approx(4.0)
    assert geo.min_area_rectangle(hull) == pytest.approx(4.0)
    rot = np.array([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    assert geo.min_area_rectangle(geo.convex_hull(square @ rot.T)) == pytest.approx(4.0)
    cx, cy, r = geo.min_enclosing_circle(hull)
    assert (cx, cy, r) == pytest.approx((1.0, 1.0, math.sqrt(2)))
    ang = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    star_r = np.where(np.arange(200) % 40 < 20, 5.0, 2.5)  # five arms
    pts = np.stack([star_r * np.cos(ang), star_r * np.sin(ang)], 1)
    assert geo.count_arms(pts, (0.0, 0.0)) == 5
    assert geo.count_arms(np.stack([np.cos(ang), np.sin(ang)], 1) * 4, (0.0, 0.0)) == 0


def test_deterministic(judge):
    images, _, _ = geo.rendered_set(40, seed=3)
    a = judge.predict(images)
    b = geo.GeometryJudge().predict(images.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(geo.rendered_set(8, seed=3)[0], geo.rendered_set(8, seed=3)[0])
    c1 = geo.calibrate(n_fit=120, n_test=40, seed=5)
    c2 = geo.calibrate(n_fit=120, n_test=40, seed=5)
    assert c1 == c2
