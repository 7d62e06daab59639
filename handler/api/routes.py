"""The endpoints of `/api/v1/`, on the core the WebSocket frames use.

Theory of operation: each request is turned into the client frame it stands for (a
`send_message`, `create_chat`, `create_group` or `fetch_messages`) and validated by
`protocol.decode_object`, so its errors carry the protocol's codes and fields; then the rules
of `session.checks` (participant, recipient, not with yourself) and the store calls the
connection driver makes, with `NO_ORIGIN`: no connection asked, so the hub's fan-out of the
commit reaches every open connection of every participant, the sender's included, each once.
Nothing here marks anything delivered: reads are not deliveries to a user's devices.

Order of refusals: no key configured -> 404 (the API does not exist); no or a wrong key ->
401; over the key's rate -> 429; then the request's own errors. Unknown paths and methods
under `/api/` are 404, after the same key check.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.routing import PathConverter

from handler import protocol
from handler.api.auth import ApiKeys
from handler.api.errors import error_response, internal, json_response, not_found
from handler.api.openapi import OPENAPI
from handler.config import ApiConfig
from handler.errors import ErrorCode, HandlerError, ProtocolError
from handler.services import Services
from handler.session import checks
from handler.store.base import NO_ORIGIN

log = logging.getLogger("handler.api")

PREFIX: Final = "/api/v1"
BODY_TIMEOUT_S: Final = 10.0
_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_ANY_METHOD: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

Handler = Callable[..., Awaitable[Response]]


def install(app: QuartTrio, config: ApiConfig, services_of: Callable[[], Services | None]) -> None:
    """Add the API's routes to `app`; `services_of()` is the running services (None while
    starting or stopping)."""
    api = _Api(ApiKeys(config.keys, config.rate_per_s, config.rate_burst), services_of)
    app.url_map.converters["anypath"] = _AnyPath
    routes: tuple[tuple[str, str, Handler], ...] = (
        ("/messages", "POST", api.send_message),
        ("/chats", "POST", api.create_chat),
        ("/users/<anypath:user_id>/chats", "GET", api.chats_of),
        ("/chats/<anypath:chat_id>/messages", "GET", api.messages_of),
        ("/users/<anypath:user_id>/disconnect", "POST", api.disconnect),
        ("/openapi.json", "GET", api.openapi),
    )
    for rule, method, handler in routes:
        app.add_url_rule(
            PREFIX + rule,
            f"api_{handler.__name__}",
            api.endpoint(handler),
            methods=[method],
            # An automatic OPTIONS answer would bypass the key check (and exist without keys).
            provide_automatic_options=False,
        )
    unknown = api.endpoint(api.unknown)
    for rule in ("/api/", "/api/<anypath:rest>"):
        app.add_url_rule(
            rule,
            "api_unknown",
            unknown,
            methods=list(_ANY_METHOD),
            provide_automatic_options=False,
        )


class _AnyPath(PathConverter):
    """werkzeug's `path`, newlines included: its `.` stops at one, so an id holding a
    (percent-encoded) newline matched no route and got Quart's HTML 404 instead of ours."""

    regex = "(?s:[^/].*?)"


