"""``MSAM.encode`` and ``MSAM.decode`` are graph-safe: no tensor from host data, no host sync, no data-dependent shape.

These are what CUDA-graph capture (and ``torch.compile`` without graph breaks) needs. The check runs at the
dispatcher on CPU: ``aten.lift_fresh`` is a tensor made from host data (``torch.tensor``, ``new_tensor``),
``aten._local_scalar_dense`` a read of a device value on the host (``.item()``, ``bool(t)``, a Python branch on a
tensor) and ``aten.nonzero`` a data-dependent shape.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import small_msam_kwargs
from torch.utils._python_dispatch import TorchDispatchMode

from msam_components.networks import MSAM, build_msam
from msam_components.networks.compute_paths import set_attention_impl

pytestmark = pytest.mark.numerics  # compares floating-point results: CI reruns it with ATEN_CPU_CAPABILITY=default

FORBIDDEN = ("aten.lift_fresh", "aten._local_scalar_dense", "aten.nonzero")
# 8^3 tokens in 8^3 windows (no padding), as the engine tests' model but a 32^3 input
SMALL_KWARGS = small_msam_kwargs(image_size=32, patch_size=4)
# 16^3 input, 4^3 tokens padded to one 6^3 window: the fast encoder takes the closed-form padded-window path; with
# clicks stamped into the mask prompt (the bundles' default)
PADDED_WINDOW_KWARGS = small_msam_kwargs(image_size=16, patch_size=4, encoder_window_size=6, click_stamp=8.0)


class OpRecorder(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - dispatcher signature
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _forbidden(fn) -> dict[str, int]:  # noqa: ANN001
    recorder = OpRecorder()
    with recorder:
        fn()
    return {op: n for op, n in recorder.ops.items() if op in FORBIDDEN}


@pytest.fixture(scope="module", params=["small", "padded-window"])
def model(request: pytest.FixtureRequest) -> MSAM:
    kwargs = SMALL_KWARGS if request.param == "small" else PADDED_WINDOW_KWARGS
    torch.manual_seed(0)
    net = build_msam(**kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _clicks(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples, three click slots: sample 0 has one positive and two padding clicks, sample 1 two clicks."""
    points = torch.tensor([[[3, size - 5, 7], [0, 0, 0], [0, 0, 0]], [[size // 2, 4, 9], [1, 2, size - 1], [0, 0, 0]]])
    labels = torch.tensor([[1, -1, -1], [1, 0, -1]])
    return points, labels, labels != -1


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_encode_and_decode_make_no_host_tensor_sync_or_dynamic_shape(model: MSAM, impl: str) -> None:
    set_attention_impl(model, impl)
    size = model.image_size
    image = torch.randn(2, 1, size, size, size)
    points, labels, valid = _clicks(size)
    low_res = torch.randn(2, 1, *model.low_res_size)
    with torch.no_grad():
        states = []
        assert _forbidden(lambda: states.append(model.prepare_embedding(model.encode(image)))) == {}
        state = states[0]
        for mask in (None, low_res):
            assert _forbidden(lambda: model.decode(state, points, labels, mask)) == {}
            assert _forbidden(lambda: model.decode(state, points, labels, mask, valid_points=valid)) == {}
            assert _forbidden(lambda: model.decode(state.embedding, points, labels, mask)) == {}
        assert _forbidden(lambda: model.decode(state, None, None, None)) == {}


def test_the_recorder_sees_what_it_forbids() -> None:
    """The check would fail on the ops it looks for (so an empty result means something)."""
    x = torch.arange(4.0)
    found = _forbidden(lambda: (x.new_tensor([1.0, 2.0]), x.sum().item(), torch.nonzero(x)))
    assert set(found) == set(FORBIDDEN)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_decode_with_gradients_is_graph_safe(impl: str) -> None:
    """The training step's decode (autograd on) as well."""
    torch.manual_seed(0)
    net = build_msam(**PADDED_WINDOW_KWARGS, attention_impl=impl)
    image = torch.randn(2, 1, 16, 16, 16)
    points, labels, valid = _clicks(16)
    found = _forbidden(
        lambda: net.upsample(
            net.decode(net.prepare_embedding(net.encode(image)), points, labels, None, valid_points=valid)
        )
        .sum()
        .backward()
    )
    assert found == {}


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_padding_clicks_left_out_give_the_unpadded_logits(model: MSAM, impl: str, with_mask: bool) -> None:
    """Clicks padded with label -1 and ``valid_points`` False decode exactly as the clicks alone (float64)."""
    net = copy.deepcopy(model).double().eval()
    set_attention_impl(net, impl)
    size = net.image_size
    points, labels, valid = _clicks(size)
    image = torch.randn(2, 1, size, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    low_res = torch.randn(2, 1, *net.low_res_size, dtype=torch.float64) if with_mask else None
    with torch.no_grad():
        state = net.prepare_embedding(net.encode(image))
        padded = net.decode(state, points, labels, low_res, valid_points=valid)
        for b, n in enumerate(valid.sum(1).tolist()):
            alone = net.decode(
                state.select(b),
                points[b : b + 1, :n],
                labels[b : b + 1, :n],
                None if low_res is None else low_res[b : b + 1],
            )
            torch.testing.assert_close(padded[b : b + 1], alone, rtol=1e-10, atol=1e-12)
        # label -1 alone is SAM's "not a point" token, which does take part: leaving it out is what valid_points does
        kept = net.decode(state, points, labels, low_res)
        assert (kept[0] - padded[0]).abs().max() > 1e-6


def test_valid_points_shape_is_checked(model: MSAM) -> None:
    state = torch.zeros(2, model.prompt_encoder.embed_dim, *model.embedding_size)
    points, labels, valid = _clicks(model.image_size)
    with pytest.raises(ValueError, match="valid_points must be"):
        model.decode(state, points, labels, None, valid_points=valid[:, :2])
    with pytest.raises(ValueError, match="valid_points must be"):
        model.decode(state, None, None, None, valid_points=valid)


def test_input_scale_buffer_is_not_in_the_state_dict() -> None:
    """The prompt encoder's coordinate scale is a non-persistent buffer: checkpoints keep their keys."""
    net = build_msam(**SMALL_KWARGS)
    assert "prompt_encoder.input_scale" in dict(net.named_buffers())
    assert not any(key.endswith("input_scale") for key in net.state_dict())


def test_upsampling_reuses_its_interpolation_matrices() -> None:
    """After the first call the fast upsampling builds nothing on the host (no per-click host-to-device copy)."""
    net = build_msam(**SMALL_KWARGS)
    logits = torch.randn(1, 1, *net.low_res_size)
    with torch.inference_mode():
        first = net.upsample(logits)
    recorder = OpRecorder()
    with recorder:
        again = net.upsample(logits.requires_grad_())
    again.sum().backward()  # matrices first built under inference_mode still work with autograd
    assert torch.equal(first, again.detach())
    assert not {"aten.index_put_", "aten.arange", "aten.zeros"} & set(recorder.ops)
