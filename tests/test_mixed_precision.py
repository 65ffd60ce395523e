"""Mixed precision (the bundles' `amp` switch): the Dice of a small trained model does not drop under autocast.

On GPU `amp: true` runs the click loop under CUDA autocast; here the same code path runs under CPU bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from conftest import click_engine_parts, make_blob_cases, small_msam_kwargs
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from msam_components.engines import msam_loss, msam_optimizer
from msam_components.networks import MSAM, build_msam

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

CPU = torch.device("cpu")


def _evaluate(net: MSAM, cases: list[dict], amp: bool) -> tuple[float, set[torch.dtype]]:
    """Mean Dice at the last click, and the dtypes of the mask decoder's low-res logits."""
    dtypes: set[torch.dtype] = set()
    hook = net.mask_decoder.register_forward_hook(lambda m, i, o: dtypes.add(o[0].dtype))
    evaluator = SupervisedEvaluator(
        device=CPU,
        val_data_loader=DataLoader(cases, batch_size=2),
        network=net,
        **click_engine_parts(False, num_clicks=3, seed=5),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    dice: list[torch.Tensor] = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: dice.extend(o["click_dice"] for o in e.state.output)
    )
    evaluator.run()
    hook.remove()
    return float(torch.stack(dice)[:, -1].mean()), dtypes


def test_bf16_autocast_keeps_the_dice_of_a_trained_model() -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs(lora_rank=0, encoder_trainable="full"))
    trainer = SupervisedTrainer(
        device=CPU,
        max_epochs=8,
        train_data_loader=DataLoader(make_blob_cases(8, seed=0), batch_size=2, shuffle=True),
        network=net,
        optimizer=msam_optimizer(net, lr=2e-3, weight_decay=0.0, prompt_decoder_lr_scale=1.0),
        **click_engine_parts(True, loss=msam_loss(lambda_dice=1.0, lambda_ce=0.0), num_clicks=3, seed=1),
    )
    trainer.run()
    val = make_blob_cases(4, seed=42)
    dice_fp32, dtypes_fp32 = _evaluate(net, val, amp=False)
    dice_bf16, dtypes_bf16 = _evaluate(net, val, amp=True)
    assert dtypes_fp32 == {torch.float32} and dtypes_bf16 == {torch.bfloat16}, "autocast must really be on"
    # the trained Dice varies with the CPU's kernels and threads (measured 0.53-0.69 under ATEN_CPU_CAPABILITY
    # default / avx2 / avx512 on 1 and 2 threads; bf16 within 0.0015 of it each time): the bound only says it learned
    assert dice_fp32 > 0.35, f"the small model did not learn ({dice_fp32:.3f}); the comparison would be meaningless"
    assert dice_bf16 >= dice_fp32 - 0.02, f"bf16 Dice {dice_bf16:.4f} dropped from fp32 {dice_fp32:.4f}"
