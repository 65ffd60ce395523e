"""A tiny M-SAM trained for under a minute on the synthetic multi-lesion CT (several tumours, look-alikes) with the
bundles' click recipe learns that a negative click is local: it removes part of the false positive it is placed in and
leaves the rest of the mask alone. With the narrower click stamp of before (``click_stamp_sigma`` 1) the same training
removed about a quarter of the rest of the mask and fails here; a model that ignored the click would clear nothing."""

from __future__ import annotations

import numpy as np
import torch
from conftest import small_msam_kwargs
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.transforms import ScaleIntensityRanged

from msam_components.data.synthetic import kits19_like_arrays
from msam_components.engines import IterativeClickRefinement, msam_loss, msam_optimizer, negative_click_effects
from msam_components.networks import MSAM
from msam_components.transforms import NormalizeIntensityAboved

CPU = torch.device("cpu")


def _case(seed: int, index: int) -> dict[str, torch.Tensor]:
    """One KiTS19-like case at the demo's 64^3 and 2 mm, with the bundles' CT intensity preprocessing; tumour label."""
    hu, seg = kits19_like_arrays(seed, index, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0))
    data = {"image": torch.from_numpy(hu.astype(np.float32))[None]}
    data = ScaleIntensityRanged("image", -1000, 1000, -1000, 1000, clip=True)(data)
    data = NormalizeIntensityAboved("image", threshold=0.0)(data)
    return {"image": torch.as_tensor(data["image"]), "label": torch.from_numpy((seg == 2).astype(np.float32))[None]}


def test_a_negative_click_clears_part_of_its_false_positive_and_keeps_the_rest() -> None:
    torch.manual_seed(0)
    kwargs = small_msam_kwargs(click_stamp=8.0, click_stamp_sigma=2.0, lora_rank=0, encoder_trainable="full")
    net = MSAM(**kwargs)
    recipe = dict(pass_all_clicks=True, seed=0, target="clicked", lambda_click=1.0, initial_mask_prob=0.3)
    strategy = {"interior": 0.5, "random": 0.25, "center": 0.25}
    trainer = SupervisedTrainer(
        device=CPU,
        max_epochs=20,
        train_data_loader=DataLoader([_case(0, i) for i in range(8)], batch_size=2, shuffle=True),
        network=net,
        optimizer=msam_optimizer(net, lr=1e-3, weight_decay=0.0, prompt_decoder_lr_scale=1.0),
        loss_function=msam_loss(1.0, 0.5),
        iteration_update=IterativeClickRefinement(num_clicks=3, strategy=strategy, **recipe),
    )
    trainer.run()

    held_out = [_case(1, i) for i in range(8)]
    evaluator = SupervisedEvaluator(
        device=CPU,
        val_data_loader=DataLoader(held_out, batch_size=1),
        network=net,
        iteration_update=IterativeClickRefinement(
            num_clicks=3, strategy="center", pass_all_clicks=True, keep_click_logits=True
        ),
    )
    effects: list[tuple[int, int, float, float]] = []

    def collect(engine) -> None:
        (out,) = engine.state.output
        label = held_out[engine.state.iteration - 1]["label"][0]
        effects.extend(negative_click_effects(out["click_logits"], out["click_points"], out["click_labels"], label))

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    assert len(effects) >= 4, f"too few negative clicks in false positives to judge: {effects}"
    cleared = float(np.mean([e[2] for e in effects]))
    lost = 1.0 - float(np.nanmean([e[3] for e in effects]))
    assert cleared >= 0.1, f"negative clicks cleared only {cleared:.2f} of their false-positive regions: {effects}"
    assert lost <= 0.1, f"negative clicks also removed {lost:.2f} of the rest of the mask: {effects}"
    assert cleared >= 5 * lost, f"the change is not local to the clicked region: {effects}"
