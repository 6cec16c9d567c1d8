"""Reads IDX files, the format of the MNIST and Fashion-MNIST raw files, gzip-compressed or plain.

Layout: two zero bytes, a type byte, a byte giving the number of dimensions, each dimension as a
big-endian uint32, then the values in C order, big-endian.
"""
import gzip
import zlib

import numpy as np

from util import UsageError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path):
    """Returns the array stored in the IDX file at `path`, in native byte order."""
    raw = _read_bytes(path)
    dtype, shape, offset = _parse_header(path, raw)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise UsageError(f"{path}: the header promises {expected} bytes of data for shape {shape} "
                         f"but {len(raw) - offset} follow — the file is truncated or corrupt; "
                         "download it again")
    array = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_bytes(path):
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise UsageError(f"{path}: broken gzip data ({error}); download it again") from None


def _parse_header(path, raw):
    """Returns (dtype, shape, offset of the first value)."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _TYPES or raw[3] == 0:
        raise UsageError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'}); "
                         "download it again")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise UsageError(f"{path}: IDX header cut short; download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.dtype(_TYPES[raw[2]]), shape, offset
