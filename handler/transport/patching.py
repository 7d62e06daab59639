"""The fence around our replacements of Hypercorn functions (STYLE #22).

A `Patch` names the class attribute it replaces, the replacement, and the upstream function
it stands in for. `hypercorn_guard.install()` applies them only for the Hypercorn (and
wsproto) versions they were checked against, and the tests hash the source of every
`original`, and of the wsproto code the replacements rely on, so an upgrade that changes one
of them fails loudly instead of silently running our copy of old code.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class Patch:
    """One replaced attribute of a third-party class."""

    owner: type[Any]
    name: str
    replacement: Callable[..., Any]
    original: Callable[..., Any]

    @property
    def qualname(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"

    def apply(self) -> None:
        # setattr: a deliberate replacement of a method, documented where it is defined.
        setattr(self.owner, self.name, self.replacement)

    def revert(self) -> None:
        setattr(self.owner, self.name, self.original)

    def applied(self) -> bool:
        return self.owner.__dict__.get(self.name) is self.replacement


def source_fingerprint(function: Callable[..., Any]) -> str:
    """SHA-256 of a function's source (what the tests pin for every replaced function)."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
