"""CUDA-graph replay of the encoder and the per-click decode: shape logic and buffer handling on CPU, capture on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import small_msam_kwargs

from msam_components.engines import ClickInferer, EmbeddingCache
from msam_components.engines.cuda_graphs import CUDAGraphRunner, click_bucket, pad_clicks
from msam_components.networks import MSAM, build_msam
from msam_components.networks.compute_paths import set_attention_impl

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

KWARGS = small_msam_kwargs(image_size=32, patch_size=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model() -> MSAM:
    torch.manual_seed(0)
    net = build_msam(**KWARGS).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _case(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, 32, 32, 32, generator=gen)
    points = torch.randint(0, 32, (batch, 3, 3), generator=gen)
    labels = torch.tensor([[1, 0, 1]] * batch)
    return image, points, labels


def test_click_bucket_picks_the_smallest_that_fits() -> None:
    assert [click_bucket(n, (4, 1, 16)) for n in (0, 1, 2, 4, 5, 16, 17)] == [None, 1, 4, 4, 16, 16, None]


def test_pad_clicks_appends_padding_and_marks_it_invalid() -> None:
    points, labels = torch.tensor([[[1, 2, 3]], [[4, 5, 6]]]), torch.tensor([[1], [0]])
    padded, padded_labels, valid = pad_clicks(points, labels, 3)
    assert padded.shape == (2, 3, 3) and padded[:, 1:].eq(0).all() and torch.equal(padded[:, :1], points)
    assert padded_labels.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert valid.tolist() == [[True, False, False]] * 2
    with pytest.raises(ValueError, match="cannot pad"):
        pad_clicks(points, labels, 0)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_cpu_falls_back_to_the_eager_model(model: MSAM, impl: str) -> None:
    set_attention_impl(model, impl)
    runner = CUDAGraphRunner(model)
    image, points, labels = _case()
    with torch.no_grad():
        state = runner.encode(image)
        assert runner.last_path == "eager" and not runner.applies(image)
        low = runner.decode(state, points, labels, None)
        assert runner.last_path == "eager" and len(runner.graphs) == 0
        torch.testing.assert_close(low, model.decode(model.prepare_embedding(model.encode(image)), points, labels))


def test_static_buffers_padding_and_cloned_outputs(model: MSAM) -> None:
    """Emulated capture on CPU: padded clicks in static buffers give the eager unpadded logits, call after call.

    (Padding against no padding on both attention paths: ``test_graph_safe.py``.)
    """
    set_attention_impl(model, "fast")
    runner = CUDAGraphRunner(model, click_buckets=(1, 4), emulate=True)
    with torch.no_grad():
        results, expected = [], []
        for seed in (0, 1):
            image, points, labels = _case(batch=2, seed=seed)
            state = runner.encode(image)
            assert runner.last_path == "graph"
            eager_state = model.prepare_embedding(model.encode(image))
            low = torch.zeros(2, 1, *model.low_res_size)
            for n in (1, 2, 3):
                low = runner.decode(state, points[:, :n], labels[:, :n], low)
                assert runner.last_path == "graph"
                results.append(low)
            eager = torch.zeros(2, 1, *model.low_res_size)
            for n in (1, 2, 3):
                eager = model.decode(eager_state, points[:, :n], labels[:, :n], eager)
                expected.append(eager)
        for got, want in zip(results, expected):  # earlier outputs are clones, not overwritten by later replays
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # encode, decode with 1 click (bucket 1) and with 2-3 clicks (bucket 4); the second image reuses them
        assert len(runner.graphs) == 3
        assert runner.decode(state, *_case(2)[1:], None) is not None and len(runner.graphs) == 4  # no mask prompt
        too_many = torch.zeros(2, 5, 3, dtype=torch.long)
        runner.decode(state, too_many, torch.ones(2, 5, dtype=torch.long), None)
        assert runner.last_path == "eager"
    with torch.enable_grad():
        runner.encode(image)
        assert runner.last_path == "eager"


def test_click_inferer_on_cpu_is_unchanged_by_the_option(model: MSAM) -> None:
    set_attention_impl(model, "fast")
    image, points, labels = _case()
    fg, bg = points[0, :2].tolist(), points[0, 2:].tolist()
    with torch.no_grad():
        on = ClickInferer(cache=EmbeddingCache(), cuda_graphs=True)
        off = ClickInferer(cache=EmbeddingCache(), cuda_graphs=False)
        result_on, result_off = on(image, model, fg, bg), off(image, model, fg, bg)
    assert torch.equal(result_on, result_off)
    assert on.graphs is None and on.graph_runner(model, image) is None


@needs_cuda
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_captured_graphs_match_eager_on_cuda(model: MSAM, impl: str) -> None:
    net = build_msam(**KWARGS).cuda().eval()
    net.load_state_dict(model.state_dict())
    set_attention_impl(net, impl)
    runner = CUDAGraphRunner(net)
    image, points, labels = (t.cuda() for t in _case(batch=2))
    with torch.no_grad():
        for _ in range(2):  # capture, then replay
            state = runner.encode(image)
            assert runner.last_path == "graph"
            low = runner.decode(state, points, labels, torch.zeros(2, 1, *net.low_res_size, device="cuda"))
            assert runner.last_path == "graph"
        eager_state = net.prepare_embedding(net.encode(image))
        eager = net.decode(eager_state, points, labels, torch.zeros(2, 1, *net.low_res_size, device="cuda"))
    assert state.tensors().keys() == eager_state.tensors().keys()
    for key, value in eager_state.tensors().items():
        torch.testing.assert_close(state.tensors()[key], value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(low, eager, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_click_inferer_uses_graphs_on_cuda(model: MSAM) -> None:
    net = build_msam(**KWARGS).cuda().eval()
    net.load_state_dict(model.state_dict())
    image, points, _ = _case()
    fg, bg = points[0, :2].tolist(), points[0, 2:].tolist()
    with torch.no_grad():
        graphed = ClickInferer(cache=EmbeddingCache())
        result = graphed(image.cuda(), net, fg, bg)
        eager = ClickInferer(cache=EmbeddingCache(), cuda_graphs=False)(image.cuda(), net, fg, bg)
    assert graphed.graphs is not None and graphed.graphs.last_path == "graph"
    torch.testing.assert_close(result, eager, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_graph_captured_under_autocast_survives_the_autocast_region(model: MSAM) -> None:
    """bf16 capture in one autocast region, replay in a later one: the graph casts its weights itself."""
    net = build_msam(**KWARGS).cuda().eval()
    net.load_state_dict(model.state_dict())
    runner = CUDAGraphRunner(net)
    image, points, labels = (t.cuda() for t in _case())
    low = torch.zeros(1, 1, *net.low_res_size, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net.decode(net.prepare_embedding(net.encode(image)), points, labels, low)  # fills the autocast cache
            runner.decode(runner.encode(image), points, labels, low)
        torch.randn(1 << 24, device="cuda").mul_(7.0)  # reuse freed memory
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graphed = runner.decode(runner.encode(image), points, labels, low)
            assert runner.last_path == "graph"
            eager = net.decode(net.prepare_embedding(net.encode(image)), points, labels, low)
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=0.05, atol=0.05)
