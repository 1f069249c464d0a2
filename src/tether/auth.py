"""Authentication hooks for the WebSocket adapters: a client's id comes from its token, not from it.

    from tether.auth import sign_token, signed_token_authenticator, static_tokens

    # a fixed set of credentials
    authenticate = static_tokens({"s3cr3t-for-alice-…": "alice"})
    # or tokens your login service signs (HMAC-SHA256, with an expiry)
    token = sign_token(SECRET, "alice", expires_at=time.time() + 3600)
    authenticate = signed_token_authenticator(SECRET)

    websockets.serve(hub, host, port, authenticate=authenticate)   # or
    create_app(hub, authenticate=authenticate)

`tether serve` enables the signed-token hook when `TETHER_AUTH_SECRET` is set (also
`create_app` and `transports.websockets.serve` do, when given no hook of their own).

Where the token is read from: the `tether.v1` `hello.token`; otherwise (plain mode, or a
`tether.v1` client that sends none) an `Authorization: Bearer <token>` header, then a
`?token=` query parameter (browsers cannot set headers on a WebSocket; prefer
`hello.token`, which stays out of access logs).

Refusals (an `error` frame in `tether.v1`, then the close code):

- `unauthorized` / 1008: no token, an unknown or forged token, an expired token;
- `forbidden_client_id` / 1008: the client named an id other than its token's.

A signed token's expiry also holds on the open connection: at that moment the server
sends `error` code `token_expired` and closes with 1008, unless the client sent a fresh
token in an `auth` frame first (`tether.Client(token=callable)` and the JS client do that
on their own, ahead of expiry). Hooks of your own get the same by returning
`Identity(client_id, expires_in=seconds)`.

Every comparison of secret material uses `hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Mapping

from .channels.service import granted
from .protocol import (
    CHANNEL_PATTERN,
    MAX_TOKEN_LENGTH,
    CloseCode,
    Hello,
    ProtocolError,
    valid_client_id,
)
from .transports.connection import Authenticate, ConnectionInfo, Identity

__all__ = [
    "MIN_SECRET_LENGTH",
    "Identity",
    "auth_from_config",
    "channel_granted",
    "forbidden_client_id",
    "sign_token",
    "signed_token_authenticator",
    "static_tokens",
    "token_channels",
    "token_expires_at",
    "token_from",
    "unauthorized",
    "verify_token",
]

MIN_SECRET_LENGTH = 16
# Domain separation: a MAC made for something else with the same secret is no token.
_CONTEXT = b"tether.token.v1\x00"


def unauthorized(reason: str) -> ProtocolError:
    """The refusal for missing, unknown, forged or expired credentials (close 1008)."""
    return ProtocolError("unauthorized", reason, CloseCode.POLICY_VIOLATION)


def forbidden_client_id(asked: str, allowed: str) -> ProtocolError:
    """The refusal for a client that names an id other than its token's (close 1008)."""
    # The token's id is not echoed: the error frame should not tell a thief whose token it has.
    return ProtocolError(
        "forbidden_client_id",
        f"client id {asked!r} does not match the token",
        CloseCode.POLICY_VIOLATION,
    )


def token_from(info: ConnectionInfo, hello: Hello | None) -> str | None:
    """The credentials a connection presented: `hello.token`, else the bearer header,
    else the `token` query parameter."""
    if hello is not None and hello.token:
        return hello.token
    header = info.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return info.query.get("token") or None


def _asked_id(info: ConnectionInfo, hello: Hello | None, client_id_param: str) -> str | None:
    if hello is not None:
        return hello.client_id
    return info.query.get(client_id_param) or None


def _check_asked(asked: str | None, client_id: str) -> str:
    # Rejecting is safer than silently serving the token's id: a client that thinks it
    # is "bob" but is served as "alice" would mix two streams up in its own state.
    if asked is not None and not hmac.compare_digest(asked.encode(), client_id.encode()):
        raise forbidden_client_id(asked, client_id)
    return client_id


def _check_client_id(client_id: str) -> None:
    if not valid_client_id(client_id):
        raise ValueError(f"invalid client id {client_id!r}")


