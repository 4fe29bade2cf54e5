"""Every outbound HTTP request leaves through a client made here, and through its guard.

Our own requests (webhooks) use `httpx`; the provider SDKs require their `httpx2` fork, which has
the same API. Both get the same timeouts, pool limits, redirect policy and egress guard here.

The guard (every URL a tenant supplies is untrusted): a request goes out only over `https` to a
host whose every address is public, or to an `EGRESS_ALLOW` entry (`host:port`, then also over
`http`, to any address). It lives in each client's transport: the connection pool under it opens
its connections through a network backend that resolves the name once, checks every address
and connects to a checked one, while TLS still verifies the certificate for the name. So no
code path can skip it, and a name that resolves to something else the second time (DNS
rebinding) cannot slip past. Redirects are not followed, and no proxy from the environment is
used (a proxy would resolve the name itself).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anthropic
import certifi
import httpcore
import httpcore2
import httpx
import httpx2

from ..errors import ProviderRejected, field_error, invalid

USER_AGENT = "ai-rate-limiter/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Allow = frozenset[tuple[str, int]]
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class Departure:
    """When a request may leave: not after `leave_by` (this process's monotonic clock). A late
    one is first offered to `retime` (how late it is); if that gives up, it is not sent and
    `on_late` raises. `sent_at` is when it started to leave, `written_at` when the last of its
    bytes was handed to the network."""

    leave_by: float
    on_late: Callable[[float], Exception]
    sent_at: float | None = None
    written_at: float | None = None

    def retime(self, late_s: float) -> bool:
        """Move `leave_by` to a fresh slot, slept until (True), or give up (False). A method,
        not a callback kept on the departure: one that refers back to its departure would make
        each request a reference cycle, garbage only the collector's full passes free."""
        return False

    @property
    def left_at(self) -> float | None:
        """When it was on its way: written, or at least started."""
        return self.written_at if self.written_at is not None else self.sent_at


_departures = threading.local()


def departing(departure: Departure | None) -> None:
    """The departure the calling thread's next request keeps to (None: any time)."""
    _departures.current = departure


def keep_to(departure: Departure, clock: Callable[[], float] = time.monotonic) -> float:
    """Now, if the request may leave now: a late one is retimed to a fresh slot where it can
    be, else not sent (`on_late`'s error). Retiming in place costs one limiter call; giving up
    costs the connection, a new request and a new choice of provider."""
    now = clock()
    while now > departure.leave_by:
        late = now - departure.leave_by
        if not departure.retime(late):
            raise departure.on_late(late)
        now = clock()
    return now


def _check_departure(request: Any) -> None:
    """A request already late when it is about to take a connection is retimed or not sent
    (and takes none); the last check is in `_leaving`, as its bytes go out."""
    departure: Departure | None = getattr(_departures, "current", None)
    if departure is not None:
        keep_to(departure)


def _leaving(write: Callable[[], None]) -> None:
    """Hand a request to the network with `write`, if the calling thread's departure allows:
    checked just before, once the request has its connection (from the pool, or opened and
    through TLS) and all of its bytes are ready, so a late one is not written at all."""
    departure: Departure | None = getattr(_departures, "current", None)
    if departure is None or departure.sent_at is not None:
        write()
        return
    departure.sent_at = keep_to(departure)
    write()
    departure.written_at = time.monotonic()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: loading the CA bundle takes about 50 ms, which each
    new client would otherwise spend again."""
    return ssl.create_default_context(cafile=certifi.where())


# --- the rules ---------------------------------------------------------------------------------


class Refused(Exception):
    """The guard's verdict on a destination: its text says why ("10.0.0.5 is a private address")."""


class EgressRefused(ProviderRejected, anthropic.AnthropicError):
    """A provider request the guard stopped: permanent, and not a connection failure to retry.
    It is also an `AnthropicError` because the Anthropic SDK passes its own errors on as they
    are (any other exception from the transport becomes its `APIConnectionError`); the OpenAI
    SDK passes on whatever is not an `httpx2` error."""


@functools.cache
def allowlist(text: str) -> Allow:
    """`EGRESS_ALLOW`: comma-separated `host:port` entries (IPv6 as `[::1]:8600`), lower-cased.
    A host is matched as written: `localhost:8600` does not allow `127.0.0.1:8600`."""
    entries: set[tuple[str, int]] = set()
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""  # an IPv6 address needs its brackets
        if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"EGRESS_ALLOW: {raw.strip()!r} is not host:port")
        entries.add((host, int(port)))
    return frozenset(entries)


