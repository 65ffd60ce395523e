"""The MONAI Label app (monailabel_app/) served by a real ``monailabel start_server`` from ``.venv-label``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from label_server import label_server

REPO = Path(__file__).resolve().parents[1]
LABEL_BIN = REPO / ".venv-label" / "bin"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
REQUEST_TIMEOUT_S = 120
LIMITS = {"max_clicks": "20", "max_upload_mb": "2", "max_train_epochs": "3", "max_pending_infers": "2"}
BIG_SHAPE = (320, 320, 240)  # a study whose first click takes a while (load and resampling), for the stall test

pytestmark = [
    pytest.mark.skipif(
        not (LABEL_BIN / "monailabel").exists(),
        reason="needs .venv-label with monailabel (numpy<2); build it with `make label-venv`, run with `make test-label`",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("httpx") is None,
        reason="needs httpx (installed in .venv-label); run with `make test-label`",
    ),
]


def _make_inputs(root: Path) -> tuple[Path, Path, list[int]]:
    """One synthetic KiTS19-like study, a tiny random checkpoint (small_bundle.yaml) and a click in its tumour."""
    import nibabel as nib
    import torch
    from monai.bundle import ConfigParser

    from msam_components.data import make_kits19_like

    make_kits19_like(root / "raw", num_cases=3, shape=(48, 40, 32))
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in ("case_00000", "case_00001", "case_00002"):  # labelled studies, as annotators save them (tumour = 1)
        shutil.copy(root / "raw" / case / "imaging.nii.gz", studies / f"{case}.nii.gz")
        seg = nib.load(str(root / "raw" / case / "segmentation.nii.gz"))
        tumour = (np.asarray(seg.dataobj) == 2).astype(np.uint8)
        nib.save(nib.Nifti1Image(tumour, seg.affine), str(studies / "labels" / "final" / f"{case}.nii.gz"))
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "msam_kits19" / "configs" / "inference.yaml"), str(SMALL)])
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    seg = np.asarray(nib.load(str(root / "raw" / "case_00000" / "segmentation.nii.gz")).dataobj)
    click = [int(v) for v in np.rint(np.argwhere(seg == 2).mean(0))]
    return studies, ckpt, click


def _write_volume(
    path: Path, shape: tuple[int, ...], zooms: tuple[float, ...] = (1.0, 1.0, 1.0), seed: int = 0
) -> Path:
    """A small int16 NIfTI volume with the given voxel sizes."""
    import nibabel as nib

    data = np.random.default_rng(seed).integers(-200, 200, size=shape, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server started with the README's command (no venv on PATH) on 127.0.0.1, serving the repo's bundles with the
    tiny kits19 checkpoint and small caps; stopped afterwards."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("label")
    studies, ckpt, click = _make_inputs(root)
    big = np.zeros(BIG_SHAPE, dtype=np.int16)
    big[100:200, 100:200, 80:160] = 100
    nib.save(nib.Nifti1Image(big, np.eye(4)), str(studies / "big_case.nii"))
    (root / "outside").mkdir()
    (root / "tmp").mkdir()
    # a study and its label that are links to files outside the studies folder: never served, listed or trained on
    shutil.copy(studies / "case_00001.nii.gz", root / "outside" / "secret.nii.gz")
    shutil.copy(studies / "labels" / "final" / "case_00001.nii.gz", root / "outside" / "secret_label.nii.gz")
    (studies / "linked_case.nii.gz").symlink_to(root / "outside" / "secret.nii.gz")
    (studies / "labels" / "final" / "linked_case.nii.gz").symlink_to(root / "outside" / "secret_label.nii.gz")
    shutil.copy(studies / "case_00001.nii.gz", studies / "case_00003.nii.gz")  # a real image whose label links out
    (studies / "labels" / "final" / "case_00003.nii.gz").symlink_to(root / "outside" / "secret_label.nii.gz")
    nib.save(nib.Nifti1Image(big, np.eye(4)), str(studies / "big_case_2.nii"))  # first clicked in the rate-limit test
    limits = [arg for key, value in LIMITS.items() for arg in ("--conf", key, value)]
    with label_server(root, str(studies), ckpt, extra_conf=limits, models=None) as base:
        yield {
            "base": base,
            "image": studies / "case_00000.nii.gz",
            "click": click,
            "root": root,
            "ckpt": ckpt,
            "studies": studies,
            "tmp_at_start": {p.name for p in (root / "tmp").iterdir()},  # the server's log config
        }


def _infer(server: dict, params: dict | str, model: str = "msam_kits19"):
    """POST /infer/<model> for the study with JSON params; returns the httpx response (label as NIfTI bytes)."""
    import httpx

    body = params if isinstance(params, str) else json.dumps(params)
    return httpx.post(
        f"{server['base']}/infer/{model}",
        params={"image": "case_00000", "output": "image"},
        data={"params": body},
        timeout=REQUEST_TIMEOUT_S,
    )


def _check_label(server: dict, content: bytes, name: str) -> None:
    """The returned label is a NIfTI with the study's shape and affine."""
    import nibabel as nib

    out = server["root"] / name
    out.write_bytes(content)
    label, image = nib.load(str(out)), nib.load(str(server["image"]))
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1}


def test_info_lists_every_bundle(server: dict) -> None:
    import httpx

    info = httpx.get(f"{server['base']}/info/", timeout=REQUEST_TIMEOUT_S).json()
    assert {"msam_kits19", "msam_brats21"} <= set(info["models"])
    kits = info["models"]["msam_kits19"]
    assert kits["type"] == "deepgrow" and kits["labels"] == {"tumor": 1}
    assert kits["config"]["weights_available"] is True
    assert info["models"]["msam_brats21"]["config"]["weights_available"] is False
    assert "tumor" in info["labels"]


