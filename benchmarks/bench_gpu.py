"""GPU benchmark of the full-size M-SAM (one short run on a lent H100/H200): correctness first, then latency and memory.

1. Correctness with TF32 off: encoder output (float32 and float64) and LoRA gradients, fast vs reference attention.
2. Encoder latency (bf16 autocast and float32), per-click decode latency, both eager and replayed from CUDA graphs
   (``msam_components/engines/cuda_graphs.py``), a batch-4 10-click bf16 training step, and peak GPU memory
   (``torch.cuda.max_memory_allocated``), for both attention paths.
3. A bundle-level training epoch: the KiTS19 bundle's ``train.yaml`` (full-size model, GPU input pipeline) on synthetic
   KiTS19-layout cases, seconds per step with data loading included, against the bare step of 2.
4. With ``--upstream DIR``: ``DIR/time_upstream_gpu.py`` (the unmodified upstream M-SAM) runs first in a subprocess on
   the same device, and the table gets its numbers and an upstream / ours ratio column.

    python benchmarks/bench_gpu.py [--upstream ../shared/reference/upstream_gpu] [--repeats 20] [--batch 4]
        [--clicks 10] [--skip-reference-train] [--skip-bundle]

Exits with status 2 and a message when CUDA is unavailable. A measurement that fails (e.g. out of memory) is reported
in the table instead of aborting the run. ``--device cpu --smoke`` runs every code path on a small model in seconds
(for testing the script without a GPU; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOKE_KWARGS, TrainStep, full_size_model, median, synthetic_case, timed  # noqa: E402

from msam_components.engines.cuda_graphs import CUDAGraphRunner  # noqa: E402
from msam_components.networks import MSAM  # noqa: E402
from msam_components.networks.compute_paths import set_attention_impl  # noqa: E402

IMPLS = ("reference", "fast")
GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msam_kits19"
# measurement label prefixes of time_upstream_gpu.py's table -> our row keys
UPSTREAM_ROWS = {
    "encoder forward, batch 1, bf16 autocast": "bf16",
    "encoder forward, batch 1, fp32, TF32 off": "fp32",
    "encoder forward peak memory, batch 1, bf16 autocast": "mem",
    "click decode, batch 1, bf16 autocast (prompt enc + MEA + mask decoder)": "decode",
    "training step, batch": "train",
    "training step peak memory": "train_mem",
}


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


def inference_rows(bench: Bench, repeats: int, upstream: dict[str, str]) -> list[str]:
    """Encoder latency (bf16 autocast, float32), its peak memory, and per-click decode latency, batch 1, eager and from
    CUDA graphs (emulated off CUDA, so the smoke test runs the same code)."""
    model = bench.model("reference").eval()
    image = bench.case(model)[0]
    centre = model.image_size // 2
    points = torch.tensor([[[centre, centre - 4, centre + 6]]], device=bench.device)
    labels = torch.tensor([[1]], device=bench.device)
    low = torch.zeros(1, 1, *model.low_res_size, device=bench.device)
    keys = ("bf16", "graph_encode", "fp32", "mem", "decode", "graph_decode")
    cells: dict[str, dict[str, str]] = {key: {} for key in keys}
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

    def graph_latency(impl: str, what: str) -> str:
        runner = CUDAGraphRunner(model, emulate=not bench.cuda)
        with autocast():
            set_attention_impl(model, impl)
            state = runner.encode(image)
            if what == "encode":
                result = bench.latency_ms(model, lambda: runner.encode(image), repeats, impl)
            else:
                result = bench.latency_ms(model, lambda: runner.decode(state, points, labels, low), repeats, impl)
        return result if runner.last_path == "graph" else f"eager fallback ({result})"

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
            _log(f"CUDA graphs {impl}")
            cells["graph_encode"][impl] = bench.guarded(lambda: graph_latency(impl, "encode"))
            cells["graph_decode"][impl] = bench.guarded(lambda: graph_latency(impl, "decode"))
            cells["fp32"][impl] = bench.guarded(
                lambda: bench.latency_ms(model, lambda: model.encode(image), repeats, impl)
            )
    labels_ = {
        "bf16": "encoder forward, batch 1, bf16 autocast (ms)",
        "fp32": "encoder forward, batch 1, float32, TF32 off (ms)",
        "mem": "encoder forward peak memory above the weights, batch 1, bf16 (GiB)",
        "decode": "per-click decode (prepared embedding), batch 1, bf16 (ms)",
        "graph_encode": "encoder forward + per-image MEA stage, CUDA graph, batch 1, bf16 autocast (ms)",
        "graph_decode": "per-click decode, CUDA graph, batch 1, bf16 (ms)",
    }
    same = {"graph_encode": "bf16", "graph_decode": "decode"}  # the upstream measurement each row compares with
    return [
        _row(labels_[key], cells[key]["reference"], cells[key]["fast"], upstream.get(same.get(key, key), ""))
        for key in keys
    ]


def train_rows(
    bench: Bench, batch: int, clicks: int, repeats: int, skip_reference: bool, upstream: dict[str, str]
) -> tuple[list[str], str]:
    """Seconds and peak memory of a bf16-autocast training step with ``clicks`` clicks at ``batch`` (fresh models);
    also returns the fast path's step seconds (the bare step the bundle step is compared with)."""
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
    step = f"train step, batch {batch}, {clicks} clicks, bf16 autocast (s)"
    peak = "train step peak memory incl. weights and AdamW state (GiB)"
    return [
        _row(step, times["reference"], times["fast"], upstream.get("train", "")),
        _row(peak, peaks["reference"], peaks["fast"], upstream.get("train_mem", "")),
    ], times["fast"]


