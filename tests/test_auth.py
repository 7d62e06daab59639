"""Token verification: every way a token can be invalid is `unauthorized`, and only that."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from handler.auth import TokenAuthority, load_dev_secret
from handler.config import AuthConfig
from handler.errors import ConfigError, ErrorCode, ProtocolError

# 64+ bytes: PyJWT warns about shorter HMAC keys for HS512, and warnings are errors here.
SECRET = "auth-test-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "another-secret-" + "fedcba9876543210" * 4


def hs256(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def authority(**config: Any) -> TokenAuthority:
    config.setdefault("jwt_secret", SECRET)
    return TokenAuthority(AuthConfig(**config))


def unauthorized(auth: TokenAuthority, token: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        auth.verify(token)
    assert info.value.code == ErrorCode.UNAUTHORIZED
    return info.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), signature]
    )


def pem_public(private_key: Any) -> str:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --------------------------------------------------------------------------- HS256


def test_hs256_ok() -> None:
    exp = int(time.time()) + 60
    identity = authority().verify(hs256({"sub": "alice", "exp": exp}))
    assert identity.user_id == "alice"
    assert identity.expires_at == exp


def test_no_exp_never_expires() -> None:
    assert authority().verify(hs256({"sub": "alice"})).expires_at is None


def test_unicode_subject() -> None:
    assert authority().verify(hs256({"sub": "\u0411\u043e\u0431 \U0001f600"})).user_id == (
        "\u0411\u043e\u0431 \U0001f600"
    )


def test_wrong_signature() -> None:
    unauthorized(authority(), hs256({"sub": "alice"}, OTHER_SECRET))


def test_tampered_payload() -> None:
    header, _, signature = hs256({"sub": "alice"}).split(".")
    forged = ".".join([header, _b64(json.dumps({"sub": "mallory"}).encode()), signature])
    unauthorized(authority(), forged)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b", "a.b.c", "a.b.c.d", "..", "\u00e9.\u00e9.\u00e9", "e30.e30.e30"],
)
def test_malformed(token: str) -> None:
    unauthorized(authority(), token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_never_accepted(alg: str) -> None:
    token = unsigned({"alg": alg, "typ": "JWT"}, {"sub": "alice"})
    unauthorized(authority(), token)
    unauthorized(authority(algorithms=("HS256", "HS512")), token)


def test_missing_alg() -> None:
    unauthorized(authority(), unsigned({"typ": "JWT"}, {"sub": "alice"}, "sig"))


def test_algorithm_not_configured() -> None:
    unauthorized(authority(), hs256({"sub": "alice"}, algorithm="HS512"))
    assert (
        authority(algorithms=("HS512",)).verify(hs256({"sub": "alice"}, algorithm="HS512")).user_id
        == "alice"
    )
    unauthorized(authority(algorithms=("HS512",)), hs256({"sub": "alice"}))


def test_expired() -> None:
    error = unauthorized(authority(), hs256({"sub": "alice", "exp": int(time.time()) - 1}))
    assert "expired" in error.message


def test_nbf() -> None:
    now = int(time.time())
    unauthorized(authority(), hs256({"sub": "alice", "nbf": now + 60}))
    assert authority().verify(hs256({"sub": "alice", "nbf": now - 1})).user_id == "alice"


@pytest.mark.parametrize("exp", ["tomorrow", None, [1], {"t": 1}])
def test_exp_of_the_wrong_type(exp: Any) -> None:
    unauthorized(authority(), hs256({"sub": "alice", "exp": exp}))


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize(
    "value",
    ["99999999999", "1", "0", True, False],
    ids=["far-future-string", "past-string", "zero-string", "true", "false"],
)
def test_exp_and_nbf_must_be_numbers(claim: str, value: Any) -> None:
    """PyJWT accepts numeric strings; a string `exp` would never expire on the connection
    (only a number can be scheduled), so any non-number is refused."""
    unauthorized(authority(), hs256({"sub": "alice", claim: value}))


def test_numeric_exp_is_kept_for_the_connection() -> None:
    exp = time.time() + 60.5
    assert authority().verify(hs256({"sub": "alice", "exp": exp})).expires_at == exp


@pytest.mark.parametrize(
    "subject",
    [
        "ali\u200bce",  # zero-width space (Cf)
        "\u202ealice",  # right-to-left override (Cf)
        "alice\u2066",  # left-to-right isolate (Cf)
        "\ufeffalice",  # byte order mark (Cf)
        "ali\u00adce",  # soft hyphen (Cf)
        "ali\u2028ce",  # line separator (Zl): splits a log line
        "ali\u2029ce",  # paragraph separator (Zp)
        "ali\u0085ce",  # next line (Cc)
        "ali\u0600ce",  # Arabic number sign (Cf)
    ],
    ids=repr,
)
def test_subject_with_invisible_characters_is_refused(subject: str) -> None:
    unauthorized(authority(), hs256({"sub": subject}))
    with pytest.raises(ProtocolError):
        authority().issue(subject)


def test_visible_unicode_subjects_stay_valid() -> None:
    for subject in ("bob\u00a0smith", "\u0411\u043e\u0431", "\U0001f600", "caf\u00e9"):
        assert authority().verify(hs256({"sub": subject})).user_id == subject


def test_issuer_when_configured() -> None:
    auth = authority(issuer="chat-auth")
    assert auth.verify(hs256({"sub": "alice", "iss": "chat-auth"})).user_id == "alice"
    unauthorized(auth, hs256({"sub": "alice", "iss": "someone-else"}))
    unauthorized(auth, hs256({"sub": "alice"}))


def test_issuer_not_checked_when_not_configured() -> None:
    assert authority().verify(hs256({"sub": "alice", "iss": "anyone"})).user_id == "alice"


def test_audience_when_configured() -> None:
    auth = authority(audience="chat")
    assert auth.verify(hs256({"sub": "alice", "aud": "chat"})).user_id == "alice"
    assert auth.verify(hs256({"sub": "alice", "aud": ["other", "chat"]})).user_id == "alice"
    unauthorized(auth, hs256({"sub": "alice", "aud": "other"}))
    unauthorized(auth, hs256({"sub": "alice"}))


def test_audience_not_checked_when_not_configured() -> None:
    assert authority().verify(hs256({"sub": "alice", "aud": "anything"})).user_id == "alice"


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"sub": None},
        {"sub": 42},
        {"sub": ["alice"]},
        {"sub": ""},
        {"sub": " alice"},
        {"sub": "alice\n"},
        {"sub": "al\u0000ice"},
        {"sub": "x" * 129},
        {"user_id": "alice"},
    ],
    ids=repr,
)
def test_missing_or_invalid_subject(claims: dict[str, Any]) -> None:
    unauthorized(authority(), hs256(claims))


def test_unauthorized_error_names_the_token_field() -> None:
    error = unauthorized(authority(), "garbage")
    assert error.field == "token"


# --------------------------------------------------------------------------- RS256 / ES256


def test_rs256_with_a_public_key(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authority(jwt_secret=None, algorithms=("RS256",), public_key=pem_public(rsa_key))
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "alice", "exp": exp}, rsa_key, algorithm="RS256")
    identity = auth.verify(token)
    assert (identity.user_id, identity.expires_at) == ("alice", exp)
    unauthorized(auth, jwt.encode({"sub": "alice"}, other_rsa_key, algorithm="RS256"))
    unauthorized(auth, jwt.encode({"sub": "alice", "exp": exp - 120}, rsa_key, algorithm="RS256"))


def test_es256_with_a_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = authority(jwt_secret=None, algorithms=("ES256",), public_key=pem_public(ec_key))
    assert auth.verify(jwt.encode({"sub": "alice"}, ec_key, algorithm="ES256")).user_id == "alice"
    other = ec.generate_private_key(ec.SECP256R1())
    unauthorized(auth, jwt.encode({"sub": "alice"}, other, algorithm="ES256"))


def test_hs256_signed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic algorithm-confusion attack: the public key used as an HMAC secret."""
    public = pem_public(rsa_key)
    auth = authority(jwt_secret=None, algorithms=("RS256",), public_key=public)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": "mallory"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(public.encode(), signing_input.encode(), hashlib.sha256).digest()
    unauthorized(auth, f"{signing_input}.{_b64(mac)}")


