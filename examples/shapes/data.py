"""Procedural shapes dataset: one coloured shape on a black background, with known labels.

Every image shows exactly ONE shape from :data:`SHAPES` in ONE colour from :data:`COLOURS`, at a random
size, position and rotation, on a plain black background (RGB 0, 0, 0, i.e. -1 after scaling to [-1, 1]).
Shapes are rendered with numpy/torch only: an inside/outside test on a supersampled grid, then box-averaged
down to the target size, which gives anti-aliased edges. Pixels entirely inside the shape carry exactly the
colour's RGB value; pixels entirely outside are exactly black.

Generation is deterministic: the same seed (or the same ``torch.Generator`` state), size and options give
bit-identical images. There is no stored data; any number of samples can be made on the fly.

Geometry (``s`` is the per-sample "size", drawn uniformly from ``size_range * H``):

* circle: radius ``s``
* square: half side ``0.85 s`` (so its corners reach ``1.2 s`` from the centre)
* triangle: equilateral, circumradius ``1.25 s``
* star: five points, outer radius ``1.3 s``, inner radius ``0.5 * 1.3 s``

:func:`shape_area` gives the exact area these imply, in pixels.
"""

from __future__ import annotations

import math

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
# RGB in [0, 1]; chosen to be far apart from each other and from the black background.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND_RGB: tuple[float, float, float] = (0.0, 0.0, 0.0)

DEFAULT_SIZE = 32
DEFAULT_SIZE_RANGE = (0.18, 0.28)  # fraction of the image side, for the size parameter s
SUPERSAMPLE = 4

# Extent factors: the distance from the centre to the farthest point of each shape, in units of s.
_EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2.0), "triangle": 1.25, "star": 1.3}
_STAR_INNER = 0.5
_MAX_VERTS = 10


def shape_area(shape: str, s: float) -> float:
    """Exact area (in pixels^2) of ``shape`` at size parameter ``s`` (pixels)."""
    if shape == "circle":
        return math.pi * s * s
    if shape == "square":
        return (2 * 0.85 * s) ** 2
    if shape == "triangle":
        r = 1.25 * s
        return 3 * math.sqrt(3) / 4 * r * r
    if shape == "star":
        r_out = 1.3 * s
        return 5 * r_out * (_STAR_INNER * r_out) * math.sin(math.radians(36))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _index_list(names, universe, kind):
    if names is None:
        return list(range(len(universe)))
    out = []
    for n in names:
        if isinstance(n, int):
            if not 0 <= n < len(universe):
                raise ValueError(f"{kind} index {n} out of range for {universe}")
            out.append(n)
        elif n in universe:
            out.append(universe.index(n))
        else:
            raise ValueError(f"unknown {kind} {n!r}; expected one of {universe}")
    if not out:
        raise ValueError(f"empty {kind} list")
    return out


