"""Bundle command-line runs: bad inputs stop with the culprit named in the last line, and no silent wrong results."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import exception_messages, write_nifti
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow

from msam_components.bundle_tools import PRESET_NAMES, preset_spec
from msam_components.bundle_tools.template import render_files
from msam_components.checks import as_bool
from msam_components.data import make_kits19_like
from msam_components.engines import TrainingCheckpoint, atomic_torch_save
from msam_components.networks import CheckpointError, read_checkpoint
from msam_components.transforms import WarnEmptyMaskd

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
KITS = REPO / "bundles" / "msam_kits19"
BUNDLES = [KITS, REPO / "bundles" / "msam_brats21"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


_messages, _nifti = exception_messages, write_nifti


def _parser(*configs: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(KITS / "configs" / c) for c in configs] + [str(SMALL)])
    parser.update(overrides)
    return parser


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).normal(0, 300, (24, 24, 16)).astype(np.float32) - 500
    label = np.zeros((24, 24, 16), np.uint8)
    label[10:14, 10:14, 6:9] = 2
    return image, label


def _train_case(tmp_path: Path, label: np.ndarray | None = None, image: np.ndarray | None = None) -> dict:
    good_image, good_label = _volumes()
    return {
        "image": str(_nifti(tmp_path / "img.nii.gz", good_image if image is None else image)),
        "label": str(_nifti(tmp_path / "seg.nii.gz", good_label if label is None else label)),
    }


def _train_error(tmp_path: Path, **case: np.ndarray) -> str:
    with pytest.raises(Exception) as err:
        _parser("train.yaml").get_parsed_content("validate#preprocessing")(_train_case(tmp_path, **case))
    return _messages(err.value)


def _infer_error(image_file: Path, foreground: object = ((5, 5, 5),), background: object = ()) -> str:
    data = {"image": str(image_file), "foreground": [list(c) for c in foreground], "background": list(background)}
    with pytest.raises(Exception) as err:
        _parser("inference.yaml").get_parsed_content("preprocessing")(data)
    return _messages(err.value)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cli(tmp_path: Path, *args: str, configs: tuple[str, ...] = ("train.yaml",)) -> subprocess.CompletedProcess:
    files = str([str(KITS / "configs" / c) for c in configs] + [str(SMALL)])
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--config_file", files, "--bundle_root", str(KITS)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)


def _train_cli(tmp_path: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    out = ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    return _cli(tmp_path, "training", "--dataset_dir", str(data), *out, "--num_epochs", "1", *extra)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-1]


# --- unreadable and wrong data --------------------------------------------------------------------------------------


def test_truncated_nifti_in_training_cli_names_the_file(tmp_path: Path) -> None:
    """Was: exit 134 ('terminate called without an active exception') with a bare EOFError."""
    make_kits19_like(tmp_path / "data", num_cases=3, shape=(40, 40, 24), seed=0)
    bad = _truncate(tmp_path / "data" / "case_00001" / "imaging.nii.gz")
    result = _train_cli(tmp_path, tmp_path / "data")
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert _last_line(result) == f"ERROR: OSError: cannot read {bad}: the compressed data ends early: the file is " + (
        "truncated (an interrupted copy or download?)"
    )
    assert log.count("ERROR: ") == 1 and "terminate called" not in log
    assert not (tmp_path / "models" / "model.pt").exists()


def test_truncated_nifti_in_inference_names_the_file(tmp_path: Path) -> None:
    image = _truncate(_nifti(tmp_path / "case_00009" / "imaging.nii.gz", _volumes()[0]))
    text = _infer_error(image)
    assert f"cannot read {image}" in text and "truncated" in text


def test_noise_label_is_refused(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (24, 24, 16)).astype(np.uint8)
    text = _train_error(tmp_path, label=noise)
    assert "seg.nii.gz" in text and "256 distinct values" in text and "not a segmentation" in text


def test_fractional_tumour_label_is_refused(tmp_path: Path) -> None:
    label = _volumes()[1].astype(np.float32) * 0.75  # tumour stored as 1.5
    text = _train_error(tmp_path, label=label)
    assert "seg.nii.gz" in text and "non-integer values such as 1.5" in text


def test_nan_in_sform_is_refused(tmp_path: Path) -> None:
    plain = _nifti(tmp_path / "plain.nii", _volumes()[0], np.diag([1.5, 1.5, 2.5, 1.0]))
    header = bytearray(plain.read_bytes())
    header[292:296] = struct.pack("<f", float("nan"))  # srow_x[3]: the x offset of the sform
    image = tmp_path / "nan_sform.nii.gz"
    image.write_bytes(gzip.compress(bytes(header)))
    text = _infer_error(image)
    assert "nan_sform.nii.gz" in text and "NaN or infinite" in text and "sform" in text


def test_huge_resampled_image_is_refused_naming_it(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "huge_voxels.nii.gz", _volumes()[0], np.diag([300.0, 300.0, 300.0, 1.0]))
    text = _infer_error(image)
    assert "huge_voxels.nii.gz" in text and "max_voxels" in text and "GB" in text


def test_same_voxel_foreground_and_background_is_refused(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "img.nii.gz", _volumes()[0])
    text = _infer_error(image, foreground=[[5, 6, 7]], background=[[1, 1, 1], [5, 6, 7]])
    assert "click [5, 6, 7] is both 'foreground' and 'background'" in text


def test_float_num_epochs_is_refused() -> None:
    with pytest.raises(Exception) as err:
        _parser("train.yaml", num_epochs=2.5).get_parsed_content("lr_scheduler")
    assert "num_epochs must be int, got 2.5" in _messages(err.value)


def test_target_labels_in_no_case_stop_before_any_model_is_written(tmp_path: Path) -> None:
    make_kits19_like(tmp_path / "data", num_cases=3, shape=(40, 40, 24), seed=0)
    result = _train_cli(tmp_path, tmp_path / "data", "--target_labels", "[3]")
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert _last_line(result).startswith("ERROR: ValueError: no training case of epoch 1 contains a voxel of ")
    assert "target_labels [3]" in _last_line(result)
    assert not (tmp_path / "models" / "model.pt").exists()
    assert not (tmp_path / "models" / "checkpoint_latest.pt").exists()
    # the engine logs one line, not MONAI's StatsHandler traceback; Python prints the traceback once
    assert "SupervisedTrainer stopped: ValueError: no training case" in log and "Exception: " not in log
    assert log.count("ERROR: ") == 1


# --- resume and checkpoints -----------------------------------------------------------------------------------------


def _resume_engine(tmp_path: Path, max_epochs: int) -> tuple[Engine, TrainingCheckpoint]:
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    ckpt = TrainingCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="true")
    ckpt.attach(engine)
    return engine, ckpt


def test_resume_past_num_epochs_says_so(tmp_path: Path) -> None:
    engine, ckpt = _resume_engine(tmp_path, 3)
    engine.run([0], max_epochs=5)  # writes checkpoint_latest.pt at epoch 5
    engine2, _ = _resume_engine(tmp_path, 3)
    with pytest.raises(ValueError, match=r"already holds epoch 5 but num_epochs is 3") as err:
        engine2.run([0], max_epochs=3)
    assert str(ckpt.path) in str(err.value)


def test_truncated_training_checkpoint_on_resume_names_the_path(tmp_path: Path) -> None:
    engine, ckpt = _resume_engine(tmp_path, 2)
    engine.run([0], max_epochs=1)
    _truncate(ckpt.path)
    engine2, _ = _resume_engine(tmp_path, 2)
    with pytest.raises(CheckpointError, match="truncated or damaged") as err:
        engine2.run([0], max_epochs=2)
    assert str(ckpt.path) in str(err.value)


def test_random_bytes_are_not_called_pickled_code(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(1, 120, 4096).astype(np.uint8).tobytes())
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(junk)
    assert "is not a PyTorch checkpoint" in str(err.value) and "Python objects" not in str(err.value)


def test_empty_checkpoint_says_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        read_checkpoint(empty)


# --- outputs ---------------------------------------------------------------------------------------------------------


def test_kits19_inference_names_outputs_after_the_case(tmp_path: Path) -> None:
    make_kits19_like(tmp_path / "data", num_cases=2, shape=(40, 40, 24), seed=0)
    parser = _parser("inference.yaml")
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "tiny.pt")
    for case in ("case_00000", "case_00001"):
        wf = ConfigWorkflow(
            config_file=[str(KITS / "configs" / "inference.yaml"), str(SMALL)],
            workflow_type="infer",
            image_path=str(tmp_path / "data" / case / "imaging.nii.gz"),
            foreground=[[20, 20, 12]],
            ckpt_path=str(tmp_path / "tiny.pt"),
            output_dir=str(tmp_path / "out"),
        )
        wf.initialize()
        wf.run()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_00000_seg.nii.gz", "case_00001_seg.nii.gz"]


def test_empty_mask_warns_naming_the_image(caplog: pytest.LogCaptureFixture) -> None:
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "/d/case_7/imaging.nii.gz"})
    with caplog.at_level(logging.WARNING, logger="msam_components"):
        WarnEmptyMaskd(keys="pred")({"image": image, "pred": torch.zeros(1, 4, 4, 4)})
        assert "case_7/imaging.nii.gz" in caplog.text and "is empty" in caplog.text
        caplog.clear()
        WarnEmptyMaskd(keys="pred")({"image": image, "pred": torch.ones(1, 4, 4, 4)})
        assert caplog.text == ""


def test_ct_not_in_hounsfield_units_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = np.random.default_rng(0).integers(0, 4096, (24, 24, 16)).astype(np.float32)  # no rescale intercept
    transform = _parser("train.yaml").get_parsed_content("validate#preprocessing")
    with caplog.at_level(logging.WARNING, logger="msam_components"):
        transform(_train_case(tmp_path, image=raw))
        assert "img.nii.gz" in caplog.text and "does not look like Hounsfield units" in caplog.text
        caplog.clear()
        transform(_train_case(tmp_path))  # air at about -1000 HU: no warning
        assert "Hounsfield" not in caplog.text


# --- docs and overlays ----------------------------------------------------------------------------------------------


def test_documented_transfer_command_survives_bash() -> None:
    """Every `--eval_data` shown in the docs reaches MONAI as `$@datalist` when pasted into bash."""
    docs = [REPO / "README.md", REPO / "bundle_template" / "docs" / "README.md"]
    docs += [b / "docs" / "README.md" for b in BUNDLES] + [b / "configs" / "evaluate.yaml" for b in BUNDLES]
    found = 0
    for doc in docs:
        for match in re.finditer(r"--eval_data (\S+)", doc.read_text(encoding="utf-8")):
            word = match.group(1).rstrip("`,)")
            out = subprocess.run(["bash", "-c", f"printf '%s' {word}"], capture_output=True, text=True, check=True)
            assert out.stdout == "$@datalist", f"{doc}: --eval_data {word} reaches MONAI as {out.stdout!r}"
            found += 1
    assert found >= len(docs)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_has_a_cpu_overlay(preset: str) -> None:
    spec = preset_spec(preset) if preset != "generic" else None
    if spec is None:
        from msam_components.bundle_tools import generic_spec

        spec = generic_spec(name="msam_x", target_labels=[2], modality="MR", dataset="x")
    files = render_files(spec)
    assert "configs/demo.yaml" in files
    assert "image_size: 64" in files["configs/demo.yaml"]


def test_brats_bundle_ships_its_cpu_overlay() -> None:
    parser = ConfigParser()
    brats = REPO / "bundles" / "msam_brats21" / "configs"
    parser.read_config([str(brats / "train.yaml"), str(brats / "demo.yaml")])
    assert parser["image_size"] == 64 and parser["network_preset"] == "demo"
    assert len(parser.get_parsed_content("network_def").image_encoder.blocks) == 2


# --- booleans on the command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["true", "True", "TRUE", True, 1, "1", "yes"])
def test_as_bool_true(text: object) -> None:
    assert as_bool(text, "flag") is True


@pytest.mark.parametrize("text", ["false", "False", False, 0, "0", "no"])
def test_as_bool_false(text: object) -> None:
    assert as_bool(text, "flag") is False


@pytest.mark.parametrize("name", ["amp", "pass_all_clicks", "detach_feedback", "use_mea", "resume"])
def test_every_boolean_option_refuses_the_same_way(name: str, tmp_path: Path) -> None:
    expected = f"{name} must be true or false (true/false/True/False/1/0), got 'maybe'"
    if name == "resume":
        net = torch.nn.Linear(2, 1)
        with pytest.raises(TypeError, match=re.escape(expected)):
            TrainingCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), resume="maybe")
        return
    target = {
        "amp": "train#trainer#amp",
        "pass_all_clicks": "train#inferer",
        "detach_feedback": "validate#inferer",
        "use_mea": "network_def",
    }[name]
    with pytest.raises(Exception) as err:
        _parser("train.yaml", **{name: "maybe"}).get_parsed_content(target)
    assert expected in _messages(err.value)


def test_amp_false_on_the_command_line_turns_amp_off() -> None:
    """`--amp false` arrives as the string 'false', which SupervisedTrainer took as true."""
    for value, expected in (("false", False), ("False", False), ("true", True)):
        parser = _parser("train.yaml", amp=value)
        assert parser.get_parsed_content("train#trainer#amp") is expected
        assert parser.get_parsed_content("validate#evaluator#amp") is expected
        assert _parser("inference.yaml", amp=value).get_parsed_content("evaluator#amp") is expected
    click_loop = _parser("train.yaml", pass_all_clicks="true").get_parsed_content("train#inferer")
    assert click_loop.pass_all_clicks is True


def test_amp_false_reaches_the_trainer_from_the_shell(tmp_path: Path) -> None:
    """The real command line: fire hands `--amp false` over as a string; the trainer must see False."""
    make_kits19_like(tmp_path / "data", num_cases=3, shape=(40, 40, 24), seed=0)
    probe = tmp_path / "probe.yaml"
    probe.write_text("run:\n  - $print('AMP', @train#trainer.amp, @validate#evaluator.amp)\n")
    files = str([str(KITS / "configs" / "train.yaml"), str(SMALL), str(probe)])
    cmd = f"{shlex.quote(sys.executable)} -m monai.bundle run --config_file {shlex.quote(files)} --bundle_root {KITS} "
    cmd += f"--dataset_dir {tmp_path / 'data'} --output_dir {tmp_path / 'eval'} --amp false"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "AMP False False" in result.stdout


def test_failure_reason_skips_monai_wrappers() -> None:
    """The last line names the real reason, not MONAI's 'applying transform' / 'Failed to instantiate' wrappers."""
    from msam_components.failure_report import failure_reason

    try:
        try:
            raise ValueError("bad label in /x/seg.nii.gz")
        except ValueError as inner:
            raise RuntimeError("applying transform <LoadImaged>") from inner
    except RuntimeError as outer:
        assert failure_reason(outer) == "ValueError: bad label in /x/seg.nii.gz"


