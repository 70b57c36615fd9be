"""Host batch buffers that are written again once nobody holds them.

Why: a fresh 19 MB float32 batch (32 x 3 x 224 x 224) is mapped afresh by the allocator for every
batch, and touching its new pages cost about 3 ms per batch on the development machine, three
times the normalisation's own arithmetic (bench/RESULTS.md). A loader that writes into a buffer
it used before skips that cost. It must never write into memory the consumer still holds, so a
buffer is handed out as a new tensor sharing its memory, and is taken again only when the pool's
own tensor is the last one referring to that memory (no batch, view or slice of it is alive).
"""
from __future__ import annotations

import torch


def _others_hold(buffer: torch.Tensor) -> bool:
    """Whether any tensor besides ``buffer`` refers to its memory. Private torch API (also used by
    torch.multiprocessing); tests/test_library_internals.py fails loudly if it changes."""
    storage = buffer.untyped_storage()  # this temporary holds one reference, ``buffer`` another
    return torch._C._storage_Use_Count(storage._cdata) > 2  # noqa: SLF001


class BufferPool:
    """Up to ``keep`` host tensors per request shape, reused once released by every holder."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, *, channels_last: bool = False) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` (channels_last strides when asked)
        that nobody else refers to: a released buffer of this pool, else a new one."""
        layout = torch.channels_last if channels_last else torch.contiguous_format
        shape = tuple(shape)
        for buffer in self._buffers:
            if (tuple(buffer.shape) == shape and buffer.dtype == dtype and buffer.is_contiguous(memory_format=layout)
                    and not _others_hold(buffer)):
                return buffer.detach()  # a new tensor on the same memory: holding it marks it busy
        buffer = torch.empty(shape, dtype=dtype, memory_format=layout)
        self._buffers = [*self._buffers, buffer][-self.keep :]  # the oldest is left to its holder
        return buffer.detach()
