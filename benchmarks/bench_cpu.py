"""CPU benchmark of the full-size M-SAM: encoder (reference vs fast attention), per-click decode, a 10-click train step.

Prints one markdown table. Encoder, block and decode timings of both attention paths are interleaved in one process
(same model, same machine load). Memory rows each run in a fresh spawned process: peak resident set size
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident size before the measured call.

    .venv/bin/python benchmarks/bench_cpu.py --threads 2 --repeats 3 [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TrainStep, full_size_model, median, synthetic_case, timed  # noqa: E402

from msam_components.networks.compute_paths import set_attention_impl  # noqa: E402

IMPLS = ("reference", "fast")


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _isolated_phase(phase: str, impl: str, threads: int, steps: int) -> dict[str, object]:
    """In a fresh process: build the model, run ``phase`` ("encode" or "train") ``steps`` times; seconds, RSS rise."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model = full_size_model(impl)
    image, label = synthetic_case()
    if phase == "encode":
        model.eval()
        run = torch.no_grad()(lambda: model.encode(image))
    else:
        run = TrainStep(model, image, label, num_clicks=10)
        run(num_clicks=1)  # warm-up: kernels and AdamW state
    exact = _reset_peak_rss()
    base = _status_mib("VmRSS") if exact else _status_mib("VmHWM")
    seconds = timed(run, steps)
    return {"seconds": seconds, "peak_rise_mib": _status_mib("VmHWM") - base, "exact": exact}


def _run_isolated(phase: str, impl: str, threads: int, steps: int) -> dict[str, object]:
    """Run :func:`_isolated_phase` in a spawned child, so that earlier allocations do not hide its peak."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_isolated_phase, phase, impl, threads, steps).result()


def _cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


SHORT, SHORT_CALLS = ("windowed", "global", "decode"), 5


def _interleaved(model: torch.nn.Module, fns: dict[str, object], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each ``fns[name]()`` under each attention path, alternating the paths run by run (warm-up dropped).

    Calls shorter than the encoder (``SHORT``) run ``SHORT_CALLS`` times per round, so their median has more samples.
    """
    times: dict[tuple[str, str], list[float]] = {(n, i): [] for n in fns for i in IMPLS}
    for round_ in range(repeats + 1):  # the first round is a warm-up
        for impl in IMPLS:
            set_attention_impl(model, impl)
            for name, fn in fns.items():
                calls = SHORT_CALLS if name in SHORT else 1
                if round_ > 0:
                    times[(name, impl)] += timed(fn, calls)
                else:
                    timed(fn, 1)
    return times


def _timing_row(label: str, times: dict[tuple[str, str], list[float]], name: str, fmt: str) -> str:
    """A row of ``median (min)`` seconds per path; the ratio is of the medians."""
    ref, fast = times[(name, "reference")], times[(name, "fast")]
    cells = [f"{median(v):{fmt}} (min {min(v):{fmt}})" for v in (ref, fast)]
    return f"| {label} | {cells[0]} | {cells[1]} | {median(ref) / median(fast):.1f}x |"


def _row(label: str, ref: float | None, fast: float, fmt: str = ".2f", unit: str = "") -> str:
    """One table row with the reference/fast ratio."""
    if ref is None:
        return f"| {label} | skipped (--quick) | {fast:{fmt}}{unit} | |"
    return f"| {label} | {ref:{fmt}}{unit} | {fast:{fmt}}{unit} | {ref / fast:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="skip the reference-path training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load_start = os.getloadavg()[0]

    model = full_size_model("reference").eval()
    encoder = model.image_encoder
    image, _ = synthetic_case()
    with torch.no_grad():
        embeddings = {}
        for impl in IMPLS:
            set_attention_impl(model, impl)
            embeddings[impl] = model.encode(image)
        diff = (embeddings["fast"] - embeddings["reference"]).abs().max().item()
        tokens = encoder.patch_embed(image) + encoder.pos_embed
        points, labels = torch.tensor([[[64, 60, 70]]]), torch.tensor([[1]])
        # a realistic feedback mask: the first click's own logits, as in the click loop
        low = model.decode(model.prepare_embedding(embeddings["reference"]), points, labels, None)
        states, decoded = {}, {}
        for impl in IMPLS:  # each path's own per-image state (the fast one caches the MEA's composed mask kernel)
            set_attention_impl(model, impl)
            states[impl] = model.prepare_embedding(embeddings["reference"])
            decoded[impl] = model.decode(states[impl], points, labels, low)
        decode_diff = (decoded["fast"] - decoded["reference"]).abs().max().item()
        fns = {
            "encoder": lambda: model.encode(image),
            "windowed": lambda: encoder.blocks[0](tokens),
            "global": lambda: encoder.blocks[2](tokens),
            "decode": lambda: model.decode(states[model.attention_impl], points, labels, low),
        }
        t = _interleaved(model, fns, args.repeats)
    del model, encoder, states, embeddings

    memory = {impl: _run_isolated("encode", impl, args.threads, 1) for impl in IMPLS}
    train = {"fast": _run_isolated("train", "fast", args.threads, 1)}
    if not args.quick:
        train["reference"] = _run_isolated("train", "reference", args.threads, 1)
    exact = all(m["exact"] for m in [*memory.values(), *train.values()])

    print(f"Full-size M-SAM (LoRA r=16, MEA), float32, batch 1, CPU: {_cpu_name()}, {os.cpu_count()} logical cores,")
    print(f"torch {torch.__version__}, {args.threads} threads, {date.today()}, timings: median (min) of {args.repeats}")
    print(f"runs ({args.repeats * SHORT_CALLS} for the block and decode rows)")
    print(
        "interleaved runs after one warm-up; train: one step; memory: peak RSS rise in a fresh process"
        + ("" if exact else "*")
    )
    print(
        f"1-min load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} (other processes share CPUs)"
    )
    print("\n| measurement | reference | fast | ref / fast |\n|---|---|---|---|")
    print(_timing_row("encoder forward (s)", t, "encoder", ".2f"))
    print(_timing_row("one windowed block, 8^3 in 14^3 (s)", t, "windowed", ".3f"))
    print(_timing_row("one global block, 8^3 (s)", t, "global", ".3f"))
    mem = {i: memory[i]["peak_rise_mib"] for i in IMPLS}
    print(_row("encoder forward peak RSS rise (MiB)", mem["reference"], mem["fast"], ".0f"))
    print(_timing_row("per-click decode, prepared embedding (s)", t, "decode", ".3f"))
    share = {i: 100 * median(t[("decode", i)]) / median(t[("encoder", i)]) for i in IMPLS}
    print(f"| per-click decode / encoder forward | {share['reference']:.1f} % | {share['fast']:.1f} % | |")
    ref_train = train.get("reference")
    label = "train step, 10 clicks, batch 1, after a 1-click warm-up (s)"
    print(_row(label, ref_train["seconds"][0] if ref_train else None, train["fast"]["seconds"][0], ".1f"))
    label = "train step peak RSS rise over model + AdamW state (MiB)"
    print(_row(label, ref_train["peak_rise_mib"] if ref_train else None, train["fast"]["peak_rise_mib"], ".0f"))
    print(f"| max abs diff of the encoder output, fast vs reference | | {diff:.1e} | |")
    print(f"| max abs diff of the per-click low-res logits, fast vs reference | | {decode_diff:.1e} | |")
    if not exact:
        print(
            "\n*/proc/self/clear_refs was refused: memory rows are the rise above the model-building peak (lower bound)"
        )


if __name__ == "__main__":
    main()
