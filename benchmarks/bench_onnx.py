"""ONNX export at full size: onnxruntime (CPU) against our PyTorch fast path, encoder and one click, in one run.

Builds the full-size default M-SAM (random weights, LoRA B / rel-pos / pos_embed drawn as in ``common.py``), exports
the encoder and the per-click step with ``msam_components.export_onnx``, and prints one markdown table: median (min)
seconds of the encoder forward and of one click decode on a prepared state, each in PyTorch and in onnxruntime
(interleaved, same thread count), the ratio, and the max abs difference of the encoder state and of a 3-click chain's
low-res logits. Run from the repository root: ``.venv/bin/python benchmarks/bench_onnx.py --threads 2`` (a few
minutes on 2 cores; ``--smoke`` uses a small model). Needs ``pip install "msam-components[onnx]"``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import SMOKE_KWARGS, full_size_model, median, timed

from msam_components.export import example_clicks, state_names
from msam_components.export_onnx import export_onnx, load_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a small model, to check the script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = full_size_model(**(SMOKE_KWARGS if args.smoke else {})).eval()
    size = model.image_size
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    folder = tempfile.mkdtemp(prefix="msam_onnx_")
    start = time.perf_counter()
    paths = export_onnx(model, folder, image)
    export_s = time.perf_counter() - start
    import onnxruntime as ort

    encoder, decoder = load_onnx(paths, threads=args.threads)
    points, labels = example_clicks(model, 1, 3, 0)
    with torch.no_grad():
        state = model.prepare_embedding(model.encode(image))
        onnx_state = encoder(image)
        enc_diff = max(float((o - state.tensors()[n]).abs().max()) for n, o in zip(state_names(model), onnx_state))
        low = onnx_low = image.new_zeros(1, 1, *model.low_res_size)
        logit_diff = 0.0
        for i in range(points.shape[1]):
            click, label = points[:, i : i + 1], labels[:, i : i + 1]
            low = model.decode(state, click, label, low)
            onnx_low = decoder(*onnx_state, click, label, onnx_low)
            logit_diff = max(logit_diff, float((onnx_low - low).abs().max()))
        click, label = points[:, :1], labels[:, :1]
        prev = image.new_zeros(1, 1, *model.low_res_size)
        rows = {"encoder forward (s)": ([], []), "one click decode, prepared state (s)": ([], [])}
        for _ in range(args.repeats):  # interleaved, after a warm-up of each
            rows["encoder forward (s)"][0].extend(timed(lambda: model.encode(image), 1))
            rows["encoder forward (s)"][1].extend(timed(lambda: encoder(image), 1))
            rows["one click decode, prepared state (s)"][0].extend(
                timed(lambda: model.decode(state, click, label, prev), 1)
            )
            rows["one click decode, prepared state (s)"][1].extend(
                timed(lambda: decoder(*onnx_state, click, label, prev), 1)
            )
    print(
        f"{'small (--smoke)' if args.smoke else 'full-size'} M-SAM, float32, batch 1, {args.threads} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; export took {export_s:.0f} s\n"
    )
    print("| measurement | PyTorch (fast path) | onnxruntime | PyTorch / onnxruntime |")
    print("|---|---|---|---|")
    for name, (ours, onnx) in rows.items():
        ours, onnx = ours[1:] or ours, onnx[1:] or onnx  # the first call of each warms up
        print(
            f"| {name} | {median(ours):.3f} (min {min(ours):.3f}) | {median(onnx):.3f} (min {min(onnx):.3f}) | "
            f"{median(ours) / median(onnx):.2f}x |"
        )
    print(f"| max abs diff of the encoder state, onnxruntime vs PyTorch | | {enc_diff:.1e} | |")
    print(f"| max abs diff of the low-res logits over 3 clicks | | {logit_diff:.1e} | |")


if __name__ == "__main__":
    main()
