"""The scaling plot is a valid PNG whose curves are the table's rows (data read back from the drawn
lines and from the PNG itself)."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_t1.eval.plot import SERIES_KEY, plot_scaling, read_png_text, series_from_rows


def _table() -> list[dict]:
    rows = []
    for bench in ("aime2024", "math500"):
        for ck, slope in (("sft", 0.02), ("rl-step-200", 0.05)):
            for i, n in enumerate((256, 512, 1024, 2048, 4096)):
                rows.append(
                    {
                        "checkpoint": ck,
                        "benchmark": bench,
                        "budget": n,
                        "accuracy": 0.1 + slope * i,
                        "stderr": 0.01 * (i + 1) if i else float("nan"),
                    }
                )
    random.Random(0).shuffle(rows)  # the plot must sort each curve by budget itself
    return rows


def test_png_is_valid_and_curves_come_from_the_table(tmp_path):
    rows = _table()
    png = tmp_path / "scaling.png"
    drawn = plot_scaling(rows, png, title="test")
    texts = read_png_text(png)  # signature, CRCs, IHDR..IEND, image data inflate
    stored = json.loads(texts[SERIES_KEY])
    expect = series_from_rows(rows)
    for bench in ("aime2024", "math500"):
        assert set(stored[bench]) == {"sft", "rl-step-200"}
        for ck in ("sft", "rl-step-200"):
            want = sorted(
                (r["budget"], r["accuracy"])
                for r in rows
                if r["benchmark"] == bench and r["checkpoint"] == ck
            )
            for source in (drawn[bench][ck], stored[bench][ck]):
                assert source["budget"] == [float(b) for b, _ in want]
                assert source["accuracy"] == pytest.approx([a for _, a in want], abs=1e-12)
            assert stored[bench][ck]["stderr"][0] is None  # NaN stored as null
            assert math.isnan(expect[bench][ck]["stderr"][0])
            assert stored[bench][ck]["stderr"][1:] == pytest.approx(expect[bench][ck]["stderr"][1:])
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1100, 400)  # 2 panels of 5.5 x 4 inches at 100 dpi
        # both curves are drawn, in matplotlib's first two colours (C0 #1f77b4, C1 #ff7f0e)
        raw = im.convert("RGB").tobytes()
        pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
        for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
            assert sum(max(abs(a - b) for a, b in zip(px, colour)) < 20 for px in pixels) > 300, colour


def test_corrupt_png_is_rejected(tmp_path):
    png = tmp_path / "s.png"
    plot_scaling(_table()[:5], png)
    data = bytearray(png.read_bytes())
    data[40] ^= 0xFF
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC|chunk"):
        read_png_text(bad)
    bad.write_bytes(b"GIF89a" + bytes(data[6:]))
    with pytest.raises(ValueError, match="signature"):
        read_png_text(bad)


def test_no_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no scaling rows"):
        plot_scaling([], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
