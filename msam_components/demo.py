"""End-to-end CPU demo through the real KiTS19 bundle: synthetic data, training, 10-click evaluation, inference.

Run with ``make demo`` (or ``python -m msam_components.demo``). Every step is a plain ``python -m monai.bundle run``
command, printed before it runs, so the demo doubles as a how-to.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "msam_kits19"
TUMOUR_LABEL = 2


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{BUNDLE / 'configs' / n}'" for n in names) + "]"


def _run(step: str, args: list[str]) -> None:
    """Run one bundle command, echoing it, streaming its log, and stopping the demo if it fails."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    print(f"\n=== {step} ===\n$ {shlex.join(cmd)}\n", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo step '{step}' failed with exit code {result.returncode}")
    print(f"--- {step} finished in {time.time() - start:.0f} s", flush=True)


def tumour_click(segmentation: Path) -> list[int]:
    """A foreground click on disk: the tumour voxel closest to the tumour's centroid (what a user would click)."""
    seg = np.asarray(nib.load(str(segmentation)).dataobj)
    voxels = np.argwhere(seg == TUMOUR_LABEL)
    centre = voxels.mean(axis=0)
    return [int(v) for v in voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "demo_output", help="where everything is written")
    parser.add_argument("--num-cases", type=int, default=30, help="synthetic KiTS19-layout cases to generate")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's number of training epochs")
    args = parser.parse_args(argv)
    from msam_components.data.synthetic import make_kits19_like

    out = args.output.resolve()
    data_dir, models_dir, eval_dir, infer_dir = out / "kits19", out / "models", out / "eval", out / "inference"
    total_start = time.time()
    print(f"=== generating {args.num_cases} synthetic cases in the official KiTS19 layout: {data_dir}", flush=True)
    make_kits19_like(data_dir, num_cases=args.num_cases, seed=0)
    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(data_dir), "--output_dir", str(eval_dir)]
    logging_conf = ["--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    epochs = ["--num_epochs", str(args.epochs), "--val_interval", str(args.epochs)] if args.epochs else []
    _run(
        "training (small demo model, from scratch)",
        ["training", "--config_file", _configs("train.yaml", "demo.yaml"), *common, "--ckpt_dir", str(models_dir)]
        + epochs
        + logging_conf,
    )
    ckpt = models_dir / "model.pt"
    _run(
        "evaluation with 10 simulated clicks",
        ["evaluating", "--config_file", _configs("train.yaml", "evaluate.yaml", "demo.yaml"), *common]
        + ["--ckpt_path", str(ckpt)]
        + logging_conf,
    )
    fold = json.loads((eval_dir / "fold.json").read_text())
    case = fold["validation"][0]
    image, seg = data_dir / case / "imaging.nii.gz", data_dir / case / "segmentation.nii.gz"
    click = tumour_click(seg)
    _run(
        f"interactive inference on {case} with one foreground click {click}",
        ["--config_file", _configs("inference.yaml", "demo.yaml"), "--bundle_root", str(BUNDLE)]
        + ["--image_path", str(image), "--foreground", json.dumps([click]), "--background", "[]"]
        + ["--ckpt_path", str(ckpt), "--output_dir", str(infer_dir)]
        + logging_conf,
    )
    rows = list(csv.DictReader((eval_dir / "click_metrics.csv").open()))
    summary = json.loads((eval_dir / "click_metrics_summary.json").read_text())
    last = summary["num_clicks"]
    print("\n=== results on the validation cases (simulated clicks) ===")
    print(f"{'case':<14}{'Dice@1':>8}{f'Dice@{last}':>9}")
    for row in rows:
        print(f"{row['case']:<14}{float(row['dice_click_1']):>8.3f}{float(row[f'dice_click_{last}']):>9.3f}")
    print(f"{'mean':<14}{summary['mean_dice_per_click'][0]:>8.3f}{summary['dice_last_click']:>9.3f}")
    mask_path = infer_dir / "imaging_seg.nii.gz"
    mask_img, gt_img = nib.load(str(mask_path)), nib.load(str(seg))
    mask = np.asarray(mask_img.dataobj) > 0
    gt = np.asarray(gt_img.dataobj) == TUMOUR_LABEL
    print(f"\ninference mask: {mask_path}")
    print(
        f"  shape {mask.shape} (input {gt.shape}), affine equal to input: {np.allclose(mask_img.affine, gt_img.affine)}"
    )
    print(f"  Dice vs the tumour label from one click: {dice(mask, gt):.3f}")
    print(f"\noutputs: checkpoint {ckpt}\n         per-click metrics, plot, metrics.json in {eval_dir}")
    print(f"demo finished in {time.time() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
