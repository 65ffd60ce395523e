"""What a negative click does to the mask: the share of its false-positive region it cleared, and of the rest kept.

Click compliance only asks whether the clicked voxel changed; an annotator who removes a false positive with one
click also needs the whole region gone and the rest of the mask untouched (the editing half of issue "clicks that
correct"). Used by ``experiments/negative_clicks.py`` and the learning test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy import ndimage

__all__ = ["negative_click_effects"]


def negative_click_effects(
    logits: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    label: torch.Tensor,
    predicted: Callable[[torch.Tensor], torch.Tensor] = lambda x: x > 0.5,
) -> list[tuple[int, int, float, float]]:
    """``(click number, region voxels, share of the region cleared, share of the rest of the mask kept)`` for each
    negative click placed in a false positive of the previous mask (a 6-connected component of predicted non-lesion
    voxels). ``logits`` ``[K, D, H, W]`` after each click, ``points`` ``[K, 3]``, ``labels`` ``[K]`` (1/0/-1),
    ``label`` ``[D, H, W]``; ``predicted`` binarises logits as the evaluation does (as for ``click_compliance``, e.g.
    ``functools.partial(binarise, threshold=0.5, threshold_on="logits")``). The kept share is NaN when the previous mask
    held nothing but that region."""
    lesion = label.bool()
    effects = []
    for k in range(1, logits.shape[0]):
        if int(labels[k]) != 0:
            continue
        before, after = predicted(logits[k - 1]), predicted(logits[k])
        components = ndimage.label((before & ~lesion).cpu().numpy())[0]
        hit = int(components[tuple(int(i) for i in points[k])])
        if hit == 0:  # not in a false positive of the previous mask
            continue
        region = torch.from_numpy(components == hit).to(before.device)
        rest = before & ~region
        kept = float(after[rest].float().mean()) if bool(rest.any()) else float("nan")
        effects.append((k + 1, int(region.sum()), float((~after[region]).float().mean()), kept))
    return effects