def _polygon(shape_idx: int, s: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Vertices (n, _MAX_VERTS, 2) centred at 0, padded by repeating the first vertex (zero-length edges)."""
    name = SHAPES[shape_idx]
    if name == "square":
        radii = [0.85 * math.sqrt(2.0)] * 4
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif name == "triangle":
        radii = [1.25] * 3
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif name == "star":
        radii = [1.3 if k % 2 == 0 else 1.3 * _STAR_INNER for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:
        raise ValueError(name)
    radii = radii + [radii[0]] * (_MAX_VERTS - len(radii))
    angles = angles + [angles[0]] * (_MAX_VERTS - len(angles))
    r = torch.tensor(radii, dtype=torch.float64)[None, :] * s[:, None]
    a = torch.tensor(angles, dtype=torch.float64)[None, :] + theta[:, None]
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=-1)


def _inside_polygon(px: torch.Tensor, py: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """Even-odd crossing test. px, py: (n, P) point coordinates relative to centre; verts: (n, V, 2)."""
    inside = torch.zeros(px.shape, dtype=torch.bool)
    nv = verts.shape[1]
    for i in range(nv):
        x1, y1 = verts[:, i, 0:1], verts[:, i, 1:2]
        x2, y2 = verts[:, (i + 1) % nv, 0:1], verts[:, (i + 1) % nv, 1:2]
        straddles = (y1 > py) != (y2 > py)
        dy = torch.where(y2 == y1, torch.ones_like(y2), y2 - y1)
        x_cross = x1 + (py - y1) * (x2 - x1) / dy
        inside ^= straddles & (px < x_cross)
    return inside


def render(
    shape_idx: torch.Tensor,
    colour_idx: torch.Tensor,
    s: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    theta: torch.Tensor,
    size: int = DEFAULT_SIZE,
    supersample: int = SUPERSAMPLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render given parameters (pixels, radians) to (images in [-1, 1] (n, 3, H, W), coverage (n, H, W) in [0, 1])."""
    n = shape_idx.shape[0]
    hs = size * supersample
    # Sub-pixel centres in pixel units: pixel (i, j) covers [j, j+1) x [i, i+1).
    coords = (torch.arange(hs, dtype=torch.float64) + 0.5) / supersample
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    gx = gx.reshape(1, -1)
    gy = gy.reshape(1, -1)
    cover = torch.zeros(n, hs * hs, dtype=torch.bool)
    s = s.to(torch.float64)
    px = gx - cx.to(torch.float64)[:, None]
    py = gy - cy.to(torch.float64)[:, None]
    for k, name in enumerate(SHAPES):
        sel = (shape_idx == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        if name == "circle":
            cover[sel] = px[sel] ** 2 + py[sel] ** 2 <= s[sel, None] ** 2
        else:
            verts = _polygon(k, s[sel], theta.to(torch.float64)[sel])
            cover[sel] = _inside_polygon(px[sel], py[sel], verts)
    cov = cover.reshape(n, 1, hs, hs).to(torch.float32)
    cov = torch.nn.functional.avg_pool2d(cov, supersample).reshape(n, size, size)
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)[colour_idx]  # (n, 3)
    bg = torch.tensor(BACKGROUND_RGB, dtype=torch.float32)
    img = bg[None, :, None, None] * (1 - cov[:, None]) + rgb[:, :, None, None] * cov[:, None]
    return img * 2 - 1, cov


def sample_params(n, generator, size=DEFAULT_SIZE, shapes=None, colours=None, size_range=DEFAULT_SIZE_RANGE):
    """Draw labels and geometry for ``n`` samples. Returns a dict of tensors (pixels / radians)."""
    shape_pool = torch.tensor(_index_list(shapes, SHAPES, "shape"))
    colour_pool = torch.tensor(_index_list(colours, COLOURS, "colour"))
    shape_idx = shape_pool[torch.randint(len(shape_pool), (n,), generator=generator)]
    colour_idx = colour_pool[torch.randint(len(colour_pool), (n,), generator=generator)]
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    lo, hi = size_range
    s = (lo + (hi - lo) * u[:, 0]) * size
    extent = torch.tensor([_EXTENT[k] for k in SHAPES], dtype=torch.float64)[shape_idx] * s
    margin = extent + 0.5
    cx = margin + (size - 2 * margin) * u[:, 1]
    cy = margin + (size - 2 * margin) * u[:, 2]
    theta = 2 * math.pi * u[:, 3]
    return {"shape_idx": shape_idx, "colour_idx": colour_idx, "s": s, "cx": cx, "cy": cy, "theta": theta}


def _as_generator(generator_or_seed) -> torch.Generator:
    if isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    if generator_or_seed is None:
        raise ValueError("pass a seed (int) or a torch.Generator: the dataset is always seeded")
    g = torch.Generator()
    g.manual_seed(int(generator_or_seed))
    return g


def make_batch(
    n: int,
    generator: torch.Generator | int,
    size: int = DEFAULT_SIZE,
    shapes=None,
    colours=None,
    size_range=DEFAULT_SIZE_RANGE,
    return_params: bool = False,
    chunk: int = 256,
):
    """Make ``n`` labelled images.

    Args:
        n: number of images.
        generator: an int seed or a CPU ``torch.Generator`` (advanced in place, so consecutive calls differ).
        size: image side in pixels (default 32; e.g. 24 also works).
        shapes / colours: optional subsets (names or indices) to draw from; default all of them, uniformly.
        size_range: range of the size parameter ``s`` as a fraction of ``size``.
        return_params: also return the geometry dict from :func:`sample_params`.

    Returns:
        ``(images, shape_idx, colour_idx)``: float32 (n, 3, size, size) in [-1, 1], int64 (n,), int64 (n,);
        plus the params dict when ``return_params``.
    """
    g = _as_generator(generator)
    p = sample_params(n, g, size=size, shapes=shapes, colours=colours, size_range=size_range)
    imgs = []
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        img, _ = render(
            p["shape_idx"][sl], p["colour_idx"][sl], p["s"][sl], p["cx"][sl], p["cy"][sl], p["theta"][sl], size=size
        )
        imgs.append(img)
    images = torch.cat(imgs) if imgs else torch.zeros(0, 3, size, size)
    if return_params:
        return images, p["shape_idx"], p["colour_idx"], p
    return images, p["shape_idx"], p["colour_idx"]


def caption(shape=None, colour=None) -> str:
    """Caption for one or two attributes: ``caption(colour="red") == "a red shape"``,
    ``caption(shape="circle") == "a circle"``, ``caption("circle", "red") == "a red circle"``.
    Indices are accepted as well as names."""
    if isinstance(shape, int):
        shape = SHAPES[shape]
    if isinstance(colour, int):
        colour = COLOURS[colour]
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    if shape is None and colour is None:
        return "a shape"
    if shape is None:
        return f"a {colour} shape"
    if colour is None:
        return f"a {shape}"
    return f"a {colour} {shape}"


def captions_for(shape_idx: torch.Tensor, colour_idx: torch.Tensor, which: str = "both") -> list[str]:
    """Captions for a batch of labels; ``which`` is "both", "shape" or "colour"."""
    out = []
    for si, ci in zip(shape_idx.tolist(), colour_idx.tolist(), strict=True):
        if which == "both":
            out.append(caption(si, ci))
        elif which == "shape":
            out.append(caption(shape=si))
        elif which == "colour":
            out.append(caption(colour=ci))
        else:
            raise ValueError(which)
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (n, 3, H, W) -> uint8 (n, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor, path, nrow: int = 8, scale: int = 4, pad: int = 1) -> None:
    """Save a grid of [-1, 1] images as a PNG (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = torch.full((3, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    x = (images.clamp(-1, 1) + 1) / 2
    for i in range(n):
        r, cidx = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + cidx * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    img.save(path)
