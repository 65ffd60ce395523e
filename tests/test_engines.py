"""The click-loop iteration inside MONAI's trainer/evaluator, the click inferer, and the optimiser helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import click_engine_parts, make_blob_cases, msam_kwargs_from_reference_config, small_msam_kwargs
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer

import msam_components.clicks.simulator as click_simulator
from msam_components.engines import (
    ClickHistory,
    ClickInferer,
    ClickMetricsHandler,
    EmbeddingCache,
    msam_loss,
    msam_lr_milestones,
    msam_lr_scheduler,
    msam_optimizer,
)
from msam_components.networks import MSAM, build_msam, load_pretrained

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

CPU = torch.device("cpu")


def _evaluator(net: MSAM, cases: list[dict], parts: dict, **kwargs) -> SupervisedEvaluator:
    """An evaluator running the click loop (``parts``: ``click_engine_parts(False, ...)``)."""
    loader = DataLoader(cases, batch_size=kwargs.pop("batch_size", 2), shuffle=False)
    return SupervisedEvaluator(device=CPU, val_data_loader=loader, network=net, **parts, **kwargs)


def _outputs(engine) -> list[dict]:
    """Collect the decollated per-case outputs of every iteration."""
    collected: list[dict] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: collected.extend(e.state.output))
    return collected


def test_engine_chain_reproduces_reference_logits(tiny_fixture: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fixture's fixed clicks, the evaluator's loop reproduces low_res_logits_iter0/1/2 (upsampled)."""
    fx = tiny_fixture
    net = build_msam(**msam_kwargs_from_reference_config(fx["config"])).eval()
    load_pretrained(net, fx["state_dict"])
    seen_logits: list[torch.Tensor | None] = []

    def fixed_clicks(pred, label, rng, strategy, threshold, threshold_on):
        i = len(seen_logits)
        seen_logits.append(pred)
        return fx["points"][i].view(1, 1, 3), fx["point_labels"][i].view(1, 1)

    monkeypatch.setattr(click_simulator, "sample_clicks_batch", fixed_clicks)
    image = fx["image_int8"].float() * fx["image_scale"]
    case = {"image": MetaTensor(image[0]), "label": MetaTensor((image[0] > 2).float())}
    evaluator = _evaluator(net, [case], click_engine_parts(False, num_clicks=3, keep_click_logits=True), batch_size=1)
    outputs = _outputs(evaluator)
    evaluator.run()
    logits = outputs[0]["click_logits"]
    assert logits.shape == (3, 128, 128, 128)
    for i in range(3):
        expected = net.upsample(fx[f"low_res_logits_iter{i}"].float())[0, 0]
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)
    assert seen_logits[0] is None  # the first click is sampled before any prediction
    torch.testing.assert_close(seen_logits[1][0, 0], logits[0])  # later clicks see the previous full-res logits
    torch.testing.assert_close(outputs[0]["pred"][0], logits[-1])


