"""The MONAI Label app (monailabel_app/) served by a real ``monailabel start_server`` from ``.venv-label``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_BIN = REPO / ".venv-label" / "bin"
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120

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


def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server on 127.0.0.1 serving the repo's bundles with the tiny kits19 checkpoint; stopped afterwards."""
    import httpx

    root = tmp_path_factory.mktemp("label")
    studies, ckpt, click = _make_inputs(root)
    port = _free_port()
    cmd = [
        str(LABEL_BIN / "monailabel"),
        "start_server",
        "--app",
        str(REPO / "monailabel_app"),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "msam_kits19_ckpt",
        str(ckpt),
        "--conf",
        "overlay",
        str(SMALL),
        "--conf",
        "device",
        "cpu",
    ]
    env = {
        "PATH": f"{LABEL_BIN}:/usr/bin:/bin",
        "HOME": str(root),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_SESSIONS": "false",
        "OMP_NUM_THREADS": "2",
    }
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=str(root), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/info/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {START_TIMEOUT_S}s:\n{(root / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield {"base": base, "image": studies / "case_00000.nii.gz", "click": click, "root": root, "ckpt": ckpt}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


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


def test_train_from_monailabel_updates_the_served_weights(server: dict) -> None:
    """POST /train/<model> runs the bundle's train.yaml on the labelled studies; inference then uses the new weights."""
    import httpx

    before = server["ckpt"].stat().st_mtime_ns
    response = httpx.post(
        f"{server['base']}/train/msam_kits19",
        params={"run_sync": True},
        json={"max_epochs": 1},
        timeout=REQUEST_TIMEOUT_S * 3,
    )
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["epochs"] == 1 and stats["train_cases"] == 2 and stats["weights_written"]
    assert server["ckpt"].stat().st_mtime_ns != before, "training must write the served checkpoint"
    again = _infer(server, {"foreground": [server["click"]], "background": []})
    assert again.status_code == 200, again.text
    bad = httpx.post(f"{server['base']}/train/msam_kits19", params={"run_sync": True}, json={"max_epochs": 0})
    assert bad.status_code == 400 and "max_epochs" in bad.text


def test_cached_image_stage_reproduces_the_full_preprocessing(tmp_path: Path) -> None:
    """The app's per-file cache of the image-only preprocessing gives the same model input, clicks and inversion."""
    import copy

    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    sys.path.insert(0, str(REPO / "monailabel_app"))
    from lib.bundle_infer import split_preprocessing

    studies, _, click = _make_inputs(tmp_path)
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "msam_kits19" / "configs" / "inference.yaml"), str(SMALL)])
    pre = parser.get_parsed_content("preprocessing")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    image_stage, click_stage = split_preprocessing(pre)
    assert len(image_stage.transforms) > 0 and len(click_stage.transforms) == 2
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


def nib_shape(path: str) -> tuple[int, ...]:
    """Spatial shape of a NIfTI file as stored."""
    import nibabel as nib

    return tuple(nib.load(path).shape[:3])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
