"""Inference from user clicks: a MONAI ``Inferer`` that runs the click loop on cached image states, window by window."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from ..networks.click_loop import ClickLoop, GivenClicks
from ..networks.click_prompt import mask_prompt
from ..networks.image_state import ImageState
from ..networks.msam import MSAM
from .cuda_graphs import DEFAULT_CLICK_BUCKETS, CUDAGraphRunner
from .embedding_cache import ClickHistory, EmbeddingCache
from .window_growth import WindowGrowth

ClickList = Sequence[Sequence[int]] | torch.Tensor | None
CLICK_MODES = ("sequential", "cumulative", "together")
OUTSIDE_LOGIT = -100.0  # logits where no click window reaches (several windows): certainly background


def _as_points(clicks: ClickList, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Normalise a click list (``[[d,h,w], ...]``, ``[N,3]`` or ``[B,N,3]``) to an int64 ``[B, N, 3]`` tensor."""
    if clicks is None:
        return torch.zeros(batch, 0, 3, dtype=torch.long, device=device)
    points = torch.as_tensor(clicks, device=device)
    if points.numel() == 0:
        return torch.zeros(batch, 0, 3, dtype=torch.long, device=device)
    if points.is_floating_point():
        if not torch.equal(points, points.round()):
            raise ValueError(f"{name} clicks must be integer voxel indices, got {points.tolist()}")
    if points.ndim == 2:
        points = points.unsqueeze(0).expand(batch, -1, -1)
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != batch:
        raise ValueError(f"{name} clicks must be a list of [d, h, w] voxel indices, got shape {list(points.shape)}")
    return points.long()