class _Api:
    def __init__(self, keys: ApiKeys, services_of: Callable[[], Services | None]) -> None:
        self._keys = keys
        self._services_of = services_of

    def endpoint(self, handler: Handler) -> Handler:
        """The view of one endpoint: the key check and the rate limit first, and one place
        that turns every failure into its JSON answer."""

        @functools.wraps(handler)
        async def view(**params: str) -> Response:
            try:
                if not self._keys.enabled:
                    raise not_found()
                self._keys.admit(request.headers.get("Authorization"), trio.current_time())
                services = self._services_of()
                if services is None:
                    raise ProtocolError(
                        ErrorCode.INTERNAL, "the server is starting or stopping; try again"
                    )
                return await handler(services, **params)
            except ProtocolError as error:
                log.info(
                    "api error %s %s code=%s field=%s",
                    request.method,
                    request.path,
                    error.code,
                    error.field,
                )
                return error_response(error)
            except Exception as error:  # one request must never take the server down
                return error_response(_report(error))

        return view

    # ------------------------------------------------------------------ endpoints

    async def send_message(self, services: Services) -> Response:
        body = await _json_body(services.limits.max_frame_bytes)
        sender_id = _user_id(body, "sender_id")
        frame = _decode(
            services,
            "send_message",
            body,
            ("chat_id", "recipient_id", "content", "client_message_id"),
        )
        assert isinstance(frame, protocol.SendMessage)
        chat = checks.check_participant(await services.chats.get(frame.chat_id), sender_id)
        if frame.recipient_id is None and not chat.is_group:
            # Optional here: a backend names the chat, the recipient follows from it.
            frame = attrs.evolve(frame, recipient_id=chat.other_participant(sender_id))
        checks.check_recipient(frame, chat, sender_id)
        started = trio.current_time()
        message, _ = await services.store.add_message(
            chat, sender_id, frame.content, frame.client_message_id, NO_ORIGIN
        )
        services.metrics.commit_latency.observe(trio.current_time() - started)
        # 201 for a resend too: an idempotent replay answers what the original answered.
        return json_response(message.to_wire(), 201)

    async def create_chat(self, services: Services) -> Response:
        body = await _json_body(services.limits.max_frame_bytes)
        user_id = _user_id(body, "user_id")
        direct = body.get("recipient_id") is not None
        group = body.get("title") is not None or body.get("member_ids") is not None
        if direct == group:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "give recipient_id (a direct chat) or title and member_ids (a group)",
                field="recipient_id",
            )
        if direct:
            frame = _decode(services, "create_chat", body, ("recipient_id",))
            assert isinstance(frame, protocol.CreateChat)
            checks.check_create_chat(frame, user_id)
            view, created = await services.create_chat(user_id, frame.recipient_id, NO_ORIGIN)
            return json_response(view.to_wire(), 201 if created else 200)
        frame = _decode(services, "create_group", body, ("title", "member_ids"))
        assert isinstance(frame, protocol.CreateGroup)
        checks.check_create_group(frame, user_id)
        chat = await services.store.create_group(user_id, frame.title, frame.member_ids, NO_ORIGIN)
        return json_response(protocol.ChatView.fresh(chat).to_wire(), 201)

    async def chats_of(self, services: Services, user_id: str) -> Response:
        protocol.validate_user_id(user_id, "user_id")
        chats = await services.chats_of(user_id)
        return json_response({"data": [view.to_wire() for view in chats]})

    async def messages_of(self, services: Services, chat_id: str) -> Response:
        query: dict[str, Any] = {"chat_id": chat_id}
        args = request.args
        if "before" in args:
            query["before"] = args["before"]
        if "limit" in args:
            limit = args["limit"]
            # A number in the query is text: an integer becomes one; anything else is left
            # as it is, for the frame's own check to refuse ("limit must be an integer").
            query["limit"] = int(limit) if _INTEGER.fullmatch(limit) else limit
        frame = _decode(services, "fetch_messages", query, ("chat_id", "before", "limit"))
        assert isinstance(frame, protocol.FetchMessages)
        chat = checks.check_chat(await services.chats.get(frame.chat_id))
        # No viewer: a backend reads the whole chat, not what one member may see of it.
        page = await services.store.messages_before(chat.chat_id, frame.before, frame.limit)
        if page is None:
            raise checks.unknown_before()
        messages, has_more = page
        return json_response(
            {"data": [message.to_wire() for message in messages], "has_more": has_more}
        )

    async def disconnect(self, services: Services, user_id: str) -> Response:
        protocol.validate_user_id(user_id, "user_id")
        closed = await services.hub.disconnect(user_id)
        return json_response({"closed": closed})

    async def openapi(self, services: Services) -> Response:
        return json_response(OPENAPI)

    async def unknown(self, services: Services, rest: str = "") -> Response:
        raise not_found()


# --------------------------------------------------------------------------- requests


async def _json_body(limit: int) -> Mapping[str, Any]:
    """The request's JSON object, read up to `limit` bytes (a WebSocket frame's limit)."""
    too_large = ProtocolError(
        ErrorCode.TOO_LARGE, f"the body is larger than {limit} bytes", field="body"
    )
    length = request.content_length
    if length is not None and length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_TIMEOUT_S) as waited:
        async for chunk in request.body:
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    if waited.cancelled_caught:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "the body did not arrive in time")
    try:
        obj = protocol.parse_json(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ProtocolError):
        raise ProtocolError(ErrorCode.BAD_JSON, "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "the body must be a JSON object")
    return obj


def _user_id(body: Mapping[str, Any], name: str) -> str:
    """The user the request acts as: a user id, as a token's `sub` must be."""
    value = body.get(name)
    if value is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} is required", field=name)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a string", field=name)
    return protocol.validate_user_id(value, name)


def _decode(
    services: Services, frame_type: str, body: Mapping[str, Any], names: tuple[str, ...]
) -> protocol.ClientFrame:
    """The client frame the request stands for, validated by the protocol's own decoder.

    Only the frame's fields are copied: a body's `type`, `token` or `request_id` mean
    nothing here."""
    frame = {"type": frame_type, **{name: body[name] for name in names if name in body}}
    return protocol.decode_object(frame, services.protocol_limits)


def _report(error: Exception) -> ProtocolError:
    correlation_id = secrets.token_hex(6)
    if isinstance(error, HandlerError):
        log.error("api internal %s correlation=%s: %s", request.path, correlation_id, error)
    else:
        log.exception(
            "api internal %s correlation=%s", request.path, correlation_id, exc_info=error
        )
    return internal(correlation_id)
