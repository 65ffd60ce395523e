"""The click simulator of the training and evaluation loop, and the training-recipe options that make clicks matter.

``ClickSimulator`` supplies each step's new click to the click loop (``networks/click_loop.ClickLoop``, which decides
which clicks each decode gets) from the errors of the previous prediction, and keeps the clicks it drew. It is the one click simulator of the project: the engines drive it per batch, and
:class:`~msam_components.transforms.SimulateClickd` runs it on one sample as a MONAI transform. Besides the reference protocol (uniform clicks over all errors, only the current click passed,
target = every lesion voxel) it holds what a recipe needs so that a model cannot score by ignoring clicks:

* ``strategy`` may be a mixture (``{"random": 0.5, "interior": 0.5}``), drawn per click;
* ``target="clicked"``: each click's target is the lesions (connected components of the label) that a positive click
  has touched so far, plus those in the starting mask, plus a starting mask's false positive until a negative click
  lands in it. A model that copies its mask or segments every lesion-like blob is then wrong, while one that adds the
  clicked lesion, removes the clicked false positive, and changes nothing else, is right;
* ``initial_mask_prob``: a share of the training cases start from an imperfect mask (lesions dropped, boundaries
  dilated or eroded, a false-positive blob added) instead of an empty one, so the first clicks correct an existing
  mask, negative clicks included;
* ``feedback_dropout``: a share of the fed-back masks is replaced by an empty one, so the clicks must carry the
  segmentation on their own (with the loop's ``pass_all_clicks``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

from ..networks.click_prompt import mask_prompt
from .sampling import PADDING_LABEL, STRATEGIES, sample_clicks_batch

__all__ = ["ClickSimulator", "TARGETS", "check_strategy", "gather_at_points"]

TARGETS = ("all", "clicked")


def check_strategy(name: str, value: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate a click strategy (one of ``STRATEGIES`` or a mapping of them to positive weights); return the weights."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise ValueError(f"{name} must be one of {STRATEGIES} or a mapping of them to weights, got {value!r}")
        return {value: 1.0}
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} must be one of {STRATEGIES} or a mapping of them to weights, got {value!r}")
    weights: dict[str, float] = {}
    for key, weight in dict(value).items():
        if key not in STRATEGIES:
            raise ValueError(f"{name} has unknown strategy {key!r}; choose from {STRATEGIES}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{name}[{key!r}] must be a positive weight, got {weight!r}")
        weights[str(key)] = float(weight)
    return weights


def gather_at_points(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of ``volume`` ``[B, D, H, W]`` at voxel indices ``points`` ``[B, N, 3]`` -> ``[B, N]``."""
    _, d, h, w = volume.shape
    index = (points[..., 0] * h + points[..., 1]) * w + points[..., 2]
    return volume.reshape(volume.shape[0], -1).gather(1, index.clamp(0, d * h * w - 1))