# --- second hardening round: option ranges, headers, splits, one-line errors -----------------------------------------


def test_nan_in_the_sform_rotation_is_refused_not_replaced(tmp_path: Path) -> None:
    """Was: MONAI's reader made an affine from the voxel sizes without a word (exit 0 on an invented grid)."""
    plain = _nifti(tmp_path / "plain.nii", _volumes()[0], np.diag([1.5, 1.5, 2.5, 1.0]))
    header = bytearray(plain.read_bytes())
    header[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]: part of the sform's 3x3
    image = tmp_path / "nan_rotation.nii.gz"
    image.write_bytes(gzip.compress(bytes(header)))
    text = _infer_error(image)
    assert "nan_rotation.nii.gz" in text and "sform holds NaN or infinite" in text


def test_zero_size_dimension_names_the_file_and_its_shape(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "empty.nii.gz", np.zeros((24, 0, 16), np.float32))
    text = _infer_error(image)
    assert "empty.nii.gz" in text and "[24, 0, 16]" in text and "zero-size dimension" in text


def test_label_with_negative_values_is_refused(tmp_path: Path) -> None:
    label = _volumes()[1].astype(np.int16)
    label[0, 0, 0] = -1
    text = _train_error(tmp_path, label=label)
    assert "seg.nii.gz" in text and "negative values such as -1" in text


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("learning_rate", "fast", "--learning_rate: expected a number, got 'fast'"),
        ("learning_rate", 1e12, "--learning_rate: 1000000000000.0 is outside its sane range (0, 1]"),
        ("val_fraction", 0, "--val_fraction: 0 is outside"),
        ("num_epochs", 0, "--num_epochs: 0 is outside"),
        ("batch_size", 2.5, "--batch_size: expected an integer"),
        ("target_labels", [-1], "--target_labels: expected a list of non-negative integer"),
    ],
)
def test_training_options_are_range_checked_by_name(option: str, value: object, fragment: str) -> None:
    with pytest.raises(Exception) as err:
        _parser("train.yaml", **{option: value}).get_parsed_content("checked_options")
    assert fragment in _messages(err.value)


