"""Train the KiTS19 demo model under several recipes side by side and evaluate each on held-out cases.

Each job trains ``configs/train.yaml`` + ``configs/demo.yaml`` with its own overrides (as ``python -m monai.bundle run
training`` in its own process), then evaluates the model with 10 simulated ``center`` and 10 ``random`` clicks on
held-out cases drawn with another seed, and appends one JSON line to ``<out>/results.jsonl``. Jobs run ``--workers`` at
a time; training stops at ``--train-deadline`` seconds after the start, and a stopped job is evaluated from its last
complete epoch (``checkpoint_latest.pt``; its ``epochs_done`` says which). A table of every finished job is printed
at the end. Jobs file: one job per line, ``NAME EPOCHS [--key value ...]`` (``#`` starts a comment), e.g.::

    base 24
    patch4 24 --network_def#patch_size 4

    python experiments/recipe_sweep.py --jobs jobs.txt --out /tmp/sweep --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "msam_kits19"


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{BUNDLE / 'configs' / n}'" for n in names) + "]"


def _overrides(args: list[str]) -> dict[str, object]:
    """``--key value`` pairs as config values (JSON where the value parses as JSON)."""
    if len(args) % 2:
        raise ValueError(f"overrides must be --key value pairs, got {args}")
    parsed: dict[str, object] = {}
    for key, value in zip(args[::2], args[1::2]):
        try:
            parsed[key.lstrip("-")] = json.loads(value)
        except ValueError:
            parsed[key.lstrip("-")] = value
    return parsed


def _summary(path: Path) -> dict[str, object]:
    s = json.loads(path.read_text())
    return {
        "dice": [round(x, 3) for x in s["mean_dice_per_click"]],
        "noc85": s["noc_at_85"],
        "never85": s["noc_at_85_num_never_reached"],
        "comp_pos": s["compliance_positive"],
        "n_pos": s["num_positive_clicks"],
        "comp_neg": s["compliance_negative"],
        "n_neg": s["num_negative_clicks"],
    }


def run_job(args: argparse.Namespace) -> dict[str, object]:
    """Train one job until done or the deadline, evaluate it, and return its result line."""
    import torch
    from monai.bundle import ConfigWorkflow

    out = args.out / "runs" / args.name
    out.mkdir(parents=True, exist_ok=True)
    logging = ["--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    result: dict[str, object] = {"name": args.name, "epochs": args.epochs, "overrides": args.overrides}
    start = time.time()
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        _configs("train.yaml", "demo.yaml"),
    ]
    cmd += ["--bundle_root", str(BUNDLE), "--dataset_dir", str(args.data), "--output_dir", str(out), *logging]
    cmd += ["--ckpt_dir", str(out / "models"), "--num_epochs", str(args.epochs), "--val_interval", str(args.epochs)]
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd + args.overrides, stdout=log, stderr=subprocess.STDOUT)
        try:
            result["rc"] = proc.wait(timeout=max(1.0, args.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            result["rc"] = "stopped at the deadline"
    result["train_s"] = round(time.time() - start, 1)
    ckpt = out / "models" / "model.pt"
    if result["rc"] != 0:
        latest = out / "models" / "checkpoint_latest.pt"
        if not latest.is_file():
            result["error"] = (out / "train.log").read_text()[-1500:]
            return result
        state = torch.load(latest, map_location="cpu", weights_only=False)
        result["epochs_done"] = state["trainer"]["epoch"]
        ckpt = out / "models" / "model_last_epoch.pt"
        torch.save(state["model"], ckpt)
    try:
        for strategy in ("center", "random"):
            wf = ConfigWorkflow(
                config_file=[str(BUNDLE / "configs" / n) for n in ("train.yaml", "evaluate.yaml", "demo.yaml")],
                workflow_type="eval",
                bundle_root=str(BUNDLE),
                dataset_dir=str(args.heldout),
                output_dir=str(out / f"eval_{strategy}"),
                ckpt_path=str(ckpt),
                eval_click_strategy=strategy,
                num_clicks=10,
                logging_file=str(BUNDLE / "configs" / "logging.conf"),
            )
            for key, value in _overrides(args.overrides).items():
                wf.parser[key] = value
            wf.parser["eval_data"] = "$@datalist"  # every held-out case (nothing of them was trained on)
            wf.initialize()
            wf.run()
            result[strategy] = _summary(out / f"eval_{strategy}" / "click_metrics_summary.json")
    except Exception:  # one job's failure must not lose the others' results
        result["eval_error"] = traceback.format_exc()[-1500:]
    return result


def _row(r: dict) -> str:
    cells = [r["name"], str(r.get("epochs_done", r["epochs"])), f"{r['train_s']:.0f}"]
    for strategy in ("center", "random"):
        s = r.get(strategy)
        if s is None:
            cells += ["-"] * 5
            continue
        noc = f"{s['noc85']:.1f} ({s['never85']})"
        cells += [f"{s['dice'][0]:.3f}", f"{s['dice'][-1]:.3f}", noc, f"{s['comp_pos']:.2f} / {s['comp_neg']:.2f}"]
        cells += [f"{s['dice'][-1] - s['dice'][0]:+.3f}"]
    return (
        "| "
        + " | ".join(cells)
        + " |"
        + (f" {r.get('error', r.get('eval_error', ''))[-200:]}" if "center" not in r else "")
    )


def print_table(results: Path) -> None:
    """Markdown table of every job in ``results.jsonl``."""
    head = ["job", "epochs", "train s"]
    for s in ("center", "random"):
        head += [f"{s} Dice@1", "Dice@10", "NoC@85 (never)", "compliance + / -", "gain"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for line in results.read_text().splitlines() if results.is_file() else []:
        print(_row(json.loads(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=Path, help="jobs file: NAME EPOCHS [--key value ...] per line")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="training cases (default: <out>/kits19, generated)")
    parser.add_argument("--heldout", type=Path, default=None, help="held-out cases (default: generated with seed 1)")
    parser.add_argument("--workers", type=int, default=1, help="jobs trained at a time")
    parser.add_argument("--train-deadline", type=float, default=float("inf"), help="seconds until training stops")
    parser.add_argument("--total", type=float, default=float("inf"), help="seconds until every job is stopped")
    parser.add_argument("--job", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: one job
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.data or args.out / "kits19"
    args.heldout = args.heldout or args.out / "kits19_heldout"
    if args.job:
        args.name, args.epochs, args.deadline, args.overrides = (
            args.job[0],
            int(args.job[1]),
            float(args.job[2]),
            args.job[3:],
        )
        line = json.dumps(run_job(args))
        with open(args.out / "results.jsonl", "a") as f:
            f.write(line + "\n")
        return
    if args.jobs is None:
        parser.error("--jobs is required")
    from msam_components.data.synthetic import make_kits19_like

    if not args.data.exists():
        make_kits19_like(args.data, num_cases=30, seed=0)
    if not args.heldout.exists():
        make_kits19_like(args.heldout, num_cases=12, seed=1)
    jobs = [ln.split("#")[0].split() for ln in args.jobs.read_text().splitlines()]
    pending = [j for j in jobs if j]
    for job in pending:
        int(job[1]), _overrides(job[2:])  # bad jobs fail here, before anything runs
    start, running = time.time(), []
    fixed = ["--out", str(args.out), "--data", str(args.data), "--heldout", str(args.heldout)]
    while (pending or running) and time.time() - start < args.total:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < args.workers and time.time() - start < args.train_deadline - 30:
            job = pending.pop(0)
            deadline = str(start + args.train_deadline)
            cmd = [sys.executable, __file__, *fixed, "--job", job[0], job[1], deadline, *job[2:]]
            running.append(subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1")))
            print(f"{time.time() - start:6.0f} s  started {' '.join(job)}", flush=True)
        time.sleep(2)
    for proc in running:
        proc.kill()
    if pending:
        print("not started:", ", ".join(j[0] for j in pending))
    with tarfile.open(args.out / "train_logs.tgz", "w:gz") as tar:
        for log in (args.out / "runs").glob("*/train.log"):
            tar.add(log, arcname=f"{log.parent.name}.log")
    print_table(args.out / "results.jsonl")


if __name__ == "__main__":
    main()
