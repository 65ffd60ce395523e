"""GPU benchmark of the full-size M-SAM (one short run on a lent H100/H200): correctness first, then latency and memory.

1. Correctness with TF32 off: encoder output (float32 and float64) and LoRA gradients, fast vs reference attention.
2. Encoder latency (bf16 autocast and float32), per-click decode latency, a batch-4 10-click bf16 training step, and
   peak GPU memory (``torch.cuda.max_memory_allocated``), for both attention paths.

    python benchmarks/bench_gpu.py [--repeats 20] [--batch 4] [--clicks 10] [--skip-reference-train]

Exits with status 2 and a message when CUDA is unavailable. A measurement that fails (e.g. out of memory) is reported
in the table instead of aborting the run. ``--device cpu --smoke`` runs every code path on a small model in seconds
(for testing the script without a GPU; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOKE_KWARGS, TrainStep, full_size_model, median, synthetic_case, timed  # noqa: E402

from msam_components.networks import MSAM  # noqa: E402
from msam_components.networks.rel_pos_attention import set_attention_impl  # noqa: E402

IMPLS = ("reference", "fast")
GIB = 1024**3


class Bench:
    """Device, model size and the device-specific helpers (sync, peak memory) of one benchmark run."""

    def __init__(self, device: str, smoke: bool) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.model_kwargs = dict(SMOKE_KWARGS) if smoke else {}

    def model(self, impl: str, dtype: torch.dtype = torch.float32) -> MSAM:
        """A fresh full-size (or smoke) model on the device."""
        return full_size_model(impl, **self.model_kwargs).to(self.device, dtype)

    def case(self, model: MSAM, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic image and label at the model's input size."""
        return synthetic_case(batch=batch, size=model.image_size, device=str(self.device))

    def sync(self) -> None:
        """Wait for queued kernels before reading the clock."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the bytes allocated now."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_gib(self, base: int = 0) -> str:
        """Peak allocated GiB since :meth:`reset_peak`, minus ``base`` (``n/a`` off CUDA)."""
        return f"{(torch.cuda.max_memory_allocated(self.device) - base) / GIB:.2f}" if self.cuda else "n/a"

    def latency_ms(self, model: MSAM, fn: Callable[[], object], repeats: int, impl: str) -> str:
        """Median milliseconds of ``fn`` under ``impl`` after two warm-up calls."""
        set_attention_impl(model, impl)
        timed(fn, 2, self.sync)
        return f"{1000 * median(timed(fn, repeats, self.sync)):.2f}"

    def guarded(self, fn: Callable[[], str]) -> str:
        """Run one measurement; on failure return a short error cell instead of raising."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            return "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing row must not abort the whole run
            traceback.print_exc(file=sys.stderr)
            return f"failed: {type(exc).__name__}"
        finally:
            if self.cuda:
                torch.cuda.empty_cache()


def _log(message: str) -> None:
    """Progress to stderr, so a run cut short still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _set_tf32(enabled: bool) -> None:
    """TF32 for matmul and cuDNN (off for the correctness checks, as the reference README asks)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def correctness(bench: Bench, dtype: torch.dtype, tolerance: float) -> str:
    """Max abs difference of the encoder outputs and of two chained clicks' logits, and of the LoRA gradients relative
    to their max, fast vs reference."""
    model = bench.model("reference", dtype)
    image = bench.case(model)[0].to(dtype)
    centre = model.image_size // 2
    points = torch.tensor([[[centre, centre - 4, centre + 6]]], device=bench.device)
    labels = torch.tensor([[1]], device=bench.device)
    outs, clicks, grads = {}, {}, {}
    for impl in IMPLS:
        set_attention_impl(model, impl)
        model.zero_grad(set_to_none=True)
        out = model.encode(image)
        # a fixed random projection: a loss like out.square().mean() is flat after the neck's LayerNorm (cancellation)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        (out * weight.to(out)).sum().backward()
        outs[impl] = out.detach()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():  # the per-click fast paths: a click, then a second one fed the first one's logits
            state = model.prepare_embedding(outs[impl])
            first = model.decode(state, points, labels, torch.zeros(1, 1, *model.low_res_size).to(out))
            clicks[impl] = torch.cat([first, model.decode(state, points, labels, first)])
    diff = (outs["fast"] - outs["reference"]).abs().max().item()
    cdiff = (clicks["fast"] - clicks["reference"]).abs().max().item()
    gdiff = ((grads["fast"] - grads["reference"]).abs().max() / grads["reference"].abs().max()).item()
    verdict = "PASS" if max(diff, cdiff, gdiff) < tolerance else "FAIL"
    return (
        f"{verdict} (< {tolerance:.0e}): output {diff:.1e}, click logits {cdiff:.1e}, LoRA grad (relative) {gdiff:.1e}"
    )


