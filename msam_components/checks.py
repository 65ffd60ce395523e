"""Argument checks shared by the components: wrong config values fail with the setting's name, not deep inside."""

from __future__ import annotations


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