def test_click_returns_label_in_input_geometry(server: dict) -> None:
    first = _infer(server, {"foreground": [server["click"]], "background": []})
    assert first.status_code == 200, first.text
    _check_label(server, first.content, "first.nii.gz")
    again = _infer(server, {"foreground": [server["click"]], "background": [[0, 0, 0]]})
    assert again.status_code == 200, again.text
    _check_label(server, again.content, "again.nii.gz")


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"foreground": [], "background": []}, "no click"),
        ({"foreground": [[1, 2]]}, "[i, j, k]"),
        ({"foreground": [[999, 0, 0]]}, "outside"),
        ({"foreground": "centre"}, "must be a list"),
    ],
)
def test_malformed_request_is_4xx_and_server_keeps_serving(server: dict, params: dict, fragment: str) -> None:
    bad = _infer(server, params)
    assert 400 <= bad.status_code < 500, bad.text
    assert fragment in bad.json()["detail"]
    good = _infer(server, {"foreground": [server["click"]]})
    assert good.status_code == 200, good.text


def test_model_without_weights_says_so(server: dict) -> None:
    resp = _infer(server, {"foreground": [server["click"]]}, model="msam_brats21")
    assert resp.status_code == 503
    assert "no weights" in resp.json()["detail"]


def _train(server: dict, body: object, model: str = "msam_kits19", run_sync: bool = True):
    """POST /train/<model> with a JSON (or raw string) body."""
    import httpx

    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        f"{server['base']}/train/{model}",
        params={"run_sync": run_sync},
        content=content,
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT_S * 3,
    )


def test_train_serves_new_weights_only_if_not_worse_and_can_restore(server: dict) -> None:
    """POST /train/<model> scores old and new weights on the same validation cases; the served file changes exactly
    when the new score is at least the old one, the old weights are kept, and /restore swaps them back."""
    import httpx

    ckpt = server["ckpt"]
    old = ckpt.read_bytes()
    response = _train(server, {"max_epochs": 1})
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["epochs"] == 1 and stats["train_cases"] == 2 and stats["val_cases"] == 1
    assert isinstance(stats["previous_metric"], float) and isinstance(stats["new_metric"], float)
    assert stats["replaced"] == (stats["new_metric"] >= stats["previous_metric"])
    backup = ckpt.with_name(ckpt.name + ".prev")
    if stats["replaced"]:
        assert backup.read_bytes() == old and ckpt.read_bytes() != old
        new = ckpt.read_bytes()
    restore = httpx.post(f"{server['base']}/train/msam_kits19/restore", timeout=REQUEST_TIMEOUT_S)
    if stats["replaced"]:
        assert restore.status_code == 200, restore.text
        assert ckpt.read_bytes() == old and backup.read_bytes() == new
    else:
        assert ckpt.read_bytes() == old
        assert restore.status_code == 404 and "no previous weights" in restore.text
    again = _infer(server, {"foreground": [server["click"]], "background": []})
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({"max_epochs": 1, "learning_rate": 1e12}, 400, "learning_rate"),
        ({"learning_rate": "fast"}, 400, "learning_rate"),
        ({"learning_rate": -1}, 400, "learning_rate"),
        ({"val_fraction": 0}, 400, "val_fraction"),
        ({"val_fraction": "x"}, 400, "val_fraction"),
        ({"max_epochs": 1e9}, 400, "max_epochs"),
        ({"max_epochs": 4}, 400, "max_epochs"),
        ({"max_epochs": 0}, 400, "max_epochs"),
        ({"max_epochs": True}, 400, "max_epochs"),
        ({"junk": "x" * 200_000}, 400, "junk"),
        ({"gpus": "0" * 200_000}, 400, "gpus"),
        ({"max_epochs": [1] * 100}, 413, "max_epochs"),
        ("[1, 2]", 400, "JSON object"),
        ("{not json", 400, "not valid JSON"),
    ],
)
def test_bad_training_parameters_are_refused_and_weights_kept(server: dict, body: object, code: int, fragment: str):
    before = server["ckpt"].read_bytes()
    for run_sync in (True, False):  # background runs are checked before they are queued
        bad = _train(server, body, run_sync=run_sync)
        assert bad.status_code == code, bad.text
        assert fragment in bad.json()["detail"]
    assert server["ckpt"].read_bytes() == before


def test_background_training_runs_to_the_end(server: dict) -> None:
    """A valid run_sync=false training is queued, runs in MONAI Label's subprocess and ends DONE (not SUBMITTED)."""
    import httpx

    started = _train(server, {"max_epochs": 1}, run_sync=False)
    assert started.status_code == 200, started.text
    task_id = started.json()["id"]
    deadline = time.monotonic() + REQUEST_TIMEOUT_S * 2
    while True:
        status = httpx.get(f"{server['base']}/train/", params={"all": True}, timeout=REQUEST_TIMEOUT_S).json()
        task = next(t for t in status if t["id"] == task_id)
        if task["status"] not in ("SUBMITTED", "RUNNING") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert task["status"] == "DONE", task


def test_train_or_restore_unknown_model_is_404(server: dict) -> None:
    import httpx

    bad = _train(server, {"max_epochs": 1}, model="nosuch")
    assert bad.status_code == 404 and "nosuch" in bad.json()["detail"]
    bad = httpx.post(f"{server['base']}/train/nosuch/restore", timeout=REQUEST_TIMEOUT_S)
    assert bad.status_code == 404 and "nosuch" in bad.json()["detail"]


