"""Line charts as PNG, drawn with pillow (no plotting dependency).

    line_chart("runs/toy/best_of_n.png", {"maj@N": [(1, .36), (2, .37), (4, .41)], ...},
               title="SFT policy on the toy test", xlabel="N", ylabel="accuracy", log2_x=True)

One chart per call: axes with ticks and grid lines, one coloured polyline with point markers per
series, a legend. Pure drawing arithmetic (`to_pixel`) is separate from the drawing so it can be
tested by hand.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ursa import io

SIZE = (720, 440)                     # px: wide enough for a legend beside a readable plot
MARGIN = (70, 40, 190, 55)            # left, top, right (the legend), bottom
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))
N_TICKS = 5


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def to_pixel(x: float, y: float, xr: tuple, yr: tuple, size=SIZE, margin=MARGIN, log2_x: bool = False) -> tuple:
    """Data (x, y) -> pixel (px, py) inside the plot area; y grows upwards."""
    (x0, x1), (y0, y1) = xr, yr
    if log2_x:
        x, x0, x1 = math.log2(x), math.log2(x0), math.log2(x1)
    left, top, right, bottom = margin[0], margin[1], size[0] - margin[2], size[1] - margin[3]
    px = left + (x - x0) / (x1 - x0) * (right - left)
    py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
    return px, py


def line_chart(path, series: dict, title: str = "", xlabel: str = "", ylabel: str = "",
               log2_x: bool = False, y_range: Optional[tuple] = None, x_ticks: Optional[Sequence[float]] = None):
    """Write a PNG line chart of series {name: [(x, y), ...]} to path (atomically)."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None]
    if not pts:
        raise ValueError(f"{path}: no points to plot")
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    xr = (min(xs), max(xs)) if not log2_x else (min(xs) / 1.15, max(xs) * 1.15)
    if not log2_x:
        xr = _nice_range(*xr)
    yr = y_range or _nice_range(min(ys), max(ys))
    img = Image.new("RGB", SIZE, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    for k in range(N_TICKS + 1):                                   # y grid and labels
        yv = yr[0] + (yr[1] - yr[0]) * k / N_TICKS
        _, py = to_pixel(xr[0], yv, xr, yr, log2_x=log2_x)
        d.line([(left, py), (right, py)], fill=(230, 230, 230))
        d.text((4, py - 6), f"{yv:.3g}", fill=(60, 60, 60), font=font)
    ticks = list(x_ticks) if x_ticks is not None else sorted(set(xs)) if len(set(xs)) <= 12 else \
        [xr[0] + (xr[1] - xr[0]) * k / N_TICKS for k in range(N_TICKS + 1)]
    for xv in ticks:                                               # x ticks and labels
        px, _ = to_pixel(xv, yr[0], xr, yr, log2_x=log2_x)
        d.line([(px, bottom), (px, bottom + 4)], fill=(60, 60, 60))
        d.text((px - 8, bottom + 8), f"{xv:.4g}", fill=(60, 60, 60), font=font)
    d.rectangle([left, top, right, bottom], outline=(60, 60, 60))
    for i, (name, s) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        p = [to_pixel(x, y, xr, yr, log2_x=log2_x) for x, y in s if y is not None]
        if len(p) > 1:
            d.line(p, fill=c, width=2)
        for px, py in p:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        ly = top + 8 + 16 * i                                      # legend
        d.line([(right + 12, ly + 6), (right + 32, ly + 6)], fill=c, width=3)
        d.text((right + 38, ly), name, fill=(30, 30, 30), font=font)
    d.text((left, 12), title, fill=(0, 0, 0), font=font)
    d.text(((left + right) // 2 - 3 * len(xlabel), SIZE[1] - 22), xlabel, fill=(30, 30, 30), font=font)
    d.text((4, top - 24), ylabel, fill=(30, 30, 30), font=font)
    with io.atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