def inference_rows(bench: Bench, repeats: int) -> list[str]:
    """Encoder latency (bf16 autocast, float32), its peak memory, and per-click decode latency, batch 1."""
    model = bench.model("reference").eval()
    image = bench.case(model)[0]
    centre = model.image_size // 2
    points = torch.tensor([[[centre, centre - 4, centre + 6]]], device=bench.device)
    labels = torch.tensor([[1]], device=bench.device)
    low = torch.zeros(1, 1, *model.low_res_size, device=bench.device)
    cells: dict[str, dict[str, str]] = {"bf16": {}, "fp32": {}, "mem": {}, "decode": {}}
    autocast = lambda: torch.autocast(bench.device.type, dtype=torch.bfloat16)  # noqa: E731

    def encoder_memory() -> str:
        with autocast():
            base = bench.reset_peak()
            model.encode(image)
            return bench.peak_gib(base)

    def decode_latency(impl: str) -> str:
        with autocast():
            set_attention_impl(model, impl)
            state = model.prepare_embedding(model.encode(image))
            return bench.latency_ms(model, lambda: model.decode(state, points, labels, low), repeats, impl)

    with torch.no_grad():
        for impl in IMPLS:
            _log(f"inference {impl}")
            set_attention_impl(model, impl)
            with autocast():
                cells["bf16"][impl] = bench.guarded(
                    lambda: bench.latency_ms(model, lambda: model.encode(image), repeats, impl)
                )
            cells["mem"][impl] = bench.guarded(encoder_memory)
            cells["decode"][impl] = bench.guarded(lambda: decode_latency(impl))
            cells["fp32"][impl] = bench.guarded(
                lambda: bench.latency_ms(model, lambda: model.encode(image), repeats, impl)
            )
    labels_ = {
        "bf16": "encoder forward, batch 1, bf16 autocast (ms)",
        "fp32": "encoder forward, batch 1, float32, TF32 off (ms)",
        "mem": "encoder forward peak memory above the weights, batch 1, bf16 (GiB)",
        "decode": "per-click decode (prepared embedding), batch 1, bf16 (ms)",
    }
    return [_row(labels_[key], row["reference"], row["fast"]) for key, row in cells.items()]


def train_rows(bench: Bench, batch: int, clicks: int, repeats: int, skip_reference: bool) -> list[str]:
    """Seconds and peak memory of a bf16-autocast training step with ``clicks`` clicks at ``batch`` (fresh models)."""
    times, peaks = {}, {}
    for impl in IMPLS:
        if impl == "reference" and skip_reference:
            times[impl] = peaks[impl] = "skipped"
            continue
        _log(f"train step {impl}")

        def run() -> str:
            model = bench.model(impl)
            image, label = bench.case(model, batch)
            step = TrainStep(model, image, label, num_clicks=clicks)
            step(torch.bfloat16, num_clicks=1)  # warm-up: kernels and AdamW state
            bench.reset_peak()
            seconds = median(timed(lambda: step(torch.bfloat16), repeats, bench.sync))
            peaks[impl] = bench.peak_gib()
            return f"{seconds:.3f}"

        times[impl] = bench.guarded(run)
        peaks.setdefault(impl, "n/a")
    return [
        _row(f"train step, batch {batch}, {clicks} clicks, bf16 autocast (s)", times["reference"], times["fast"]),
        _row("train step peak memory incl. weights and AdamW state (GiB)", peaks["reference"], peaks["fast"]),
    ]


def _row(label: str, ref: str, fast: str) -> str:
    """A table row; the ratio column only when both cells are numbers."""
    try:
        ratio = f"{float(ref) / float(fast):.1f}x"
    except (ValueError, ZeroDivisionError):
        ratio = ""
    return f"| {label} | {ref} | {fast} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency (median reported)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument(
        "--skip-reference-train", action="store_true", help="time the training step on the fast path only"
    )
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' with --smoke to test the script")
    parser.add_argument("--smoke", action="store_true", help="small model: checks the script runs, not the speed")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_gpu.py: CUDA is not available (no GPU or a CPU-only torch build); nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    bench = Bench(args.device, args.smoke)
    start = time.time()
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "CPU (smoke test, numbers meaningless)"
    _set_tf32(False)
    _log("correctness float32 (TF32 off)")
    check32 = bench.guarded(lambda: correctness(bench, torch.float32, 5e-5))
    _log("correctness float64")
    check64 = bench.guarded(lambda: correctness(bench, torch.float64, 1e-9))
    rows = inference_rows(bench, args.repeats)
    _set_tf32(True)
    rows += train_rows(bench, args.batch, args.clicks, args.train_repeats, args.skip_reference_train)

    size = "smoke-size" if args.smoke else "full-size"
    print(f"\n{size} M-SAM (LoRA, MEA) on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"latency: median of {args.repeats} after 2 warm-ups; train: median of {args.train_repeats} steps after a")
    print("1-click warm-up step, TF32 on; all other rows TF32 off. Correctness: fast vs reference\n")
    print("| measurement | reference | fast | ref / fast |\n|---|---|---|---|")
    print(f"| correctness float32, TF32 off: max abs diff | | {check32} | |")
    print(f"| correctness float64: max abs diff | | {check64} | |")
    print("\n".join(rows))
    print(f"\ntotal wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
