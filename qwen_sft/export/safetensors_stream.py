"""A safetensors file written one tensor at a time: the header first (names, dtypes, shapes), then each tensor's bytes.

    with StreamingSafetensors(path, [("a", torch.float32, (2, 3)), ...]) as out:
        out.write("a", tensor)

``safetensors.torch.save_file`` needs every tensor in memory at once; an adapter for 128 experts × 48
layers is gigabytes, so exports declare the layout up front (it is known from the input's header) and
stream the data. The file is the standard format (8-byte little-endian header length, JSON header
padded to 8 bytes, contiguous data in declaration order), read back by ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class StreamingSafetensors:
    def __init__(self, path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [name for name, _, _ in layout]
        if len(set(self._order)) != len(self._order):
            raise ValueError(f"{path}: duplicate tensor names in the layout")
        self._layout = {name: (dtype, tuple(shape)) for name, dtype, shape in layout}
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in layout:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} is not supported here")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._fh = None

    def __enter__(self) -> StreamingSafetensors:
        self._fh = open(self.path, "wb")
        self._fh.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise ValueError(f"{self.path}: tensors must come in layout order: got {name}, expected {want}")
        dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} != declared {dtype} {shape}")
        # Raw bytes in native (little-endian on every platform torch ships for) order, as safetensors stores them.
        self._fh.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        fh, self._fh = self._fh, None
        try:
            if exc_type is None and self._next != len(self._order):
                raise ValueError(f"{self.path}: only {self._next} of {len(self._order)} declared tensors were written")
            if exc_type is None:
                fh.flush()
        finally:
            fh.close()
