"""Batches padded to a few sizes, for runtimes that pay for every change of input shape.

DESIGN (issue 18): onnxruntime-gpu 1.31.1 with cuDNN 9.14 on an H200 redoes its cuDNN setup
for every convolution whenever a run's input shape differs from the previous run's, even for
shapes it has seen before. Measured in-process on a resnet18 export (batch 31 and 32 in
turn, against batch 32 again and again, 2.1 ms a run): 53 ms a run with
``cudnn_conv_algo_search`` HEURISTIC, 119 ms with EXHAUSTIVE (Triton's default), 18 ms with
DEFAULT; cycling through batch sizes 1..64 took as long the third time as the first. A
dynamic batcher forms a different batch size nearly every time, so served throughput fell to
0.04-0.3x of the same session in a loop, the worker's main thread busy in cuDNN's setup.

``BatchBuckets`` picks the size a batch of ``n`` rows runs at: the smallest bucket (powers of
two up to ``max_batch_size``, or the sizes given) that holds it, but never smaller than the
size in use until ``patience`` batches in a row would all have fit a smaller one; then the
largest of those. Under a steady load the shape stays the same; it grows at once when a
batch needs more and shrinks after a lull. The padding rows are zeros and their outputs are
dropped; rows of a batch are independent in any model a dynamic batcher may batch, so the
requests' outputs are those of an unpadded run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

PATIENCE: Final = 32
"""Batches in a row that fit a smaller bucket before the size in use shrinks to it."""


def parse_buckets(raw: str, max_batch_size: int) -> list[int] | None:
    """The bucket sizes of a ``SHOAL_ORT_BATCH_BUCKETS`` value: ``pow2`` (1, 2, 4, ... and
    ``max_batch_size``), ``off`` (None: no padding), or sizes separated by commas (each
    1..max_batch_size; ``max_batch_size`` is added). Raises ``ValueError`` naming what is
    wrong."""
    text = raw.strip().lower()
    if text == "off":
        return None
    if text == "pow2":
        sizes = {max_batch_size}
        b = 1
        while b < max_batch_size:
            sizes.add(b)
            b *= 2
        return sorted(sizes)
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"expected 'pow2', 'off' or batch sizes separated by commas, got '{raw}'") from None
    bad = sorted(s for s in sizes if not 1 <= s <= max_batch_size)
    if not sizes or bad:
        raise ValueError(f"batch sizes must be 1..{max_batch_size} (max_batch_size), got '{raw}'")
    return sorted(sizes | {max_batch_size})


class BatchBuckets:
    """The padded size of each batch (see the module docstring). Not thread-safe: one per
    model instance, called by the thread that runs its batches."""

    __slots__ = ("sizes", "patience", "current", "_streak", "_streak_max")

    def __init__(self, sizes: Sequence[int], patience: int = PATIENCE) -> None:
        self.sizes = sorted(sizes)
        self.patience = patience
        self.current = 0
        self._streak = 0
        self._streak_max = 0

    def fit(self, n: int) -> int:
        """The smallest bucket that holds ``n`` rows (``n`` itself above the largest)."""
        for size in self.sizes:
            if size >= n:
                return size
        return n

    def size_for(self, n: int) -> int:
        fit = self.fit(n)
        if fit >= self.current:
            self.current = fit
            self._streak = self._streak_max = 0
            return fit
        self._streak += 1
        self._streak_max = max(self._streak_max, fit)
        if self._streak >= self.patience:
            self.current = self._streak_max
            self._streak = self._streak_max = 0
        return self.current
