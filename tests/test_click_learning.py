"""A tiny M-SAM trained for under a minute on the synthetic multi-lesion CT (several tumours, look-alikes) with the
bundles' click recipe learns to act on a negative click where it is placed: the click removes more of the false positive
it sits in than of the rest of the mask. A model that ignored the click would clear nothing; one that read a negative
click as "shrink everything" would clear both alike.

Training a model this small for 80 steps is chaotic under float rounding: the same seed on another CPU's kernels, or on
another thread count, ends in another model. The claim is therefore asserted on the median over three training seeds,
with margins set from the spread measured over seeds 0-2 under ``ATEN_CPU_CAPABILITY`` default / avx2 / avx512 on 2
threads and default / avx512 on 1 thread (``python tests/test_click_learning.py 0 1 2`` prints the per-seed values):
the share of its region a click cleared was 0.18-1.00 per seed (medians over the seeds 0.55-0.87), the share of the rest
of the mask it removed 0.02-0.94, and their difference 0.06-0.38 per seed (medians 0.10-0.34). An earlier version
asserted on seed 0 alone that at most 0.1 of the rest is removed: that held on some CPUs and failed on others (0.16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import click_engine_parts, small_msam_kwargs
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.transforms import ScaleIntensityRanged

from msam_components.data.synthetic import kits19_like_arrays
from msam_components.engines import msam_loss, msam_optimizer, negative_click_effects
from msam_components.networks import build_msam
from msam_components.transforms import NormalizeIntensityAboved

CPU = torch.device("cpu")


def _case(seed: int, index: int) -> dict[str, torch.Tensor]:
    """One KiTS19-like case at the demo's 64^3 and 2 mm, with the bundles' CT intensity preprocessing; tumour label."""
    hu, seg = kits19_like_arrays(seed, index, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0))
    data = {"image": torch.from_numpy(hu.astype(np.float32))[None]}
    data = ScaleIntensityRanged("image", -1000, 1000, -1000, 1000, clip=True)(data)
    data = NormalizeIntensityAboved("image", threshold=0.0)(data)
    return {"image": torch.as_tensor(data["image"]), "label": torch.from_numpy((seg == 2).astype(np.float32))[None]}


SEEDS = (0, 1, 2)


def negative_click_effects_after_training(seed: int) -> tuple[float, float, int]:
    """Train the tiny model from ``seed`` (weights, shuffling, clicks) on the same 8 cases; on 8 held-out cases, the
    mean share of each clicked false-positive region that one negative click cleared, the share of the rest of the mask
    it removed, and the number of such clicks."""
    torch.manual_seed(seed)
    kwargs = small_msam_kwargs(click_stamp=8.0, click_stamp_sigma=2.0, lora_rank=0, encoder_trainable="full")
    net = build_msam(**kwargs)
    recipe = dict(pass_all_clicks=True, seed=seed, target="clicked", lambda_click=1.0, initial_mask_prob=0.3)
    strategy = {"interior": 0.5, "random": 0.25, "center": 0.25}
    trainer = SupervisedTrainer(
        device=CPU,
        max_epochs=20,
        train_data_loader=DataLoader([_case(0, i) for i in range(8)], batch_size=2, shuffle=True),
        network=net,
        optimizer=msam_optimizer(net, lr=1e-3, weight_decay=0.0, prompt_decoder_lr_scale=1.0),
        **click_engine_parts(True, loss=msam_loss(1.0, 0.5), num_clicks=3, strategy=strategy, **recipe),
    )
    trainer.run()

    held_out = [_case(1, i) for i in range(8)]
    evaluator = SupervisedEvaluator(
        device=CPU,
        val_data_loader=DataLoader(held_out, batch_size=1),
        network=net,
        **click_engine_parts(False, num_clicks=3, strategy="center", pass_all_clicks=True, keep_click_logits=True),
    )
    effects: list[tuple[int, int, float, float]] = []

    def collect(engine) -> None:
        (out,) = engine.state.output
        label = held_out[engine.state.iteration - 1]["label"][0]
        effects.extend(negative_click_effects(out["click_logits"], out["click_points"], out["click_labels"], label))

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    if not effects:
        return float("nan"), float("nan"), 0
    return float(np.mean([e[2] for e in effects])), 1.0 - float(np.nanmean([e[3] for e in effects])), len(effects)


@pytest.mark.numerics
def test_a_negative_click_clears_more_of_its_false_positive_than_of_the_rest() -> None:
    runs = {seed: negative_click_effects_after_training(seed) for seed in SEEDS}
    counts = [count for _, _, count in runs.values()]
    assert min(counts) >= 2 and sum(counts) >= 15, f"too few negative clicks in false positives to judge: {runs}"
    cleared = float(np.median([c for c, _, _ in runs.values()]))
    margin = float(np.median([c - lost for c, lost, _ in runs.values()]))
    assert cleared >= 0.2, f"negative clicks cleared a median {cleared:.2f} of their false-positive regions: {runs}"
    assert margin >= 0.05, f"they cleared a median of only {margin:.2f} more there than of the rest of the mask: {runs}"


if __name__ == "__main__":  # measure the spread: python tests/test_click_learning.py SEED...
    import sys
    import time

    for arg in sys.argv[1:]:
        start = time.perf_counter()
        cleared, lost, count = negative_click_effects_after_training(int(arg))
        print(
            f"seed {arg}: cleared {cleared:.3f} removed elsewhere {lost:.3f} difference {cleared - lost:.3f} "
            f"clicks {count} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
