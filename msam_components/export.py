"""Export the deployable parts of M-SAM to TorchScript: the encoder (once per image) and one click-decode step
(``--format onnx``: the same two parts as ONNX, see :mod:`msam_components.export_onnx`).

Artifacts written by :func:`export_torchscript` (all traced at fixed shapes, in the example image's dtype and device):

- ``encoder.ts``: ``image [B, 1, S, S, S]`` -> the per-image decoder state as a tuple, in :func:`state_names` order:
  ``(embedding, image, image_conv)`` with the Mask-Enhanced Adapter, ``(embedding,)`` without it; each is
  ``[B, C, S/p, S/p, S/p]`` (``[1, 384, 8, 8, 8]`` for the full-size model).
- ``decode_step.ts``: ``(*state, points [B, 1, 3] int64, point_labels [B, 1] int64, low_res_mask [B, 1, 4S/p, ...])``
  -> low-res logits ``[B, 1, 4S/p, 4S/p, 4S/p]`` (``[1, 1, 32, 32, 32]`` full size). One click per step: feed the
  output back as the next ``low_res_mask`` (zeros before the first click); upsample trilinearly to ``S^3`` at the end.
- ``export_info.json``: the shapes, dtype and input/output order above, for the deploying side.

Command (``--check`` compares the artifacts with the PyTorch model and exits 1 when outside the tolerance)::

    python -m msam_components.export --config_file bundles/msam_kits19/configs/inference.yaml \
        --ckpt_path bundles/msam_kits19/models/model.pt --output_dir exported/ --check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .export_parts import DecodeStepForExport, EncoderForExport, example_clicks, example_prompt, state_names
from .networks.click_loop import ClickLoop, GivenClicks
from .networks.msam import MSAM

ENCODER_FILE = "encoder.ts"
DECODE_STEP_FILE = "decode_step.ts"
INFO_FILE = "export_info.json"
DEFAULT_TOLERANCE = 1e-5  # rtol and atol: the traced graphs run the same kernels, so float32 agrees to ~0 on CPU


class ExportCheckError(AssertionError):
    """Exported artifacts disagree with the PyTorch model beyond the tolerance; carries the full table of diffs."""

    def __init__(self, message: str, diffs: dict[str, float], failed: list[str]) -> None:
        super().__init__(message)
        self.diffs = diffs
        self.failed = failed


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notices and the tracer's shape-check warnings (shapes are fixed by design)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_torchscript(model: MSAM, out_dir: str | Path, example_image: torch.Tensor) -> dict[str, Path]:
    """Trace the encoder and decode step at ``example_image``'s shape, dtype and device; return the written paths."""
    expected = (1, model.image_size, model.image_size, model.image_size)
    if example_image.ndim != 5 or tuple(example_image.shape[1:]) != expected:
        raise ValueError(f"example_image must be [B, {', '.join(map(str, expected))}], got {list(example_image.shape)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"encoder": out_dir / ENCODER_FILE, "decode_step": out_dir / DECODE_STEP_FILE, "info": out_dir / INFO_FILE}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _quiet_jit():
            encoder = torch.jit.trace(EncoderForExport(model), (example_image,), check_trace=False)
            state = encoder(example_image)
            prompt = example_prompt(model, example_image)
            decoder = torch.jit.trace(DecodeStepForExport(model), (*state, *prompt), check_trace=False)
            encoder.save(str(paths["encoder"]))
            decoder.save(str(paths["decode_step"]))
    finally:
        model.train(was_training)
    info = {
        "format": "torchscript",
        "torch_version": torch.__version__,
        "dtype": str(example_image.dtype).removeprefix("torch."),
        "device": str(example_image.device),
        "image_shape": list(example_image.shape),
        "encoder": {"file": ENCODER_FILE, "inputs": ["image"], "outputs": list(state_names(model))},
        "state_shapes": {name: list(t.shape) for name, t in zip(state_names(model), state)},
        "decode_step": {
            "file": DECODE_STEP_FILE,
            "inputs": [*state_names(model), "points", "point_labels", "low_res_mask"],
            "points_shape": list(prompt[0].shape),
            "point_labels_shape": list(prompt[1].shape),
            "low_res_shape": list(prompt[2].shape),
            "outputs": ["low_res_logits"],
        },
        "point_order": "(d, h, w) voxel indices in the model input; labels 1 positive, 0 negative",
        "upsample": "trilinear, align_corners=False, to image_shape[2:]",
    }
    paths["info"].write_text(json.dumps(info, indent=2) + "\n")
    return paths


def load_exported(
    paths: Mapping[str, str | Path], map_location: str | torch.device | None = None
) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """``(encoder, decode_step)`` from :func:`export_torchscript`'s paths (TorchScript modules, no msam code needed),
    or from :func:`~msam_components.export_onnx.export_onnx`'s (onnxruntime sessions on CPU, same call signature)."""
    if str(paths["encoder"]).endswith(".onnx"):
        from .export_onnx import load_onnx

        return load_onnx(paths)  # type: ignore[return-value]
    with _quiet_jit():
        encoder = torch.jit.load(str(paths["encoder"]), map_location=map_location).eval()
        decoder = torch.jit.load(str(paths["decode_step"]), map_location=map_location).eval()
    return encoder, decoder


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    """Max abs difference and whether ``actual`` is within ``atol + rtol * |expected|`` everywhere."""
    if actual.shape != expected.shape:
        return float("inf"), False
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()), bool((diff <= atol + rtol * expected.double().abs()).all())


