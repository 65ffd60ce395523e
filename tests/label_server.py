"""The MONAI Label app's server as the tests start it against a DICOMweb store: the README's start command, a bare
PATH, the tiny test bundle with "box" weights (the mask is the model window around the click), stopped by PID."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dicomweb_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
MODEL = "msam_kits19"
BARE_PATH = "/usr/bin:/bin"
START_TIMEOUT_S = 180


def box_weights(path: Path) -> Path:
    """Weights of the tiny test network (``small_bundle.yaml``) whose mask decoder answers "tumour" everywhere.

    The served mask is then exactly the model's window, which the app centres on the first foreground click: where it
    lands says whether the client's click index and the app's voxel index agree. Only the last upscaling layer and the
    hypernetworks' last layers change, so the whole pipeline (encoder, prompt encoder, MEA, decoder, paste-back) runs.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / MODEL / "configs" / "inference.yaml"), str(SMALL)])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        net.mask_decoder.output_upscaling[-2].weight.zero_()
        net.mask_decoder.output_upscaling[-2].bias.fill_(1.0)
        for mlp in net.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
    torch.save(net.state_dict(), path)
    return path


def model_window() -> tuple[float, float]:
    """The test model's window edge and voxel size (mm), from the overlay's ``image_size`` and ``pixdim``."""
    import yaml

    conf = yaml.safe_load(SMALL.read_text())
    pixdim = float(np.max(np.atleast_1d(conf["pixdim"])))
    return float(conf["image_size"]) * pixdim, pixdim


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a process a test started, killing it if it does not stop in 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@contextlib.contextmanager
def label_server(root: Path, studies_url: str, ckpt: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Run the server (``--studies`` at ``studies_url``, weights ``ckpt``, log ``root/server.log``) for the block;
    yields its base URL. Fails the test, with the log's end, if it exits or is not up in ``START_TIMEOUT_S``."""
    import httpx
    from test_monailabel_app import readme_start_command

    port = free_port()
    values = {"/data/images": studies_url, "8000": str(port), "/weights/msam_kits19.pt": str(ckpt)}
    cmd = [values.get(a, a) for a in readme_start_command()]
    assert studies_url in cmd and str(port) in cmd, f"README start command has no --studies/--port to set: {cmd}"
    cmd += ["--conf", "models", MODEL, "--conf", "overlay", str(SMALL), "--conf", "device", "cpu"]
    (root / "tmp").mkdir(exist_ok=True)
    env = {
        "PATH": BARE_PATH,
        "HOME": str(root),
        "TMPDIR": str(root / "tmp"),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "OMP_NUM_THREADS": "2",
        **(extra_env or {}),
    }
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(f"{base}/info/", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server not up in {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield base
        finally:
            stop_process(proc)
