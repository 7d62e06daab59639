"""The WebSocket transport: the ASGI `/ws` endpoint and the Hypercorn hardening it relies on."""