def test_rs256_token_refused_when_only_hs256_is_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    unauthorized(authority(), jwt.encode({"sub": "alice"}, rsa_key, algorithm="RS256"))


def test_rs256_and_hs256_together(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authority(algorithms=("HS256", "RS256"), public_key=pem_public(rsa_key))
    assert auth.verify(hs256({"sub": "alice"})).user_id == "alice"
    assert auth.verify(jwt.encode({"sub": "bob"}, rsa_key, algorithm="RS256")).user_id == "bob"


# --------------------------------------------------------------------------- issuing


def test_issued_tokens_verify() -> None:
    auth = authority()
    before = time.time()
    identity = auth.verify(auth.issue("alice", ttl_s=60))
    assert identity.user_id == "alice"
    assert identity.expires_at is not None
    assert before + 58 <= identity.expires_at <= time.time() + 60


def test_issued_tokens_carry_configured_iss_and_aud() -> None:
    auth = authority(issuer="i", audience="a")
    claims = jwt.decode(auth.issue("alice"), SECRET, algorithms=["HS256"], audience="a")
    assert (claims["iss"], claims["aud"], claims["sub"]) == ("i", "a", "alice")
    assert auth.verify(auth.issue("alice")).user_id == "alice"


def test_dev_tokens_without_a_secret_use_a_random_one() -> None:
    first = TokenAuthority(AuthConfig(dev_tokens=True))
    second = TokenAuthority(AuthConfig(dev_tokens=True))
    token = first.issue("alice")
    assert first.verify(token).user_id == "alice"
    unauthorized(second, token)


# --------------------------------------------------------------------------- dev secret file


def test_dev_secret_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "chat.db.secret"
    first = TokenAuthority(AuthConfig(dev_tokens=True, secret_file=path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = first.issue("alice")
    # A new process (a restart, or the `token` command) reads the same secret.
    second = TokenAuthority(AuthConfig(dev_tokens=True, secret_file=path))
    assert second.verify(token).user_id == "alice"
    assert len(path.read_text().strip()) >= 32
    assert [p.name for p in tmp_path.iterdir()] == ["chat.db.secret"]  # no temporary left


def test_dev_secret_file_created_by_racing_processes_is_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "chat.db.secret"
    secrets: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait(timeout=10)
        secrets.append(load_dev_secret(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(secrets) == 8
    assert len(set(secrets)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_dev_secret_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """Refused, not fixed: whoever could read it can sign tokens for anyone."""
    path = tmp_path / "chat.db.secret"
    path.write_text("s" * 43)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        TokenAuthority(AuthConfig(dev_tokens=True, secret_file=path))
    assert info.value.key == "auth.jwt_secret"
    assert "chmod 600" in str(info.value)
    assert stat.S_IMODE(path.stat().st_mode) == mode  # left as it was


def test_dev_secret_file_that_is_short_or_a_symlink_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.secret"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"too short")
    os.close(fd)
    with pytest.raises(ConfigError, match="shorter"):
        load_dev_secret(short)
    real = tmp_path / "real.secret"
    fd = os.open(real, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"s" * 43)
    os.close(fd)
    link = tmp_path / "link.secret"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        load_dev_secret(link)


def test_dev_secret_file_that_cannot_be_created_names_the_fix(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(ConfigError) as info:
        load_dev_secret(blocked / "chat.db.secret")
    assert "auth.jwt_secret" in str(info.value)


def test_issue_refuses_an_invalid_user_id() -> None:
    with pytest.raises(ProtocolError):
        authority().issue(" alice")


# --------------------------------------------------------------------------- verified cache


def test_a_cached_token_still_expires_on_time() -> None:
    auth = authority()
    expires = int(time.time()) + 60
    token = hs256({"sub": "alice", "exp": expires})
    assert auth.verify(token).user_id == "alice"
    assert auth.verify(token, now=expires - 0.5).user_id == "alice"  # the cached identity
    with pytest.raises(ProtocolError) as caught:
        auth.verify(token, now=expires)
    assert caught.value.code is ErrorCode.UNAUTHORIZED
    assert "expired" in caught.value.message
    # Forgotten once expired: the next try goes through PyJWT again, which refuses it too.
    assert (
        "expired"
        in unauthorized(auth, hs256({"sub": "alice", "exp": int(time.time()) - 1})).message
    )


def test_a_refused_token_is_not_cached() -> None:
    auth = authority()
    early = hs256({"sub": "alice", "nbf": int(time.time()) + 60})
    for _ in range(2):
        assert "ImmatureSignatureError" in unauthorized(auth, early).message
    forged = hs256({"sub": "alice"}, key=OTHER_SECRET)
    for _ in range(2):
        unauthorized(auth, forged)


def test_one_character_changed_is_a_different_token() -> None:
    auth = authority()
    token = hs256({"sub": "alice"})
    assert auth.verify(token).user_id == "alice"
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    unauthorized(auth, tampered)


def test_the_cache_is_bounded_and_keeps_the_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("handler.auth.VERIFIED_CACHE_SIZE", 3)
    auth = authority()
    tokens = [hs256({"sub": f"user{n}"}) for n in range(4)]
    for token in tokens[:3]:
        auth.verify(token)
    auth.verify(tokens[0])  # used again: user1 is now the least recently used
    auth.verify(tokens[3])
    assert len(auth._verified) == 3
    kept = {identity.user_id for identity in auth._verified.values()}
    assert kept == {"user0", "user2", "user3"}
