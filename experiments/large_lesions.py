"""Lesions longer than one model window: does ``--grow_windows`` follow them? Whole-lesion coverage, precision and Dice.

Writes ``--cases`` KiTS19-like CTs with one tumour about 190 mm long (``synthetic.large_lesion_ct_case``; the demo
window is 64 voxels at 2 mm = 128 mm), clicks once at the tumour's deepest voxel, and runs the KiTS19 bundle's
``inference.yaml`` (+ ``--overlay``) with each ``--grow`` value; prints one row per case and the means.
``--grow_band 0`` sets ``ClickInferer(grow_band=0)``: the former trigger (the mask itself must reach a window face).
With the demo model of ``make demo``::

    .venv/bin/python experiments/large_lesions.py --ckpt demo_output/models/model.pt --overlay demo.yaml --cases 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from msam_components.data.synthetic import large_lesion_ct_case

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msam_kits19"
SPACING = (1.5, 1.5, 2.5)


def segment(
    image: Path, click: list[int], ckpt: Path, overlay: str | None, grow: int, out: Path, band: float | None = None
) -> tuple[np.ndarray, int]:
    """The bundle's mask for one click (and how many windows were added)."""
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / "inference.yaml")] + ([str(BUNDLE / "configs" / overlay)] if overlay else [])
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        image_path=str(image),
        foreground=[click],
        background=[],
        ckpt_path=str(ckpt),
        output_dir=str(out),
        grow_windows=grow,
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        **({} if band is None else {"inferer#grow_band": band}),
    )
    wf.initialize()
    wf.run()
    grown = wf.parser.get_parsed_content("inferer").last_grown_windows
    wf.finalize()
    return np.asarray(nib.load(str(out / f"{image.name.split('.')[0]}_seg.nii.gz")).dataobj) > 0, grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="model.pt of the KiTS19 bundle (e.g. make demo's)")
    parser.add_argument("--overlay", default=None, help="a config overlay of the bundle, e.g. demo.yaml")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--grow", type=int, nargs="+", default=[0, 6])
    parser.add_argument("--grow_band", type=float, default=None, help="ClickInferer's grow_band (default: its own)")
    args = parser.parse_args()
    begin, rows = time.time(), {g: [] for g in args.grow}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.cases):
            image, seg = large_lesion_ct_case(seed, spacing=SPACING)
            tumour = seg == 2
            path = Path(tmp) / f"case{seed}.nii.gz"
            nib.save(nib.Nifti1Image(image, np.diag([*SPACING, 1.0])), str(path))
            click = [int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(tumour)), tumour.shape)]
            for grow in args.grow:
                out = Path(tmp) / f"out{seed}_{grow}"
                mask, grown = segment(path, click, args.ckpt, args.overlay, grow, out, args.grow_band)
                hit = float((mask & tumour).sum())
                rows[grow].append(
                    dict(
                        length=float(np.ptp(np.argwhere(tumour)[:, 2])) * SPACING[2],
                        extent=float(np.ptp(np.argwhere(mask)[:, 2])) * SPACING[2] if mask.any() else 0.0,
                        coverage=hit / tumour.sum(),
                        precision=hit / max(mask.sum(), 1),
                        dice=2 * hit / (mask.sum() + tumour.sum()),
                        grown=grown,
                    )
                )
    length = np.mean([r["length"] for r in rows[args.grow[0]]])
    band = "the inferer's default" if args.grow_band is None else args.grow_band
    print(f"\n{args.cases} cases, one tumour of mean length {length:.0f} mm along z, one click; checkpoint {args.ckpt}")
    print(f"grow_band: {band}")
    print(
        "| case | tumour length (mm) | grow_windows | windows added | mask z extent (mm) | coverage | precision | Dice |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for grow, r in rows.items():
        mean = {k: float(np.mean([x[k] for x in r])) for k in r[0]}
        for case, x in [*enumerate(r), ("mean", mean)]:
            print(
                f"| {case} | {x['length']:.0f} | {grow} | {x['grown']:.{1 if case == 'mean' else 0}f} | "
                f"{x['extent']:.0f} | {x['coverage']:.3f} | {x['precision']:.3f} | {x['dice']:.3f} |"
            )
    print(f"\n({time.time() - begin:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
