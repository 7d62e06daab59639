"""The HTTP API for backends (`/api/v1/`): the handler as one service among the product's others.

Backends act on chats without holding a WebSocket. Every call goes through the core the
WebSocket frames go through: the request is turned into the client frame it stands for and
validated by `protocol.decode_object`, checked by the same rules (`session.checks`), stored
by the same store calls, and fanned out by the hub from the store's commits, like any frame's.

- `auth`: API keys (constant-time comparison) and the per-key rate limit;
- `errors`: the JSON error answers and their HTTP statuses;
- `openapi`: the OpenAPI 3.1 document, written once as data;
- `routes`: the endpoints.
"""

from __future__ import annotations

from handler.api.routes import install

__all__ = ["install"]
