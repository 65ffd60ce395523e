"""The best Dice a model could reach if its only error were the resolution of its low-res logits.

M-SAM predicts low-res logits on a grid of 4 x (input / patch size) voxels per axis and upsamples them trilinearly:
32^3 for the paper's 128^3 input (4x coarser, 6 mm at 1.5 mm) and also 32^3 for the CPU demo's 64^3 input with patch
8 (2x coarser, 4 mm at 2 mm). This script takes each case's tumour label, resamples it to the model's voxel size,
averages it onto that logit grid (the best possible low-res logits up to a monotone map), upsamples it back, thresholds
it at one half and reports the Dice against the label. If this ceiling is high, a model's lower Dice is not the grid's
fault. For the demo's held-out cases::

    .venv/bin/python experiments/logit_grid_ceiling.py --data demo_output/kits19_heldout --pixdim 2.0 --factor 2 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def ceiling_dice(label: np.ndarray, zooms: tuple[float, ...], pixdim: float, factor: int) -> float:
    """Dice of the label against itself passed through a ``factor``-times coarser grid at ``pixdim`` mm."""
    resampled = ndimage.zoom(label.astype(np.float32), [z / pixdim for z in zooms], order=1) > 0.5
    volume = torch.as_tensor(resampled, dtype=torch.float32)[None, None]
    pad = [p for s in reversed(resampled.shape) for p in (0, (-s) % factor)]
    low = F.avg_pool3d(F.pad(volume, pad), factor)
    up = F.interpolate(low, scale_factor=factor, mode="trilinear", align_corners=False)[0, 0]
    up = up[tuple(slice(0, s) for s in resampled.shape)].numpy() > 0.5
    return float(2 * (up & resampled).sum() / max(up.sum() + resampled.sum(), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout cases (case_*/segmentation.nii.gz)")
    parser.add_argument("--pixdim", type=float, default=2.0, help="the model's voxel size in mm (demo: 2.0)")
    parser.add_argument("--factor", type=int, nargs="+", default=[2, 4], help="logit grid coarseness (demo: 2)")
    parser.add_argument("--label", type=int, default=2, help="the tumour label value (KiTS19: 2)")
    args = parser.parse_args()
    cases = sorted(args.data.glob("case_*/segmentation.nii.gz"))
    if not cases:
        raise SystemExit(f"no case_*/segmentation.nii.gz under {args.data}")
    print(f"{len(cases)} cases at {args.pixdim} mm")
    print("| logit grid | mean Dice ceiling | min |")
    print("|---|---|---|")
    for factor in args.factor:
        dices = []
        for path in cases:
            img = nib.load(str(path))
            dices.append(
                ceiling_dice(np.asarray(img.dataobj) == args.label, img.header.get_zooms()[:3], args.pixdim, factor)
            )
        print(f"| {factor}x ({factor * args.pixdim:g} mm) | {np.mean(dices):.3f} | {np.min(dices):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