def _leftovers(server: dict) -> list[str]:
    """Temporary upload, result, dataset and training files the server left in its TMPDIR."""
    deadline = time.monotonic() + 5
    while True:
        names = sorted(p.name for p in (server["root"] / "tmp").iterdir() if p.name not in server["tmp_at_start"])
        names = [n for n in names if not n.startswith("torchinductor_")]  # torch's compile cache
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def _outside_files(server: dict) -> list[str]:
    """Files anywhere under the test's root except the studies, the server's TMPDIR and what the fixture wrote."""
    root = server["root"]
    known = {"model.pt", "model.pt.prev", "model.pt.train.lock", "server.log", "first.nii.gz", "again.nii.gz"}
    known |= {"outside/secret.nii.gz", "outside/secret_label.nii.gz"}
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        skip = rel.parts[0] in ("studies", "tmp", "raw") or rel.parts[0].startswith(".")  # .cache: the server's HOME
        if path.is_file() and not skip and str(rel) not in known:
            found.append(str(rel))
    return sorted(found)


def _put_image(server: dict, image_id: str | None, payload: bytes, filename: str = "x.nii.gz"):
    """PUT /datastore/image with one file."""
    import httpx

    params = {"image": image_id} if image_id is not None else {}
    files = {"file": (filename, payload, "application/octet-stream")}
    return httpx.put(f"{server['base']}/datastore/image", params=params, files=files, timeout=REQUEST_TIMEOUT_S)


def _put_label(server: dict, image_id: str, tag: str, payload: bytes, filename: str = "x.nii.gz"):
    """PUT /datastore/label with one file."""
    import httpx

    files = {"label": (filename, payload, "application/octet-stream")}
    return httpx.put(
        f"{server['base']}/datastore/label",
        params={"image": image_id, "tag": tag},
        files=files,
        timeout=REQUEST_TIMEOUT_S,
    )


@pytest.mark.parametrize(
    "image_id", ["../outside/notes", "../../outside/notes", "/tmp/notes", "..", "a\\..\\b", ".hidden", "sub/notes"]
)
def test_image_ids_cannot_leave_the_studies(server: dict, image_id: str, tmp_path: Path) -> None:
    payload = _write_volume(tmp_path / "ok.nii.gz", (8, 8, 8)).read_bytes()
    before = sorted(p.name for p in server["studies"].rglob("*"))
    bad = _put_image(server, image_id, payload)
    assert bad.status_code == 400, bad.text
    assert "image id" in bad.json()["detail"]
    assert _outside_files(server) == [] and not Path("/tmp/notes.nii.gz").exists()
    assert sorted(p.name for p in server["studies"].rglob("*")) == before
    assert _leftovers(server) == []


@pytest.mark.parametrize("tag", ["../../outside/t", "../final", "/tmp/t", "a/b", ".."])
def test_label_tags_cannot_leave_the_studies(server: dict, tag: str, tmp_path: Path) -> None:
    import nibabel as nib

    image = nib.load(str(server["image"]))
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(path))
    payload = path.read_bytes()
    bad = _put_label(server, "case_00000", tag, payload)
    assert bad.status_code == 400 and "label tag" in bad.json()["detail"], bad.text
    bad = _infer(server, {"foreground": [server["click"]], "save_label": True, "label_tag": tag})
    assert bad.status_code == 400 and "label_tag" in bad.json()["detail"], bad.text
    bad = _put_label(server, "../case_00000", "final", payload)
    assert bad.status_code == 400 and "image id" in bad.json()["detail"], bad.text
    assert _outside_files(server) == [] and not Path("/tmp/t.nii.gz").exists()
    assert _leftovers(server) == []


