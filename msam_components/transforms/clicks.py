"""MONAI dictionary transform that simulates the next interactive click and keeps the click history."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor

from msam_components.transforms.click_sampling import STRATEGIES, Click, _check_threshold, sample_click

__all__ = ["SimulateClickd"]


class SimulateClickd(Randomizable, MapTransform):
    """Add one simulated click from the errors of ``data[pred_key]`` vs ``data[label_key]``, and extend the history.

    Outputs (plain int64 tensors on the label's device; inputs are never modified):

    * ``point_key``: ``[1, 3]`` (d, h, w) and ``point_label_key``: ``[1]`` (1 positive, 0 negative, -1 padding), i.e. a
      one-point prompt; a DataLoader collates them to ``[B, 1, 3]`` / ``[B, 1]``.
    * ``history_points_key`` / ``history_labels_key``: ``[N, 3]`` / ``[N]`` with this click appended (created when
      missing or None). Padding clicks are appended too, so ``N`` equals the number of calls.

    A missing or None ``pred_key`` means "no prediction yet" (first click, inside the lesion). Padding clicks (label -1,
    point (0,0,0)) are emitted when nothing is left to correct, or for an empty lesion at the first click; see
    :func:`~msam_components.transforms.click_sampling.sample_click`. The ``"random"`` strategy draws from ``self.R``,
    so ``set_random_state(seed)`` makes a sequence of calls reproducible; ``"center"`` is deterministic. If
    ``label_key`` is absent and ``allow_missing_keys`` is True the data is returned unchanged (shallow copy).
    """

    def __init__(
        self,
        label_key: Hashable = "label",
        pred_key: Hashable = "pred",
        point_key: Hashable = "click_point",
        point_label_key: Hashable = "click_label",
        history_points_key: Hashable = "click_points",
        history_labels_key: Hashable = "click_labels",
        strategy: str = "random",
        threshold: float = 0.5,
        threshold_on: str = "logits",
        allow_missing_keys: bool = False,
    ) -> None:
        """Configure keys and sampling; ``label_key`` is the MONAI ``keys`` argument (exactly one key)."""
        MapTransform.__init__(self, keys=label_key, allow_missing_keys=allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"label_key must be a single key, got {label_key!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        _check_threshold(threshold, threshold_on)
        self.label_key = self.keys[0]
        self.pred_key = pred_key
        self.point_key = point_key
        self.point_label_key = point_label_key
        self.history_points_key = history_points_key
        self.history_labels_key = history_labels_key
        self.strategy = strategy
        self.threshold = threshold
        self.threshold_on = threshold_on
        self._click: Click | None = None

    def randomize(self, data: Mapping[Hashable, object]) -> None:
        """Draw this call's click from ``data`` (label, optional pred) with ``self.R``; stored in ``self._click``."""
        label = convert_to_tensor(data[self.label_key], track_meta=False)
        pred = data.get(self.pred_key)
        pred = None if pred is None else convert_to_tensor(pred, track_meta=False)
        self._click = sample_click(pred, label, self.R, self.strategy, self.threshold, self.threshold_on)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a shallow copy of ``data`` with the new click and the extended click history."""
        d = dict(data)
        for _ in self.key_iterator(d):
            self.randomize(d)
            click = self._click
            assert click is not None
            point = click.point.reshape(1, 3)
            point_label = torch.tensor([click.label], dtype=torch.int64, device=point.device)
            d[self.point_key] = point
            d[self.point_label_key] = point_label
            d[self.history_points_key] = self._extend(d.get(self.history_points_key), point, (-1, 3), "points")
            d[self.history_labels_key] = self._extend(d.get(self.history_labels_key), point_label, (-1,), "labels")
        return d

    @staticmethod
    def _extend(history: object, new: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """Append ``new`` to an ``[N, 3]`` / ``[N]`` history (None starts a fresh one) without mutating the old one."""
        if history is None:
            return new.clone()
        hist = convert_to_tensor(history, track_meta=False)
        if hist.ndim != len(shape) or (len(shape) == 2 and hist.shape[1] != 3):
            expected = "[N,3]" if len(shape) == 2 else "[N]"
            raise ValueError(f"history {what} must have shape {expected}, got {tuple(hist.shape)}")
        return torch.cat([hist.to(device=new.device, dtype=torch.int64), new], dim=0)