class ClickInferer(Inferer):
    """Segment from user clicks in the 128^3 model input space, with the previous logits fed back.

    ``mode="sequential"`` (default, as in training) decodes one click at a time in the order foreground clicks then
    background clicks, each step fed the previous low-res logits; ``mode="cumulative"`` does the same but gives each
    step every click so far (for models trained with ``pass_all_clicks``); ``mode="together"`` decodes all clicks in
    one step.
    The image embedding is cached per image (``cache``), so repeated requests on the same image only run the decoder.
    With ``reuse_clicks`` (sequential mode, no autograd) the logits after each click are cached too, and a request
    that starts with the previous request's clicks resumes after them: the result is the same as replaying every click
    (tested), but an added click costs one decode instead of one per click so far. ``last_decode_steps`` says how
    many decoder runs the last call made. Returns full-resolution logits ``[B, 1, 128, 128, 128]``; without any click the
    bare-image prediction is returned. With ``cuda_graphs`` (ignored on CPU) the encoder and the per-click decode of a
    CUDA input without autograd replay CUDA graphs (``cuda_graphs.py``; clicks padded up to the next of
    ``click_buckets``), which removes the kernel-launch overhead that dominates a click on a GPU.

    ``initial_mask`` (``[B, 1, *window]``, foreground > 0) starts the loop from an existing segmentation instead of an
    empty mask: it enters as the first mask prompt (:func:`~msam_components.networks.click_prompt.mask_prompt`, logits
    of +-``initial_mask_scale``), exactly where the loop feeds back its own predictions, and the clicks follow. Without
    clicks the model's reading of the mask alone is returned.

    ``click_windows`` (``[G, 3]`` window starts in the input, from ``CropOrPadAroundClicksd(multi_window=True)``) with
    ``click_groups`` (the window of each foreground click) segments clicks too far apart for one window: each window
    gets its group's foreground clicks and every background click inside it, the windows run one after the other
    (batch 1), and the logits are merged by maximum into an input-sized map (``OUTSIDE_LOGIT`` where no window
    reaches). With ``max_grow_windows`` a lesion that leaves its window is followed (``WindowGrowth``): the
    lesion's extent is estimated as the mask so far (logits > ``grow_threshold``) plus the voxels connected to the
    clicked windows' mask within ``grow_band`` robust standard deviations of its median intensity (0: the mask alone,
    the former trigger), so a precise piece that stays inside its window still grows. Wherever that estimate crosses a
    window face that is not the input's edge, a window shifted by half a window across that face is added (the face
    the most estimate voxels cross first) and decoded from one positive click at the deepest voxel of the estimate not
    yet segmented inside it (of the mask there, when nothing is left), without a mask prompt (given the mask as its
    prompt, the demo model reproduced it instead of extending it), until no face is crossed or ``max_grow_windows``
    windows were added (``last_grown_windows``).
    """

    def __init__(
        self,
        mode: str = "sequential",
        cache: EmbeddingCache | None = None,
        reuse_clicks: bool = True,
        cuda_graphs: bool = True,
        click_buckets: Sequence[int] = DEFAULT_CLICK_BUCKETS,
        initial_mask_scale: float = 4.0,
        max_grow_windows: int = 0,
        grow_threshold: float = 0.5,
        grow_band: float = 2.0,
    ) -> None:
        super().__init__()
        if isinstance(max_grow_windows, bool) or not isinstance(max_grow_windows, int) or max_grow_windows < 0:
            raise ValueError(f"max_grow_windows must be a non-negative integer, got {max_grow_windows!r}")
        self.max_grow_windows, self.grow_threshold = max_grow_windows, float(grow_threshold)
        if not grow_band >= 0:
            raise ValueError(f"grow_band must be >= 0 (robust standard deviations), got {grow_band!r}")
        self.grow_band = float(grow_band)
        self.last_grown_windows = 0
        if not initial_mask_scale > 0:
            raise ValueError(f"initial_mask_scale must be > 0, got {initial_mask_scale!r}")
        self.initial_mask_scale = float(initial_mask_scale)
        if mode not in CLICK_MODES:
            raise ValueError(f"mode must be one of {CLICK_MODES}, got {mode!r}")
        self.mode = mode
        self.cache = cache if cache is not None else EmbeddingCache()
        self.reuse_clicks = reuse_clicks
        self.cuda_graphs = cuda_graphs
        self.click_buckets = tuple(click_buckets)
        self.graphs: CUDAGraphRunner | None = None
        self.last_decode_steps = 0

    def graph_runner(self, network: MSAM, inputs: torch.Tensor) -> CUDAGraphRunner | None:
        """The CUDA-graph runner for ``network`` when ``cuda_graphs`` is on and ``inputs`` is on CUDA, else None."""
        if not (self.cuda_graphs and inputs.is_cuda):
            return None
        if self.graphs is None or self.graphs.network is not network:
            self.graphs = CUDAGraphRunner(network, self.click_buckets)
        return self.graphs

    def embedding_state(self, inputs: torch.Tensor, network: MSAM, cache_key: str | None = None) -> ImageState:
        """Cached ``prepare_embedding(encode(inputs))`` for this image."""
        key = cache_key or EmbeddingCache.key_for(inputs)
        state = self.cache.get(key)
        if state is None:
            runner = self.graph_runner(network, inputs)
            if runner is not None:
                state = runner.encode(inputs)
            else:
                state = network.prepare_embedding(network.encode(inputs))
            self.cache.put(key, state)
        return state

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: MSAM,
        foreground: ClickList = None,
        background: ClickList = None,
        cache_key: str | None = None,
        initial_mask: torch.Tensor | None = None,
        click_windows: torch.Tensor | None = None,
        click_groups: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        """Full-resolution logits of ``inputs`` for the clicks (see the class doc); records ``last_decode_steps``."""
        network = getattr(network, "module", network)
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # the loop runs on plain tensors
        mask = initial_mask.as_tensor() if isinstance(initial_mask, MetaTensor) else initial_mask
        window = (network.image_size,) * 3
        if click_windows is not None and (
            len(torch.as_tensor(click_windows).reshape(-1, 3)) > 1 or tuple(plain.shape[2:]) != window
        ):
            logits, steps = self._several_windows(
                plain, network, foreground, background, mask, click_windows, click_groups
            )
        else:
            logits, steps = self._one_window(plain, network, foreground, background, cache_key, mask)
        self.last_decode_steps = steps
        if isinstance(inputs, MetaTensor):  # the logits get the input's meta back for Invertd
            return MetaTensor(logits, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return logits

    def _one_window(
        self,
        inputs: torch.Tensor,
        network: MSAM,
        foreground: ClickList,
        background: ClickList,
        cache_key: str | None,
        initial_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, int]:
        """The logits of one model window for its clicks, and how many decodes they took (resumed clicks: none)."""
        batch, device = inputs.shape[0], inputs.device
        fg = _as_points(foreground, batch, device, "foreground")
        bg = _as_points(background, batch, device, "background")
        size = network.image_size
        for name, pts in (("foreground", fg), ("background", bg)):
            if pts.numel() and (pts.min() < 0 or pts.max() >= size):
                raise ValueError(f"{name} click outside the {size}^3 model input: {pts.reshape(-1, 3).tolist()}")
        points = torch.cat([fg, bg], dim=1)
        labels = torch.cat(
            [
                torch.ones(batch, fg.shape[1], dtype=torch.long, device=device),
                torch.zeros(batch, bg.shape[1], dtype=torch.long, device=device),
            ],
            dim=1,
        )
        key = cache_key or EmbeddingCache.key_for(inputs)
        state = self.embedding_state(inputs, network, key)
        start = self._start_prompt(inputs, network, initial_mask)
        if points.shape[1] == 0:
            return network.upsample(network.decode(state, None, None, start)), 1
        low_res = start if start is not None else inputs.new_zeros(batch, 1, *network.low_res_size)
        runner = self.graph_runner(network, inputs)
        decode = network.decode if runner is None else runner.decode
        if self.mode == "together":  # one step given every click
            clicks = GivenClicks(points, labels, per_step=points.shape[1])
            return ClickLoop().run(network, state, clicks, 1, low_res, decode=decode, full_each_step=False)[0], 1
        reuse = self.reuse_clicks and not torch.is_grad_enabled()
        start_id = None if start is None else EmbeddingCache.key_for(start)  # the clicks' logits depend on it
        history = self.cache.history(key) if reuse else None
        if history is not None and history.start != start_id:
            history = None
        done = history.common_prefix(points, labels) if history is not None else 0
        steps = history.low_res[:done] if history is not None else []
        if done:
            low_res = steps[-1]
        # resumed after the clicks already decoded: the loop holds them, so cumulative decodes still get every click
        loop = ClickLoop(self.mode == "cumulative", points=points[:, :done], labels=labels[:, :done])
        if done < points.shape[1]:
            clicks = GivenClicks(points[:, done:], labels[:, done:])
            num = points.shape[1] - done
            (logits,) = loop.run(network, state, clicks, num, low_res, decode=decode, full_each_step=False)
            steps = steps + loop.low_res
        else:
            logits = network.upsample(low_res)
        if reuse:
            self.cache.put_history(key, ClickHistory(points, labels, steps, start_id))
        return logits, points.shape[1] - done

    def _several_windows(
        self,
        inputs: torch.Tensor,
        network: MSAM,
        foreground: ClickList,
        background: ClickList,
        initial_mask: torch.Tensor | None,
        click_windows: torch.Tensor,
        click_groups: torch.Tensor | None,
    ) -> tuple[torch.Tensor, int]:
        """One model window per group of clicks, merged by maximum into logits of the input's size (batch 1), and the
        decodes it took."""
        if inputs.shape[0] != 1:
            raise ValueError(f"several click windows need a batch of 1, got {inputs.shape[0]}")
        device, size = inputs.device, network.image_size
        fg = _as_points(foreground, 1, device, "foreground")[0]
        bg = _as_points(background, 1, device, "background")[0]
        starts = torch.as_tensor(click_windows, device=device).reshape(-1, 3).long()
        groups = (
            torch.zeros(len(fg), dtype=torch.long, device=device)
            if click_groups is None
            else torch.as_tensor(click_groups, device=device).reshape(-1).long()
        )
        if len(groups) != len(fg):
            raise ValueError(f"click_groups has {len(groups)} entries for {len(fg)} foreground clicks")
        extent = torch.tensor(inputs.shape[2:], device=device)
        if (starts < 0).any() or (starts + size > extent).any():
            raise ValueError(
                f"click windows {starts.tolist()} of {size}^3 do not lie inside the input {list(extent.tolist())}"
            )
        merged = inputs.new_full((1, 1, *inputs.shape[2:]), OUTSIDE_LOGIT)
        steps = 0
        for g, start in enumerate(starts):
            region = (..., *(slice(int(a), int(a) + size) for a in start))
            inside = ((bg >= start) & (bg < start + size)).all(dim=1)
            mask = None if initial_mask is None else torch.as_tensor(initial_mask, device=device)[region]
            logits, used = self._one_window(
                inputs[region], network, (fg[groups == g] - start)[None], (bg[inside] - start)[None], None, mask
            )
            steps += used
            merged[region] = torch.maximum(merged[region], logits)
        steps += self._grow(inputs, network, merged, [tuple(int(a) for a in s) for s in starts], bg)
        return merged, steps

    def _grow(
        self, inputs: torch.Tensor, network: MSAM, merged: torch.Tensor, starts: list[tuple[int, ...]], bg: torch.Tensor
    ) -> int:
        """Decode the windows :class:`WindowGrowth` proposes along the clicked lesion; returns the decode steps."""
        self.last_grown_windows = 0
        if not self.max_grow_windows:
            return 0
        size, steps = network.image_size, 0
        growth = WindowGrowth(inputs[0, 0], merged[0, 0] > self.grow_threshold, starts, size, self.grow_band)
        while self.last_grown_windows < self.max_grow_windows:
            proposal = growth.next_window(merged[0, 0] > self.grow_threshold)
            if proposal is None:
                break
            new, seed = proposal
            region = (..., *(slice(a, a + size) for a in new))
            origin = torch.tensor(new, device=inputs.device)
            click = torch.tensor(seed, device=inputs.device).view(1, 1, 3)
            in_window = ((bg >= origin) & (bg < origin + size)).all(dim=1)
            # the click alone, no mask prompt: given the mask so far, a model reproduces it and does not extend it
            logits, used = self._one_window(inputs[region], network, click, (bg[in_window] - origin)[None], None, None)
            merged[region] = torch.maximum(merged[region], logits)
            steps += used
            self.last_grown_windows += 1
        return steps

    def _start_prompt(self, inputs: torch.Tensor, network: MSAM, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The first mask prompt: ``initial_mask`` as low-res logits (None without one), shape-checked."""
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=inputs.device)
        if mask.ndim == inputs.ndim - 1:
            mask = mask[None]
        if mask.shape[0] != inputs.shape[0] or mask.shape[2:] != inputs.shape[2:] or mask.shape[1] != 1:
            raise ValueError(
                f"initial_mask must be [B, 1, *window] like the input {list(inputs.shape)}, got {list(mask.shape)}"
            )
        return mask_prompt(mask > 0, network.low_res_size, self.initial_mask_scale).to(inputs.dtype)