def _secret_bytes(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_LENGTH:
        raise ValueError(f"the secret must be at least {MIN_SECRET_LENGTH} bytes")
    return key


# --------------------------------------------------------------------------- static tokens


def static_tokens(tokens: Mapping[str, str], *, client_id_param: str = "client_id") -> Authenticate:
    """An `authenticate` hook for a fixed `{token: client_id}` table.

    Tokens are looked up by their SHA-256 digest, so the lookup's timing says nothing
    about the secret, and the match is confirmed with `hmac.compare_digest`.
    """
    table: dict[bytes, tuple[bytes, str]] = {}
    for token, client_id in tokens.items():
        if len(token) < 8:
            raise ValueError("a token must be at least 8 characters")
        _check_client_id(client_id)
        raw = token.encode()
        table[hashlib.sha256(raw).digest()] = (raw, client_id)

    async def authenticate(info: ConnectionInfo, hello: Hello | None) -> str:
        token = token_from(info, hello)
        if token is None:
            raise unauthorized("a token is required")
        raw = token.encode()
        entry = table.get(hashlib.sha256(raw).digest())
        if entry is None or not hmac.compare_digest(entry[0], raw):
            raise unauthorized("invalid token")
        return _check_asked(_asked_id(info, hello, client_id_param), entry[1])

    return authenticate


# --------------------------------------------------------------------------- signed tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> bytes:
    return hmac.new(key, _CONTEXT + body.encode("ascii"), hashlib.sha256).digest()


def sign_token(
    secret: str | bytes,
    client_id: str,
    expires_at: float,
    *,
    channels: Iterable[str] | None = None,
) -> str:
    """A token for `client_id` valid until `expires_at` (epoch seconds).

    Format: `base64url("<expires_at>:<client_id>[|<channels>]") "." base64url(HMAC-SHA256)`.
    `channels` (comma-separated in the token) limits the channels the connection may
    subscribe to: names, or prefixes ending in `*` (`"room.*"`); an empty list grants
    none; None (the default) leaves it to the hub's `authorize_subscribe` hooks. Issue it
    from your login service over TLS; keep lifetimes short (minutes to hours), since a
    stolen token works for anyone until it expires. Raises ValueError for a bad client id
    or channel grant.
    """
    _check_client_id(client_id)
    key = _secret_bytes(secret)
    text = f"{int(expires_at)}:{client_id}"
    if channels is not None:
        grants = list(channels)
        for grant in grants:
            if not _valid_grant(grant):
                raise ValueError(f"invalid channel grant {grant!r}: a channel name or a prefix*")
        text += "|" + ",".join(grants)
    body = _b64(text.encode())
    return f"{body}.{_b64(_mac(key, body))}"


def _valid_grant(grant: object) -> bool:
    if not isinstance(grant, str):
        return False
    name = grant[:-1] if grant.endswith("*") else grant
    return (grant.endswith("*") and name == "") or CHANNEL_PATTERN.fullmatch(name) is not None


def channel_granted(channel: str, grants: frozenset[str]) -> bool:
    """Whether `channel` is among `grants` (names, or prefixes ending in `*`)."""
    return granted(channel, grants)


def verify_token(secret: str | bytes, token: str, *, now: float) -> str:
    """The client id a signed token names; raises `ProtocolError("unauthorized")` when the
    token is malformed, forged or expired at `now` (epoch seconds)."""
    key = _secret_bytes(secret)
    return _verify(key, token, now)[0]


def token_channels(secret: str | bytes, token: str, *, now: float) -> frozenset[str] | None:
    """The channel grants of a signed token (None: unrestricted); raises like `verify_token`."""
    return _verify(_secret_bytes(secret), token, now)[2]


def token_expires_at(token: str) -> float | None:
    """The expiry (epoch seconds) a `sign_token` token carries, read WITHOUT verifying it;
    None for a token of another format. For clients that schedule a refresh: never use it
    to decide whether to trust a token."""
    body, dot, _ = token.partition(".")
    if not dot or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        expiry_text, colon, _ = _unb64(body).decode("utf-8").partition(":")
        return float(int(expiry_text)) if colon else None
    except (binascii.Error, ValueError):
        return None


def _verify(key: bytes, token: str, now: float) -> tuple[str, int, frozenset[str] | None]:
    # The length bound (the protocol's limit on `hello.token`) caps the work per handshake.
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise unauthorized("malformed token")
    body, _, mac_text = token.partition(".")
    try:
        expected = _b64(_mac(key, body))  # `body` is ASCII if the MAC is right
    except UnicodeEncodeError:
        raise unauthorized("malformed token") from None
    # Compared as text, not decoded bytes: base64 has spare bits in its last character,
    # and a token must have exactly one spelling (so it can be logged, revoked, matched).
    if not hmac.compare_digest(mac_text.encode(), expected.encode()):
        raise unauthorized("invalid token signature")
    try:
        expiry_text, _, rest = _unb64(body).decode("utf-8").partition(":")
        expires_at = int(expiry_text)
    except (binascii.Error, ValueError):
        raise unauthorized("malformed token") from None
    if now >= expires_at:
        raise unauthorized("token expired")
    client_id, bar, grant_text = rest.partition("|")  # "|" is in no client id
    if not valid_client_id(client_id):
        raise unauthorized("malformed token")
    grants = None
    if bar:
        grants = frozenset(grant_text.split(",")) if grant_text else frozenset()
        if not all(_valid_grant(g) for g in grants):
            raise unauthorized("malformed token")
    return client_id, expires_at, grants


def signed_token_authenticator(
    secret: str | bytes,
    *,
    clock: Callable[[], float] = time.time,
    client_id_param: str = "client_id",
) -> Authenticate:
    """An `authenticate` hook accepting tokens made by `sign_token(secret, ...)`.

    `clock` gives epoch seconds (inject one in tests). The client id served is the
    token's; a client naming another one is refused with `forbidden_client_id`. The
    connection ends at the token's expiry unless an `auth` frame renews it.
    """
    key = _secret_bytes(secret)

    async def authenticate(info: ConnectionInfo, hello: Hello | None) -> Identity:
        token = token_from(info, hello)
        if token is None:
            raise unauthorized("a token is required")
        now = clock()
        client_id, expires_at, grants = _verify(key, token, now)
        asked = _check_asked(_asked_id(info, hello, client_id_param), client_id)
        return Identity(asked, expires_in=expires_at - now, channels=grants)

    return authenticate


def auth_from_config(
    auth_secret: str | None, *, clock: Callable[[], float] = time.time
) -> Authenticate | None:
    """The hook `TETHER_AUTH_SECRET` asks for: signed tokens, or None when it is unset.
    `clock` gives epoch seconds (the adapters pass the hub's, `Hub.clock.wall`)."""
    return signed_token_authenticator(auth_secret, clock=clock) if auth_secret else None
