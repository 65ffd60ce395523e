"""CUDA graphs for the click-time model calls: the image encoder (once per image) and the per-click decode.

On a GPU a fast-path decode is hundreds of small kernels whose launch overhead costs many times their GPU time (see
``benchmarks/RESULTS.md``). A captured ``torch.cuda.CUDAGraph`` launches them all at once. A graph replays fixed
addresses and shapes, so each call's tensors are copied into the graph's static input buffers, the clicks are padded
up to the next of ``click_buckets`` with label -1 and left out of the attention (``MSAM.decode(valid_points=...)``,
the same logits as unpadded), and the outputs are cloned off the graph's buffers. One graph is captured per static
shape (batch, clicks bucket, dtypes, autocast state, attention path, weights' addresses), after a warm-up on a side
stream. Everything else runs the eager model unchanged: CPU tensors, autograd, more clicks than the largest bucket,
and a capture that fails.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..networks.image_state import ImageState
from ..networks.msam import MSAM

Outputs = torch.Tensor | dict[str, torch.Tensor]
DEFAULT_CLICK_BUCKETS = (1, 4, 16, 64)


def click_bucket(num_clicks: int, buckets: Sequence[int] = DEFAULT_CLICK_BUCKETS) -> int | None:
    """The smallest bucket that holds ``num_clicks`` clicks (None when none does: the caller decodes eagerly)."""
    fitting = [b for b in sorted(buckets) if b >= num_clicks]
    return fitting[0] if fitting and num_clicks > 0 else None


def pad_clicks(
    points: torch.Tensor, labels: torch.Tensor, num_clicks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``points`` ``[B, N, 3]`` and ``labels`` ``[B, N]`` to ``num_clicks`` with ``(0, 0, 0)`` / -1.

    Returns the padded points and labels and ``valid`` ``[B, num_clicks]`` bool (False for the added padding), for
    ``MSAM.decode(..., valid_points=valid)``.
    """
    batch, n = labels.shape
    if n > num_clicks:
        raise ValueError(f"cannot pad {n} clicks to {num_clicks}")
    extra = num_clicks - n
    points = torch.cat([points, points.new_zeros(batch, extra, 3)], dim=1)
    valid = torch.cat(
        [labels.new_ones(batch, n, dtype=torch.bool), labels.new_zeros(batch, extra, dtype=torch.bool)], 1
    )
    labels = torch.cat([labels, labels.new_full((batch, extra), -1)], dim=1)
    return points, labels, valid


def _clone(outputs: Outputs) -> Outputs:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    return {k: v.clone() for k, v in outputs.items()}


def _without_autocast_cache(device_type: str) -> torch.autocast:
    """The current autocast state with its cache of cast weights off.

    A graph must cast the weights itself: a cast taken from the cache would be read from memory outside the graph's
    pool, which is freed when the caller's autocast region ends.
    """
    return torch.autocast(
        device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
        cache_enabled=False,
    )


