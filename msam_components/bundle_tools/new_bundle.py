"""Command line: start a new M-SAM bundle for a tumour task from `bundle_template/`.

    python -m msam_components.bundle_tools.new_bundle --preset lits --name msam_lits --output bundles/
    python -m msam_components.bundle_tools.new_bundle --preset generic --name msam_inhouse_liver --label 2 \\
        --modality CT --dataset "in-house liver CT" --output bundles/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .presets import PRESET_NAMES, generic_spec, preset_spec
from .spec import MODALITIES, BundleSpec
from .template import TEMPLATE_DIR, render_bundle

__all__ = ["build_parser", "main", "spec_from_args"]

_GENERIC_ONLY = ("label", "modality", "dataset", "task", "description")


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line: a preset (or generic answers), the bundle name and where to write it."""
    parser = argparse.ArgumentParser(
        prog="python -m msam_components.bundle_tools.new_bundle",
        description="Render bundle_template/ into a new M-SAM bundle folder for one tumour task.",
    )
    parser.add_argument("--preset", required=True, choices=PRESET_NAMES, help="task preset, or 'generic'")
    parser.add_argument(
        "--name", help="bundle folder name (default: the preset's, e.g. msam_lits; required for generic)"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder that receives <name>/ (e.g. bundles/)")
    parser.add_argument("--force", action="store_true", help="overwrite the template's files in an existing bundle")
    parser.add_argument("--template", type=Path, default=TEMPLATE_DIR, help="template folder (default: %(default)s)")
    generic = parser.add_argument_group("generic preset (imagesTr/ + labelsTr/ layout)")
    generic.add_argument("--label", type=int, action="append", help="target label value; repeat for several")
    generic.add_argument("--modality", choices=sorted(MODALITIES), help="CT (clip + z-score above 0 HU) or MR")
    generic.add_argument("--dataset", help="short dataset name used in the texts (default: the name without msam_)")
    generic.add_argument("--task", help="metadata 'task' sentence")
    generic.add_argument("--description", help="README paragraph that introduces the data")
    return parser


def spec_from_args(args: argparse.Namespace) -> BundleSpec:
    """Turn parsed arguments into a spec; generic answers are refused for fixed presets, whose texts would lie."""
    if args.preset != "generic":
        given = [f"--{k}" for k in _GENERIC_ONLY if getattr(args, k) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: only for --preset generic; preset {args.preset!r} fixes these answers"
            )
        return preset_spec(args.preset, args.name)
    required = {"--name": args.name, "--label": args.label, "--modality": args.modality}
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        raise ValueError(f"--preset generic needs {', '.join(missing)}")
    return generic_spec(args.name, args.label, args.modality, args.dataset, args.task, args.description)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: render the bundle, print where it went and the next commands; errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
        target = render_bundle(spec, args.output, force=args.force, template=args.template)
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"wrote bundle {spec.name!r} ({spec.dataset}, {spec.modality}) to {target}")
    train = "python -m monai.bundle run training --config_file configs/train.yaml --bundle_root ."
    print(f"  train: cd {target} && {train} --dataset_dir {spec.example_dataset_dir}")
    print(f"  then fill in the Performance section of {target / 'docs' / 'README.md'} from the evaluation report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
