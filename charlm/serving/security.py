"""Who `charlm serve` answers (closed by default): the checks in front of the app, outermost first.

    HostCheck    the Host header must name this server: localhost, the address served or an
                 --allowed-host (the defence against DNS rebinding); Starlette's TrustedHostMiddleware
    OriginCheck  a browser page of another site is refused unless --cors-origin lets it in;
                 CORS headers and preflights by Starlette's CORSMiddleware
    BearerAuth   with a token, every endpoint but the page and /health needs
                 `Authorization: Bearer TOKEN`

Every refusal is the server's JSON error (`error_response`, used by the app's handlers too).
Limits per client are the app's admission (`charlm.serving.app.InFlight`), not a check here.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Mapping, Sequence

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charlm.config.serving import ServeAccess

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")  # as Host headers spell them (IPv6 in brackets)
OPEN_PATHS = frozenset({"/", "/health"})  # the page (it asks for the token) and liveness (probes send none)


def error_response(status: int, field: str | None, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    """The server's one error shape: `{"error": message, "field": field}`."""
    # ensure_ascii: a field name or value may hold lone surrogates, which UTF-8 cannot encode.
    body = json.dumps({"error": message, "field": field}, ensure_ascii=True, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def guard(app: FastAPI, access: ServeAccess) -> None:
    """Put the checks in front of `app` (added last = run first: Host, then Origin, then token)."""
    app.add_middleware(BearerAuth, token=access.token)
    app.add_middleware(OriginCheck, origins=access.cors_origins)
    app.add_middleware(HostCheck, names=(*LOCAL_NAMES, access.host, *access.allowed_hosts))


def _spellings(address: str) -> list[str]:
    """How a Host header names `address`: IPv6 in brackets, an IPv4-mapped one as IPv4 too."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return [address] if address else []
    mapped = getattr(ip, "ipv4_mapped", None)
    return [f"[{ip}]" if ip.version == 6 else str(ip), *([str(mapped)] if mapped else [])]


class HostCheck:
    """Refuses (400) a request whose Host header names neither localhost, the address served,
    nor an allowed name: a page of another site whose name it has pointed at this machine
    (DNS rebinding) sends its own name. Starlette's TrustedHostMiddleware decides; this adds
    the address each connection came in on (with 0.0.0.0 or ::, whichever of the machine's
    addresses the client dialled: a number cannot be a rebound name) and answers in JSON."""

    def __init__(self, app: ASGIApp, names: Sequence[str]) -> None:
        self.app = app
        self.names = [s for name in names for s in _spellings(name)]
        self._checks: dict[str, TrustedHostMiddleware] = {}  # per local address: a few at most

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        local = (scope.get("server") or ("",))[0] or ""
        check = self._checks.get(local)
        if check is None:
            check = self._checks[local] = TrustedHostMiddleware(
                self._through, allowed_hosts=[*self.names, *_spellings(local)], www_redirect=False)
        await check(scope, receive, _Refusal(scope, receive, send))

    async def _through(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert isinstance(send, _Refusal)
        await self.app(scope, receive, send.send)  # allowed: the app answers on the real `send`


class _Refusal:
    """The `send` TrustedHostMiddleware is given: an allowed request reaches the app with the
    real one (`HostCheck._through`), so only the middleware's own plain-text refusal comes here,
    and it is answered with the server's JSON error instead."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            host = Headers(scope=self.scope).get("host")
            said = "no Host header: requests must name" if host is None else f"Host {host[:100]!r} is not"
            text = (f"{said} a name of this server (it answers to localhost, the address it serves "
                    "and each --allowed-host)")
            await error_response(400, None, text)(self.scope, self.receive, self.send)
        # The refusal's body is dropped: the JSON answer above is complete.


class OriginCheck:
    """Refuses (403) a request whose Origin is neither this server's own nor allowed
    (--cors-origin) before it runs: a page of another site may POST text/plain here without
    asking first, and CORS headers only keep it from reading the answer, not the server from
    generating it. Allowed origins get Starlette's CORSMiddleware: preflights and headers."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=("GET", "POST"),
                                   allow_headers=("Authorization",), expose_headers=("Retry-After",))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self.allows(origin, headers.get("host", "")):
                message = (f"Origin {origin[:100]!r}: pages of other sites may not use this server "
                           "(it lets in its own and each --cors-origin)")
                await error_response(403, None, message)(scope, receive, send)
                return
        await self.cors(scope, receive, send)

    def allows(self, origin: str, host: str) -> bool:
        """Allowed, or this server's own page: the origin's host:port is the Host the request
        was sent to (already checked by HostCheck). The scheme is not compared: behind a TLS
        proxy the page is https:// and the request reaches us as http://."""
        return self.cors.is_allowed_origin(origin) or origin.partition("://")[2].lower() == host.lower() != ""


class BearerAuth:
    """With a token, refuses (401, `WWW-Authenticate: Bearer`) every request but those of
    `OPEN_PATHS` that does not carry `Authorization: Bearer TOKEN`."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            answer = error_response(401, None, "this server needs a token: send the header "
                                    "Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
        # compare_digest: the time taken does not tell how much of a guess was right.
        elif not secrets.compare_digest(given.strip().encode("latin-1"), self.token):
            answer = error_response(401, None, "wrong token",
                                    {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        else:
            await self.app(scope, receive, send)
            return
        await answer(scope, receive, send)
