"""A connection's protocol rules, as a pure state machine (see `machine`'s theory of operation).

Pure package: no trio, no I/O. `handler.transport.driver` carries its commands out.
"""

from handler.session.machine import SessionMachine, SessionRules, State

__all__ = ["SessionMachine", "SessionRules", "State"]
