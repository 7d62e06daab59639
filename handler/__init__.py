"""Real-time chat gateway: the WebSocket Handler.

Public surface: `create_app` (an ASGI app for Hypercorn's trio worker), `serve` (run it), and
`__version__`. Everything else is internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_app", "serve"]

if TYPE_CHECKING:
    from handler.app import create_app
    from handler.server import serve


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the pure core (handler.protocol) pulls in no trio or quart.
    if name == "create_app":
        from handler.app import create_app

        return create_app
    if name == "serve":
        from handler.server import serve

        return serve
    raise AttributeError(name)
