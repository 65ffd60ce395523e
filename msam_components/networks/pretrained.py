"""Load SAM-Med3D, official M-SAM and this project's checkpoints into :class:`MSAM`, safely and with a clear report."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def _numpy_scalar_globals() -> list[object]:
    """numpy's scalar/dtype reconstructors: trainers often save metrics such as ``best_dice`` as numpy scalars."""
    import numpy as np

    try:  # numpy >= 2 (numpy 1.26 has a numpy._core shim that needs the explicit import)
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import scalar
    found: list[object] = [scalar, np.dtype]
    found += [
        getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
    ]
    return found


# Non-tensor objects that real checkpoints carry next to the weights and that are plain data, not code:
# SAM-Med3D/M-SAM trainers store their argparse.Namespace under "args" and metrics as numpy scalars.
SAFE_CHECKPOINT_GLOBALS: list[object] = [argparse.Namespace, *_numpy_scalar_globals()]

_MSAM_PREFIX = "lora_sam.sam."
_MEA_PREFIX_UPSTREAM = "bidatt."
_MEA_PREFIX = "mea."
_LORA_KEY = re.compile(r"\.attn\.qkv\.linear_[ab]_[qv]\.weight$")
_WRAPPED_QKV = re.compile(r"\.attn\.qkv\.qkv\.(weight|bias)$")
_PLAIN_QKV = re.compile(r"\.attn\.qkv\.(weight|bias)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read safely or does not fit the network."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: the detected format and the keys loaded, kept, missing or rejected."""

    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    kept_initialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    merged_lora: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        """Readable multi-line description, listing at most ``limit`` keys per category."""
        lines = [f"checkpoint {self.source} ({self.source_format}): {len(self.loaded)} tensors loaded"]
        for title, keys in (
            ("kept as initialised (not part of this format)", self.kept_initialised),
            ("LoRA merged into qkv", self.merged_lora),
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
                lines.append(f"  {len(keys)} {title}: {shown}")
        return "\n".join(lines)


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80  # legacy (non-zip) torch.save files and plain pickles start with PROTO


def _check_checkpoint_container(path: Path) -> None:
    """Refuse, with the reason, a file that cannot be a ``torch.save`` output: empty, truncated zip, or other bytes.

    ``torch.load`` would report such files as unpickling errors, which read like "pickled code"; here they are named
    for what they are before anything is unpickled.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is truncated or damaged ({size} bytes, a zip archive without its end record): "
                "the file was not written completely; use an intact copy"
            )
        return
    if head[0] != _PICKLE_PROTOCOL_OPCODE:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a torch.save zip archive nor a pickle "
            f"(first bytes {head!r}, {size} bytes)"
        )


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, object]:
    """``torch.load`` with ``weights_only=True``; only :data:`SAFE_CHECKPOINT_GLOBALS` may be reconstructed.

    A file that needs any other Python object (pickled code, custom classes) is refused with the offending names; it is
    never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _check_checkpoint_container(path)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 - not a zip checkpoint; the original error says enough
                unsafe = []
            if not unsafe and "Unsupported global" not in str(err):  # damaged data, not code
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointError(
                    f"could not read checkpoint {path}: it is damaged or not a PyTorch checkpoint ({reason})"
                ) from err
            names = f" (it references {', '.join(unsafe)})" if unsafe else ""
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects other than tensors and plain data{names}. "
                "Only weights are loaded (weights_only=True); nothing in the file was executed."
            ) from err
        raise CheckpointError(f"could not read checkpoint {path}: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def extract_state_dict(obj: Mapping[str, object], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: under ``model_state_dict``/``state_dict``/``model``/``network``, or the dict."""
    for key in ("model_state_dict", "state_dict", "model", "network"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no weights found in {source}: top-level keys are {sorted(map(str, obj))[:20]}")
    if len(tensors) != len(obj):
        others = sorted(k for k in obj if k not in tensors)
        raise CheckpointError(f"{source} mixes weights with other entries {others[:10]}; cannot tell which are weights")
    return {k[7:] if k.startswith("module.") else k: v for k, v in tensors.items()}


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"msam-official"`` (``lora_sam.sam.*``/``bidatt.*``), ``"sam-med3d"`` (plain 324-key layout) or ``"msam-components"``."""
    keys = list(state_dict)
    if any(k.startswith(_MSAM_PREFIX) or k.startswith(_MEA_PREFIX_UPSTREAM) for k in keys):
        return "msam-official"
    if any(k.startswith(_MEA_PREFIX) for k in keys) or any(_LORA_KEY.search(k) for k in keys):
        return "msam-components"
    return "sam-med3d"


def to_canonical_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any supported layout to this project's names: no ``lora_sam.sam.`` prefix, ``mea.*`` for the adapter."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_MSAM_PREFIX):
            key = key[len(_MSAM_PREFIX) :]
        elif key.startswith(_MEA_PREFIX_UPSTREAM):
            key = _MEA_PREFIX + key[len(_MEA_PREFIX_UPSTREAM) :]
        out[key] = value
    return out


def _adapt_qkv_naming(
    state: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    """Match ``attn.qkv.qkv.*`` (LoRA-wrapped) vs ``attn.qkv.*`` naming to the model; fold LoRA in if the model has none."""
    model_keys = set(model_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        wrapped, plain = _WRAPPED_QKV.search(key), _PLAIN_QKV.search(key)
        if wrapped and key not in model_keys:
            alt = _WRAPPED_QKV.sub(r".attn.qkv.\1", key)
            key = alt if alt in model_keys else key
        elif plain and not wrapped and key not in model_keys:
            alt = _PLAIN_QKV.sub(r".attn.qkv.qkv.\1", key)
            key = alt if alt in model_keys else key
        out[key] = value
    # a LoRA checkpoint into a LoRA-free model: fold B @ A into the q and v rows (exact up to rounding)
    lora_keys = [k for k in out if _LORA_KEY.search(k) and k not in model_keys]
    for a_q in [k for k in lora_keys if k.endswith("linear_a_q.weight")]:
        prefix = a_q[: -len("linear_a_q.weight")]
        weight_key = prefix + "weight"
        parts = [prefix + f"linear_{ab}_{qv}.weight" for ab in "ab" for qv in "qv"]
        if weight_key in out and weight_key in model_keys and all(p in out for p in parts):
            dtype = model_state[weight_key].dtype  # merge in the model's precision, not the file's
            w = out[weight_key].to(dtype).clone()
            dim = w.shape[1]
            w[:dim] += out[prefix + "linear_b_q.weight"].to(dtype) @ out[prefix + "linear_a_q.weight"].to(dtype)
            w[-dim:] += out[prefix + "linear_b_v.weight"].to(dtype) @ out[prefix + "linear_a_v.weight"].to(dtype)
            out[weight_key] = w
            for p in parts:
                del out[p]
            report.merged_lora.append(prefix.rstrip("."))
    return out


def _expected_from_source(source_format: str, model_keys: set[str]) -> set[str]:
    """Model keys a checkpoint of this format must provide (SAM-Med3D files carry no LoRA and no MEA)."""
    if source_format == "sam-med3d":
        return {k for k in model_keys if not k.startswith(_MEA_PREFIX) and not _LORA_KEY.search(k)}
    return set(model_keys)


def load_pretrained(
    network: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, object], strict: bool = True
) -> LoadReport:
    """Load SAM-Med3D (324 keys), official M-SAM (461 keys) or this project's weights into ``network``.

    SAM-Med3D files leave LoRA and the MEA as initialised (reported as such). With ``strict`` any missing, unexpected or
    mis-shaped key raises :class:`CheckpointError` listing them and nothing is loaded; otherwise the fitting tensors
    load and the report lists the rest. Files are read with ``weights_only=True`` (see :func:`read_checkpoint`).
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    else:
        source, raw = str(path_or_state_dict), read_checkpoint(path_or_state_dict)
    state = extract_state_dict(raw, source)
    source_format = detect_format(state)
    report = LoadReport(source=source, source_format=source_format)
    model_state = network.state_dict()
    model_keys = set(model_state)
    state = _adapt_qkv_naming(to_canonical_keys(state), model_state, report)
    expected = _expected_from_source(source_format, model_keys)
    report.missing = sorted(expected - set(state))
    report.unexpected = sorted(set(state) - model_keys)
    report.mismatched = sorted(
        f"{k}: checkpoint {list(v.shape)} vs model {list(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and v.shape != model_state[k].shape
    )
    report.kept_initialised = sorted(model_keys - expected)
    if strict and not report.ok:
        raise CheckpointError(
            "checkpoint does not fit the network (strict=True); nothing was loaded.\n" + report.summary(20)
        )
    bad = {m.split(":")[0] for m in report.mismatched}
    loadable = {k: v for k, v in state.items() if k in model_keys and k not in bad}
    network.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report


def load_pretrained_or_warn(
    network: nn.Module, path: str | os.PathLike | None, strict: bool = True, required: bool = False
) -> nn.Module:
    """Bundle helper: load ``path`` into ``network`` if given and return the network; warn loudly when there is none.

    Without a checkpoint (``None`` or ``""``) training starts from random initialisation, which is far from the
    paper's setting (SAM-Med3D-turbo weights); ``required=True`` (evaluation, inference) turns that into an error.
    """
    import logging
    import warnings

    logger = logging.getLogger("msam_components")
    if path is None or str(path).strip() in ("", "None", "null"):
        if required:
            raise FileNotFoundError("no checkpoint given: set 'ckpt_path' (or 'pretrained_ckpt') to a weights file")
        message = (
            "no pretrained checkpoint given (pretrained_ckpt is empty): the network starts from RANDOM initialisation. "
            "M-SAM is meant to start from SAM-Med3D(-turbo) weights; pass --pretrained_ckpt /path/to/sam_med3d_turbo.pth"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
        return network
    report = load_pretrained(network, path, strict=strict)
    logger.info(report.summary())
    return network