class ClickSimulator:
    """Supplies the new click of each step of one batch to the click loop: samples from the errors, keeps the clicks.

    ``label`` is the binary lesion mask ``[B, 1, D, H, W]``; clicks are always drawn from its errors. With
    ``target="clicked"`` the per-click training targets (:meth:`target`) follow the clicks (see the module doc).
    """

    def __init__(
        self,
        label: torch.Tensor,
        rng: np.random.RandomState,
        strategy: str | Mapping[str, float] = "random",
        first_strategy: str | Mapping[str, float] | None = None,
        threshold: float = 0.5,
        threshold_on: str = "logits",
        target: str = "all",
        initial_mask_prob: float = 0.0,
        feedback_dropout: float = 0.0,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.label, self.rng = label, rng
        self.strategy = check_strategy("strategy", strategy) or {"random": 1.0}
        self.first_strategy = check_strategy("first_strategy", first_strategy) or self.strategy
        self.threshold, self.threshold_on = threshold, threshold_on
        self.initial_mask_prob, self.feedback_dropout = float(initial_mask_prob), float(feedback_dropout)
        self.points: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self._components: torch.Tensor | None = None
        self._selected: torch.Tensor | None = None
        self._kept_fp: list[torch.Tensor | None] = [None] * label.shape[0]  # starting-mask false positives
        if target == "clicked":
            comps = [ndimage.label(m[0].detach().cpu().numpy() > 0)[0] for m in label]
            self._components = torch.as_tensor(np.stack(comps), device=label.device, dtype=torch.int64)
            self._selected = torch.zeros(label.shape[0], int(self._components.max()) + 1, dtype=torch.bool)

    @property
    def uses_feedback_fn(self) -> bool:
        """Whether :meth:`feedback` may change the mask prompt (training recipes only)."""
        return self.initial_mask_prob > 0 or self.feedback_dropout > 0

    def _draw_strategy(self, weights: dict[str, float]) -> str:
        """Pick this click's strategy (no random number is drawn for a single strategy)."""
        if len(weights) == 1:
            return next(iter(weights))
        names = sorted(weights)
        p = np.array([weights[n] for n in names])
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    def __call__(self, iteration: int, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        strategy = self._draw_strategy(self.first_strategy if iteration == 0 else self.strategy)
        points, labels = sample_clicks_batch(logits, self.label, self.rng, strategy, self.threshold, self.threshold_on)
        self.points.append(points)
        self.labels.append(labels)
        if self._components is not None:
            self._select(points, labels)
            self.targets.append(self._current_target())
        return points, labels

    def _select(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the lesions under this step's positive clicks to the selected set; a negative click in a false positive
        of the starting mask removes that false positive from the target."""
        assert self._components is not None and self._selected is not None
        hit = gather_at_points(self._components, points).cpu()
        for b in range(points.shape[0]):
            for n in range(points.shape[1]):
                if int(labels[b, n]) == 1 and int(hit[b, n]) > 0:
                    self._selected[b, int(hit[b, n])] = True
                kept = self._kept_fp[b]
                if int(labels[b, n]) == 0 and kept is not None and bool(kept[tuple(points[b, n].tolist())]):
                    self._kept_fp[b] = None

    def _current_target(self) -> torch.Tensor:
        """Binary ``[B, 1, D, H, W]`` mask of the selected lesions."""
        assert self._components is not None and self._selected is not None
        selected = self._selected.clone()
        selected[:, 0] = False
        table = selected.to(self._components.device)
        target = torch.stack([table[b][self._components[b]] for b in range(table.shape[0])])
        for b, kept in enumerate(self._kept_fp):
            if kept is not None:
                target[b] |= kept
        return target[:, None].to(self.label.dtype)

    def target(self, iteration: int) -> torch.Tensor:
        """The training target after click ``iteration``: the whole label, or the clicked lesions (``"clicked"``)."""
        return self.targets[iteration] if self._components is not None else self.label

    def feedback(self, iteration: int, low_res: torch.Tensor) -> torch.Tensor:
        """Training-only mask-prompt changes: an imperfect starting mask at step 0, random dropout of later ones."""
        if iteration == 0 and self.initial_mask_prob > 0:
            chosen = self.rng.rand(low_res.shape[0]) < self.initial_mask_prob
            if chosen.any():
                return self._initial_masks(low_res, chosen)
        if iteration > 0 and self.feedback_dropout > 0:
            drop = self.rng.rand(low_res.shape[0]) < self.feedback_dropout
            if drop.any():
                keep = torch.as_tensor(~drop, device=low_res.device, dtype=low_res.dtype).view(-1, 1, 1, 1, 1)
                return low_res * keep
        return low_res

    def _initial_masks(self, low_res: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
        """Low-res logits of damaged ground truth: each lesion kept with probability 1/2, then dilated or eroded, and
        half of the time a false positive (a lesion's copy moved elsewhere). With ``target="clicked"`` that false positive
        stays in the target until a negative click is placed in it: the user's mask is kept unless a click says
        otherwise, so only obeying the negative click lowers the loss."""
        masks = torch.zeros_like(self.label)
        for b in np.flatnonzero(chosen):
            components = (  # the lesions' connected components, already labelled for target="clicked"
                self._components[b].cpu().numpy()
                if self._components is not None
                else ndimage.label(self.label[b, 0].detach().cpu().numpy() > 0)[0]
            )
            keep = [c for c in range(1, int(components.max()) + 1) if self.rng.rand() < 0.5]
            mask = np.isin(components, keep)
            steps = int(self.rng.randint(-2, 3))
            if steps > 0:
                mask = ndimage.binary_dilation(mask, iterations=steps)
            elif steps < 0:
                mask = ndimage.binary_erosion(mask, iterations=-steps)
            if self.rng.rand() < 0.5:
                false_positive = self._displaced_lesion(components)
                mask |= false_positive
                if false_positive.any():
                    self._kept_fp[b] = torch.as_tensor(false_positive, device=self.label.device)
            masks[b, 0] = torch.as_tensor(mask, device=masks.device, dtype=masks.dtype)
            if self._selected is not None:  # lesions already in the starting mask belong to the target
                present = np.unique(components[mask & (components > 0)])
                self._selected[b, torch.as_tensor(present, dtype=torch.int64)] = True
        scale = torch.as_tensor(self.rng.uniform(2.0, 8.0, size=masks.shape[0]), dtype=low_res.dtype)
        fed = mask_prompt(masks, low_res.shape[2:], scale.to(masks.device)).to(low_res.dtype)
        chosen_t = torch.as_tensor(chosen, device=fed.device).view(-1, 1, 1, 1, 1)
        return torch.where(chosen_t, fed, low_res)

    def _displaced_lesion(self, components: np.ndarray) -> np.ndarray:
        """A false positive for a starting mask: a copy of one lesion moved off every lesion (empty if none fits)."""
        count = int(components.max())
        if count == 0:
            return np.zeros(components.shape, dtype=bool)
        lesion = components == int(self.rng.randint(1, count + 1))
        for _ in range(8):
            shift = [int(self.rng.randint(-s // 2, s // 2 + 1)) for s in components.shape]
            moved = ndimage.shift(lesion, shift, order=0, mode="constant", cval=False)
            if moved.any() and not (ndimage.binary_dilation(moved, iterations=2) & (components > 0)).any():
                return moved
        return np.zeros(components.shape, dtype=bool)

    def replay(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        """Take ``[B, K, 3]`` / ``[B, K]`` earlier clicks as this simulator's history, one step per click, updating the
        clicked-lesion targets as if they had been drawn here (how a transform resumes from a sample's history)."""
        for k in range(points.shape[1]):
            step_points, step_labels = points[:, k : k + 1].to(torch.int64), labels[:, k : k + 1].to(torch.int64)
            self.points.append(step_points)
            self.labels.append(step_labels)
            if self._components is not None:
                self._select(step_points, step_labels)
                self.targets.append(self._current_target())

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All clicks so far: ``[B, K, 3]`` points and ``[B, K]`` labels (-1 marks a padding click)."""
        return torch.cat(self.points, dim=1), torch.cat(self.labels, dim=1)


def click_compliance(logits: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, predicted) -> torch.Tensor:
    """``[B, K]``: 1 where the prediction after click ``k`` gives its voxel the clicked label, 0 if not, NaN (padding)."""
    fg = predicted(logits)  # [B, K, D, H, W] bool
    values = torch.stack([gather_at_points(fg[:, k], points[:, k : k + 1])[:, 0] for k in range(fg.shape[1])], dim=1)
    obeyed = (values.long() == labels).float()
    return torch.where(labels == PADDING_LABEL, torch.full_like(obeyed, float("nan")), obeyed)