def test_bad_learning_rate_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    """Was: TypeError: can't multiply sequence by non-int of type 'float', deep in the optimiser."""
    result = _train_cli(tmp_path, tmp_path / "nowhere", "--learning_rate", "fast")
    assert result.returncode == 1
    assert _last_line(result).startswith("ERROR: ValueError: --learning_rate: expected a number, got 'fast'")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_one_case_dataset_fails_instead_of_ending_without_a_model(tmp_path: Path) -> None:
    """Was: exit 0 and no model.pt (no validation case, so the best-metric checkpoint was never written)."""
    make_kits19_like(tmp_path / "data", num_cases=1, shape=(40, 40, 24), seed=0)
    result = _train_cli(tmp_path, tmp_path / "data")
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "gives 1 training and 0 validation case(s)" in _last_line(result)
    assert not (tmp_path / "models" / "model.pt").exists()


def test_missing_image_path_is_one_clear_line(tmp_path: Path) -> None:
    """Was: 378 lines holding 27 tracebacks, ending in 'no DICOMs in: .'."""
    result = _cli(tmp_path, "--output_dir", str(tmp_path / "out"), configs=("inference.yaml",))
    log = result.stdout + result.stderr
    assert result.returncode == 1
    assert _last_line(result).startswith("ERROR: ValueError: --image_path is required")
    assert "Traceback" not in log and len(log.splitlines()) < 10, log
    debug = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(KITS / "configs" / "inference.yaml")],
        capture_output=True,
        text=True,
        env={**ENV, "MSAM_DEBUG": "1"},
        timeout=600,
        cwd=tmp_path,
    )
    assert "Traceback" in debug.stderr and "--image_path is required" in debug.stderr.splitlines()[-1]


