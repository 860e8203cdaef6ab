"""Streaming I/O for HF folders: safetensors read one tensor at a time, sharded writes, atomic output.

Memory: :class:`SafetensorsReader` reads each tensor with ``pread`` straight into a freshly
allocated tensor, so a read costs exactly that tensor's bytes. (``safe_open`` memory-maps the file:
the pages it touches count in the process's RSS until the file is closed, so converting a 20 GB
shard would look like a 20 GB process.) :class:`SafetensorsShardWriter` writes a *planned* list of
tensors (names, shapes and dtypes known up front, so each shard's header is written first and the
data streamed after it), either from tensors or as byte ranges of other files (:func:`copy_range`,
``copy_file_range``: the bytes never enter the process). Nothing here holds more than the tensor
in hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_t1.atomic import atomic_dir
from megatron_t1.convert.maps import ConvertError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp")
"""Files that are weights (never copied as 'assets')."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the ``torch_dtype`` string of config.json)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``bf16`` / ``bfloat16`` / ``fp32`` / ``float32`` / ``fp16`` -> torch dtype (None stays None)."""
    if name is None:
        return None
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ConvertError(f"unknown dtype {name!r}; use one of bf16, fp32, fp16")
    return table[name]


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _byte_view(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous tensor's bytes (any dtype, bf16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range ``[begin, end)``."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one ``.safetensors`` file's header (8-byte little-endian length + JSON)."""
    if not path.is_file():
        raise ConvertError(f"missing safetensors file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise ConvertError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        b, e = info["data_offsets"]
        entry = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + b, base + e)
        if entry.end > size or entry.nbytes != tensor_bytes(entry.shape, entry.dtype):
            raise ConvertError(f"{path}: tensor {name} data range is inconsistent (truncated file?)")
        out[name] = entry
    return out


class SafetensorsReader:
    """Random access to the tensors of an HF folder (``model.safetensors`` or an index + shards)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConvertError(f"HF folder not found: {self.dir}")
        index = self.dir / INDEX_FILE
        self.entries: dict[str, TensorEntry] = {}
        self._fds: dict[Path, int] = {}
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a valid safetensors index ({e})") from None
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, []).append(name)
            for fname, names in by_file.items():
                path = self.dir / fname
                if not path.is_file():
                    raise ConvertError(
                        f"missing shard {path} (listed in {INDEX_FILE} for {names[0]} and others)"
                    )
                header = read_safetensors_header(path)
                for name in names:
                    if name not in header:
                        raise ConvertError(
                            f"{path}: tensor {name} listed in {INDEX_FILE} is not in the shard"
                        )
                    self.entries[name] = header[name]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = f" (found {bins[:3]}: convert .bin checkpoints to safetensors first)" if bins else ""
                raise ConvertError(f"no safetensors weights in {self.dir}{hint}")
            for path in files:
                for name, e in read_safetensors_header(path).items():
                    if name in self.entries:
                        raise ConvertError(
                            f"tensor {name} appears in both {self.entries[name].file} and {path}"
                        )
                    self.entries[name] = e

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise ConvertError(f"HF tensor {name} not found in {self.dir}")
        return self.entries[name]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a new CPU tensor of exactly its bytes)."""
        e = self.entry(name)
        t = torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes:
            pread_into(self._fd(e.file), e.begin, _byte_view(t), f"{name} in {e.file}")
        return t

    def read_into(self, name: str, start: int, buf) -> None:
        """Copy bytes ``[start, start + len(buf))`` of tensor ``name`` into the writable ``buf``."""
        e = self.entry(name)
        n = memoryview(buf).nbytes
        if start < 0 or start + n > e.nbytes:
            raise ConvertError(
                f"byte range [{start}, {start + n}) outside HF tensor {name} ({e.nbytes} bytes)"
            )
        pread_into(self._fd(e.file), e.begin + start, buf, f"{name} in {e.file}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pread_into(fd: int, offset: int, buf, what: str) -> None:
    """Fill ``buf`` from file descriptor ``fd`` at ``offset`` (no intermediate copy)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):  # one read returns at most ~2 GB on Linux
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ConvertError(f"unexpected end of file while reading {what}")
        done += n


