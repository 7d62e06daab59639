"""JWT verification and dev-token issuing, on PyJWT with pinned algorithms.

The user id is the `sub` claim. `exp` and `nbf` are checked when present (and must be numbers),
`iss`/`aud` when configured; `alg: none` and any algorithm not configured are refused before the
key is chosen.

Verified tokens are cached for reconnects (`VERIFIED_CACHE_SIZE` of them, least recently used
first out), keyed by a hash of the token, so a client that reconnects with the same token skips
the signature check. Only success is cached, and a hit is checked against `exp` again: `nbf` and
`iat` only ever move from the future into the past, so a token that verified once stays valid
until it expires, and the keys do not change while the process runs.

Dev tokens without a configured secret are signed with a secret kept in a file
(`AuthConfig.secret_file`, beside the database), created on first use: tokens then survive a
restart, and `python -m handler token USER` signs tokens the server accepts.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any, Final

import attrs
import jwt

from handler.config import AuthConfig
from handler.errors import ConfigError, ErrorCode, ProtocolError
from handler.protocol import validate_user_id

DEV_TOKEN_TTL_S = 24 * 3600
# Verified tokens kept for reconnects: about 200 bytes each.
VERIFIED_CACHE_SIZE: Final = 16384
DEV_SECRET_MIN_CHARS: Final = 32
_SECRET_KEY: Final = "auth.jwt_secret"


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
            # No secret configured but dev tokens wanted: a generated one, never a guessable
            # default. Kept in a file when the config names one (it always does), so tokens
            # outlive the process; random per process otherwise.
            if config.secret_file is not None:
                secret = load_dev_secret(config.secret_file)
            else:
                secret = secrets.token_urlsafe(32)
        self._secret = secret
        self._algorithms = list(config.algorithms)
        if config.dev_tokens and "HS256" not in self._algorithms:
            self._algorithms.append("HS256")  # dev tokens are always HS256
        self.dev_tokens = config.dev_tokens
        self._verified: dict[bytes, Identity] = {}  # insertion order = least recently used first

    def _key_for(self, algorithm: str) -> Any:
        if algorithm.startswith("HS"):
            return self._secret
        return self._config.public_key

    def verify(self, token: str, now: float | None = None) -> Identity:
        """Return the token's identity or raise `ProtocolError(unauthorized)`."""
        key = hashlib.blake2b(token.encode(), digest_size=16).digest()
        cached = self._verified.pop(key, None)
        if cached is not None:
            if cached.expires_at is not None and int(cached.expires_at) <= (
                time.time() if now is None else now
            ):
                raise _unauthorized("expired")  # as PyJWT says it (its `exp` check, leeway 0)
            self._verified[key] = cached  # the most recently used now
            return cached
        identity = self._verify_signed(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[key] = identity
        return identity

    def _verify_signed(self, token: str) -> Identity:
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
        for claim in ("exp", "nbf"):
            # PyJWT accepts numeric strings ("exp": "1700000000"); a connection would then
            # never expire, since only a number can be scheduled.
            value = claims.get(claim)
            if claim in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise _unauthorized(f"{claim} must be a number")
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise _unauthorized("sub must be a string")
        try:
            validate_user_id(subject, "sub")
        except ProtocolError:
            raise _unauthorized("sub is not a valid user id") from None
        expires = claims.get("exp")
        return Identity(subject, None if expires is None else float(expires))

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


def load_dev_secret(path: Path) -> str:
    """The dev-token secret kept at `path`, created (mode 0600, atomically) on first use.

    A file that other users could read, or that belongs to someone else, is refused rather
    than fixed: whoever read it can sign tokens for any user, and tightening the mode would
    hide that. Deleting it makes a new secret (and invalidates every dev token).
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    try:
        _create_secret(path)
        return _read_secret(path)
    except OSError as error:
        raise ConfigError(
            _SECRET_KEY,
            f"cannot create the dev-token secret {path}: {error.strerror or error};"
            " set auth.jwt_secret (or CHAT_JWT_SECRET) instead",
        ) from None


def _create_secret(path: Path) -> None:
    """Write a new secret to a private temporary file, then link it into place: a process
    starting at the same moment reads either no file or the whole secret, and if two create
    one, the first link wins and both use it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (secrets.token_urlsafe(32) + "\n").encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, 0o600)
    try:
        try:
            os.write(descriptor, text)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made one first: use theirs
        except OSError:
            _write_exclusively(path, flags, text)  # a file system without hard links
    finally:
        temporary.unlink(missing_ok=True)


def _write_exclusively(path: Path, flags: int, text: bytes) -> None:
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileExistsError:
        return
    try:
        os.write(descriptor, text)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_secret(path: Path) -> str:
    """Raises FileNotFoundError when there is none yet, ConfigError when it is unusable."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ConfigError(
            _SECRET_KEY, f"cannot read the dev-token secret {path}: {error.strerror or error}"
        ) from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(_SECRET_KEY, f"the dev-token secret {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                _SECRET_KEY,
                f"the dev-token secret {path} belongs to another user (uid {info.st_uid}):"
                " delete it to make a new one",
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                _SECRET_KEY,
                f"the dev-token secret {path} is readable by other users"
                f" (mode {stat.S_IMODE(info.st_mode):04o}): run chmod 600 {path},"
                " or delete it to make a new one",
            )
        text = handle.read(4096).decode("utf-8", "replace").strip()
    if len(text) < DEV_SECRET_MIN_CHARS:
        raise ConfigError(
            _SECRET_KEY,
            f"the dev-token secret {path} is shorter than {DEV_SECRET_MIN_CHARS} characters:"
            " delete it to make a new one",
        )
    return text