_RFC_1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped (`::ffff:a.b.c.d`), NAT64
    (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::`); None for any other."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour


def kind(ip: IPAddress) -> str | None:
    """Why no request may go to `ip` ("a private address"); None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            inner_kind = kind(inner)
            return None if inner_kind is None else f"{inner_kind} (it embeds {inner})"
    checks: list[tuple[bool, str]] = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (any(ip in n for n in _RFC_1918) if ip.version == 4 else False, "a private address"),
        (ip in _UNIQUE_LOCAL if ip.version == 6 else False, "a unique-local address"),
        (ip.is_site_local if isinstance(ip, ipaddress.IPv6Address) else False, "a site-local address"),
        (ip in _CGNAT if ip.version == 4 else False, "a shared (CGNAT) address"),
        (ip.is_multicast, "a multicast address"),
        (ip == _BROADCAST, "a broadcast address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "a special-use address"),
    ]
    return next((text for hit, text in checks if hit), None)


# inet_aton's spellings of an IPv4 address: 1 to 4 parts, each decimal, octal (0...) or hex (0x...)
_NUMERIC_IPV4 = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


def literal(host: str) -> IPAddress | None:
    """The address a host written as one means, in every spelling the C resolver accepts
    (`2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`, `[::ffff:169.254.169.254]`); None for
    a name."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _as_written(host: str, ip: IPAddress, reason: str) -> str:
    """`10.0.0.5 is a private address`; an unusual spelling also gets its usual one."""
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return f"{host} is {ip}, {reason}"
    return f"{host} is {reason}"


def lookup(host: str, port: int) -> list[str]:
    """The name's addresses from the system resolver: the one lookup a connection makes."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def vetted(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, every one of them public; else `Refused` naming the first that is
    not. A failed lookup raises `OSError`."""
    ip = literal(host)
    if ip is not None:
        reason = kind(ip)
        if reason is not None:
            raise Refused(_as_written(host, ip, reason))
        return [ip]
    addresses = [ipaddress.ip_address(a) for a in lookup(host, port)]
    if not addresses:
        raise socket.gaierror(f"{host} has no address")
    for ip in addresses:
        reason = kind(ip)
        if reason is not None:
            raise Refused(f"{host} resolves to {ip}, {reason}")
    return addresses


def screen(scheme: str, host: str, port: int | None, allow: Allow) -> int:
    """What can be refused before any lookup: the scheme, and a host that is an address. The
    port the request goes to."""
    scheme = scheme.lower()
    port = port or DEFAULT_PORTS.get(scheme)
    if port is None:
        raise Refused(f"{scheme}: is not https")
    if (host.lower(), port) in allow and scheme in DEFAULT_PORTS:
        return port
    ip = literal(host)
    reason = None if ip is None else kind(ip)
    if ip is not None and reason is not None:
        raise Refused(_as_written(host, ip, reason))
    if scheme != "https":
        raise Refused(f"{scheme}://{host}:{port} is not https (http only to an EGRESS_ALLOW entry)")
    return port


def check_destination(url: str, allow: str, field: str) -> None:
    """The registration-time check of a URL a tenant gives (the same rules as at connection):
    `ValidationFailed` naming `field` if no request could go there."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError as exc:
        problem = f"is not a valid URL ({exc})"
    else:
        try:
            port = screen(parts.scheme, host, port, allowlist(allow))
            if (host, port) not in allowlist(allow):
                vetted(host, port)
            return
        except Refused as exc:
            problem = f"egress refused: {exc}"
        except OSError:
            problem = f"{host} does not resolve"
    raise invalid([field_error(field.split("."), problem)])


# --- the transports ----------------------------------------------------------------------------

Stream = TypeVar("Stream")


def _pinned(
    connect: Callable[[str], Stream],
    host: str,
    port: int,
    allow: Allow,
    errors: tuple[type[Exception], ...],
) -> Stream:
    """Connect to `host`: an allowed entry as it is, any other host at one of its vetted
    addresses, tried in the resolver's order (as `socket.create_connection` does)."""
    if (host, port) in allow:
        return connect(host)
    try:
        addresses = vetted(host, port)
    except OSError as exc:
        raise errors[0](f"{host}: {exc}") from exc
    last: Exception | None = None
    for ip in addresses:
        try:
            return connect(str(ip))
        except errors as exc:
            last = exc
    assert last is not None
    raise last


def _one_write_stream(core: ModuleType) -> Any:
    """httpcore's stream holding what is written until the first read, then writing it at once.

    httpcore writes a request's headers and its body separately; between the two a thread can
    wait for the interpreter for many milliseconds on a busy machine, and the provider counts
    the request only once its last byte is in. One write leaves nothing between the departure
    check and the wire but the write itself (HTTP/1.1 always reads after a whole request).

    The read timeout bounds the whole answer too, not only each read: from the moment the
    request leaves, a server has that long to send all of it, so one that trickles a byte at a
    time cannot hold a call (and the message's lease) for as long as it likes."""

    class OneWriteStream(core.NetworkStream):  # type: ignore[name-defined]
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.pending: list[bytes] = []
            self.timeout: float | None = None
            self.answer_by: float | None = None  # on time.monotonic()

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            if buffer:
                self.pending.append(bytes(buffer))
                self.timeout = timeout

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            if self.pending:
                data = b"".join(self.pending)
                self.pending.clear()
                self.answer_by = None if timeout is None else time.monotonic() + timeout
                # As httpcore does: a server may have answered and closed early.
                with contextlib.suppress(core.WriteError):
                    _leaving(lambda: self.inner.write(data, self.timeout))
            if self.answer_by is not None:
                left = self.answer_by - time.monotonic()
                if left <= 0:
                    raise core.ReadTimeout("the whole answer did not come within the timeout")
                timeout = left if timeout is None else min(timeout, left)
            return bytes(self.inner.read(max_bytes, timeout))

        def close(self) -> None:
            self.pending.clear()
            self.inner.close()

        def start_tls(self, *args: Any, **kwargs: Any) -> Any:
            return OneWriteStream(self.inner.start_tls(*args, **kwargs))

        def get_extra_info(self, info: str) -> Any:
            return self.inner.get_extra_info(info)

    return OneWriteStream


def _pinned_backend(core: ModuleType) -> Any:
    """httpcore's network backend connecting only to vetted addresses, for `core`: httpcore
    (under `httpx`) or httpcore2 (under `httpx2`, the SDKs' client), which have the same API."""

    stream = _one_write_stream(core)

    class PinnedBackend(core.NetworkBackend):  # type: ignore[name-defined]
        def __init__(self, allow: Allow) -> None:
            self.allow = allow
            self.inner = core.SyncBackend()

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> Any:
            connected = _pinned(
                lambda address: self.inner.connect_tcp(address, port, timeout, local_address, socket_options),
                host,
                port,
                self.allow,
                (core.ConnectError, core.ConnectTimeout),
            )
            return stream(connected)

        def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
        ) -> Any:
            raise Refused("a unix socket is no destination")

        def sleep(self, seconds: float) -> None:
            self.inner.sleep(seconds)

    return PinnedBackend


def _guarded_transport(lib: ModuleType, core: ModuleType, refused: Callable[[str, Any], Exception]) -> Any:
    """`lib`'s transport on a pool of `core` that connects through the pinned backend, screening
    each request first; a refusal is raised as `refused(message, request)` makes it."""
    backend = _pinned_backend(core)

    class GuardedTransport(lib.HTTPTransport):  # type: ignore[name-defined]
        def __init__(self, allow: Allow, limits: Any) -> None:
            super().__init__(verify=tls_context(), limits=limits, trust_env=False)
            self.allow = allow
            self._pool = core.ConnectionPool(
                ssl_context=tls_context(),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=backend(allow),
            )

        def handle_request(self, request: Any) -> Any:
            url = request.url
            try:
                screen(url.scheme, url.raw_host.decode("ascii"), url.port, self.allow)
                return super().handle_request(request)
            except Refused as exc:
                raise refused(f"egress refused: {exc}", request) from None

    return GuardedTransport


# Webhooks: a refusal is an `httpx.ConnectError` ("egress refused: ..."), which the sender records.
GuardedTransport = _guarded_transport(httpx, httpcore, lambda msg, req: httpx.ConnectError(msg, request=req))
# The SDKs: a refusal is an `EgressRefused`, a permanent provider error.
GuardedTransport2 = _guarded_transport(httpx2, httpcore2, lambda msg, req: EgressRefused(msg))


def _options(lib: Any, timeout_s: float) -> dict[str, Any]:
    return {
        "timeout": lib.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        "headers": {"user-agent": USER_AGENT},
        "follow_redirects": False,
        "trust_env": False,  # no proxy from the environment: it would resolve names itself
    }


def http_client(timeout_s: float, max_connections: int = 100, allow: str = "") -> httpx.Client:
    """Our own client (webhooks); `allow`: the `EGRESS_ALLOW` setting."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(transport=GuardedTransport(allowlist(allow), limits), **_options(httpx, timeout_s))


def sdk_http_client(timeout_s: float, max_connections: int = 100, allow: str = "") -> httpx2.Client:
    """The SDKs' client; `allow`: the `EGRESS_ALLOW` setting."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx2.Client(
        transport=GuardedTransport2(allowlist(allow), limits),
        event_hooks={"request": [_check_departure]},
        **_options(httpx2, timeout_s),
    )
