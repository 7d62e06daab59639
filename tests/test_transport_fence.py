"""The fence around the Hypercorn patches (STYLE #22).

- Every function the guard replaces is listed here with the SHA-256 of its upstream source:
  an upgrade that changes one fails here, loudly, until someone re-reads the new upstream
  code against our replacement and updates the hash.
- Functions we do not replace but mirror or depend on in detail are pinned the same way,
  wsproto's among them: `hypercorn_ws` reads its private state and relies on behaviour it
  does not document, which the tests below also check directly.
- Outside the checked Hypercorn or wsproto range `install()` patches nothing (Hypercorn's
  public behaviour), and says so.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Final

import hypercorn.protocol.h11
import hypercorn.protocol.ws_stream as ws_stream
import pytest
import trio
import trio._highlevel_serve_listeners as serve_listeners
import trio._socket
import wsproto.connection
import wsproto.extensions
import wsproto.frame_protocol
import wsproto.handshake
from support import masked_frame
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from handler.transport import hypercorn_guard
from handler.transport.patching import Patch, source_fingerprint

REPLACED: Final = {
    "hypercorn.protocol.ws_stream.WSStream._accept": (
        "144623ad2e13fc566be426323f5f072de97ffccb58c6a4fc1f344626c9f93be9"
    ),
    "hypercorn.protocol.ws_stream.WSStream.handle": (
        "743209f49012b8c7b57b89be980c662a254edf3bbf7de8f95a8f9943e92f6e7c"
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
# `SocketStream.send_all`, and it and `_read_directly` call the standard-library socket inside
# trio's (`_sock`) the way `_nonblocking_helper` and `_try_sync` do, minus the yield;
# `_read_directly` hands an upgraded connection's bytes to its `WSStream` as
# `H11Protocol._handle_events` passes them through an empty `H11WSConnection`;
# `accept_errors` assumes trio's accept loop (its logger, its retry after EMFILE), and
# `hypercorn_ws._accept_handshake` mirrors Hypercorn's `Handshake.accept`.
# The wsproto entries are what `hypercorn_ws` relies on beyond wsproto's documented API:
# - `CappedPerMessageDeflate` overrides `frame_inbound_payload_data` (a copy plus the cap) and
#   reads the inflate state that `__init__`, `frame_inbound_header` and
#   `frame_inbound_complete` keep (`WSPROTO_PRIVATE_ATTRIBUTES`);
# - `_accept_handshake` builds the server `Connection` itself, and negotiates the extension
#   with `server_extensions_handshake`, as Hypercorn does;
# - `_guarded_handle_events` tells rejected input from a peer's Close by the state in which
#   `Connection.events` yields `CloseConnection`, and `_guarded_app_send` counts on
#   `Connection.send` raising `LocalProtocolError` once the WebSocket is closing;
# - `lean_frames.frame_texts` writes the bytes `FrameProtocol.send_data` and `_serialize_frame`
#   write for a whole text message without extensions.
MIRRORED: Final = {
    "trio.SocketStream.send_all": (
        trio.SocketStream.send_all,
        "df9f0a360b5bbd20d3b05f9bb9bc1f39fb03098f1786dcab975c9817c9955720",
    ),
    "trio._socket._SocketType._nonblocking_helper": (
        trio._socket._SocketType._nonblocking_helper,
        "9e896e3fb79e414017a1ade9972c4825d17bbdcf42656fe8c526fac2392da257",
    ),
    "trio._socket._try_sync": (
        trio._socket._try_sync,
        "f60d82430bbc33755be34d6b65b2ca1a360e07bde18aa49120451397df4f8780",
    ),
    "trio._highlevel_serve_listeners._serve_one_listener": (
        serve_listeners._serve_one_listener,
        "9367ae038290927f905a8bd68170f479134b9a6e2ab5e8d88e0772cf9e26345b",
    ),
    "hypercorn.protocol.h11.H11Protocol._handle_events": (
        hypercorn.protocol.h11.H11Protocol._handle_events,
        "bd4a76b2837e872273a69e31a827fbcfd6a74c31bfcc59ac6ece1976af9aaed1",
    ),
    "hypercorn.protocol.h11.H11WSConnection": (
        hypercorn.protocol.h11.H11WSConnection,
        "33372cf6894299781cef6e5d27bb13d72b5fab6cf29a2f9bff2f6b7c3ca966aa",
    ),
    "hypercorn.protocol.ws_stream.Handshake.accept": (
        ws_stream.Handshake.accept,
        "e163533bf79197932595723bec015f1665ff05081a3dec1c70fd6a3538bd2b1c",
    ),
    "wsproto.extensions.PerMessageDeflate.__init__": (
        wsproto.extensions.PerMessageDeflate.__init__,
        "e892804c68998e2056fd68ade3af9c222588f499bad341b35c9f68a659d15331",
    ),
    "wsproto.extensions.PerMessageDeflate.frame_inbound_header": (
        wsproto.extensions.PerMessageDeflate.frame_inbound_header,
        "5451a091b37fe47d702af40a4edece015f6625b86f09e3a2924b9ecdeeaed136",
    ),
    "wsproto.extensions.PerMessageDeflate.frame_inbound_payload_data": (
        wsproto.extensions.PerMessageDeflate.frame_inbound_payload_data,
        "93bc8692346aa787e24a9d3ac672f91163d945a19c7a0b1cf048959d89a23fe5",
    ),
    "wsproto.extensions.PerMessageDeflate.frame_inbound_complete": (
        wsproto.extensions.PerMessageDeflate.frame_inbound_complete,
        "15ecc689b99856b3038b324a1526250307bfce9328275ed9b3760375b99ec421",
    ),
    "wsproto.connection.Connection.__init__": (
        wsproto.connection.Connection.__init__,
        "2aa4c1439d32bd59b285f012d57a6e23ff50e84648a9322d1cd175af0d3fd9f0",
    ),
    "wsproto.connection.Connection.events": (
        wsproto.connection.Connection.events,
        "e4d77be0bfef1af244f2ea432158259d022a621df8da5282012b1664493c2047",
    ),
    "wsproto.connection.Connection.send": (
        wsproto.connection.Connection.send,
        "f24770b66cf8fcb56f4670e34a166c8443040c1d869a59bb865adf43d7216c43",
    ),
    "wsproto.frame_protocol.FrameProtocol.send_data": (
        wsproto.frame_protocol.FrameProtocol.send_data,
        "123f604b2533c71119b3a0f9f252b2eccb8f57fb82058b3cf3b7706004dcb508",
    ),
    "wsproto.frame_protocol.FrameProtocol._serialize_frame": (
        wsproto.frame_protocol.FrameProtocol._serialize_frame,
        "54db7d4e9bb11d8f370baa359344035245262854d864532a28c711c2d390482c",
    ),
    "wsproto.handshake.server_extensions_handshake": (
        wsproto.handshake.server_extensions_handshake,
        "56dcd715837e35cdcacfc5000f7d0e02881a2530a17f50a60e03f5d3f0106c16",
    ),
}

# `PerMessageDeflate`'s private attributes that `CappedPerMessageDeflate` reads.
WSPROTO_PRIVATE_ATTRIBUTES: Final = (
    "_decompressor",
    "_inbound_compressed",
    "_inbound_is_compressible",
)


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


def test_the_private_wsproto_attributes_the_guard_reads_exist() -> None:
    assert set(WSPROTO_PRIVATE_ATTRIBUTES) <= set(vars(PerMessageDeflate()))


def test_wsproto_reports_rejected_input_as_a_close_while_still_open() -> None:
    """What `_guarded_handle_events` tells rejected input by: the state stays `OPEN`."""
    connection = Connection(ConnectionType.SERVER)
    connection.receive_data(masked_frame(0x81, b"\xff"))  # a text frame, invalid UTF-8
    [event] = connection.events()
    assert isinstance(event, CloseConnection)
    assert event.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA
    assert connection.state is ConnectionState.OPEN


def test_wsproto_refuses_a_data_frame_once_closing() -> None:
    """What `_guarded_app_send` catches for a frame written after our Close."""
    connection = Connection(ConnectionType.SERVER)
    connection.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE))
    assert connection.state is ConnectionState.LOCAL_CLOSING
    with pytest.raises(LocalProtocolError):
        connection.send(TextMessage(data="late"))


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


def test_the_installed_wsproto_is_in_the_checked_range() -> None:
    assert hypercorn_guard.wsproto_supported()


@pytest.mark.parametrize(
    ("version", "supported"),
    [("1.3.0", True), ("1.3.2", True), ("1.3.3rc1", True), ("1.2.0", False), ("1.4.0", False)],
)
def test_wsproto_version_range(version: str, supported: bool) -> None:
    assert hypercorn_guard.wsproto_supported(version) is supported


def _installed_version_but(package: str, version: str) -> Callable[[str], str]:
    """`importlib.metadata.version`, except that `package` claims to be `version`."""
    real = importlib.metadata.version
    return lambda name: version if name == package else real(name)


@pytest.mark.parametrize(
    "fake_version",
    # One package out of range at a time, so each check is shown to refuse on its own.
    [_installed_version_but("hypercorn", "0.19.0"), _installed_version_but("wsproto", "1.4.0")],
    ids=["hypercorn-0.19", "wsproto-1.4"],
)
def test_outside_the_range_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fake_version: Callable[[str], str],
) -> None:
    hypercorn_guard.install()
    for patch in hypercorn_guard.PATCHES:
        patch.revert()
    try:
        monkeypatch.setattr(hypercorn_guard, "_installed", False)
        monkeypatch.setattr(hypercorn_guard.importlib.metadata, "version", fake_version)
        with caplog.at_level(logging.ERROR, logger="handler.transport"):
            assert hypercorn_guard.install() is False
        assert not any(patch.applied() for patch in hypercorn_guard.PATCHES)
        assert hypercorn_guard.installed() is False
        assert "NOT installed" in caplog.text
        # The line names the checked ranges of both, whichever one was missed.
        assert "hypercorn 0.18..0.19" in caplog.text
        assert "wsproto 1.3..1.4" in caplog.text
    finally:
        for patch in hypercorn_guard.PATCHES:
            patch.apply()