def test_trainer_loss_decreases_on_blobs() -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    loader = DataLoader(make_blob_cases(8), batch_size=2, shuffle=True)
    trainer = SupervisedTrainer(
        device=CPU,
        max_epochs=6,
        train_data_loader=loader,
        network=net,
        optimizer=msam_optimizer(net, lr=2e-3),
        **click_engine_parts(True, loss=msam_loss(), num_clicks=3, seed=1),
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, f"loss did not decrease: {first:.3f} -> {last:.3f}"


def test_evaluator_writes_per_click_reports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    evaluator = _evaluator(net, make_blob_cases(3, seed=5), click_engine_parts(False, num_clicks=4, seed=3))
    ClickMetricsHandler(output_dir=tmp_path).attach(evaluator)
    evaluator.run()
    rows = list(csv.DictReader((tmp_path / "click_metrics.csv").open()))
    assert [r["case"] for r in rows] == ["case_00000", "case_00001", "case_00002"]
    assert [k for k in rows[0] if k.startswith("dice_click_")] == [f"dice_click_{i}" for i in range(1, 5)]
    assert [k for k in rows[0] if k.startswith("iou_click_")] == [f"iou_click_{i}" for i in range(1, 5)]
    summary = json.loads((tmp_path / "click_metrics_summary.json").read_text())
    assert summary["num_cases"] == 3 and summary["num_clicks"] == 4
    dice_last = [float(r["dice_click_4"]) for r in rows]
    assert summary["dice_last_click"] == pytest.approx(sum(dice_last) / 3, abs=1e-5)
    assert evaluator.state.metrics["dice_last_click"] == pytest.approx(summary["dice_last_click"], abs=1e-6)
    assert (tmp_path / "click_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "metrics.json").exists()


def test_seeded_evaluation_is_reproducible_and_reseeds_each_epoch() -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    cases = make_blob_cases(2, seed=7)

    def clicks_of_run(epochs: int) -> list[torch.Tensor]:
        evaluator = _evaluator(net, cases, click_engine_parts(False, num_clicks=3, seed=11), batch_size=2)
        evaluator.state.max_epochs = epochs
        outputs = _outputs(evaluator)
        evaluator.run()
        return [o["click_points"] for o in outputs]

    first, second = clicks_of_run(1), clicks_of_run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    two_epochs = clicks_of_run(2)
    assert all(torch.equal(a, b) for a, b in zip(two_epochs[:2], two_epochs[2:]))
    for points, lab in zip(first, cases):  # the first click lies inside the lesion
        d, h, w = points[0].tolist()
        assert lab["label"][0, d, h, w] == 1


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_through_feedback_path(detach: bool) -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs())
    image = torch.randn(1, 1, 64, 64, 64)
    low_res_outputs: list[torch.Tensor] = []
    original_decode = net.decode

    def recording_decode(*args, **kwargs):
        out = original_decode(*args, **kwargs)
        out.retain_grad()
        low_res_outputs.append(out)
        return out

    net.decode = recording_decode  # type: ignore[method-assign]
    clicks = lambda i, logits: (torch.tensor([[[20 + i, 30, 40]]]), torch.ones(1, 1, dtype=torch.long))  # noqa: E731
    logits = net(image, click_fn=clicks, num_clicks=3, detach_feedback=detach)
    logits[:, -1].sum().backward()
    first_grad = low_res_outputs[0].grad
    if detach:  # only the zero gradient of the concatenated output reaches the first step
        assert first_grad is None or first_grad.abs().sum() == 0
    else:
        assert first_grad is not None and first_grad.abs().sum() > 0


def test_click_inferer_caches_embedding_and_matches_manual_chain() -> None:
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs()).eval()
    image = torch.randn(1, 1, 64, 64, 64)
    encode_calls = []
    original_encode = net.encode
    net.encode = lambda x: (encode_calls.append(1), original_encode(x))[1]  # type: ignore[method-assign]
    inferer = ClickInferer(cache=EmbeddingCache(max_items=2))
    fg, bg = [[30, 31, 32], [20, 20, 20]], [[5, 6, 7]]
    with torch.no_grad():
        out = inferer(image, net, foreground=fg, background=bg)
        again = inferer(image, net, foreground=fg, background=bg)
        emb = original_encode(image)
        low = torch.zeros(1, 1, 32, 32, 32)
        for point, lab in [(fg[0], 1), (fg[1], 1), (bg[0], 0)]:
            low = net.decode(emb, torch.tensor([[point]]), torch.tensor([[lab]]), low)
    assert len(encode_calls) == 1 and inferer.cache.hits == 1
    torch.testing.assert_close(out, net.upsample(low), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, out)
    assert out.shape == (1, 1, 64, 64, 64)
    with torch.no_grad():
        together = ClickInferer(mode="together")(image, net, foreground=fg, background=bg)
        bare = inferer(image, net)
    assert together.shape == bare.shape == out.shape
    with pytest.raises(ValueError, match="outside"):
        inferer(image, net, foreground=[[64, 0, 0]])
    with pytest.raises(ValueError, match="integer"):
        inferer(image, net, foreground=[[1.5, 2, 3]])
    with pytest.raises(ValueError, match="voxel indices"):
        inferer(image, net, foreground=[[1, 2]])


