"""MONAI dictionary transform that simulates the next interactive click and keeps the click history.

It runs the same :class:`~msam_components.clicks.simulator.ClickSimulator` the training and evaluation
engines use, on one sample, so a click drawn here is the click a trainer would draw (strategies, mixtures, targets).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor

from ..clicks.sampling import check_threshold, spatial_volume
from ..clicks.simulator import TARGETS, ClickSimulator, check_strategy

__all__ = ["SimulateClickd"]


class SimulateClickd(Randomizable, MapTransform):
    """Add one simulated click from the errors of ``data[pred_key]`` vs ``data[label_key]``, and extend the history.

    Outputs (plain int64 tensors on the label's device; inputs are never modified):

    * ``point_key``: ``[1, 3]`` (d, h, w) and ``point_label_key``: ``[1]`` (1 positive, 0 negative, -1 padding), i.e. a
      one-point prompt; a DataLoader collates them to ``[B, 1, 3]`` / ``[B, 1]``.
    * ``history_points_key`` / ``history_labels_key``: ``[N, 3]`` / ``[N]`` with this click appended (created when
      missing or None). Padding clicks are appended too, so ``N`` equals the number of calls.

    * ``target_key`` (optional): the ``[1, D, H, W]`` training target after this click, which with
      ``target="clicked"`` is the lesions the positive clicks so far touched (see ``ClickSimulator``).

    A missing or None ``pred_key`` means "no prediction yet" (first click, inside the lesion). Padding clicks (label -1,
    point (0,0,0)) are emitted when nothing is left to correct, or for an empty lesion at the first click; see
    :func:`~msam_components.clicks.sampling.sample_click`. ``strategy`` is one of ``"random"``, ``"center"``,
    ``"interior"`` or a mapping of them to weights (drawn per click, as in training). Random draws come from
    ``self.R``, so ``set_random_state(seed)`` makes a sequence of calls reproducible; ``"center"`` is deterministic.
    If ``label_key`` is absent and ``allow_missing_keys`` is True the data is returned unchanged (shallow copy).
    """

    def __init__(
        self,
        label_key: Hashable = "label",
        pred_key: Hashable = "pred",
        point_key: Hashable = "click_point",
        point_label_key: Hashable = "click_label",
        history_points_key: Hashable = "click_points",
        history_labels_key: Hashable = "click_labels",
        strategy: str | Mapping[str, float] = "random",
        threshold: float = 0.5,
        threshold_on: str = "logits",
        allow_missing_keys: bool = False,
        target: str = "all",
        target_key: Hashable | None = None,
    ) -> None:
        """Configure keys and sampling; ``label_key`` is the MONAI ``keys`` argument (exactly one key)."""
        MapTransform.__init__(self, keys=label_key, allow_missing_keys=allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"label_key must be a single key, got {label_key!r}")
        check_strategy("strategy", strategy)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        check_threshold(threshold, threshold_on)
        self.label_key = self.keys[0]
        self.pred_key = pred_key
        self.point_key = point_key
        self.point_label_key = point_label_key
        self.history_points_key = history_points_key
        self.history_labels_key = history_labels_key
        self.strategy = strategy
        self.threshold = threshold
        self.threshold_on = threshold_on
        self.target, self.target_key = target, target_key
        self._click: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def randomize(self, data: Mapping[Hashable, object]) -> None:
        """Draw this call's click from ``data`` (label, optional pred, click history) with ``self.R`` through a
        ``ClickSimulator`` resumed from the history; ``(point [1,3], label [1], target [1,D,H,W])`` in ``self._click``.
        """
        label = spatial_volume(convert_to_tensor(data[self.label_key], track_meta=False), "label")
        pred = data.get(self.pred_key)
        pred = None if pred is None else spatial_volume(convert_to_tensor(pred, track_meta=False), "pred")
        if pred is not None and pred.shape != label.shape:
            raise ValueError(
                f"pred spatial shape {tuple(pred.shape)} does not match label spatial shape {tuple(label.shape)}"
            )
        points = self._history(data.get(self.history_points_key), (-1, 3), "points", label.device)
        labels = self._history(data.get(self.history_labels_key), (-1,), "labels", label.device)
        if points.shape[0] != labels.shape[0]:
            raise ValueError(f"history points ({points.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        simulator = ClickSimulator(
            label[None, None],
            self.R,
            strategy=self.strategy,
            threshold=self.threshold,
            threshold_on=self.threshold_on,
            target=self.target,
        )
        simulator.replay(points[None], labels[None])
        point, point_label = simulator(points.shape[0], None if pred is None else pred[None, None])
        target = simulator.target(points.shape[0])[0].to(label.dtype)
        self._click = (point[0], point_label[0], target)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a shallow copy of ``data`` with the new click and the extended click history."""
        d = dict(data)
        for _ in self.key_iterator(d):
            self.randomize(d)
            assert self._click is not None
            point, point_label, target = self._click
            d[self.point_key] = point
            d[self.point_label_key] = point_label
            d[self.history_points_key] = self._extend(d.get(self.history_points_key), point)
            d[self.history_labels_key] = self._extend(d.get(self.history_labels_key), point_label)
            if self.target_key is not None:
                d[self.target_key] = target
        return d

    @staticmethod
    def _history(history: object, shape: tuple[int, ...], what: str, device: torch.device) -> torch.Tensor:
        """An ``[N, 3]`` / ``[N]`` int64 click history (None is an empty one), checked."""
        if history is None:
            return torch.zeros((0, *shape[1:]), dtype=torch.int64, device=device)
        hist = convert_to_tensor(history, track_meta=False)
        if hist.ndim != len(shape) or (len(shape) == 2 and hist.shape[1] != 3):
            expected = "[N,3]" if len(shape) == 2 else "[N]"
            raise ValueError(f"history {what} must have shape {expected}, got {tuple(hist.shape)}")
        return hist.to(device=device, dtype=torch.int64)

    @staticmethod
    def _extend(history: object, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` to a checked history (None starts a fresh one) without mutating the old one."""
        if history is None:
            return new.clone()
        return torch.cat([convert_to_tensor(history, track_meta=False).to(device=new.device, dtype=torch.int64), new])
