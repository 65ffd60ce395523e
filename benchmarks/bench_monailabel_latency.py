"""Click latency of the MONAI Label app (full-size KiTS19 bundle, random weights) on one synthetic CT, in-process.

Run from the repository root with the app's venv: ``OMP_NUM_THREADS=2 .venv-label/bin/python
benchmarks/bench_monailabel_latency.py``. Prints one table: first click (model load + encoder), repeated and added
clicks (cached image embedding).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# no datastore file watcher: it would outlive the temporary study folder and print a traceback at exit
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.utils.app import app_instance

from msam_components.data import make_kits19_like

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Build a study and a random full-size checkpoint, then time four successive requests on the same image."""
    work = Path(tempfile.mkdtemp(prefix="msam_label_bench_"))
    try:
        make_kits19_like(work / "raw", num_cases=1, shape=(160, 160, 96))
        (work / "studies").mkdir()
        shutil.copy(work / "raw/case_00000/imaging.nii.gz", work / "studies/case_00000.nii.gz")
        parser = ConfigParser()
        parser.read_config([str(REPO / "bundles/msam_kits19/configs/inference.yaml")])
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), work / "model.pt")
        sys.path.insert(0, str(REPO / "monailabel_app"))
        conf = {"msam_kits19_ckpt": str(work / "model.pt"), "device": "cpu", "models": "msam_kits19"}
        app = app_instance(str(REPO / "monailabel_app"), str(work / "studies"), conf)
        seg = np.asarray(nib.load(work / "raw/case_00000/segmentation.nii.gz").dataobj)
        c = [int(v) for v in np.argwhere(seg == 2).mean(0)]
        requests = (
            ("first click", [c], []),
            ("same clicks again", [c], []),
            ("added background click", [c], [[c[0] + 6, c[1], c[2]]]),
            ("added foreground click", [c, [c[0], c[1] + 3, c[2]]], [[c[0] + 6, c[1], c[2]]]),
        )
        for n in range(4, 11):  # a longer session: background clicks appended one by one, up to 10 clicks
            fg, bg = requests[-1][1], requests[-1][2]
            requests += ((f"click {n}: background added", fg, [*bg, [c[0] + 6 + n, c[1] - n, c[2]]]),)
        columns = ("request", "wall (s)", "encoder ran", "image cached", "decode steps")
        print(f"| {' | '.join(columns)} | (threads: {torch.get_num_threads()}) |")
        print("|---|---|---|---|---|---|")
        for name, fg, bg in requests:
            start = time.perf_counter()
            result = app.infer({"model": "msam_kits19", "image": "case_00000", "foreground": fg, "background": bg})
            wall = time.perf_counter() - start
            params = result["params"]
            cells = (name, f"{wall:.2f}", params["encoder_ran"], params["image_cached"], params["decode_steps"])
            print(f"| {' | '.join(map(str, cells))} | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
