"""End-to-end CPU demo through the real KiTS19 bundle: synthetic data, training, 10-click evaluation, inference.

Run with ``make demo`` (or ``python -m msam_components.demo``). Every step is a plain ``python -m monai.bundle run``
command, printed before it runs, so the demo doubles as a how-to.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

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


def lesion_clicks(segmentation: Path) -> list[list[int]]:
    """One foreground click per tumour on disk, at the voxel of each tumour closest to its centroid (what a user would
    click), largest tumour first."""
    seg = np.asarray(nib.load(str(segmentation)).dataobj) == TUMOUR_LABEL
    components, count = ndimage.label(seg)
    clicks = []
    for index in np.argsort(-np.bincount(components.reshape(-1))[1:]):
        voxels = np.argwhere(components == index + 1)
        centre = voxels.mean(axis=0)
        clicks.append([int(v) for v in voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]])
    return clicks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def print_click_report(title: str, summary: dict) -> None:
    """The interaction measures of one evaluation: the per-click Dice curve, NoC@80/85/90 and click compliance."""
    curve = summary["mean_dice_per_click"]
    print(f"\n--- {title}: {summary['num_cases_in_means']} cases")
    print("  click  " + "".join(f"{k:>7d}" for k in range(1, len(curve) + 1)))
    print("  Dice   " + "".join(f"{d:>7.3f}" for d in curve))
    print(
        f"  Dice@1 {summary['dice_first_click']:.3f}  Dice@{len(curve)} {summary['dice_last_click']:.3f}  "
        f"gain {summary['dice_gain_last_click']:+.3f}"
    )
    noc = "  ".join(
        f"NoC@{round(t * 100)} {summary[f'noc_at_{round(t * 100)}']:.2f} "
        f"({summary[f'noc_at_{round(t * 100)}_num_never_reached']} never)"
        for t in summary["noc_thresholds"]
    )
    print(f"  {noc}")
    if summary.get("compliance_available"):
        print(
            f"  compliance: positive clicks {summary['compliance_positive']:.2f} of {summary['num_positive_clicks']}, "
            f"negative clicks {summary['compliance_negative']:.2f} of {summary['num_negative_clicks']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "demo_output", help="where everything is written")
    parser.add_argument("--num-cases", type=int, default=30, help="synthetic KiTS19-layout cases to generate")
    parser.add_argument("--num-heldout", type=int, default=12, help="cases drawn with another seed, for evaluation")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's number of training epochs")
    args = parser.parse_args(argv)
    from msam_components.data.synthetic import make_kits19_like

    out = args.output.resolve()
    data_dir, heldout_dir, models_dir = out / "kits19", out / "kits19_heldout", out / "models"
    eval_dir, infer_dir = out / "eval", out / "inference"
    total_start = time.time()
    print(f"=== generating {args.num_cases} synthetic cases in the official KiTS19 layout: {data_dir}", flush=True)
    make_kits19_like(data_dir, num_cases=args.num_cases, seed=0)
    print(f"=== generating {args.num_heldout} held-out cases with another seed: {heldout_dir}", flush=True)
    make_kits19_like(heldout_dir, num_cases=args.num_heldout, seed=1)
    logging_conf = ["--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    epochs = ["--num_epochs", str(args.epochs), "--val_interval", str(args.epochs)] if args.epochs else []
    _run(
        "training (small demo model, from scratch)",
        ["training", "--config_file", _configs("train.yaml", "demo.yaml"), "--bundle_root", str(BUNDLE)]
        + ["--dataset_dir", str(data_dir), "--output_dir", str(eval_dir / "training"), "--ckpt_dir", str(models_dir)]
        + epochs
        + logging_conf,
    )
    ckpt = models_dir / "model.pt"
    for strategy in ("center", "random"):
        _run(
            f"evaluation on the held-out cases with 10 simulated '{strategy}' clicks",
            ["evaluating", "--config_file", _configs("train.yaml", "evaluate.yaml", "demo.yaml")]
            + ["--bundle_root", str(BUNDLE), "--dataset_dir", str(heldout_dir), "--eval_data", "$@datalist"]
            + ["--eval_click_strategy", strategy, "--output_dir", str(eval_dir / strategy), "--ckpt_path", str(ckpt)]
            + logging_conf,
        )
    case = sorted(p.name for p in heldout_dir.iterdir() if p.is_dir())[0]
    image, seg = heldout_dir / case / "imaging.nii.gz", heldout_dir / case / "segmentation.nii.gz"
    clicks = lesion_clicks(seg)
    _run(
        f"interactive inference on held-out {case}: one foreground click per tumour {clicks}",
        ["--config_file", _configs("inference.yaml", "demo.yaml"), "--bundle_root", str(BUNDLE)]
        + ["--image_path", str(image), "--foreground", json.dumps(clicks), "--background", "[]"]
        + ["--window_center", "foreground"]
        + ["--ckpt_path", str(ckpt), "--output_dir", str(infer_dir)]
        + logging_conf,
    )
    print("\n=== interaction measures on the held-out cases (simulated clicks) ===")
    for strategy in ("center", "random"):
        summary = json.loads((eval_dir / strategy / "click_metrics_summary.json").read_text())
        print_click_report(f"'{strategy}' clicks", summary)
    mask_path = infer_dir / f"{case}_seg.nii.gz"
    mask_img, gt_img = nib.load(str(mask_path)), nib.load(str(seg))
    mask = np.asarray(mask_img.dataobj) > 0
    gt = np.asarray(gt_img.dataobj) == TUMOUR_LABEL
    print(f"\ninference mask: {mask_path}")
    print(
        f"  shape {mask.shape} (input {gt.shape}), affine equal to input: {np.allclose(mask_img.affine, gt_img.affine)}"
    )
    print(f"  Dice vs the tumour label from {len(clicks)} click(s), one per tumour: {dice(mask, gt):.3f}")
    print(
        f"\noutputs: checkpoint {ckpt}\n         per-click metrics, plots, metrics.json in {eval_dir}/{{center,random}}"
    )
    print(f"demo finished in {time.time() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