def test_valid_uploads_land_in_the_studies_and_infer_can_save_a_label(server: dict, tmp_path: Path) -> None:
    import nibabel as nib

    payload = _write_volume(tmp_path / "ok.nii.gz", (24, 20, 16)).read_bytes()
    good = _put_image(server, "uploaded_01", payload)
    assert good.status_code == 200, good.text
    assert (server["studies"] / "uploaded_01.nii.gz").read_bytes() == payload
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 20, 16), np.uint8), np.eye(4)), str(path))
    label = path.read_bytes()
    good = _put_label(server, "uploaded_01", "reviewed", label)
    assert good.status_code == 200, good.text
    assert (server["studies"] / "labels" / "reviewed" / "uploaded_01.nii.gz").read_bytes() == label
    import httpx

    saved = httpx.post(
        f"{server['base']}/infer/msam_kits19",
        params={"image": "case_00000", "output": "json"},
        data={"params": json.dumps({"foreground": [server["click"]], "save_label": True, "label_tag": "draft"})},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert saved.status_code == 200, saved.text
    mask = nib.load(str(server["studies"] / "labels" / "draft" / "case_00000.nii.gz"))
    assert mask.shape == nib.load(str(server["image"])).shape
    assert _leftovers(server) == []


def _junk_uploads(root: Path) -> dict[str, tuple[str, bytes]]:
    """Uploads that are not images a server should store."""
    import nibabel as nib

    noise = root / "noise.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 40, 32)).astype(np.float32), np.eye(4)), str(noise))
    truncated = _write_volume(root / "trunc.nii.gz", (48, 40, 32)).read_bytes()
    two_d = root / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 40), np.int16), np.eye(4)), str(two_d))
    return {
        "text": ("notes.txt", b"hello"),
        "script": ("run.sh", b"#!/bin/sh\nrm -rf /\n"),
        "junk": ("junk.nii.gz", os.urandom(4096)),
        "truncated": ("trunc.nii.gz", truncated[: len(truncated) // 2]),
        "2d": ("flat.nii.gz", two_d.read_bytes()),
        "too_big": ("big.nii", b"\0" * (3 * 2**20)),
        "noise_label": ("noise.nii.gz", noise.read_bytes()),
    }


@pytest.mark.parametrize("kind", ["text", "script", "junk", "truncated", "2d", "too_big", "noise_label"])
def test_uploads_are_checked_and_temp_files_removed(server: dict, kind: str, tmp_path: Path) -> None:
    import httpx

    name, payload = _junk_uploads(tmp_path)[kind]
    before = sorted(str(p) for p in server["studies"].rglob("*"))
    if kind == "noise_label":  # a readable volume of the right shape, but not a label
        bad = _put_label(server, "case_00001", "final", payload, filename=name)
    else:
        bad = _put_image(server, None, payload, filename=name)
    assert 400 <= bad.status_code < 500, bad.text
    assert bad.status_code != 422 and bad.json()["detail"]
    if kind != "noise_label":
        infer = httpx.post(
            f"{server['base']}/infer/msam_kits19",
            params={"output": "image"},
            data={"params": json.dumps({"foreground": [[1, 1, 1]]})},
            files={"file": (name, payload, "application/octet-stream")},
            timeout=REQUEST_TIMEOUT_S,
        )
        assert 400 <= infer.status_code < 500 and infer.status_code != 422, infer.text
    assert sorted(str(p) for p in server["studies"].rglob("*")) == before
    assert _leftovers(server) == []


def test_huge_voxels_are_refused_before_resampling(server: dict, tmp_path: Path) -> None:
    """A 1 KB NIfTI with 100 mm voxels would resample to ~3e8 voxels at 3 mm: 413, whether uploaded or stored."""
    import httpx

    path = _write_volume(tmp_path / "huge.nii.gz", (20, 20, 20), zooms=(100.0, 100.0, 100.0))
    assert path.stat().st_size < 20_000
    infer = httpx.post(
        f"{server['base']}/infer/msam_kits19",
        data={"params": json.dumps({"foreground": [[10, 10, 10]]})},
        files={"file": ("huge.nii.gz", path.read_bytes(), "application/octet-stream")},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert infer.status_code == 413 and "max_voxels" in infer.json()["detail"], infer.text
    assert _put_image(server, "huge", path.read_bytes()).status_code == 200
    stored = httpx.post(
        f"{server['base']}/infer/msam_kits19",
        params={"image": "huge"},
        data={"params": json.dumps({"foreground": [[10, 10, 10]]})},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert stored.status_code == 413 and "resampling" in stored.json()["detail"], stored.text
    assert _leftovers(server) == []


def test_infer_reads_only_datastore_images(server: dict) -> None:
    """Paths (absolute, relative to the server's folder) never reach a reader, and existing and missing files outside
    the studies get the same answer."""
    outside = _write_volume(server["root"] / "raw" / "secret.nii.gz", (48, 40, 32))
    answers = {}
    for image in (str(outside), str(outside.with_name("missing.nii.gz")), "README.md", "no_such_file.md"):
        resp = _infer_image(server, image, {"foreground": [[1, 1, 1]]})
        answers[image] = (resp.status_code, resp.json()["detail"].replace(image, "<id>"))
    assert answers[str(outside)] == answers[str(outside.with_name("missing.nii.gz"))]
    assert answers[str(outside)][0] == 400
    assert answers["README.md"] == answers["no_such_file.md"] == (404, "image '<id>' not found in the datastore")


def _infer_image(server: dict, image: str, params: dict | str):
    """POST /infer/msam_kits19 for any ``image`` query value."""
    import httpx

    body = params if isinstance(params, str) else json.dumps(params)
    return httpx.post(
        f"{server['base']}/infer/msam_kits19",
        params={"image": image, "output": "json"},
        data={"params": body},
        timeout=REQUEST_TIMEOUT_S,
    )


@pytest.mark.parametrize(
    "params, code, fragment",
    [
        ("[1, 2]", 400, "JSON object"),
        ("{oops", 400, "not valid JSON"),
        ('{"foreground": [[1e400, 1, 1]]}', 400, "integer voxel indices"),
        ('{"foreground": [[' + "1" + "0" * 400 + ", 1, 1]]}", 400, "outside the image"),
        (json.dumps({"foreground": [[1, 1, 1]] * 21}), 413, "max_clicks"),
        (json.dumps({"foreground": [[1, 1, 1]], "pad": "x" * 70_000}), 413, "max_params_kb"),
        (json.dumps({"foreground": [[1, 1, 1]], "image": "/etc/passwd"}), 400, "'image'"),
        (json.dumps({"foreground": [[1, 1, 1]], "save_label": "yes"}), 400, "save_label"),
    ],
)
def test_bad_params_are_4xx_with_the_reason(server: dict, params: str, code: int, fragment: str) -> None:
    bad = _infer(server, params)
    assert bad.status_code == code, bad.text
    assert fragment in bad.json()["detail"]


def test_unknown_model_and_missing_image_name_the_culprit(server: dict) -> None:
    bad = _infer(server, {"foreground": [server["click"]]}, model="nosuch")
    assert bad.status_code == 404 and "nosuch" in bad.json()["detail"]
    bad = _infer_image(server, "case_99999", {"foreground": [[1, 1, 1]]})
    assert bad.status_code == 404 and "case_99999" in bad.json()["detail"]


def test_info_answers_while_an_inference_runs(server: dict) -> None:
    """Three simultaneous first clicks on a 320x320x240 study: /info/ answers before any of them finishes, and with
    max_pending_infers=2 exactly one of the three gets 429 (no sleeps, so a fast machine cannot make it pass vacuously).
    """
    import httpx

    calls: dict[str, tuple[float, float, object]] = {}

    def timed(name: str) -> None:
        start = time.monotonic()
        response = _infer_image(server, "big_case", {"foreground": [[150, 150, 120]]})
        calls[name] = (start, time.monotonic(), response)

    workers = [threading.Thread(target=timed, args=(name,)) for name in ("first", "second", "third")]
    for worker in workers:
        worker.start()
    info_start = time.monotonic()
    info = httpx.get(f"{server['base']}/info/", timeout=REQUEST_TIMEOUT_S)
    info_end = time.monotonic()
    for worker in workers:
        worker.join(REQUEST_TIMEOUT_S)
    assert info.status_code == 200
    assert len(calls) == 3, "an inference request did not return"
    codes = sorted(response.status_code for _, _, response in calls.values())
    served = [(end - start, response) for start, end, response in calls.values() if response.status_code == 200]
    slowest = max(seconds for seconds, _ in served)
    assert codes == [200, 200, 429], f"status codes {codes} (slowest inference {slowest:.2f}s)"
    refused = next(response for _, _, response in calls.values() if response.status_code == 429)
    assert "max_pending_infers" in refused.json()["detail"], refused.text
    first_done = min(end for _, end, response in calls.values() if response.status_code == 200)
    assert info_end < first_done, f"/info/ returned only after an inference finished ({info_end - info_start:.2f}s)"
    assert info_end - info_start < 1.0, f"/info/ took {info_end - info_start:.2f}s while an inference ran"


def _app_lib():
    """The app's ``lib`` package, importable as the server imports it."""
    if str(REPO / "monailabel_app") not in sys.path:
        sys.path.insert(0, str(REPO / "monailabel_app"))
    import lib.bundle_train
    import lib.guard

    return lib


def test_weights_are_replaced_only_if_not_worse_and_the_previous_ones_restore(tmp_path: Path) -> None:
    from fastapi import HTTPException

    train = _app_lib().bundle_train
    assert train.should_replace(None, 0.1) and train.should_replace(0.5, 0.5) and train.should_replace(0.5, 0.6)
    assert not train.should_replace(0.5, 0.4) and not train.should_replace(0.5, float("nan"))
    assert train.should_replace(float("nan"), 0.1)
    served, candidate = tmp_path / "model.pt", tmp_path / "candidate.pt"
    served.write_bytes(b"old")
    candidate.write_bytes(b"new")
    backup = train.promote(candidate, served)
    assert (served.read_bytes(), backup.read_bytes(), backup.name) == (b"new", b"old", "model.pt.prev")
    train.restore_previous(served)
    assert (served.read_bytes(), backup.read_bytes()) == (b"old", b"new")
    train.restore_previous(served)  # restoring twice undoes the restore
    assert (served.read_bytes(), backup.read_bytes()) == (b"new", b"old")
    backup.unlink()
    with pytest.raises(HTTPException, match="no previous weights"):
        train.restore_previous(served)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidate.pt", "model.pt"]  # no temporary files left


def test_limits_and_names() -> None:
    from fastapi import HTTPException

    guard = _app_lib().guard
    assert guard.Limits.from_conf({"max_voxels": "1000", "models": "all"}).max_voxels == 1000
    for bad in ({"max_clicks": "many"}, {"max_learning_rate": "-1"}, {"max_upload_mb": "nan"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            guard.Limits.from_conf(bad)
    for good in ("case_00000", "1.2.840.113619.2", "BraTS2021_00000_t1"):
        assert guard.check_name(good, "image id") == good
    for bad in ("", "..", "a/b", "a\\b", "/etc/passwd", ".lock", "x" * 200, "a\x00b", 7, None):
        with pytest.raises(HTTPException) as err:
            guard.check_name(bad, "image id")
        assert err.value.status_code == 400 and "image id" in err.value.detail


def test_paths_stay_inside_the_studies_also_through_links(tmp_path: Path) -> None:
    from fastapi import HTTPException

    guard = _app_lib().guard
    studies, outside = tmp_path / "studies", tmp_path / "outside.nii.gz"
    studies.mkdir()
    outside.write_bytes(b"x")
    (studies / "linked.nii.gz").symlink_to(outside)
    assert guard.inside(studies, "case.nii.gz", "image") == str(studies / "case.nii.gz")
    for name in ("linked.nii.gz", "../outside.nii.gz", str(outside)):
        with pytest.raises(HTTPException, match="outside the studies folder"):
            guard.inside(studies, name, "image")
    dest = studies / "linked.nii.gz"
    guard.atomic_copy(studies / "../outside.nii.gz", dest)  # replaces the link itself, never writes through it
    assert not dest.is_symlink() and outside.read_bytes() == b"x" and sorted(os.listdir(studies)) == ["linked.nii.gz"]


def test_cached_image_stage_reproduces_the_full_preprocessing(tmp_path: Path) -> None:
    """The app's per-file cache of the image-only preprocessing gives the same model input, clicks and inversion."""
    import copy

    import torch
    from monai.transforms import Compose

    sys.path.insert(0, str(REPO / "monailabel_app"))
    from lib.bundle_infer import task_overrides, task_parser

    studies, _, click = _make_inputs(tmp_path)
    bundle = REPO / "bundles" / "msam_kits19"
    parser = task_parser([str(bundle / "configs" / "inference.yaml"), str(SMALL)], task_overrides(bundle, "model.pt"))
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    image_stage = Compose(parser.get_parsed_content("preprocessing_image"))
    click_stage = Compose(parser.get_parsed_content("preprocessing_clicks"))
    assert list(pre.transforms) == [*image_stage.transforms, *click_stage.transforms]  # the bundle's own instances
    assert post.transforms[0] is parser.get_parsed_content("paste_window") and post.transforms[0].box_only
    assert len(post.transforms) == 1 + len(parser.get_parsed_content("postprocessing_threshold"))  # no saver
    image = str(studies / "case_00000.nii.gz")
    cached = image_stage({"image": image})
    for fg, bg in (([click], []), ([click], [[click[0] + 4, click[1], click[2]]])):  # the cache is reused, unchanged
        full = pre({"image": image, "foreground": fg, "background": bg})
        staged = click_stage({**copy.deepcopy(cached), "foreground": fg, "background": bg})
        assert torch.equal(staged["image"].as_tensor(), full["image"].as_tensor())
        for key in ("foreground", "background"):
            assert torch.equal(torch.as_tensor(staged[key]), torch.as_tensor(full[key]))
        assert [op["class"] for op in staged["image"].applied_operations] == [
            op["class"] for op in full["image"].applied_operations
        ]
        inverted = [post({**d, "pred": d["image"][:1].clone()})["pred"] for d in (full, staged)]
        assert inverted[0].shape[1:] == inverted[1].shape[1:] == nib_shape(image)
        assert torch.equal(inverted[0].as_tensor(), inverted[1].as_tensor())


def _spy_failure_report(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Record every call of the bundles' ``install_failure_report`` (as the configs call it), installing nothing."""
    import msam_components.failure_report

    calls: list[None] = []
    monkeypatch.setattr(msam_components.failure_report, "install_failure_report", lambda: calls.append(None))
    return calls


def test_the_server_never_installs_the_failure_report_excepthook(tmp_path: Path, monkeypatch) -> None:
    """The bundles' initialize under the app's overrides never calls install_failure_report (the command line's
    process-ending sys.excepthook), in training and in inference; without the overrides it does (the spy works)."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    lib = _app_lib()
    from lib.bundle_infer import task_overrides, task_parser

    calls = _spy_failure_report(monkeypatch)
    hook = sys.excepthook
    bundle = REPO / "bundles" / "msam_kits19"
    train_files = [str(bundle / "configs" / "train.yaml"), str(SMALL)]
    override = {"bundle_root": str(bundle), "output_dir": str(tmp_path), "dataset_dir": str(tmp_path)}
    plain = ConfigWorkflow(config_file=train_files, workflow_type="train", run_id="training", **override)
    plain.initialize()
    assert len(calls) == 1  # the bundle as users run it installs the failure report
    lib.bundle_train.train_workflow(train_files, override).initialize()
    assert len(calls) == 1 and sys.excepthook is hook
    infer_files = [str(bundle / "configs" / "inference.yaml"), str(SMALL)]
    plain_infer = ConfigParser()
    plain_infer.read_config(infer_files)
    plain_infer.get_parsed_content("install_failure_report")
    assert len(calls) == 2
    parser = task_parser(infer_files, task_overrides(bundle, tmp_path / "model.pt"))
    assert parser.get_parsed_content("install_failure_report") is None
    parser.get_parsed_content("postprocessing")  # what the task builds
    assert len(calls) == 2 and sys.excepthook is hook


def nib_shape(path: str) -> tuple[int, ...]:
    """Spatial shape of a NIfTI file as stored."""
    import nibabel as nib

    return tuple(nib.load(path).shape[:3])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def _infer_with_label(server: dict, params: dict, label: bytes | None, name: str = "current.nii.gz"):
    """POST /infer/msam_kits19 on case_00000 with an optional label upload (the "edit the current label" flow)."""
    import httpx

    files = {"label": (name, label, "application/octet-stream")} if label is not None else None
    return httpx.post(
        f"{server['base']}/infer/msam_kits19",
        params={"image": "case_00000", "output": "json"},
        data={"params": json.dumps(params)},
        files=files,
        timeout=REQUEST_TIMEOUT_S,
    )


def test_edit_flow_starts_from_the_uploaded_label(server: dict, tmp_path: Path) -> None:
    """A label sent with the request (lesion = 1, on the image's grid) is the starting mask the clicks correct; a label
    on another grid is refused naming the fault; nothing is left in the server's temporary folder."""
    import nibabel as nib

    current = server["studies"] / "labels" / "final" / "case_00000.nii.gz"
    clicks = {"foreground": [server["click"]]}
    edited = _infer_with_label(server, clicks, current.read_bytes())
    assert edited.status_code == 200, edited.text
    window_voxels = edited.json()["initial_mask_voxels"]
    assert window_voxels > 0
    plain = _infer_with_label(server, clicks, None)
    assert plain.status_code == 200 and plain.json()["initial_mask_voxels"] is None
    seg = nib.load(str(current))
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), str(empty))
    assert _infer_with_label(server, clicks, empty.read_bytes()).json()["initial_mask_voxels"] == 0
    shifted = tmp_path / "shifted.nii.gz"
    affine = seg.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), affine), str(shifted))
    bad = _infer_with_label(server, clicks, shifted.read_bytes())
    assert bad.status_code == 400 and "uploaded label" in bad.json()["detail"] and "grid" in bad.json()["detail"]
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:-4], seg.affine), str(cropped))
    bad = _infer_with_label(server, clicks, cropped.read_bytes())
    assert bad.status_code == 400 and "shape" in bad.json()["detail"], bad.text
    bad = _infer_with_label(server, clicks, b"not a volume", name="current.txt")
    assert 400 <= bad.status_code < 500, bad.text
    sneaky = _infer_with_label(server, {**clicks, "initial_mask": str(current)}, None)
    assert sneaky.status_code == 400 and "initial_mask" in sneaky.json()["detail"]
    assert _leftovers(server) == []