def bundle_rows(
    bench: Bench, cases: int, batch: int, clicks: int, bare_step: str, upstream: dict[str, str]
) -> list[str]:
    """Seconds per training step of the KiTS19 bundle's own ``train.yaml`` on synthetic KiTS19-layout cases.

    Two epochs on ``cases - 1`` training cases (one goes to the unused validation split); the steps of the second
    epoch are timed from its start, so data loading is included and the first epoch's warm-up and the epoch-end
    checkpoint are not. bf16 autocast as the bare step. Runs last: the bundle's ``initialize`` sets MONAI determinism.
    """
    times: dict[str, str] = {}

    def run() -> str:
        from ignite.engine import Events
        from monai.bundle import ConfigParser

        from msam_components.data import make_kits19_like

        with tempfile.TemporaryDirectory() as tmp:
            smoke = bool(bench.model_kwargs)
            make_kits19_like(Path(tmp) / "data", cases, (48, 48, 32) if smoke else (80, 80, 48), seed=0)
            parser = ConfigParser()
            parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
            parser.update(_bundle_overrides(bench, Path(tmp), cases, batch, clicks))
            parser.get_parsed_content("initialize")
            start = time.perf_counter()
            trainer = parser.get_parsed_content("train#trainer")  # builds the model and caches the data
            times["setup"] = f"{time.perf_counter() - start:.1f}"
            marks: list[tuple[int, float]] = []

            def mark(engine: object) -> None:
                bench.sync()
                marks.append((engine.state.epoch, time.perf_counter()))

            trainer.add_event_handler(Events.EPOCH_STARTED, mark)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
            start = time.perf_counter()
            trainer.run()
            times["run"] = f"{time.perf_counter() - start:.1f}"
            last = [t for epoch, t in marks if epoch == 2]
            return f"{median([b - a for a, b in zip(last, last[1:])]):.3f}"

    _log("bundle training epoch")
    step = bench.guarded(run)
    ratio = _ratio(step, bare_step, 2)
    what = f"KiTS19 bundle train.yaml, {cases - 1} synthetic cases, batch {batch}, {clicks} clicks, bf16"
    return [
        _row(
            f"bundle training step, 2nd epoch, data loading included ({what}) (s)", "", step, upstream.get("train", "")
        ),
        _row("bundle training step / bare train step", "", ratio),
        _row(
            "bundle setup (model, caching) / two epochs incl. checkpoints (s)",
            "",
            "{} / {}".format(times.get("setup", "n/a"), times.get("run", "n/a")),
        ),
    ]


def _bundle_overrides(bench: Bench, tmp: Path, cases: int, batch: int, clicks: int) -> dict[str, object]:
    """Config overrides of the benchmark's bundle run: 2 epochs, no validation, bf16, outputs in ``tmp``."""
    overrides: dict[str, object] = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(tmp / "data"),
        "output_dir": str(tmp / "eval"),
        "ckpt_dir": str(tmp / "models"),
        "device": str(bench.device),
        "num_epochs": 2,
        "val_interval": 1000,
        "val_fraction": 1.0 / cases,
        "batch_size": batch,
        "train_num_clicks": clicks,
        "amp": bench.cuda,
        "train#trainer#amp_kwargs": {"dtype": "$torch.bfloat16"},
    }
    for key, value in bench.model_kwargs.items():  # smoke: the small model and a coarse grid
        target = key if key in ("image_size", "lora_rank") else f"network_def#{key}"
        overrides[target] = list(value) if isinstance(value, tuple) else value
    if bench.model_kwargs:
        overrides.update({"pixdim": [3.0, 3.0, 3.0], "crop_jitter": 2, "num_workers": 0})
    return overrides


