"""Single-tensor ``torch.save`` records as DCP stores them: written around bytes that never pass
through Python, and located inside a file so they can be copied raw.

DCP's ``FileSystemWriter`` stores each chunk as one ``torch.save`` zip record (stored, not
compressed) at an offset of a ``.distcp`` file, and its reader ``torch.load`` s that byte range. The
helpers here let the converters move the tensor bytes with ``copy_file_range`` instead:

* :class:`RecordSplitter` captures the record ``torch.save`` writes for an *untouched*
  ``torch.empty`` of the right shape and dtype, minus its data: the head and tail to write around
  the real bytes. With the CRC off (:func:`no_crc32`) they do not depend on the data.
* :func:`raw_data_offset` finds the data of an existing record, after checking (by unpickling its
  small ``data.pkl`` with a restricted unpickler) that it holds exactly one contiguous tensor.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from megatron_t1.convert.hf_io import write_all
from megatron_t1.convert.maps import ConvertError


@contextlib.contextmanager
def no_crc32():
    """Skip the CRC-32 that ``torch.save`` computes over every record (2-4x faster writes).

    ``torch.load`` (and so DCP's and Megatron's readers) never checks it; this is torch's own
    ``set_crc32_options(False)``, restored on exit. Only ``unzip -t`` of a record would complain.
    """
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch < 2.6: always computes it
        yield
        return
    old = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(old)


class RecordSplitter(io.RawIOBase):
    """A write-only stream for ``torch.save`` that keeps everything but the one ``nbytes``-long
    write of the tensor's data (miniz writes a stored record's data in a single call); with the
    CRC off, the kept bytes do not depend on the data."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes = nbytes
        self.head: list[bytes] = []
        self.tail: list[bytes] = []
        self.seen = 0
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n == self.nbytes and n > 0 and not self.seen:
            self.seen += 1  # the data itself: never read (it is an untouched torch.empty)
        else:
            (self.tail if self.seen else self.head).append(bytes(b))
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def parts(self) -> tuple[bytes, bytes]:
        if self.seen != 1:
            raise ConvertError("torch.save did not write the tensor data in one piece; cannot stream it")
        return b"".join(self.head), b"".join(self.tail)


def write_zeros(fd: int, n: int) -> None:
    zeros = bytes(min(n, 16 * 2**20))
    while n > 0:
        k = min(n, len(zeros))
        write_all(fd, memoryview(zeros)[:k])
        n -= k


class FileView(io.RawIOBase):
    """A read-only window ``[offset, offset + length)`` of a file (for ``torch.load``)."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self._start, self._len, self._pos = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._len - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._f.fileno(), [memoryview(b)[:n]], self._start + self._pos)
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _member_data_start(view: io.RawIOBase, info: zipfile.ZipInfo) -> int:
    """Offset of a stored zip member's data (after its local header, whose extra field pads it)."""
    view.seek(info.header_offset)
    header = view.read(30)
    if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _TensorProbe(pickle.Unpickler):
    """Unpickles a torch.save ``data.pkl`` of a single plain tensor without touching its data."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _capture_rebuild
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        return pid


def _capture_rebuild(storage, storage_offset, size, stride, *args):
    return ("tensor", storage, storage_offset, tuple(size), tuple(stride))


def _probe_tensor_pickle(data: bytes):
    """(size, stride, storage offset, storage key, storage numel) of a pickled tensor, or None."""
    obj = _TensorProbe(io.BytesIO(data)).load()
    if not (isinstance(obj, tuple) and obj and obj[0] == "tensor"):
        return None
    _, pid, offset, size, stride = obj
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[3] == "cpu"):
        return None
    storage_dtype = _STORAGE_DTYPES.get(str(pid[1]))
    return size, stride, offset, pid[2], pid[4], storage_dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
"""Legacy storage class names in pickles -> dtype (looked up by name: touching the classes warns)."""


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def raw_data_offset(path: Path, offset: int, length: int, numel: int, dtype: torch.dtype) -> int | None:
    """Absolute file offset of the data of the record ``[offset, offset + length)`` of ``path``
    when it holds exactly ``numel`` contiguous elements of ``dtype`` stored uncompressed (what our
    writer and Megatron's write for a contiguous tensor), else None (read it with torch.load)."""
    try:
        with FileView(path, offset, length) as view:
            zf = zipfile.ZipFile(view)
            pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            pkl_info = zf.getinfo(pkl)
            if pkl_info.compress_type != zipfile.ZIP_STORED:
                return None
            view.seek(_member_data_start(view, pkl_info))  # not zf.read: our records carry no CRC
            probe = _probe_tensor_pickle(view.read(pkl_info.file_size))
            if probe is None:
                return None
            size, stride, storage_offset, storage_key, storage_numel, storage_dtype = probe
            if (
                storage_offset != 0
                or storage_numel != numel
                or math.prod(size) != numel
                or storage_dtype != dtype
                or not _is_contiguous(size, stride)
            ):
                return None
            rec = zf.getinfo(pkl[: -len("data.pkl")] + f"data/{storage_key}")
            if rec.compress_type != zipfile.ZIP_STORED or rec.file_size != numel * dtype.itemsize:
                return None
            return offset + _member_data_start(view, rec)
    except (zipfile.BadZipFile, StopIteration, KeyError, OSError, pickle.UnpicklingError, struct.error):
        return None