class StaticCall:
    """One captured call: static input buffers, the CUDA graph that reads them and the outputs it writes.

    ``emulate`` runs ``fn`` eagerly on the static buffers instead of capturing (CPU tests of the buffer handling).
    """

    def __init__(
        self, fn: Callable[..., Outputs], inputs: dict[str, torch.Tensor], warmup: int = 3, emulate: bool = False
    ) -> None:
        self.fn = fn
        self.inputs = {k: v.detach().clone() for k, v in inputs.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        if emulate:
            self.outputs = fn(**self.inputs)
            return
        device = next(iter(self.inputs.values())).device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _without_autocast_cache(device.type):  # warm-up off the default stream
            for _ in range(warmup):
                fn(**self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a server's request threads) may keep using CUDA while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), _without_autocast_cache(device.type):
            self.outputs = fn(**self.inputs)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        """Copy ``inputs`` into the static buffers (same keys, shapes and dtypes), replay, return cloned outputs."""
        for key, value in inputs.items():
            buffer = self.inputs[key]
            if value.data_ptr() != buffer.data_ptr():
                buffer.copy_(value)
        if self.graph is None:
            self.outputs = self.fn(**self.inputs)
        else:
            self.graph.replay()
        return _clone(self.outputs)


class CUDAGraphRunner:
    """``prepare_embedding(encode(image))`` and ``decode`` of one :class:`MSAM`, replayed from CUDA graphs on CUDA.

    Graphs are captured lazily per static shape and kept in an LRU of ``max_graphs`` (each holds its own GPU memory
    pool: about the encoder's peak activations for the encoder graph). Calls are serialised by a lock, since a graph's
    buffers are shared. ``last_path`` says what the last call ran: ``"graph"`` or ``"eager"``.
    """

    def __init__(
        self,
        network: MSAM,
        click_buckets: Sequence[int] = DEFAULT_CLICK_BUCKETS,
        max_graphs: int = 8,
        warmup: int = 3,
        emulate: bool = False,
    ) -> None:
        if not click_buckets or min(click_buckets) < 1:
            raise ValueError(f"click_buckets must be positive click counts, got {list(click_buckets)}")
        self.network = network
        self.click_buckets = tuple(sorted(set(int(b) for b in click_buckets)))
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.emulate = emulate
        self.graphs: OrderedDict[tuple, StaticCall | None] = OrderedDict()
        self.last_path = "eager"
        self._lock = threading.Lock()

    def applies(self, tensor: torch.Tensor) -> bool:
        """Whether a call on ``tensor`` can use a graph: a CUDA tensor (or emulation) with autograd off."""
        return (tensor.is_cuda or self.emulate) and not torch.is_grad_enabled()

    def encode(self, image: torch.Tensor) -> ImageState:
        """``network.prepare_embedding(network.encode(image))``, from a graph when :meth:`applies`."""
        if self.applies(image):
            result = self._run("encode", self._encode_fn, {"image": image})
            if result is not None:
                return ImageState(**result)
        self.last_path = "eager"
        return self.network.prepare_embedding(self.network.encode(image))

    def decode(
        self, state: ImageState | torch.Tensor, points: torch.Tensor, labels: torch.Tensor, low_res: torch.Tensor | None
    ) -> torch.Tensor:
        """``network.decode(state, points, labels, low_res)`` low-res logits, from a graph when the shapes fit."""
        bucket = click_bucket(points.shape[1], self.click_buckets)
        if bucket is not None and isinstance(state, ImageState) and self.applies(points):
            padded, padded_labels, valid = pad_clicks(points, labels, bucket)
            inputs = {**state.tensors(), "points": padded, "labels": padded_labels, "valid": valid}
            if low_res is not None:
                inputs["low_res"] = low_res
            result = self._run("decode", self._decode_fn, inputs)
            if result is not None:
                return result
        self.last_path = "eager"
        return self.network.decode(state, points, labels, low_res)

    def _encode_fn(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network.prepare_embedding(self.network.encode(image)).tensors()

    def _decode_fn(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        low_res: torch.Tensor | None = None,
        **state: torch.Tensor,
    ) -> torch.Tensor:
        return self.network.decode(ImageState(**state), points, labels, low_res, valid_points=valid)

    def graph_key(self, kind: str, inputs: dict[str, torch.Tensor]) -> tuple:
        """What a graph is specific to: input shapes/dtypes/device, autocast, attention path and weights' addresses."""
        device = next(iter(inputs.values())).device
        autocast = torch.is_autocast_enabled(device.type)
        cast_dtype = torch.get_autocast_dtype(device.type) if autocast else None
        tensors = tuple(sorted((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in inputs.items()))
        weights = tuple(t.data_ptr() for t in self.network.parameters()) + tuple(
            t.data_ptr() for t in self.network.buffers()
        )
        return (kind, tensors, autocast, cast_dtype, self.network.attention_impl, hash(weights))

    def _run(self, kind: str, fn: Callable[..., Outputs], inputs: dict[str, torch.Tensor]) -> Outputs | None:
        """Replay (capturing first if needed) the graph for ``inputs``; None when its capture failed before."""
        key = self.graph_key(kind, inputs)
        with self._lock:
            if key not in self.graphs:
                self.graphs[key] = self._capture(fn, inputs)
                while len(self.graphs) > self.max_graphs:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            call = self.graphs[key]
            if call is None:
                return None
            self.last_path = "graph"
            return call(inputs)

    def _capture(self, fn: Callable[..., Outputs], inputs: dict[str, torch.Tensor]) -> StaticCall | None:
        try:
            return StaticCall(fn, inputs, self.warmup, self.emulate)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            warnings.warn(f"CUDA graph capture failed, running eagerly for this shape: {exc}", stacklevel=3)
            return None
