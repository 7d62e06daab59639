"""JWT verification and dev-token issuing, on PyJWT with pinned algorithms.

The user id is the `sub` claim. `exp` and `nbf` are checked when present, `iss`/`aud` when
configured; `alg: none` and any algorithm not configured are refused before the key is chosen.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import attrs
import jwt

from handler.config import AuthConfig
from handler.errors import ErrorCode, ProtocolError
from handler.protocol import validate_user_id

DEV_TOKEN_TTL_S = 24 * 3600


@attrs.frozen
class Identity:
    user_id: str
    expires_at: float | None  # epoch seconds, from `exp`


def _unauthorized(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNAUTHORIZED, f"invalid token: {reason}", field="token")


class TokenAuthority:
    """Verifies tokens; signs dev tokens when `auth.dev_tokens` is on."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        secret = config.jwt_secret
        if secret is None and config.dev_tokens:
            # No secret configured but dev tokens wanted: a per-process random secret keeps
            # dev tokens working without ever shipping a guessable default.
            secret = secrets.token_urlsafe(32)
        self._secret = secret
        self._algorithms = list(config.algorithms)
        if config.dev_tokens and "HS256" not in self._algorithms:
            self._algorithms.append("HS256")  # dev tokens are always HS256
        self.dev_tokens = config.dev_tokens

    def _key_for(self, algorithm: str) -> Any:
        if algorithm.startswith("HS"):
            return self._secret
        return self._config.public_key

    def verify(self, token: str, now: float | None = None) -> Identity:
        """Return the token's identity or raise `ProtocolError(unauthorized)`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _unauthorized("algorithm not accepted")
        key = self._key_for(algorithm)
        if key is None:
            raise _unauthorized("algorithm not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._config.issuer,
                audience=self._config.audience,
                options={
                    "require": ["sub"],
                    # PyJWT refuses any token with `aud` when no audience is given; the
                    # protocol checks `aud` only when one is configured.
                    "verify_aud": self._config.audience is not None,
                },
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("expired") from None
        except jwt.PyJWTError as error:
            raise _unauthorized(type(error).__name__) from None
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise _unauthorized("sub must be a string")
        try:
            validate_user_id(subject, "sub")
        except ProtocolError:
            raise _unauthorized("sub is not a valid user id") from None
        expires = claims.get("exp")
        return Identity(subject, float(expires) if isinstance(expires, int | float) else None)

    def issue(self, user_id: str, ttl_s: float = DEV_TOKEN_TTL_S) -> str:
        """Sign an HS256 token for `user_id` (dev tokens and the `token` command)."""
        if self._secret is None:
            raise RuntimeError("no jwt_secret configured: cannot sign tokens")
        validate_user_id(user_id, "user_id")
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl_s)}
        if self._config.issuer is not None:
            claims["iss"] = self._config.issuer
        if self._config.audience is not None:
            claims["aud"] = self._config.audience
        return jwt.encode(claims, self._secret, algorithm="HS256")
