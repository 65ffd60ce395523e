"""Argument checks shared by the components: wrong config values fail with the setting's name, not deep inside."""

from __future__ import annotations

import os


def check_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is one of ``types`` (``True`` is not accepted as an int)."""
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


TRUE_SPELLINGS = ("true", "1", "yes")
FALSE_SPELLINGS = ("false", "0", "no")


def as_bool(value: object, name: str = "value") -> bool:
    """Read a boolean option as given in a config or on the command line, where ``--amp false`` arrives as a string.

    ``True``/``False``, ``1``/``0`` and the strings ``true``/``false``/``yes``/``no`` (any case) are accepted, so every
    boolean option behaves the same way; anything else raises ``TypeError`` naming the option (never silently truthy).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_SPELLINGS:
            return True
        if text in FALSE_SPELLINGS:
            return False
    raise TypeError(f"{name} must be true or false (true/false/True/False/1/0), got {value!r}")


# Sane ranges of the bundles' numeric options: (kind, low, high, low is allowed, high is allowed). A value outside
# them is almost always a typo or a wrong unit (a learning rate of 1e12 trains to weights of 1e12 without an error).
OPTION_RANGES: dict[str, tuple[type, float, float, bool, bool]] = {
    "learning_rate": (float, 0.0, 1.0, False, True),
    "weight_decay": (float, 0.0, 10.0, True, True),
    "prompt_decoder_lr_scale": (float, 0.0, 100.0, True, True),
    "num_epochs": (int, 1, 1_000_000, True, True),
    "val_interval": (int, 1, 1_000_000, True, True),
    "batch_size": (int, 1, 4096, True, True),
    "val_batch_size": (int, 1, 4096, True, True),
    "num_workers": (int, 0, 1024, True, True),
    "cache_rate": (float, 0.0, 1.0, True, True),
    "val_fraction": (float, 0.0, 1.0, False, False),
    "num_clicks": (int, 1, 1000, True, True),
    "train_num_clicks": (int, 1, 1000, True, True),
    "lambda_dice": (float, 0.0, 1000.0, True, True),
    "lambda_ce": (float, 0.0, 1000.0, True, True),
    "lambda_click": (float, 0.0, 1000.0, True, True),
    "initial_mask_prob": (float, 0.0, 1.0, True, True),
    "feedback_dropout": (float, 0.0, 1.0, True, True),
    "click_stamp": (float, 0.0, 1000.0, True, True),
    "click_stamp_sigma": (float, 0.0, 1000.0, True, True),
    "crop_jitter": (int, 0, 4096, True, True),
    "image_size": (int, 16, 4096, True, True),
    "lora_rank": (int, 0, 4096, True, True),
    "seed": (int, 0, 2**32 - 1, True, True),
    "pred_threshold": (float, -1e9, 1e9, True, True),  # on logits (the tests keep every voxel with -50)
    "grow_windows": (int, 0, 1000, True, True),
}


def check_options(**values: object) -> None:
    """Check the named bundle options against :data:`OPTION_RANGES` (and ``target_labels``/``initial_label`` as
    non-negative integer class ids); the first bad one raises ``ValueError`` naming the option and the value."""
    for name, value in values.items():
        if name in ("target_labels", "initial_label"):
            ids = value if isinstance(value, (list, tuple)) else [value]
            if not ids or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ids):
                raise ValueError(f"--{name}: expected a list of non-negative integer label values, got {value!r}")
            continue
        kind, low, high, low_ok, high_ok = OPTION_RANGES[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)) or value != value:
            raise ValueError(f"--{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        above = value > low or (low_ok and value == low)
        below = value < high or (high_ok and value == high)
        if not (above and below):
            interval = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise ValueError(f"--{name}: {value!r} is outside its sane range {interval}")


def require_train_and_val(split: tuple[list, list], dataset_dir: object, val_fraction: object) -> None:
    """Refuse a split with no training or no validation case: ``model.pt`` is written from the validation's best, so
    such a run would end without one (and exit 0)."""
    train, val = split
    if not train or not val:
        raise ValueError(
            f"the dataset at {dataset_dir} gives {len(train)} training and {len(val)} validation case(s) with "
            f"--val_fraction {val_fraction}: training needs at least one of each (model.pt is saved from the best "
            "validation); give at least 2 labelled cases and a val_fraction in (0, 1)"
        )


def require_input_file(name: str, path: object, what: str) -> bool:
    """``True`` if the option ``name`` names an existing file; else a one-line error naming the option (and path)."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"--{name} is required: {what} (a file path), got {path!r}")
    if not os.path.isfile(path):
        kind = "a folder, not a file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"--{name} {path}: {kind}")
    return True
