"""The fence around the Hypercorn patches (STYLE #22).

- Every function the guard replaces is listed here with the SHA-256 of its upstream source:
  an upgrade that changes one fails here, loudly, until someone re-reads the new upstream
  code against our replacement and updates the hash.
- Functions we do not replace but mirror or depend on in detail are pinned the same way.
- Outside the checked Hypercorn range `install()` patches nothing (Hypercorn's public
  behaviour), and says so.
"""

from __future__ import annotations

import logging
from typing import Final

import pytest
import trio
import trio._highlevel_serve_listeners as serve_listeners

from handler.transport import hypercorn_guard
from handler.transport.patching import Patch, source_fingerprint

REPLACED: Final = {
    "hypercorn.protocol.ws_stream.WSStream._accept": (
        "144623ad2e13fc566be426323f5f072de97ffccb58c6a4fc1f344626c9f93be9"
    ),
    "hypercorn.protocol.ws_stream.WSStream._handle_events": (
        "b90f3f595ff9fd4722f15769e9c40d113838a1deb6f3ecc0f63dc8ffc1d7f8e8"
    ),
    "hypercorn.protocol.ws_stream.WSStream.app_send": (
        "a6dd1160bfc416e7dade8eef16c89c757dd688bdc2ce539ecaa0621362c25c99"
    ),
    "hypercorn.trio.tcp_server.TCPServer.run": (
        "fd34b021d1a86c9859514de9472306ea47f4a6763732b26b7a5945278ded0e08"
    ),
    "hypercorn.trio.tcp_server.TCPServer.protocol_send": (
        "225856426bff7be02990c0badb90f51f801db14ac5db0f3d0c210cafbeb528ab"
    ),
    "hypercorn.trio.tcp_server.TCPServer._close": (
        "bc73c4ae25a1ceec1d535639443b57b3d3dea8b03c5375d58bf9702b8056ee15"
    ),
    "hypercorn.trio.tcp_server.TCPServer._read_data": (
        "7ca747d922c65cf1fb6bd7ceabe82b0b51bb9de218ce159d7b7e093ec279f728"
    ),
    "hypercorn.trio.tcp_server.TCPServer._initiate_server_close": (
        "7c1b548a65adc8b1b1358fdacbc860be3070fe99d5b1bdcfcde4c5c73a9cce03"
    ),
    "hypercorn.protocol.h11.H11Protocol._check_protocol": (
        "f95f6b38f43c62aaedddec0bb7c86d84e9a583ed22461293f8fcf249251d96ea"
    ),
    "hypercorn.protocol.ProtocolWrapper.handle": (
        "b03e2962872c85e879a5a62968a507c4cceb8df21e8eecd467b0934206a26821"
    ),
}

# Not replaced, but relied on line by line: `hypercorn_tcp._send_counted` mirrors trio's
# `SocketStream.send_all`, and `accept_errors` assumes trio's accept loop (its logger, its
# retry after EMFILE).
MIRRORED: Final = {
    "trio.SocketStream.send_all": (
        trio.SocketStream.send_all,
        "df9f0a360b5bbd20d3b05f9bb9bc1f39fb03098f1786dcab975c9817c9955720",
    ),
    "trio._highlevel_serve_listeners._serve_one_listener": (
        serve_listeners._serve_one_listener,
        "9367ae038290927f905a8bd68170f479134b9a6e2ab5e8d88e0772cf9e26345b",
    ),
}


def test_every_replaced_function_is_fingerprinted() -> None:
    assert {patch.qualname for patch in hypercorn_guard.PATCHES} == set(REPLACED)


@pytest.mark.parametrize("patch", hypercorn_guard.PATCHES, ids=lambda patch: patch.qualname)
def test_replaced_upstream_source_is_unchanged(patch: Patch) -> None:
    assert source_fingerprint(patch.original) == REPLACED[patch.qualname], (
        f"{patch.qualname} changed upstream: re-check the replacement against it"
    )


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_mirrored_upstream_source_is_unchanged(name: str) -> None:
    function, expected = MIRRORED[name]
    assert source_fingerprint(function) == expected, f"{name} changed upstream: re-check"


def test_the_installed_hypercorn_is_in_the_checked_range() -> None:
    assert hypercorn_guard.hypercorn_supported()
    assert hypercorn_guard.install() is True
    assert all(patch.applied() for patch in hypercorn_guard.PATCHES)
    assert hypercorn_guard.install() is True  # idempotent


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.18.0", True), ("0.18.3", True), ("0.18.1rc1", True), ("0.17.3", False), ("0.19.0", False)],
)
def test_version_range(version: str, supported: bool) -> None:
    assert hypercorn_guard.hypercorn_supported(version) is supported


def test_outside_the_range_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hypercorn_guard.install()
    for patch in hypercorn_guard.PATCHES:
        patch.revert()
    try:
        monkeypatch.setattr(hypercorn_guard, "_installed", False)
        monkeypatch.setattr(hypercorn_guard.importlib.metadata, "version", lambda _: "0.19.0")
        with caplog.at_level(logging.ERROR, logger="handler.transport"):
            assert hypercorn_guard.install() is False
        assert not any(patch.applied() for patch in hypercorn_guard.PATCHES)
        assert "NOT installed" in caplog.text
    finally:
        for patch in hypercorn_guard.PATCHES:
            patch.apply()
