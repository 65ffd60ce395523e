"""Shared pytest fixtures: where the read-only project data (../shared) lives, and a fast thread setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MSAM_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference"
DATA_DIR = SHARED_DIR / "data"
SCHEMA_DIR = SHARED_DIR / "schema"

# MSAM_TEST_THREADS: run the suite on another thread count (the numerics tests must pass on 1 and 2 threads)
torch.set_num_threads(int(os.environ.get("MSAM_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))
torch.set_flush_denormal(True)  # denormals make CPU training steps many times slower


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set MSAM_SHARED_DIR to the folder holding reference/ and data/)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder with the upstream reference fixtures (skips when absent)."""
    return _require(REFERENCE_DIR, "reference fixtures")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with the real sample volumes (skips when absent)."""
    return _require(DATA_DIR, "real sample data")


@pytest.fixture(scope="session")
def schema_dir() -> Path:
    """Folder with the MONAI bundle metadata schema (skips when absent)."""
    return _require(SCHEMA_DIR, "bundle metadata schema")


def msam_kwargs_from_reference_config(config: dict) -> dict:
    """Translate the reference fixture's ``config`` dict into :class:`MSAM` constructor arguments."""
    return dict(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_chans"],
        encoder_embed_dim=config["encoder_embed_dim"],
        encoder_depth=config["encoder_depth"],
        encoder_num_heads=config["encoder_num_heads"],
        encoder_mlp_ratio=config["encoder_mlp_ratio"],
        encoder_global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
        encoder_window_size=config["encoder_window_size"],
        prompt_embed_dim=config["prompt_embed_dim"],
        mask_in_chans=config["mask_in_chans"],
        decoder_transformer_depth=config["decoder_transformer_depth"],
        decoder_num_heads=config["decoder_transformer_num_heads"],
        decoder_mlp_dim=config["decoder_transformer_mlp_dim"],
        decoder_attention_downsample_rate=config["decoder_attention_downsample_rate"],
        num_multimask_outputs=config["decoder_num_multimask_outputs"],
        iou_head_depth=config["decoder_iou_head_depth"],
        iou_head_hidden_dim=config["decoder_iou_head_hidden_dim"],
        mea_num_heads=config["mea_num_heads"],
        mea_mlp_ratio=config["mea_mlp_dim"] / config["mea_channels"],
        mea_num_blocks=config["mea_num_attention_blocks"],
        lora_rank=config["lora_rank"],
    )


@pytest.fixture(scope="session")
def tiny_fixture(reference_dir: Path) -> dict:
    """The upstream tiny-model fixture (weights, inputs, float32 and float64 outputs)."""
    return torch.load(reference_dir / "msam_tiny_fixture.pt", weights_only=True)


def small_msam_kwargs(**overrides: object) -> dict:
    """A very small M-SAM for engine tests on CPU: 64^3 input, 8^3 tokens, no window padding."""
    kwargs = dict(
        image_size=64,
        patch_size=8,
        encoder_embed_dim=48,
        encoder_depth=2,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1,),
        encoder_window_size=8,
        prompt_embed_dim=48,
        mask_in_chans=8,
        decoder_mlp_dim=96,
        iou_head_hidden_dim=32,
        lora_rank=2,
    )
    kwargs.update(overrides)
    return kwargs


def make_blob_cases(num_cases: int, size: int = 64, seed: int = 0) -> list[dict]:
    """Synthetic cases: a bright noisy sphere (the lesion) in a noisy background, as MetaTensors with a file name."""
    from monai.data import MetaTensor

    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    cases = []
    for i in range(num_cases):
        centre = torch.randint(size // 4, 3 * size // 4, (3,), generator=gen).float()
        radius = float(torch.randint(size // 10, size // 5, (1,), generator=gen))
        label = (((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).float()[None]
        image = label * 2.0 + 0.3 * torch.randn(label.shape, generator=gen)
        meta = {"filename_or_obj": f"/synthetic/case_{i:05d}.nii.gz"}
        cases.append({"image": MetaTensor(image, meta=dict(meta)), "label": MetaTensor(label, meta=dict(meta))})
    return cases


def exception_messages(err: BaseException) -> str:
    """The whole exception chain as text (MONAI wraps transform errors in RuntimeErrors)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def write_nifti(path: Path, data, affine=None) -> Path:
    """Save an array as NIfTI (identity affine by default), creating the folder."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def oblique_affine(zooms: tuple[float, float, float], degrees: float = 20.0) -> "np.ndarray":
    """An affine rotated about the scanner's z axis (an oblique acquisition)."""
    import numpy as np

    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(zooms)
    affine[:3, 3] = [-30.0, 12.0, 5.0]
    return affine


def input_geometries() -> dict:
    """Voxel-to-world affines the inference tests run on: anisotropic RAS, LPS, a permuted IPL and an oblique one."""
    import numpy as np

    return {
        "ras": np.diag([1.5, 1.5, 2.5, 1.0]),
        "lps": np.diag([-1.5, -1.5, 2.5, 1.0]),
        "ipl_permuted": np.array([[0, 0, -2.5, 0], [0, -1.5, 0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1.0]]),
        "oblique": oblique_affine((1.5, 1.5, 2.5)),
    }


@pytest.fixture(scope="session")
def small_bundle_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights of the tiny test network (``tests/configs/small_bundle.yaml`` on the KiTS19 inference config)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    configs = REPO_ROOT / "bundles" / "msam_kits19" / "configs"
    parser.read_config([str(configs / "inference.yaml"), str(REPO_ROOT / "tests" / "configs" / "small_bundle.yaml")])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_bundle_ckpt") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def click_engine_parts(
    training: bool,
    loss: object = None,
    lambda_click: float = 0.0,
    loss_click_weighting: str = "uniform",
    initial_mask_key: str | None = None,
    keep_click_logits: bool = False,
    **loop: object,
) -> dict:
    """The keyword arguments that make a MONAI trainer (``training``) or evaluator run the click loop, as the bundles'
    configs wire them: ``inferer`` (``ClickLoopInferer(**loop)``), ``prepare_batch``, ``iteration_update`` and, for a
    trainer, ``loss_function`` (``PerClickLoss`` over ``loss``)."""
    from msam_components.engines import ClickLoopInferer, IterativeClickRefinement, PerClickLoss, click_batch

    parts = dict(
        inferer=ClickLoopInferer(**loop),
        prepare_batch=click_batch(),
        iteration_update=IterativeClickRefinement(initial_mask_key, keep_click_logits),
    )
    if training:
        threshold = dict((k, loop[k]) for k in ("threshold", "threshold_on") if k in loop)
        parts["loss_function"] = PerClickLoss(loss, loss_click_weighting, lambda_click, **threshold)
    return parts