def test_clicks_on_lesions_far_apart_get_one_window_each(server: dict) -> None:
    """Two foreground clicks 250 voxels apart (the test model's window is 96 mm): served, in the image's geometry."""
    import nibabel as nib

    far = _infer_image(server, "big_case", {"foreground": [[110, 110, 90], [190, 190, 150]]})
    assert far.status_code == 200, far.text
    assert far.json()["decode_steps"] == 2  # one click in each of the two windows
    outside = _infer_image(server, "big_case", {"foreground": [[110, 110, 90], [400, 190, 150]]})
    assert outside.status_code == 400 and "outside the image" in outside.json()["detail"]
    assert nib.load(str(server["studies"] / "big_case.nii")).shape == BIG_SHAPE


# ---- second hardening round: stock endpoints, links, weights, training, rate limit (README's start command) ----


def _tar_gz(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar.gz whose members are (name, bytes) files or (name, "->target") symbolic links."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_session_uploads_are_refused_before_reading_and_write_nothing(server: dict) -> None:
    """Sessions are off: a tar with ../, absolute and link members, or one over the upload cap, writes nothing."""
    import httpx

    base, outside = server["base"], server["root"] / "outside"
    absolute = Path("/tmp") / f"msam_session_probe_{os.getpid()}"
    payloads = {
        "traversal": _tar_gz([("../../../outside/x", b"x")]),
        "absolute": _tar_gz([(str(absolute), b"x")]),
        "link": _tar_gz([("link", f"->{outside}"), ("link/y", b"y")]),
        "over_cap": b"\0" * (3 * 2**20),  # the cap is 2 MB
    }
    for name, payload in payloads.items():
        resp = httpx.put(
            f"{base}/session/",
            params={"uncompress": True},
            files={"files": (f"{name}.tar.gz", payload, "application/gzip")},
            timeout=REQUEST_TIMEOUT_S,
        )
        assert resp.status_code == 403 and "sessions are disabled" in resp.json()["detail"], (name, resp.text)
    for method in ("GET", "DELETE"):
        resp = httpx.request(method, f"{base}/session/anything", timeout=REQUEST_TIMEOUT_S)
        assert resp.status_code == 403 and "sessions are disabled" in resp.json()["detail"], resp.text
    assert sorted(p.name for p in outside.iterdir()) == ["secret.nii.gz", "secret_label.nii.gz"]
    assert not absolute.exists() and _outside_files(server) == [] and _leftovers(server) == []


def test_links_out_of_the_studies_are_never_read(server: dict) -> None:
    """A study or label that links outside the studies folder is not listed, served, zipped, described or inferred."""
    import io
    import zipfile

    import httpx

    base = server["base"]
    listing = httpx.get(f"{base}/datastore/", params={"output": "all"}, timeout=REQUEST_TIMEOUT_S)
    assert listing.status_code == 200 and "linked_case" not in listing.text and "secret" not in listing.text
    probes = [
        ("GET", "/datastore/image", {"image": "linked_case"}),
        ("HEAD", "/datastore/image", {"image": "linked_case"}),
        ("GET", "/datastore/image/info", {"image": "linked_case"}),
        ("GET", "/datastore/label", {"label": "linked_case", "tag": "final"}),
        ("GET", "/datastore/label", {"label": "case_00003", "tag": "final"}),
        ("HEAD", "/datastore/label", {"image": "case_00003", "tag": "final"}),
    ]
    for method, path, params in probes:
        resp = httpx.request(method, f"{base}{path}", params=params, timeout=REQUEST_TIMEOUT_S)
        assert resp.status_code == 404, (method, path, params, resp.status_code)
    assert _infer_image(server, "linked_case", {"foreground": [[1, 1, 1]]}).status_code == 404
    archive = httpx.get(f"{base}/datastore/dataset", timeout=REQUEST_TIMEOUT_S)
    assert archive.status_code == 200, archive.text
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("label/")) == [
        "case_00000.nii.gz",
        "case_00001.nii.gz",
        "case_00002.nii.gz",
    ], names
    assert not any("linked_case" in n or "case_00003" in n for n in names)
    assert _leftovers(server) == []  # the archive is removed once sent