def test_background_click_outside_every_window_is_named_as_given(tmp_path: Path) -> None:
    """Was: 'background click outside the 128^3 model input: [[62, 13, 17]]', in window coordinates, from the model."""
    hu = np.random.default_rng(0).normal(40, 30, (400, 400, 40)).astype(np.float32)
    image = _nifti(tmp_path / "wide.nii.gz", hu, np.diag([0.8, 0.8, 2.5, 1.0]))
    text = _infer_error(image, foreground=[[20, 380, 20]], background=[[30, 370, 20], [380, 20, 20]])
    assert "'background': click(s) [[380, 20, 20]] (voxel indices of the image as given)" in text


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs: a folder on a file system that fills at once (needs root and mount, as in CI)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path: Path, full_disk: Path) -> None:
    """Was: 'RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0'."""
    make_kits19_like(tmp_path / "data", num_cases=3, shape=(40, 40, 24), seed=0)
    cmd = ["training", "--dataset_dir", str(tmp_path / "data"), "--ckpt_dir", str(full_disk)]
    result = _cli(tmp_path, *cmd, "--output_dir", str(tmp_path / "eval"), "--num_epochs", "1")
    assert result.returncode == 1
    last = _last_line(result)
    assert last.startswith(f"ERROR: OSError: [Errno 28] cannot write {full_disk}/") and "the disk is full" in last
    assert list(full_disk.iterdir()) == []  # no half-written checkpoint or temporary file


def test_label_value_outside_the_datasets_labels_is_refused(tmp_path: Path) -> None:
    """KiTS19 labels are 0, 1, 2: a segmentation holding 3 belongs to another dataset (was: trained on silently)."""
    label = _volumes()[1].copy()
    label[0:2, 0:2, 0:2] = 3
    text = _train_error(tmp_path, label=label)
    assert "seg.nii.gz" in text and "holds values [3] that are not labels of this dataset" in text


def test_a_full_disk_under_another_writer_still_says_so() -> None:
    """A write outside atomic_write (ignite's DiskSaver under MONAI's CheckpointSaver) ends in torch's own message;
    the reason line adds that the disk is full and which file was being written."""
    import errno

    from msam_components.failure_report import failure_reason

    def save(path: str) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(RuntimeError) as err:
        save("/models/model.pt")
    reason = failure_reason(err.value)
    assert (
        reason.startswith("RuntimeError: [enforce fail")
        and "(the disk is full while writing /models/model.pt)" in reason
    )
