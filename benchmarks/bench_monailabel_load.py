"""Load on the MONAI Label server: many concurrent first clicks, status codes, latency and the server's peak memory.

Starts the server with the README's start command (``.venv-label/bin/monailabel start_server ...``, sessions as that
command leaves them) on 127.0.0.1 with the KiTS19 bundle and a random-weight checkpoint, then sends two waves:
``--same`` concurrent first clicks on one study, ``--different`` concurrent first clicks on as many studies, and
``--uploads`` concurrent first clicks on an uploaded NIfTI that is small on the wire and decodes to 64 MB.
Prints one markdown table per wave: status codes, p50/p95 latency of the answered (200) and of the refused (429)
requests, and the server's peak resident memory (``VmHWM``) over the wave. Run from the repository root after
``make label-venv``: ``.venv-label/bin/python benchmarks/bench_monailabel_load.py`` (``--small`` uses the tests' tiny
model, ``--max-pending-infers`` the server's slot count).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monailabel_latency import synthetic_ct  # noqa: E402

SMALL = REPO / "tests" / "configs" / "small_bundle.yaml"


def readme_start_command() -> list[str]:
    """The start command as the README shows it (one command over continued lines)."""
    lines = (REPO / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(".venv-label/bin/monailabel start_server"))
    text = ""
    for line in lines[first:]:
        text += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            break
    return shlex.split(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wave(base: str, pid: int, requests: list[tuple[str, list[int]]], upload: bytes | None = None) -> dict:
    """Send all requests at once (each with ``upload`` as its image file when given); status codes, latencies and the
    server's peak memory over the wave."""
    reset_peak(pid)
    results: list[tuple[int, float]] = []
    barrier = threading.Barrier(len(requests))

    def one(image: str, click: list[int]) -> None:
        barrier.wait()
        start = time.perf_counter()
        resp = httpx.post(
            f"{base}/infer/msam_kits19",
            params={"output": "json", **({} if upload else {"image": image})},
            data={"params": json.dumps({"foreground": [click], "background": []})},
            files={"file": ("upload.nii.gz", upload, "application/octet-stream")} if upload else None,
            timeout=600,
        )
        results.append((resp.status_code, time.perf_counter() - start))

    threads = [threading.Thread(target=one, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"codes": Counter(code for code, _ in results), "results": results, "peak_mb": peak_rss_mb(pid)}


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    p95 = float(np.percentile(values, 95))
    return f"{statistics.median(values):.2f} / {p95:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--same", type=int, default=20, help="concurrent first clicks on one study")
    parser.add_argument("--different", type=int, default=10, help="concurrent first clicks on different studies")
    parser.add_argument("--uploads", type=int, default=20, help="concurrent first clicks on a 64 MB (decoded) upload")
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 96))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    parser.add_argument("--small", action="store_true", help="the tests' tiny model instead of the full-size one")
    parser.add_argument("--max-pending-infers", type=int, default=4)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="msam_load_"))
    studies = root / "studies"
    studies.mkdir()
    clicks = {}
    for i in range(max(args.different, 1)):
        clicks[f"ct_{i:02d}"] = synthetic_ct(studies / f"ct_{i:02d}.nii.gz", args.shape, args.spacing, seed=i)
    configs = [str(REPO / "bundles/msam_kits19/configs/inference.yaml")] + ([str(SMALL)] if args.small else [])
    config = ConfigParser()
    config.read_config(configs)
    torch.manual_seed(0)
    torch.save(config.get_parsed_content("network_def").state_dict(), root / "model.pt")

    port = free_port()
    values = {"/data/images": str(studies), "8000": str(port), "/weights/msam_kits19.pt": str(root / "model.pt")}
    cmd = [values.get(a, a) for a in readme_start_command()]
    cmd += ["--conf", "max_pending_infers", str(args.max_pending_infers), "--conf", "device", "cpu"]
    if args.small:
        cmd += ["--conf", "overlay", str(SMALL)]
    env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "TMPDIR": str(root)}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/info/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            raise SystemExit(f"server not up; see {root / 'server.log'}")
        idle_mb = peak_rss_mb(proc.pid)
        waves = {
            f"{args.same} first clicks on one study": [("ct_00", clicks["ct_00"])] * args.same,
            f"{args.different} first clicks on {args.different} studies": list(clicks.items())[: args.different],
        }
        print(
            f"server {'tiny' if args.small else 'full-size'} model, max_pending_infers {args.max_pending_infers}, "
            f"CT {list(args.shape)} of {list(args.spacing)} mm, {torch.get_num_threads()} threads here; "
            f"server RSS after start {idle_mb:.0f} MiB\n"
        )
        print("| wave | status codes | 200: p50 / p95 (s) | 429: p50 / p95 (s) | server peak RSS (MiB) |")
        print("|---|---|---|---|---|")
        big = root / "upload.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.int32), np.eye(4)), str(big))  # 64 MB as int32
        uploads = {f"{args.uploads} first clicks on a 64 MB upload ({big.stat().st_size // 1024} KB sent)": big}
        waves.update({name: [("", [128, 128, 128])] * args.uploads for name in uploads})
        for name, requests in waves.items():
            out = wave(base, proc.pid, requests, uploads[name].read_bytes() if name in uploads else None)
            ok = [t for c, t in out["results"] if c == 200]
            busy = [t for c, t in out["results"] if c == 429]
            codes = ", ".join(f"{n} x {c}" for c, n in sorted(out["codes"].items()))
            print(f"| {name} | {codes} | {quantiles(ok)} | {quantiles(busy)} | {out['peak_mb']:.0f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
