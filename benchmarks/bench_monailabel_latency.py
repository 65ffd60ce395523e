"""Click latency of the MONAI Label app (full-size KiTS19 bundle, random weights) on synthetic CTs, in-process.

Run from the repository root with the app's venv: ``OMP_NUM_THREADS=2 .venv-label/bin/python
benchmarks/bench_monailabel_latency.py`` (a 160x160x96 CT), or ``... --shape 512 512 134 --spacing 0.75 0.75 2.5``
for a real-size CT. Each of ``--studies`` images gets one session of clicks; the table gives the median (min-max) wall
time per request kind over the sessions: first click on an image (preprocessing and encoder; the first session also
loads the model, reported on its own row), repeated and added clicks (cached image and embedding), with the task's
own split: model load, preprocessing, model (encoder and decoder), postprocessing (mapping back, thresholding) and the
NIfTI write.
``--full-inversion`` maps the mask back with the plain whole-volume ``Invertd`` instead of the window's bounding box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

# no datastore file watcher: it would outlive the temporary study folder and print a traceback at exit
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.utils.app import app_instance

REPO = Path(__file__).resolve().parents[1]
LATER_CLICKS = 10  # clicks per session after the first
PHASES = ("model_load", "preprocess", "model", "postprocess", "save")  # the task's own timings (params["latency"])


def synthetic_ct(path: Path, shape: Sequence[int], spacing: Sequence[float], seed: int) -> list[int]:
    """Write a CT-like NIfTI (air, a body ellipse of soft tissue, a kidney with a tumour, noise); return a tumour voxel."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n, dtype=np.float32) - n / 2) * s for n, s in zip(shape, spacing)]  # mm from the centre
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    extent = [n * s / 2 for n, s in zip(shape, spacing)]
    image = np.full(tuple(shape), -1000, dtype=np.int16)
    image[np.broadcast_to((x / (0.8 * extent[0])) ** 2 + (y / (0.6 * extent[1])) ** 2 <= 1, image.shape)] = 40
    kidney = [0.3 * extent[0], 0.1 * extent[1], 0.0]
    image[((x - kidney[0]) / 30) ** 2 + ((y - kidney[1]) / 25) ** 2 + ((z - kidney[2]) / 50) ** 2 <= 1] = 180
    tumour = [kidney[0] + 15, kidney[1], kidney[2] + 10]
    image[(x - tumour[0]) ** 2 + (y - tumour[1]) ** 2 + (z - tumour[2]) ** 2 <= 15**2] = 90
    image += rng.integers(-20, 21, size=image.shape, dtype=np.int16)
    affine = np.diag([*map(float, spacing), 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return [int(round(t / s + n / 2)) for t, s, n in zip(tumour, spacing, shape)]


def session(c: list[int]) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    """One annotator session on a tumour voxel ``c``: the first click, then repeated and added clicks."""
    requests = [
        ("first click", [c], []),
        ("same clicks again", [c], []),
        ("added background click", [c], [[c[0] + 6, c[1], c[2]]]),
        ("added foreground click", [c, [c[0], c[1] + 3, c[2]]], [[c[0] + 6, c[1], c[2]]]),
    ]
    for n in range(4, LATER_CLICKS + 1):  # background clicks appended one by one, up to 10 clicks
        fg, bg = requests[-1][1], requests[-1][2]
        requests.append(("later click (4 to 10)", fg, [*bg, [c[0] + 6 + n, c[1] - n, c[2]]]))
    return requests


def cell(values: list[float]) -> str:
    """Median and range of a list of seconds."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: Sequence[str] | None = None) -> None:
    """Build studies and a random full-size checkpoint, then time a click session on each study."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 96), help="CT voxels (default 160 160 96)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), help="voxel size in mm")
    parser.add_argument("--studies", type=int, default=3, help="images, one click session each (default 3)")
    parser.add_argument("--full-inversion", action="store_true", help="the plain whole-volume Invertd (reference)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="msam_label_bench_"))
    try:
        (work / "studies").mkdir()
        clicks = [
            synthetic_ct(work / "studies" / f"case_{i:05d}.nii.gz", args.shape, args.spacing, i)
            for i in range(args.studies)
        ]
        config = ConfigParser()
        config.read_config([str(REPO / "bundles/msam_kits19/configs/inference.yaml")])
        torch.manual_seed(0)
        torch.save(config.get_parsed_content("network_def").state_dict(), work / "model.pt")
        conf = {"msam_kits19_ckpt": str(work / "model.pt"), "device": "cpu", "models": "msam_kits19"}
        if args.full_inversion:
            (work / "full_inversion.yaml").write_text("postprocessing#transforms#0#full_inversion: true\n")
            conf["overlay"] = str(work / "full_inversion.yaml")
        sys.path.insert(0, str(REPO / "monailabel_app"))
        app = app_instance(str(REPO / "monailabel_app"), str(work / "studies"), conf)
        walls: dict[str, list[float]] = defaultdict(list)
        phases: dict[str, list[dict[str, float]]] = defaultdict(list)
        flags: dict[str, tuple] = {}
        for i, c in enumerate(clicks):
            for name, fg, bg in session(c):
                request = {"model": "msam_kits19", "image": f"case_{i:05d}", "foreground": fg, "background": bg}
                start = time.perf_counter()
                params = app.infer(request)["params"]
                wall = time.perf_counter() - start
                if i == 0 and name == "first click":
                    name = "first request (model load + first click)"
                walls[name].append(wall)
                phases[name].append(params["latency"])
                flags[name] = (params["encoder_ran"], params["image_cached"], params["decode_steps"])
        inversion = "full Invertd" if args.full_inversion else "window bbox"
        shape = "x".join(map(str, args.shape))
        print(
            f"CT {shape} at {'x'.join(map(str, args.spacing))} mm, {args.studies} studies, "
            f"threads {torch.get_num_threads()}, inversion: {inversion}"
        )
        print(
            f"| request | wall (s), median (min-max) | n | {' / '.join(PHASES)} (s, medians) | encoder, cached, decodes |"
        )
        print("|---|---|---|---|---|")
        for name, values in walls.items():
            split = " / ".join(f"{statistics.median(p.get(k, 0.0) for p in phases[name]):.2f}" for k in PHASES)
            print(f"| {name} | {cell(values)} | {len(values)} | {split} | {', '.join(map(str, flags[name]))} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
