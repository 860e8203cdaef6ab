"""The inference-scaling figure: accuracy vs thinking budget N, one curve per checkpoint (T1 Fig. 1).

One panel per benchmark; each curve is a checkpoint's rows of the scaling table (budget on a log2
axis, pass@1 with +- one standard error bars). The data behind the curves are read back from the
drawn matplotlib lines (not from the input) and stored in the PNG itself as a ``tEXt`` chunk
(key :data:`SERIES_KEY`, JSON ``{benchmark: {checkpoint: {"budget": [...], "accuracy": [...],
"stderr": [...]}}}``), so that what a figure shows can be checked against its table
(:func:`read_png_text`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from megatron_t1.atomic import atomic_path

__all__ = ["SERIES_KEY", "plot_scaling", "read_png_text", "series_from_rows"]

SERIES_KEY = "megatron_t1.series"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def series_from_rows(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{benchmark: {checkpoint: {"budget", "accuracy", "stderr"}}}`` from scaling-table rows,
    each curve sorted by budget (the order of benchmarks and checkpoints is their first appearance)."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["benchmark"]][r["checkpoint"]].append(r)
    series: dict = {}
    for bench, curves in out.items():
        series[bench] = {}
        for ckpt, rs in curves.items():
            rs = sorted(rs, key=lambda r: r["budget"])
            series[bench][ckpt] = {
                "budget": [float(r["budget"]) for r in rs],
                "accuracy": [float(r["accuracy"]) for r in rs],
                "stderr": [float(r["stderr"]) if r["stderr"] is not None else math.nan for r in rs],
            }
    return series


def plot_scaling(rows: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> dict:
    """Draw the scaling figure from the table ``rows`` and write it to ``path`` (PNG, atomically).

    Returns the series read back from the drawn lines (the same structure as
    :func:`series_from_rows`; also stored in the PNG under :data:`SERIES_KEY`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = series_from_rows(rows)
    if not series:
        raise ValueError("no scaling rows to plot")
    n = len(series)
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.0 * nrows), squeeze=False)
    drawn: dict = {}
    try:
        for ax, (bench, curves) in zip(axes.flat, series.items()):
            drawn[bench] = {}
            top = 0.0
            for i, (ckpt, s) in enumerate(curves.items()):
                yerr = [0.0 if not math.isfinite(e) else e for e in s["stderr"]]
                top = max([top] + [a + e for a, e in zip(s["accuracy"], yerr)])
                # distinct markers: curves that coincide (e.g. two checkpoints at 0) stay visible
                container = ax.errorbar(
                    s["budget"],
                    s["accuracy"],
                    yerr=yerr,
                    marker=_MARKERS[i % len(_MARKERS)],
                    ms=5,
                    capsize=3,
                    label=ckpt,
                    fillstyle="none" if i % 2 else "full",
                )
                line = container.lines[0]
                drawn[bench][ckpt] = {
                    "budget": [float(x) for x in line.get_xdata()],
                    "accuracy": [float(y) for y in line.get_ydata()],
                    "stderr": s["stderr"],
                }
            ax.set_xscale("log", base=2)
            ticks = sorted({b for s in curves.values() for b in s["budget"]})
            ax.set_xticks(ticks, [f"{b:g}" for b in ticks], rotation=45 if len(ticks) > 6 else 0)
            ax.minorticks_off()
            ax.set_xlabel("thinking budget N (tokens)")
            ax.set_ylabel("pass@1")
            ax.set_ylim(0.0, min(1.0, max(0.05, 1.1 * top)))  # accuracy axis from 0
            ax.set_title(bench)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(title or "Inference scaling: accuracy vs thinking budget")
        fig.tight_layout()
        meta = {SERIES_KEY: json.dumps(_nan_to_none(drawn), sort_keys=True)}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata=meta)
    finally:
        plt.close(fig)
    return drawn


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG as a dict, after checking the signature, the chunk CRCs, that
    IHDR comes first and IEND last, and that the image data inflate (raises ValueError otherwise)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG (bad signature)")
    pos, chunks, texts, idat = len(PNG_SIGNATURE), [], {}, b""
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise ValueError(f"{path}: truncated {kind!r} chunk")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc_bytes)[0]:
            raise ValueError(f"{path}: CRC mismatch in {kind!r} chunk")
        chunks.append(kind)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if not chunks or chunks[0] != b"IHDR" or chunks[-1] != b"IEND":
        raise ValueError(
            f"{path}: chunks must start with IHDR and end with IEND, got {chunks[:1]}..{chunks[-1:]}"
        )
    zlib.decompress(idat)  # raises zlib.error on corrupt image data
    return texts
