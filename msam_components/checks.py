"""Argument checks shared by the components: wrong config values fail with the setting's name, not deep inside."""

from __future__ import annotations


def check_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is one of ``types`` (``True`` is not accepted as an int)."""
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