def test_served_weights_cannot_be_replaced_or_deleted_over_http(server: dict) -> None:
    import httpx

    base, before = server["base"], server["ckpt"].read_bytes()
    put = httpx.put(f"{base}/model/msam_kits19", files={"file": ("w.pt", os.urandom(4096))}, timeout=REQUEST_TIMEOUT_S)
    assert put.status_code == 403 and "POST /train/msam_kits19" in put.json()["detail"], put.text
    delete = httpx.delete(f"{base}/model/msam_kits19", timeout=REQUEST_TIMEOUT_S)
    assert delete.status_code == 403, delete.text
    unknown = httpx.put(f"{base}/model/nosuch", files={"file": ("w.pt", b"x")}, timeout=REQUEST_TIMEOUT_S)
    assert unknown.status_code == 404 and "nosuch" in unknown.json()["detail"], unknown.text
    assert server["ckpt"].read_bytes() == before
    assert _infer(server, {"foreground": [server["click"]]}).status_code == 200
    assert _leftovers(server) == []


def test_wsi_endpoints_answer_the_same_for_any_path(server: dict) -> None:
    import httpx

    existing, missing = str(server["image"]), str(server["image"].with_name("missing.nii.gz"))
    answers = set()
    for path in ("/infer/wsi/msam_kits19", "/infer/wsi_v2/msam_kits19"):
        for image in (existing, missing, "case_00000"):
            resp = httpx.post(f"{server['base']}{path}", params={"image": image}, timeout=REQUEST_TIMEOUT_S)
            answers.add((resp.status_code, resp.json()["detail"]))
    assert len(answers) == 1 and next(iter(answers))[0] == 404, answers


