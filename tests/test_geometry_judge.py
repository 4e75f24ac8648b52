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


def render_inside(inside, rgb, size: int = 24, ss: int = 8) -> torch.Tensor:
    """An anti-aliased object from an inside test on (x, y) pixel offsets from the image centre, in [-1, 1]."""
    coords = (torch.arange(size * ss, dtype=torch.float64) + 0.5) / ss - size / 2
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cov = torch.nn.functional.avg_pool2d(inside(x, y).to(torch.float32)[None, None], ss)[0, 0]
    img = torch.tensor(rgb, dtype=torch.float32)[:, None, None] * cov[None]
    return img[None] * 2 - 1


def rotated(theta: float):
    def uv(x, y):
        return x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)

    return uv


def render_ellipse(a: float, b: float, theta: float, rgb, size: int = 24) -> torch.Tensor:
    """A filled ellipse (semi-axes a, b pixels, rotated by theta) at the centre."""

    def inside(x, y):
        u, v = rotated(theta)(x, y)
        return (u / a) ** 2 + (v / b) ** 2 <= 1

    return render_inside(inside, rgb, size)


def in_polygon(x, y, verts) -> torch.Tensor:
    """Even-odd test of points against a polygon [(x, y), ...]."""
    inside = torch.zeros(x.shape, dtype=torch.bool)
    for (x1, y1), (x2, y2) in zip(verts, verts[1:] + verts[:1], strict=True):
        crosses = (y1 > y) != (y2 > y)
        inside ^= crosses & (x < x1 + (y - y1) * (x2 - x1) / ((y2 - y1) if y2 != y1 else 1e-12))
    return inside


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


def test_rounded_square_bowed_triangle_and_y_shape(judge):
    """The policy beyond the renders: rounded corners keep a square, bowed-in sides keep a triangle, a Y is none."""
    rgb = COLOUR_RGB["green"]
    for theta in (0.0, 0.5, 1.0):

        def rounded_square(x, y, a=6.0, rho=2.0, theta=theta):
            u, v = rotated(theta)(x, y)
            du, dv = (u.abs() - (a - rho)).clamp_min(0), (v.abs() - (a - rho)).clamp_min(0)
            return (u.abs() <= a) & (v.abs() <= a) & (du**2 + dv**2 <= rho**2)

        assert judge.predict(render_inside(rounded_square, rgb))[0].item() == SHAPES.index("square")
        corners = [
            (8 * math.cos(theta + k * 2 * math.pi / 3), 8 * math.sin(theta + k * 2 * math.pi / 3)) for k in range(3)
        ]
        bowed = []
        for k in range(3):  # each side's midpoint pulled 12% of the inradius towards the centre (solidity ~0.88)
            (x1, y1), (x2, y2) = corners[k], corners[(k + 1) % 3]
            bowed += [(x1, y1), (0.88 * (x1 + x2) / 2, 0.88 * (y1 + y2) / 2)]
        shape = judge.predict(render_inside(lambda x, y, p=bowed: in_polygon(x, y, p), rgb))[0].item()
        assert shape == SHAPES.index("triangle")

        def y_shape(x, y, theta=theta):
            u, v = rotated(theta)(x, y)
            arms = []
            for k in range(3):
                c, s = math.cos(k * 2 * math.pi / 3), math.sin(k * 2 * math.pi / 3)
                along, across = u * c + v * s, -u * s + v * c
                arms.append((along >= 0) & (along <= 8) & (across.abs() <= 1.3))
            return arms[0] | arms[1] | arms[2]

        assert judge.predict(render_inside(y_shape, rgb))[0].item() == -1


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
