"""The per-image cache of inference: an image's decoder state (so later clicks skip the encoder) and the clicks last
decoded on it with their logits (so a request that repeats them only decodes the added ones)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch

from ..networks.image_state import ImageState

__all__ = ["ClickHistory", "EmbeddingCache"]


class ClickHistory(NamedTuple):
    """The clicks last decoded on one image (``points [B, N, 3]``, ``labels [B, N]``), the logits after each, and a
    fingerprint of the starting mask prompt (None: started from an empty mask)."""

    points: torch.Tensor
    labels: torch.Tensor
    low_res: list[torch.Tensor]
    start: str | None = None

    def common_prefix(self, points: torch.Tensor, labels: torch.Tensor) -> int:
        """How many leading clicks of ``points``/``labels`` equal this history's (0 when the batch differs)."""
        if points.shape[0] != self.points.shape[0]:
            return 0
        n = 0
        for i in range(min(points.shape[1], self.points.shape[1])):
            if not (torch.equal(points[:, i], self.points[:, i]) and torch.equal(labels[:, i], self.labels[:, i])):
                break
            n += 1
        return n


class EmbeddingCache:
    """Bounded LRU cache of per-image decoder state (``MSAM.prepare_embedding``), so later clicks skip the encoder.

    Each image's entry also keeps its :class:`ClickHistory`, evicted with it, so a request that repeats the previous
    clicks and adds some only decodes the added ones.
    """

    def __init__(self, max_items: int = 4) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[str, ImageState] = OrderedDict()
        self._history: dict[str, ClickHistory] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_for(image: torch.Tensor) -> str:
        """Content hash of an image tensor (shape, dtype and bytes), a safe key when the caller has no image id."""
        data = image.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.hexdigest()

    def get(self, key: str) -> ImageState | None:
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: str, state: ImageState) -> None:
        with self._lock:
            self._items[key] = state
            self._items.move_to_end(key)
            self._history.pop(key, None)  # a new state invalidates the logits decoded on the old one
            while len(self._items) > self.max_items:
                self._history.pop(self._items.popitem(last=False)[0], None)

    def history(self, key: str) -> ClickHistory | None:
        """The clicks last decoded on image ``key`` and their logits (None if none, or the image was evicted)."""
        with self._lock:
            return self._history.get(key)

    def put_history(self, key: str, history: ClickHistory) -> None:
        """Record ``history`` for image ``key`` (ignored when the image is no longer cached)."""
        with self._lock:
            if key in self._items:
                self._history[key] = history

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._history.clear()

    def __len__(self) -> int:
        return len(self._items)
