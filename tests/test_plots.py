"""ursa/plots.py: the PNG has the expected size, its pixels change with the data, and the
coordinate arithmetic is exact by hand."""
import pytest
from PIL import Image

from ursa.plots import MARGIN, SIZE, line_chart, to_pixel


def test_to_pixel_by_hand():
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    assert to_pixel(0, 0, (0, 10), (0, 1)) == (left, bottom)
    assert to_pixel(10, 1, (0, 10), (0, 1)) == (right, top)
    assert to_pixel(5, 0.5, (0, 10), (0, 1)) == ((left + right) / 2, (top + bottom) / 2)
    # log2 axis: 4 sits halfway between 1 and 16
    assert to_pixel(4, 0, (1, 16), (0, 1), log2_x=True)[0] == pytest.approx((left + right) / 2)


def test_chart_size_and_pixels_follow_the_data(tmp_path):
    a = line_chart(tmp_path / "a.png", {"s": [(1, 0.2), (2, 0.4), (4, 0.3)]}, title="t", log2_x=True)
    b = line_chart(tmp_path / "b.png", {"s": [(1, 0.2), (2, 0.9), (4, 0.3)]}, title="t", log2_x=True)
    ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    assert ia.size == SIZE and ib.size == SIZE
    ba, bb = ia.tobytes(), ib.tobytes()
    diff = sum(ba[i:i + 3] != bb[i:i + 3] for i in range(0, len(ba), 3))
    assert diff > 50                                              # the middle point moved
    # the series colour appears where the first point is drawn
    px, py = to_pixel(1, 0.2, (1 / 1.15, 4 * 1.15), (0.2 - 0.035, 0.9 + 0.035), log2_x=True)
    assert ib.getpixel((round(px), round(py))) != (255, 255, 255)
    with pytest.raises(ValueError, match="no points"):
        line_chart(tmp_path / "c.png", {"s": []})
