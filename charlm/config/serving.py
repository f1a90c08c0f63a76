"""What `charlm serve` allows and whom it answers.

`ServeSettings`: its limits, each declared once (its `charlm serve` flag and its check follow
from the field). `ServeAccess`: who may use it (the address listened on, the token, the host
names and browser origins let in): not limits, so never in /health, and the token never in a
repr, a message or a log. No FastAPI or PyTorch here, so the CLI can build its flags and
refuse a bad setting without either installed."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from charlm.config.options import opt, validate
from charlm.errors import CharLMError

TOKEN_ENV = "CHARLM_SERVE_TOKEN"  # the token's environment variable (--token shows in `ps`)


@dataclass
class ServeSettings:
    """Limits of `charlm serve`; each field is the flag of the same name (`--max-length`)."""

    max_length: int = opt(10_000, "Longest sample a request may ask for, in characters.", at_least=1)
    max_samples: int = opt(8, "Most samples per request.", at_least=1)
    max_prime: int = opt(10_000, "Longest prime, in characters.", at_least=1)
    max_body: int = opt(131_072, "Largest request body, in bytes.", at_least=1)
    max_in_flight: int = opt(64, "Requests generated or sent at once; more get 503.", at_least=1)
    max_per_client: int | None = opt(None, "Requests in flight from one client address; more get 429 "
                                     "(default: a quarter of --max-in-flight, at least 4).", at_least=1)
    chunk_steps: int = opt(32, "Characters per row generated before they go to the client (they also go every "
                           "20 ms, and a request's first character at once).", at_least=1)
    # One row at a time gains nothing from more threads, and on a busy machine a second thread
    # that must meet the first at every operation makes each step many times slower
    # (measured: 330 vs 6,500 chars/s for a 2x256 LSTM on 2 loaded cores).
    threads: int = opt(1, "PyTorch CPU threads (1 is fastest for sampling one row at a time).", at_least=1)
    buffer_chars: int = opt(8_192, "Characters generated ahead of a slow reader before its request pauses.",
                            at_least=1)

    def check(self) -> ServeSettings:
        validate(self)
        return self

    def per_client(self) -> int:
        """Requests one client address may have in flight: --max-per-client, else a quarter of
        --max-in-flight (at least 4), so no one client takes every slot."""
        return self.max_per_client if self.max_per_client is not None else max(4, self.max_in_flight // 4)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name, or "" (every interface)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


# A token is sent in an HTTP header: visible ASCII, no spaces (RFC 6750's b64token is narrower still).
_TOKEN = re.compile(r"[\x21-\x7e]+")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


@dataclass(frozen=True)
class ServeAccess:
    """Who may use `charlm serve`. Closed by default: requests must name this server in their
    Host header (localhost, `host`, or one of `allowed_hosts`: `*.example.com` for subdomains,
    `*` for any), browser pages of other sites are refused unless their origin is in
    `cors_origins`, and with a `token` every endpoint but the page and /health needs
    `Authorization: Bearer TOKEN` (docs/commands.md, `charlm serve`)."""

    host: str = "127.0.0.1"  # the address listened on (--host)
    token: str | None = field(default=None, repr=False)  # never shown
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, host: str, token: str | None, allowed_hosts: list[str] | None,
                   cors_origins: list[str] | None) -> ServeAccess:
        """From the flags as given: each list flag repeated, or a comma list, or both."""
        return cls(host=host, token=token or None, allowed_hosts=_items(allowed_hosts),
                   cors_origins=_items(cors_origins))

    def check(self, no_auth: bool = False) -> ServeAccess:
        """Refuse, in one line naming each flag, a bad token, host name or origin, and a server
        reachable from other machines with no token unless `no_auth` says so on purpose."""
        found = []
        if self.token is not None and not _TOKEN.fullmatch(self.token):  # the value is never repeated
            found.append(f"--token/{TOKEN_ENV}: must be visible ASCII characters without spaces "
                         "(it is sent in the Authorization header)")
        found += [f"--allowed-host: {name!r} {problem}" for name in self.allowed_hosts
                  if (problem := _host_problem(name))]
        found += [f"--cors-origin: {origin!r} is not an origin: scheme://host[:port] with no path "
                  "(https://app.example.com)" for origin in self.cors_origins
                  if origin != "*" and not _ORIGIN.fullmatch(origin)]
        if no_auth and self.token is not None:
            found.append(f"--no-auth: a token is set (--token or {TOKEN_ENV}); give one or the other")
        elif not no_auth and self.token is None and not is_loopback(self.host):
            shown = self.host if self.host and ":" not in self.host else repr(self.host)  # not "--host :::"
            found.append(f"--host {shown}: other machines could use this server with no "
                         f"token: set one in the environment variable {TOKEN_ENV} (or --token, which "
                         "other users see in ps), or pass --no-auth to serve without one")
        if found:
            raise CharLMError("; ".join(found))
        return self


def _items(values: list[str] | None) -> tuple[str, ...]:
    # Host names and origins compare in lowercase (browsers send them so).
    return tuple(v.strip().lower() for value in values or () for v in value.split(",") if v.strip())


def _host_problem(name: str) -> str | None:
    """What is wrong with an --allowed-host pattern (the rules of Starlette's TrustedHostMiddleware,
    said as a message rather than its assertion)."""
    if "/" in name:
        return "is not a host name (no scheme or path: app.example.com)"
    if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
        return "is not a host pattern: a wildcard is only *.example.com (subdomains) or * (any)"
    bare = name.strip("[]")
    if ":" in name and not _is_ipv6(bare):
        return "has a port: give the name alone (any port is accepted)"
    return None


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False
