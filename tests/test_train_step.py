"""The training step is MONAI's own ``SupervisedTrainer._iteration`` running the inferer and loss it is configured with
(``ClickLoopInferer``, ``PerClickLoss``; nothing swapped at run time): same numbers as the step written out by hand, the
trainer's events, accumulation and AMP, and a clear error for a trainer not configured for the click loop."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import click_engine_parts, make_blob_cases, small_msam_kwargs
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from msam_components.engines import ClickLoopInferer, ClickLoopOutput, IterativeClickRefinement, PerClickLoss, msam_loss
from msam_components.networks import MSAM, build_msam

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

CPU = torch.device("cpu")


def _trainer(net: MSAM, parts: dict, iterations: int = 1, **kwargs) -> SupervisedTrainer:
    """A trainer running the click loop (``parts``: ``click_engine_parts(True, ...)``) with SGD."""
    loader = DataLoader(make_blob_cases(2 * iterations), batch_size=2, shuffle=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    return SupervisedTrainer(
        device=CPU,
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=optimizer,
        decollate=False,
        **parts,
        **kwargs,
    )


def test_one_step_equals_the_step_written_out() -> None:
    """Parameters and loss after one trainer step equal zero_grad / click loop / loss over clicks / backward / step."""
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    by_hand = copy.deepcopy(net)
    trainer = _trainer(net, click_engine_parts(True, num_clicks=3, seed=4, strategy="center", lambda_click=0.5))
    assert isinstance(trainer.inferer, ClickLoopInferer) and isinstance(trainer.loss_function, PerClickLoss)
    events: list[str] = []
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    at_model_completed: dict = {}
    trainer.add_event_handler(
        IterationEvents.MODEL_COMPLETED, lambda e: at_model_completed.update(dict(e.state.output))
    )
    trainer.run()

    manual = ClickLoopInferer(num_clicks=3, seed=4, strategy="center")
    manual.set_random_state(seed=4)
    batch = next(iter(DataLoader(make_blob_cases(2), batch_size=2)))
    image, label = batch["image"].as_tensor(), (batch["label"].as_tensor() > 0).float()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    optimizer.zero_grad()
    by_hand.train()
    output = manual(image, by_hand, label)
    logits = output.logits
    loss = PerClickLoss(msam_loss(), lambda_click=0.5)(output, label)
    loss.backward()
    optimizer.step()

    assert events == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    torch.testing.assert_close(trainer.state.output["loss"].detach(), loss.detach())
    for (name, p), q in zip(net.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    # what post-processing and metrics see at MODEL_COMPLETED: the last click's detached logits and the click results
    pred = at_model_completed["pred"]
    assert pred.shape == (2, 1, 64, 64, 64) and not pred.requires_grad
    torch.testing.assert_close(pred, logits[:, -1:].detach())
    assert at_model_completed["click_dice"].shape == (2, 3) and "click_compliance" in at_model_completed


def test_gradient_accumulation_comes_from_the_trainer() -> None:
    """``accumulation_steps=2``: no optimizer step after the first iteration, one after the second."""
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    start = [p.detach().clone() for p in net.parameters()]
    trainer = _trainer(net, click_engine_parts(True, num_clicks=2, seed=0), iterations=2, accumulation_steps=2)
    moved: list[bool] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: moved.append(any(not torch.equal(p, s) for p, s in zip(net.parameters(), start))),
    )
    trainer.run()
    assert moved == [False, True]


def test_cpu_amp_runs_the_click_loop_under_cpu_autocast() -> None:
    """MONAI's step autocasts on CUDA only; on CPU the click loop and loss still run in bfloat16 autocast."""
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    seen: list[tuple[bool, torch.dtype]] = []
    loss_function = msam_loss()

    def recording_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        return loss_function(logits, target)

    parts = click_engine_parts(True, loss=recording_loss, num_clicks=2, seed=0)
    trainer = _trainer(net, parts, amp=True, amp_kwargs={"dtype": torch.bfloat16})
    trainer.run()
    assert seen and all(enabled for enabled, _ in seen)
    assert torch.isfinite(trainer.state.output["loss"]) and trainer.loss_function is parts["loss_function"]


def test_the_configured_inferer_and_loss_run_and_a_plain_trainer_is_refused() -> None:
    """What the config declares is what runs: a loss that counts its calls sees every click; an engine left with
    MONAI's SimpleInferer (the old configs) gets an error naming the component to set, and no step is taken."""
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    calls: list[int] = []

    class CountingLoss(PerClickLoss):
        def forward(self, output: ClickLoopOutput, target: torch.Tensor) -> torch.Tensor:
            calls.append(output.logits.shape[1])
            return super().forward(output, target)

    parts = click_engine_parts(True, num_clicks=3, seed=0)
    parts["loss_function"] = CountingLoss()
    _trainer(net, parts).run()
    assert calls == [3]
    start = [p.detach().clone() for p in net.parameters()]
    plain = click_engine_parts(True, num_clicks=2, seed=0)
    del plain["inferer"]
    with pytest.raises(TypeError, match="train#inferer must be a msam_components.engines.ClickLoopInferer"):
        _trainer(net, plain).run()
    assert all(torch.equal(p, s) for p, s in zip(net.parameters(), start))
    with pytest.raises(TypeError, match="'num_clicks': this option belongs to ClickLoopInferer"):
        IterativeClickRefinement(num_clicks=3)
