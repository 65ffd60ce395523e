"""What one negative click fixes: does it clear the false-positive region it is placed in, and keep the rest?

Runs the KiTS19 bundle's evaluation (``evaluate.yaml``, 10 simulated clicks) and, for every negative click placed in a
false-positive region of the previous prediction (a 6-connected component of predicted non-lesion voxels), measures
the share of that region the click cleared and the share of the rest of the previous mask that it kept. With the demo
model of ``make demo``::

    .venv/bin/python experiments/negative_clicks.py --ckpt demo_output/models/model.pt \\
        --data demo_output/kits19_heldout --overlay demo.yaml
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import numpy as np

from msam_components.engines import binarise, negative_click_effects

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "msam_kits19"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout cases (every case is evaluated)")
    parser.add_argument("--overlay", default=None, help="config overlay of the model, e.g. demo.yaml")
    parser.add_argument("--strategy", default="center", choices=("center", "random"))
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "JSON"), help="config override")
    args = parser.parse_args()
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / n) for n in ("train.yaml", "evaluate.yaml")]
    files += [str(BUNDLE / "configs" / args.overlay)] if args.overlay else []
    with tempfile.TemporaryDirectory() as out:
        wf = ConfigWorkflow(
            config_file=files,
            workflow_type="eval",
            bundle_root=str(BUNDLE),
            dataset_dir=str(args.data),
            output_dir=out,
            ckpt_path=str(args.ckpt),
            eval_click_strategy=args.strategy,
            num_clicks=10,
            logging_file=str(BUNDLE / "configs" / "logging.conf"),
        )
        for key, value in args.set:
            wf.parser[key] = json.loads(value)
        wf.parser["eval_data"] = "$@datalist"
        wf.parser["validate#click_loop#keep_click_logits"] = True
        wf.initialize()
        predicted = functools.partial(  # the evaluation's own binarisation
            binarise,
            threshold=float(wf.parser.get_parsed_content("click_threshold")),
            threshold_on=wf.parser.get_parsed_content("click_threshold_on"),
        )
        effects: list[tuple[int, int, float, float]] = []

        def collect(engine) -> None:
            for o in engine.state.output:
                label = o["label"][0].cpu() > 0
                effects.extend(
                    negative_click_effects(
                        o["click_logits"].cpu(), o["click_points"].cpu(), o["click_labels"].cpu(), label, predicted
                    )
                )

        wf.parser.get_parsed_content("validate#evaluator").add_event_handler(Events.ITERATION_COMPLETED, collect)
        wf.run()
    if not effects:
        print("no negative click landed in a false-positive region")
        return
    e = np.array(effects, dtype=float)
    both = (e[:, 2] >= 0.9) & (e[:, 3] >= 0.9)
    print("| negative clicks in a false positive | region voxels (median) | region cleared (mean / median) |", end="")
    print(" rest kept (mean / median) | cleared >= 0.9 and kept >= 0.9 |")
    print("|---|---|---|---|---|")
    print(
        f"| {len(e)} | {np.median(e[:, 1]):.0f} | {e[:, 2].mean():.2f} / {np.median(e[:, 2]):.2f} | "
        f"{np.nanmean(e[:, 3]):.2f} / {np.nanmedian(e[:, 3]):.2f} | {both.mean():.2f} |"
    )


if __name__ == "__main__":
    main()