@pytest.mark.parametrize(
    "method, path, params, form, code, fragment",
    [
        ("DELETE", "/datastore/image", {"id": "nosuch"}, None, 404, "nosuch"),
        ("DELETE", "/datastore/image", {"id": "../case_00000"}, None, 400, "image id"),
        ("PUT", "/datastore/image/info", {"image": "nosuch"}, {"info": "{}"}, 404, "nosuch"),
        ("PUT", "/datastore/image/info", {"image": "case_00000"}, {"info": "{oops"}, 400, "info"),
        ("PUT", "/datastore/image/info", {"image": "case_00000"}, {"info": "[1]"}, 400, "info"),
        ("PUT", "/datastore/label/info", {"label": "nosuch", "tag": "final"}, {"info": "{}"}, 404, "nosuch"),
        ("PUT", "/datastore/label/info", {"label": "case_00000", "tag": "../x"}, {"info": "{}"}, 400, "label tag"),
        ("PUT", "/datastore/updatelabelinfo", {"label": "nosuch", "tag": "final"}, {"params": "{}"}, 404, "nosuch"),
        ("PUT", "/datastore/updatelabelinfo", {"label": "case_00000", "tag": "final"}, {"params": "7"}, 400, "info"),
        ("POST", "/batch/infer/msam_kits19", {}, None, 400, "clicks"),
        ("POST", "/batch/infer/msam_kits19", {"run_sync": True}, None, 400, "clicks"),
        ("POST", "/batch/infer/nosuch", {}, None, 404, "nosuch"),
        ("POST", "/scoring/dice", {}, None, 404, "dice"),
        ("POST", "/scoring/", {}, None, 404, "scoring method"),
        ("POST", "/activelearning/nosuch", {}, None, 404, "nosuch"),
    ],
)
def test_stock_endpoints_answer_4xx_naming_the_fault(
    server: dict, method: str, path: str, params: dict, form: dict | None, code: int, fragment: str
) -> None:
    import httpx

    resp = httpx.request(method, f"{server['base']}{path}", params=params, data=form, timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == code, resp.text
    assert fragment in resp.json()["detail"], resp.text


def test_checked_stock_endpoints_still_work(server: dict) -> None:
    """Info updates and active learning do their job through the checked handlers."""
    import httpx

    base = server["base"]
    put = httpx.put(
        f"{base}/datastore/image/info", params={"image": "case_00001"}, data={"info": '{"note": "x"}'}, timeout=30
    )
    assert put.status_code == 200, put.text
    info = httpx.get(f"{base}/datastore/image/info", params={"image": "case_00001"}, timeout=30).json()
    assert info["note"] == "x" and info["path"].startswith(str(server["studies"].resolve()))
    nxt = httpx.post(f"{base}/activelearning/random", json={}, timeout=30)
    assert nxt.status_code == 200, nxt.text
    assert nxt.json() == {} or nxt.json()["id"] in {p.name.split(".")[0] for p in server["studies"].glob("*.nii*")}


def test_a_label_on_another_grid_is_refused_naming_both(server: dict, tmp_path: Path) -> None:
    import nibabel as nib

    image = nib.load(str(server["image"]))
    shifted = image.affine.copy()
    shifted[:3, 3] += 5.0
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), shifted), str(path))
    bad = _put_label(server, "case_00000", "final", path.read_bytes())
    assert bad.status_code == 400, bad.text
    assert "not on its image's grid" in bad.json()["detail"] and "image affine" in bad.json()["detail"]
    assert _leftovers(server) == []


