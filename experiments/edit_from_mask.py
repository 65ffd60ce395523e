"""Clicks needed to fix a damaged segmentation vs. to segment from nothing: the "edit an existing mask" benchmark.

Runs the KiTS19 bundle's evaluation (``evaluate.yaml``, 10 simulated clicks) once from an empty mask and once from
each damage of ``msam_components.transforms.damage`` on the same cases, and prints one markdown table. With the demo
model of ``make demo``::

    .venv/bin/python experiments/edit_from_mask.py --ckpt demo_output/models/model.pt \\
        --data demo_output/kits19_heldout --overlay demo.yaml --strategy center
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "msam_kits19"
STARTS = ("none", "dilate", "erode", "drop_lesion", "add_false_positive")


def evaluate(ckpt: Path, data: Path, overlay: str | None, strategy: str, start: str, out: Path) -> dict:
    """One evaluation of every case under ``data`` from the given start; returns the click-metrics summary with the
    lesion summary (after the last click) under ``"lesions"``."""
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / n) for n in ("train.yaml", "evaluate.yaml")]
    if overlay:
        files.append(str(BUNDLE / "configs" / overlay))
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type="eval",
        bundle_root=str(BUNDLE),
        dataset_dir=str(data),
        output_dir=str(out),
        ckpt_path=str(ckpt),
        eval_click_strategy=strategy,
        eval_start=start,
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
    )
    wf.parser["eval_data"] = "$@datalist"
    wf.initialize()
    wf.run()
    wf.finalize()
    summary = json.loads((out / "click_metrics_summary.json").read_text())
    summary["lesions"] = json.loads((out / "lesion_metrics.json").read_text())
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="model.pt of the bundle (e.g. make demo's)")
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout cases to evaluate (all of them)")
    parser.add_argument("--overlay", default=None, help="a config overlay of the bundle, e.g. demo.yaml")
    parser.add_argument("--strategy", default="center", help="simulated click strategy (center, random, interior)")
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    args = parser.parse_args()
    rows = []
    begin = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for start in args.starts:
            s = evaluate(args.ckpt, args.data, args.overlay, args.strategy, start, Path(tmp) / start)
            rows.append((start, s))
    print(f"\n{rows[0][1]['num_cases_in_means']} cases, '{args.strategy}' clicks, checkpoint {args.ckpt}")
    print(
        "| start | Dice@1 | Dice@3 | Dice@10 | NoC@85 (never) | NoC@90 (never) | compliance +/- | lesions found/missed/false |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for start, s in rows:
        curve = s["mean_dice_per_click"]
        comp = (
            f"{s['compliance_positive']:.2f} / {s['compliance_negative']:.2f}"
            if s.get("compliance_available") and s["compliance_negative"] is not None
            else "n/a"
        )
        print(
            f"| {start} | {curve[0]:.3f} | {curve[min(2, len(curve) - 1)]:.3f} | {curve[-1]:.3f} "
            f"| {s['noc_at_85']:.2f} ({s['noc_at_85_num_never_reached']}) "
            f"| {s['noc_at_90']:.2f} ({s['noc_at_90_num_never_reached']}) | {comp} "
            f"| {s['lesions']['lesions_found']}/{s['lesions']['lesions_missed']}/{s['lesions']['false_lesions']} |"
        )
    print(f"\n({time.time() - begin:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
