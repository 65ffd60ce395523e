"""Shared pieces of the benchmarks: the full-size model with non-trivial weights, a synthetic case, a 10-click step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from msam_components.engines import ClickSimulator, msam_loss, msam_optimizer
from msam_components.networks import MSAM, build_msam

# a small model with the same structure (8^3 tokens padded to one 14^3 window) for smoke-testing the scripts
SMOKE_KWARGS = dict(
    image_size=32,
    patch_size=4,
    encoder_embed_dim=48,
    encoder_depth=2,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(1,),
    prompt_embed_dim=48,
    mask_in_chans=8,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
    mea_num_heads=4,
    lora_rank=4,
)


def full_size_model(attention_impl: str = "fast", seed: int = 0, **overrides: object) -> MSAM:
    """The default (paper) M-SAM with LoRA B, rel-pos tables and ``pos_embed`` drawn from N(0, 0.02^2), as the fixture.

    Zero-initialised LoRA B and rel-pos tables would hide differences between the attention paths. ``overrides``
    change constructor arguments (e.g. :data:`SMOKE_KWARGS`).
    """
    torch.manual_seed(seed)
    model = build_msam(attention_impl=attention_impl, **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".linear_b_" in name or ".rel_pos_" in name or name.endswith("pos_embed"):
                param.normal_(0.0, 0.02)
    return model


def synthetic_case(
    batch: int = 1, size: int = 128, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy bright sphere (the lesion) per sample: image and binary label ``[B, 1, S, S, S]``."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    labels = []
    for _ in range(batch):
        centre = torch.randint(size // 4, 3 * size // 4, (3,), generator=gen).float()
        labels.append((((grid - centre[:, None, None, None]) ** 2).sum(0) <= (size // 8) ** 2).float()[None])
    label = torch.stack(labels)
    image = 2.0 * label + 0.3 * torch.randn(label.shape, generator=gen)
    return image.to(device), label.to(device)


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (call ``sync`` before reading the clock, e.g. CUDA)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


class TrainStep:
    """One M-SAM training step as in the trainer: ``num_clicks`` simulated clicks, Dice+CE summed over clicks, AdamW."""

    def __init__(self, model: MSAM, image: torch.Tensor, label: torch.Tensor, num_clicks: int = 10) -> None:
        self.model, self.image, self.label, self.num_clicks = model.train(), image, label, num_clicks
        self.optimizer = msam_optimizer(model)
        self.loss_fn = msam_loss()
        self.rng = np.random.RandomState(0)

    def __call__(self, autocast_dtype: torch.dtype | None = None, num_clicks: int | None = None) -> float:
        """Run the step (under autocast when ``autocast_dtype`` is given) and return the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        device_type = self.image.device.type
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            clicks = ClickSimulator(self.label, self.rng)
            logits = self.model(self.image, click_fn=clicks, num_clicks=num_clicks or self.num_clicks)
            loss = sum(self.loss_fn(click.float(), self.label) for click in logits.split(1, dim=1))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