def test_click_inferer_resumes_from_cached_clicks_with_replay_results() -> None:
    """A session of growing, edited and reordered click lists: resumed results equal full replays, fewer decodes."""
    torch.manual_seed(0)
    net = build_msam(**small_msam_kwargs()).eval()
    images = [torch.randn(1, 1, 64, 64, 64), torch.randn(1, 1, 64, 64, 64)]
    session = [  # (image, foreground, background, clicks the resuming inferer must decode)
        (0, [[30, 31, 32]], [], 1),
        (0, [[30, 31, 32]], [], 0),  # same clicks again
        (0, [[30, 31, 32]], [[5, 6, 7]], 1),  # appended background click
        (0, [[30, 31, 32]], [[5, 6, 7], [9, 9, 9]], 1),
        (0, [[30, 31, 32], [20, 20, 20]], [[5, 6, 7], [9, 9, 9]], 3),  # a foreground click goes before the background
        (1, [[30, 31, 32]], [], 1),  # another image, then back: each image keeps its own history
        (0, [[30, 31, 32], [20, 20, 20]], [[5, 6, 7]], 0),  # a click removed: the cached prefix covers the rest
        (0, [[30, 31, 33]], [], 1),  # first click moved: nothing reusable
    ]
    resuming, replaying = ClickInferer(), ClickInferer(reuse_clicks=False)
    decode_calls = []
    original_decode = net.decode
    net.decode = lambda *a, **k: (decode_calls.append(1), original_decode(*a, **k))[1]  # type: ignore[method-assign]
    with torch.no_grad():
        for image, fg, bg, expected_decodes in session:
            decode_calls.clear()
            out = resuming(images[image], net, foreground=fg, background=bg)
            assert resuming.last_decode_steps == len(decode_calls) == expected_decodes, (fg, bg)
            torch.testing.assert_close(out, replaying(images[image], net, foreground=fg, background=bg), rtol=0, atol=0)
            assert replaying.last_decode_steps == len(fg) + len(bg)
    with torch.enable_grad():  # with autograd on, every click is decoded again (cached logits carry no graph)
        decode_calls.clear()
        resuming(images[0], net, foreground=[[30, 31, 33]], background=[])
        assert len(decode_calls) == 1
    resuming.cache.put(EmbeddingCache.key_for(images[0]), resuming.cache.get(EmbeddingCache.key_for(images[0])))
    assert resuming.cache.history(EmbeddingCache.key_for(images[0])) is None  # a new state drops its history


def test_embedding_cache_is_bounded() -> None:
    cache = EmbeddingCache(max_items=2)
    for key in "abc":
        cache.put(key, {"embedding": torch.zeros(1)})
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    history = ClickHistory(torch.zeros(1, 1, 3), torch.ones(1, 1), [torch.zeros(1)])
    cache.put_history("b", history)
    cache.put_history("a", history)  # evicted image: not recorded
    assert cache.history("b") is history and cache.history("a") is None
    cache.put("d", {"embedding": torch.zeros(1)})  # evicts "b" and its history
    assert cache.history("b") is None


def test_optimiser_and_schedule_follow_the_paper() -> None:
    assert msam_lr_milestones(200) == [120, 180]
    net = build_msam(**small_msam_kwargs())
    opt = msam_optimizer(net, lr=8e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([8e-4, 8e-5])
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    sched = msam_lr_scheduler(opt, num_epochs=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[5] == pytest.approx(8e-4) and lrs[6] == pytest.approx(8e-5) and lrs[9] == pytest.approx(8e-6)