def write_all(fd: int, buf) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def copy_range(src: Path, offset: int, length: int, dst_fd: int, *, what: str = "data") -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst_fd``'s position.

    ``copy_file_range`` copies inside the kernel (no trip through user memory, as ``cp`` does);
    across file systems or where unsupported it falls back to bounded ``pread`` / ``write``.
    """
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(fd, dst_fd, length - done, offset + done)
                if n == 0:
                    raise ConvertError(f"{src}: unexpected end of file while copying {what}")
                done += n
        except OSError:  # EXDEV, ENOSYS, EINVAL, EOPNOTSUPP: copy through a small buffer
            buf = bytearray(min(64 * 2**20, length - done))
            while done < length:
                view = memoryview(buf)[: min(len(buf), length - done)]
                pread_into(fd, offset + done, view, f"{what} in {src}")
                write_all(dst_fd, view)
                done += len(view)
    finally:
        os.close(fd)


class SafetensorsShardWriter:
    """Write a planned sequence of tensors into ``model-0000i-of-0000N.safetensors`` + index.

    ``plan``: ``[(name, shape, dtype), ...]`` in the order :meth:`write` will be called. Shards are
    filled greedily up to ``max_shard_bytes`` (a single larger tensor gets a shard of its own).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_bytes: int = 5 * 2**30,
    ):
        self.out = Path(out_dir)
        self.plan = [(n, tuple(int(x) for x in s), d) for n, s, d in plan]
        names = [p[0] for p in self.plan]
        if len(set(names)) != len(names):
            raise ConvertError("duplicate tensor names in the export plan")
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(self.plan):
            nb = tensor_bytes(shape, dtype)
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nb
        n = len(shards)
        self.shard_of: list[int] = [0] * len(self.plan)
        for s, idx in enumerate(shards):
            for i in idx:
                self.shard_of[i] = s
        self.files = [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)]
        self.shards = shards
        self.total_bytes = sum(tensor_bytes(s, d) for _, s, d in self.plan)
        self._next = 0
        self._fd: int | None = None

    def _open_shard(self, s: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for i in self.shards[s]:
            name, shape, dtype = self.plan[i]
            nb = tensor_bytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + nb],
            }
            off += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        self._fd = os.open(self.out / self.files[s], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(self._fd, struct.pack("<Q", len(blob)) + blob)

    def _begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if self._next >= len(self.plan):
            raise ConvertError(f"tensor {name} is not in the export plan (all planned tensors written)")
        pname, pshape, pdtype = self.plan[self._next]
        if name != pname or tuple(shape) != pshape or dtype != pdtype:
            raise ConvertError(
                f"export order/shape mismatch: got {name} {tuple(shape)} {dtype}, "
                f"planned {pname} {pshape} {pdtype}"
            )
        s = self.shard_of[self._next]
        if self._next == self.shards[s][0]:
            self._open_shard(s)

    def _end(self) -> None:
        s = self.shard_of[self._next]
        self._next += 1
        if self._next == self.shards[s][-1] + 1:
            self.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (name, shape and dtype must match the plan)."""
        self._begin(name, tuple(tensor.shape), tensor.dtype)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            write_all(self._fd, _byte_view(t))
        self._end()

    def write_ranges(self, name: str, ranges: Sequence[tuple[Path, int, int]]) -> None:
        """Append the next planned tensor from byte ranges ``(file, offset, length)`` of other files
        (in-kernel copies; the ranges must add up to the tensor's size)."""
        _, shape, dtype = self.plan[self._next] if self._next < len(self.plan) else (name, (), torch.uint8)
        self._begin(name, shape, dtype)
        if sum(r[2] for r in ranges) != tensor_bytes(shape, dtype):
            raise ConvertError(
                f"{name}: byte ranges add up to {sum(r[2] for r in ranges)}, "
                f"expected {tensor_bytes(shape, dtype)}"
            )
        for path, off, n in ranges:
            copy_range(path, off, n, self._fd, what=name)
        self._end()

    def finish(self) -> dict:
        """Check every planned tensor was written; write and return the index."""
        if self._next != len(self.plan):
            raise ConvertError(f"export incomplete: {self.plan[self._next][0]} was never written")
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: self.files[self.shard_of[i]] for i, (name, _, _) in enumerate(self.plan)},
        }
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out`` only when the block completes.

    ``out`` must not exist. On an exception (Ctrl-C included) the temporary folder is deleted; a
    killed process leaves only ``.NAME.incomplete-PID``, never a folder named ``out``.
    """
    out = Path(out)
    if out.exists():
        raise ConvertError(f"output folder {out} already exists; remove it or choose another --out")
    try:
        with atomic_dir(out) as tmp:
            yield tmp
    except FileExistsError:
        if not out.exists():
            raise
        raise ConvertError(f"output folder {out} appeared while converting; not overwriting it") from None


def copy_hf_assets(src: str | os.PathLike, dst: str | os.PathLike, *, skip: Sequence[str] = ()) -> list[str]:
    """Copy the non-weight files of an HF folder (tokenizer, generation config, chat template...).

    Weight files, weight indices, sub-folders and names in ``skip`` are not copied. Returns the
    copied file names.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for p in sorted(src.iterdir()):
        if (
            not p.is_file()
            or p.name in skip
            or p.name.endswith(WEIGHT_SUFFIXES)
            or p.name.endswith(".index.json")
        ):
            continue
        shutil.copy2(p, Path(dst) / p.name)
        copied.append(p.name)
    return copied


class Progress:
    """Progress over tensors and bytes (a tqdm bar on stderr; silent when disabled)."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, *, enabled: bool = True):
        self.n_tensors = total_tensors
        self.done = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.done += tensors
        if self.bar is not None:
            self.bar.set_postfix_str(f"tensors {self.done}/{self.n_tensors}", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