def run_upstream(directory: Path, bench: Bench, batch: int, clicks: int, smoke: bool) -> dict[str, str]:
    """Run ``directory/time_upstream_gpu.py`` in a subprocess on the same device; its numbers by our row keys."""
    script = Path(directory).resolve() / "time_upstream_gpu.py"
    if not script.is_file():
        raise FileNotFoundError(f"--upstream: no time_upstream_gpu.py in {directory}")
    _log(f"upstream: {script}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "upstream.md"
        cmd = [sys.executable, str(script), "--device", bench.device.type, "--output", str(out)]
        cmd += ["--smoke"] if smoke else ["--batch", str(batch), "--clicks", str(clicks)]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0 or not out.is_file():
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            return {key: f"upstream failed (exit {proc.returncode})" for key in UPSTREAM_ROWS.values()}
        return parse_upstream(out.read_text())


def parse_upstream(markdown: str) -> dict[str, str]:
    """Values of time_upstream_gpu.py's table (units dropped) by our row keys; memory rows: GiB above the weights."""
    found: dict[str, str] = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            continue
        label, value, notes = cells
        for prefix, key in UPSTREAM_ROWS.items():
            if label.startswith(prefix) and key not in found:
                if key == "mem":
                    above = re.search(r"([\d.]+) GiB above", notes)
                    value = above.group(1) if above else value
                found[key] = value.split()[0] if value else ""
                break
    return found


def _ratio(numerator: str, denominator: str, digits: int = 1) -> str:
    """``numerator / denominator`` as ``"2.0x"`` when both are numbers, else empty."""
    try:
        return f"{float(numerator) / float(denominator):.{digits}f}x"
    except (ValueError, ZeroDivisionError):
        return ""


def _row(label: str, ref: str, fast: str, upstream: str = "") -> str:
    """A table row; the ratio columns only where both cells are numbers."""
    return f"| {label} | {upstream} | {ref} | {fast} | {_ratio(ref, fast)} | {_ratio(upstream, fast)} |"


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
    parser.add_argument("--upstream", type=Path, help="folder with time_upstream_gpu.py: run it too, add ratio column")
    parser.add_argument("--skip-bundle", action="store_true", help="leave out the bundle-level training epoch")
    parser.add_argument("--bundle-cases", type=int, default=13, help="synthetic cases of the bundle run (1 held out)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_gpu.py: CUDA is not available (no GPU or a CPU-only torch build); nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    bench = Bench(args.device, args.smoke)
    start = time.time()
    # the upstream code first, before this process holds GPU memory
    upstream = run_upstream(args.upstream, bench, args.batch, args.clicks, args.smoke) if args.upstream else {}
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "CPU (smoke test, numbers meaningless)"
    _set_tf32(False)
    _log("correctness float32 (TF32 off)")
    check32 = bench.guarded(lambda: correctness(bench, torch.float32, 5e-5))
    _log("correctness float64")
    check64 = bench.guarded(lambda: correctness(bench, torch.float64, 1e-9))
    rows = inference_rows(bench, args.repeats, upstream)
    _set_tf32(True)
    train, bare_step = train_rows(
        bench, args.batch, args.clicks, args.train_repeats, args.skip_reference_train, upstream
    )
    rows += train
    if not args.skip_bundle:
        rows += bundle_rows(bench, args.bundle_cases, args.batch, args.clicks, bare_step, upstream)

    size = "smoke-size" if args.smoke else "full-size"
    print(f"\n{size} M-SAM (LoRA, MEA) on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"latency: median of {args.repeats} after 2 warm-ups; train: median of {args.train_repeats} steps after a")
    print("1-click warm-up step, TF32 on; all other rows TF32 off. Correctness: fast vs reference.")
    if args.upstream:
        print(f"upstream: {args.upstream / 'time_upstream_gpu.py'} run first in this job on the same device")
    print("\n| measurement | upstream | reference | fast | ref / fast | upstream / fast |")
    print("|---|---|---|---|---|---|")
    print(f"| correctness float32, TF32 off: max abs diff | | | {check32} | | |")
    print(f"| correctness float64: max abs diff | | | {check64} | | |")
    print("\n".join(rows))
    print(f"\ntotal wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
