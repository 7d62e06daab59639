"""Webhooks for backends: events POSTed to configured endpoints, at least once.

The modules, by role:
- `events`: what an event is on the wire, and its signature (pure);
- `backoff`: when a failed delivery is tried again, and when it is given up (pure);
- `queue`: the outbox as the delivery sees it (claim, settle, count), on a connection of its
  own; `unread`: the periodic scan that turns undelivered messages into `message.unread`;
- `delivery`: the service: one task per endpoint, HTTP with httpx, metrics.

The rows themselves are written by the store, in the transaction of the change that caused
them (`handler.store.outbox`).
"""
