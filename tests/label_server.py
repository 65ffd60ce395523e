"""The MONAI Label app's server as the tests start it: the README's start command exactly, a bare PATH (no venv on it),
the tiny test bundle, stopped by PID; and the "box" weights (the mask is the model window around the click) the
DICOMweb and browser tests serve."""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"
MODEL = "msam_kits19"
BARE_PATH = "/usr/bin:/bin"  # no venv on PATH: the README's start command must work without activating it
START_TIMEOUT_S = 180


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_start_command() -> list[str]:
    """The server start command exactly as the README's MONAI Label section shows it."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^(\.venv-label/bin/monailabel start_server .*?)(?<!\\)\n", text, re.M | re.S)
    assert match, "README has no `.venv-label/bin/monailabel start_server` command"
    return shlex.split(match.group(1).replace("\\\n", " "))


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
def label_server(
    root: Path,
    studies: str,
    ckpt: Path,
    extra_env: dict[str, str] | None = None,
    extra_conf: Sequence[str] = (),
    models: str | None = MODEL,
) -> Iterator[str]:
    """Run the server (``--studies`` at ``studies``, kits19 weights ``ckpt``, the tiny overlay, log
    ``root/server.log``) for the block and yield its base URL; ``models`` None serves what the README's command does.
    Fails the test, with the log's end, if the server exits or is not up in ``START_TIMEOUT_S``."""
    import httpx

    port = free_port()
    values = {"/data/images": studies, "8000": str(port), "/weights/msam_kits19.pt": str(ckpt)}
    cmd = [values.get(a, a) for a in readme_start_command()]
    assert studies in cmd and str(port) in cmd, f"README start command has no --studies/--port to set: {cmd}"
    cmd += ([] if models is None else ["--conf", "models", models]) + ["--conf", "overlay", str(SMALL)]
    cmd += ["--conf", "device", "cpu", *extra_conf]
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