def check_export(
    model: MSAM,
    exported_paths: Mapping[str, str | Path],
    example_image: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    atol: float = DEFAULT_TOLERANCE,
    rtol: float = DEFAULT_TOLERANCE,
    raise_on_failure: bool = True,
) -> dict[str, float]:
    """Max abs differences, exported vs PyTorch: each encoder output and the logits after each click of a chain.

    ``points`` ``[B, K, 3]`` and ``labels`` ``[B, K]`` give ``K`` clicks applied one per step, each chain fed back its
    own logits (zeros before the first). Raises :class:`ExportCheckError` if any output is outside
    ``atol + rtol * |expected|`` (unless ``raise_on_failure`` is false).
    """
    if points.ndim != 3 or labels.shape != points.shape[:2]:
        raise ValueError(f"points must be [B, K, 3] and labels [B, K], got {list(points.shape)}, {list(labels.shape)}")
    encoder, decoder = load_exported(exported_paths, map_location=example_image.device)
    diffs: dict[str, float] = {}
    failed: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state = model.prepare_embedding(model.encode(example_image))
            exported_state = tuple(encoder(example_image))
            for name, actual in zip(state_names(model), exported_state, strict=True):
                diffs[name], ok = _compare(name, actual, state.tensors()[name], atol, rtol)
                failed += [] if ok else [name]
            # the click loop twice, side by side: the model's decode, and the exported step fed its own logits back
            start = example_image.new_zeros(example_image.shape[0], 1, *model.low_res_size)
            ours, theirs = ClickLoop(), ClickLoop()
            ours.run(model, state, GivenClicks(points, labels), points.shape[1], start, full_each_step=False)

            def exported_decode(_: object, click: torch.Tensor, label: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
                return decoder(*exported_state, click, label, low)

            clicks = GivenClicks(points, labels)
            theirs.run(model, state, clicks, points.shape[1], start, decode=exported_decode, full_each_step=False)
            for i, (exported_low, low) in enumerate(zip(theirs.low_res, ours.low_res, strict=True)):
                name = f"click_{i + 1}_logits"
                diffs[name], ok = _compare(name, exported_low, low, atol, rtol)
                failed += [] if ok else [name]
    finally:
        model.train(was_training)
    if failed and raise_on_failure:
        raise ExportCheckError(f"exported outputs differ beyond atol={atol}, rtol={rtol}: {failed}", diffs, failed)
    return diffs


def format_diffs(diffs: Mapping[str, float], atol: float, rtol: float, failed: Sequence[str] = ()) -> str:
    """A small text table of max abs differences with the tolerance used."""
    width = max(len("output"), *(len(k) for k in diffs))
    lines = [f"{'output':<{width}}  max |diff|  status", f"{'-' * width}  ----------  ------"]
    lines += [f"{k:<{width}}  {v:10.3e}  {'FAIL' if k in failed else 'ok'}" for k, v in diffs.items()]
    lines.append(f"tolerance: |exported - pytorch| <= atol + rtol * |pytorch|, atol={atol:g}, rtol={rtol:g}")
    return "\n".join(lines)


def build_network(config_files: Sequence[str | Path], ckpt_path: str | Path) -> MSAM:
    """Instantiate ``network_def`` from bundle config files (later files override earlier) and load ``ckpt_path``."""
    from monai.bundle import ConfigParser

    from .networks.pretrained import load_pretrained

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    model = parser.get_parsed_content("network_def", instantiate=True)
    if not isinstance(model, MSAM):
        raise TypeError(f"network_def must build an MSAM, got {type(model).__name__}")
    print(load_pretrained(model, ckpt_path).summary())
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the bundle's network, load weights, export to TorchScript and optionally check the numbers."""
    cli = argparse.ArgumentParser(description="Export M-SAM's encoder and one click-decode step (TorchScript or ONNX).")
    cli.add_argument("--config_file", nargs="+", required=True, help="bundle config(s); later files override earlier")
    cli.add_argument("--ckpt_path", required=True, help="weights to load (strictly, any supported format)")
    cli.add_argument("--output_dir", required=True)
    cli.add_argument("--check", action="store_true", help="compare the artifacts with PyTorch; exit 1 on mismatch")
    cli.add_argument("--num_clicks", type=int, default=3, help="clicks in the checked decode chain")
    cli.add_argument("--atol", type=float, default=DEFAULT_TOLERANCE)
    cli.add_argument("--rtol", type=float, default=DEFAULT_TOLERANCE)
    cli.add_argument("--device", default="cpu", help="device to trace on (constants are baked for it)")
    cli.add_argument("--seed", type=int, default=0, help="seed of the example image and the checked clicks")
    cli.add_argument(
        "--format", choices=("torchscript", "onnx"), default="torchscript", help="onnx: run by onnxruntime (CPU)"
    )
    args = cli.parse_args(argv)

    device = torch.device(args.device)
    model = build_network(args.config_file, args.ckpt_path).to(device).eval()
    size = model.image_size
    gen = torch.Generator().manual_seed(args.seed)
    dtype = next(model.parameters()).dtype
    image = torch.randn(1, 1, size, size, size, generator=gen).to(device=device, dtype=dtype)
    if args.format == "onnx":
        from .export_onnx import export_onnx

        paths = export_onnx(model, args.output_dir, image)
    else:
        paths = export_torchscript(model, args.output_dir, image)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if not args.check:
        return 0
    points, labels = example_clicks(model, 1, args.num_clicks, args.seed)
    try:
        diffs = check_export(model, paths, image, points.to(device), labels.to(device), args.atol, args.rtol)
    except ExportCheckError as err:
        print(format_diffs(err.diffs, args.atol, args.rtol, err.failed))
        print(f"CHECK FAILED: {err}", file=sys.stderr)
        return 1
    print(format_diffs(diffs, args.atol, args.rtol))
    print("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