def test_post_train_trains_only_the_named_models_and_checks_first(server: dict) -> None:
    import httpx

    def train_named(body: object, run_sync: bool = True):
        return httpx.post(
            f"{server['base']}/train/",
            params={"run_sync": run_sync},
            content=json.dumps(body),
            headers={"content-type": "application/json"},
            timeout=REQUEST_TIMEOUT_S * 3,
        )

    brats = REPO / "bundles" / "msam_brats21" / "models" / "model.pt"
    brats_before = brats.stat().st_mtime_ns if brats.exists() else None
    for body, code, fragment in (
        ({}, 400, "name the models"),
        ({"nosuch": {}}, 404, "nosuch"),
        ({"msam_kits19": {"max_epochs": 1}, "nosuch": {}}, 404, "nosuch"),
        ({"msam_kits19": {"max_epochs": 99}}, 400, "max_epochs"),
        ({"msam_kits19": 3}, 400, "JSON object"),
    ):
        before = server["ckpt"].read_bytes()
        bad = train_named(body)
        assert bad.status_code == code and fragment in bad.json()["detail"], (body, bad.text)
        assert server["ckpt"].read_bytes() == before
    good = train_named({"msam_kits19": {"max_epochs": 1}})
    assert good.status_code == 200, good.text
    assert list(good.json()) == ["msam_kits19"]
    assert good.json()["msam_kits19"]["result"]["train_cases"] == 2  # the pairs that link outside are left out
    assert (brats.stat().st_mtime_ns if brats.exists() else None) == brats_before
    assert _leftovers(server) == []  # the training work folder is removed


def test_concurrent_trainings_of_one_model_are_serialised(server: dict) -> None:
    results: list = []

    def run() -> None:
        results.append(_train(server, {"max_epochs": 1}))

    workers = [threading.Thread(target=run) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(REQUEST_TIMEOUT_S * 3)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409], [r.text for r in results]
    assert "already running" in next(r for r in results if r.status_code == 409).json()["detail"]
    assert _leftovers(server) == []


def test_a_busy_server_refuses_before_reading_the_upload(server: dict, tmp_path: Path) -> None:
    """With both inference slots taken by slow first clicks, a truncated upload gets 429 (not 400): the limit is
    checked before the body is read or decoded."""
    import httpx

    payload = _write_volume(tmp_path / "t.nii.gz", (48, 40, 32)).read_bytes()
    truncated = payload[: len(payload) // 2]
    ends: list[float] = []

    def slow() -> None:
        _infer_image(server, "big_case_2", {"foreground": [[150, 150, 120]]})
        ends.append(time.monotonic())

    workers = [threading.Thread(target=slow) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    answers: list[tuple[float, int]] = []
    while not ends:
        resp = httpx.post(
            f"{server['base']}/infer/msam_kits19",
            data={"params": json.dumps({"foreground": [[1, 1, 1]]})},
            files={"file": ("t.nii.gz", truncated, "application/octet-stream")},
            timeout=REQUEST_TIMEOUT_S,
        )
        answers.append((time.monotonic(), resp.status_code))
        time.sleep(0.1)
    for worker in workers:
        worker.join(REQUEST_TIMEOUT_S)
    while_busy = [code for at, code in answers if at < min(ends)]
    assert while_busy and set(while_busy) == {429}, answers
    assert _leftovers(server) == []


def test_background_click_outside_the_window_is_4xx_naming_it(server: dict) -> None:
    bad = _infer_image(server, "big_case", {"foreground": [[150, 150, 120]], "background": [[2, 2, 2]]})
    assert bad.status_code == 400, bad.text
    assert "[[2, 2, 2]]" in bad.json()["detail"] and "background" in bad.json()["detail"]
