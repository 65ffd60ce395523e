"""Export the encoder and one click-decode step to ONNX, and run them with onnxruntime, as the TorchScript export does.

The same two modules as :mod:`msam_components.export_parts` (``EncoderForExport``, ``DecodeStepForExport``) go through
``torch.onnx.export`` (the ``torch.export``-based exporter), so an ONNX deployment runs the model's own code path:

- ``encoder.onnx``: ``image [B, 1, S, S, S]`` -> the per-image state tensors, in ``state_names`` order;
- ``decode_step.onnx``: ``(*state, points [B, 1, 3] int64, point_labels [B, 1] int64, low_res_mask)`` -> low-res
  logits; one click per step, the output fed back as the next ``low_res_mask``;
- ``export_info.json``: shapes, dtype and input/output names (``"format": "onnx"``).

:func:`load_onnx` wraps the two onnxruntime sessions as callables on torch tensors, so
:func:`msam_components.export.check_export` compares them with PyTorch exactly as it compares TorchScript.
Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install "msam-components[onnx]"``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .export_parts import DecodeStepForExport, EncoderForExport, example_prompt, state_names
from .networks.msam import MSAM

ENCODER_ONNX = "encoder.onnx"
DECODE_STEP_ONNX = "decode_step.onnx"
INFO_FILE = "export_info.json"
OPSET = 18


def _require_onnx() -> None:
    """A clear error naming the packages when the ONNX toolchain is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install \"msam-components[onnx]\"")


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """``torch.onnx.export`` at fixed shapes, its progress messages kept out of the user's output."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=inputs, output_names=outputs, opset_version=OPSET, verbose=False
            )
    finally:
        registry_log.setLevel(level)
    program.save(str(path))


def export_onnx(model: MSAM, out_dir: str | Path, example_image: torch.Tensor) -> dict[str, Path]:
    """Export the encoder and decode step at ``example_image``'s shape and dtype; return the written paths."""

    _require_onnx()
    expected = (1, model.image_size, model.image_size, model.image_size)
    if example_image.ndim != 5 or tuple(example_image.shape[1:]) != expected:
        raise ValueError(f"example_image must be [B, {', '.join(map(str, expected))}], got {list(example_image.shape)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"encoder": out_dir / ENCODER_ONNX, "decode_step": out_dir / DECODE_STEP_ONNX, "info": out_dir / INFO_FILE}
    names = list(state_names(model))
    step_inputs = [*names, "points", "point_labels", "low_res_mask"]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            encoder = EncoderForExport(model)
            _export(encoder, (example_image,), paths["encoder"], ["image"], names)
            state = encoder(example_image)
            prompt = example_prompt(model, example_image)
            _export(
                DecodeStepForExport(model), (*state, *prompt), paths["decode_step"], step_inputs, ["low_res_logits"]
            )
    finally:
        model.train(was_training)
    info = {
        "format": "onnx",
        "opset": OPSET,
        "torch_version": torch.__version__,
        "dtype": str(example_image.dtype).removeprefix("torch."),
        "image_shape": list(example_image.shape),
        "encoder": {"file": ENCODER_ONNX, "inputs": ["image"], "outputs": names},
        "state_shapes": {name: list(t.shape) for name, t in zip(names, state)},
        "decode_step": {
            "file": DECODE_STEP_ONNX,
            "inputs": step_inputs,
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


class OnnxStep:
    """An onnxruntime session as a callable on torch tensors, taking its inputs by position as the TorchScript modules
    do; the decode step returns one tensor, the encoder a tuple."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        kind = "encoder" if Path(path).name == ENCODER_ONNX else "decode_step"
        self.names = json.loads((Path(path).parent / INFO_FILE).read_text())[kind]["inputs"]
        self.used = [i.name for i in self.session.get_inputs()]  # the exporter drops inputs the graph never reads
        self.single = kind == "decode_step"

    def __call__(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(self.names, args)}
        outputs = tuple(torch.from_numpy(o) for o in self.session.run(None, {n: feeds[n] for n in self.used}))
        return outputs[0] if self.single else outputs


def load_onnx(paths: Mapping[str, str | Path], threads: int | None = None) -> tuple[Callable, Callable]:
    """``(encoder, decode_step)`` callables running :func:`export_onnx`'s files with onnxruntime on CPU."""
    _require_onnx()
    return OnnxStep(paths["encoder"], threads), OnnxStep(paths["decode_step"], threads)
