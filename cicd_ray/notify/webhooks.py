"""Notifications: the document POSTed when a run ends, its signature, where it may be sent, and
when a failed delivery is tried again. Pure, but for `send` (one HTTP request).

A pipeline names the URL, so it must not be able to aim the service at the cluster's own
endpoints: a target on a loopback, private, link-local or otherwise reserved address is refused
unless CICD_RAY_WEBHOOK_ALLOW lists its host or a network holding its address. The address is
checked when the URL's host is resolved, and the request goes to that address (no second lookup
a DNS answer could change in between); redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from cicd_ray.errors import CicdError

SIGNATURE_HEADER = "X-Cicd-Signature-256"
DELIVERY_HEADER = "X-Cicd-Delivery"
TIMESTAMP_HEADER = "X-Cicd-Timestamp"
MAX_AGE_S = 300.0  # a receiver refuses a signature older than this (a replay)
SEND_TIMEOUT_S = 10.0
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
DELIVERY_WINDOW_S = 900.0  # a delivery is given up this long after the run ended
TAIL_LINES = 20  # of each failed step's log, in the document

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class TargetRefused(CicdError):
    """A webhook target this service will not send to."""


def parse_allow(text: str) -> list[str]:
    """CICD_RAY_WEBHOOK_ALLOW: hosts or CIDRs, comma-separated. ValueError names a bad one."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "/" in item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as e:
                raise ValueError(f"{item!r} is not a network: {e}") from None
        elif not item.replace(".", "").replace("-", "").replace(":", "").isalnum():
            raise ValueError(f"{item!r} is neither a host name, an address nor a CIDR")
        out.append(item.lower())
    return out


def _allowed(host: str, address: Address | None, allow: list[str]) -> bool:
    for item in allow:
        if "/" in item:
            if address is not None and address in ipaddress.ip_network(item, strict=False):
                return True
        elif item == host.lower() or (address is not None and item == str(address)):
            return True
    return False


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: IPv4 in the last 32 bits


def _internal(address: Address) -> bool:
    """Internal itself, or an IPv6 address that carries an internal IPv4 one (NAT64, 6to4,
    mapped, Teredo): a translator on the way would deliver to that."""
    if not address.is_global or address.is_multicast:
        return True
    return any(_internal(inner) for inner in _embedded(address))


def _embedded(address: Address) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo:
        found += list(address.teredo)
    if address in NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def refused_targets(urls: list[str], allow: list[str]) -> list[tuple[int, str]]:
    """The targets refused before any lookup (at submission): `localhost` and literal internal
    addresses not allowed. (index, why) for each."""
    out = []
    for i, url in enumerate(urls):
        host = urlsplit(url).hostname or ""
        address = _literal(host)
        internal = (
            host == "localhost"
            or host.endswith(".localhost")
            or (address is not None and _internal(address))
        )
        if internal and not _allowed(host, address, allow):
            out.append(
                (
                    i,
                    f"{host} is a loopback or private address; list it in "
                    "CICD_RAY_WEBHOOK_ALLOW to send notifications there",
                )
            )
    return out


def _getaddrinfo(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def checked_address(url: str, allow: list[str], resolve: Resolver = _getaddrinfo) -> str:
    """The address to send to: the URL's host resolved, each address it has checked."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return checked_host(parts.hostname or "", port, allow, resolve)


def checked_host(host: str, port: int, allow: list[str], resolve: Resolver = _getaddrinfo) -> str:
    """The address to reach `host` at: each address it has checked (a notification's, a git
    source's submitted through the API); TargetRefused for an internal one not allowed."""
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except (OSError, ValueError) as e:
        raise TargetRefused(f"cannot resolve {host}: {e}") from None
    if not addresses:
        raise TargetRefused(f"{host} has no address")
    for address in addresses:
        if _internal(address) and not _allowed(host, address, allow):
            raise TargetRefused(
                f"{host} resolves to {address}, a loopback or private "
                "address; list it in CICD_RAY_WEBHOOK_ALLOW to send there"
            )
    return str(addresses[0])


def project_key(secret: str, project: str) -> str:
    """The key a project's notifications are signed with: HMAC-SHA256 of the project's name
    under CICD_RAY_WEBHOOK_SECRET, in hex. Each project's receivers hold their own key: one
    cannot sign (or check) another's."""
    return hmac.new(
        secret.encode(), f"cicd-ray notify {project}".encode(), hashlib.sha256
    ).hexdigest()


def sign(body: bytes, key: str, timestamp: int) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of `<timestamp>.<body>` under the project's key (the body
    names the project, the run and the delivery)."""
    signed = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()


def verify(
    body: bytes, key: str, header: str, timestamp: str, now: float, max_age_s: float = MAX_AGE_S
) -> bool:
    """For receivers (and tests): the signature matches the body and its timestamp, compared
    in constant time, and the timestamp is recent (a captured delivery replayed later fails)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(sign(body, key, int(timestamp)), header or "")


def document(run: dict, failed: list[dict], page_url: str, delivery_id: str) -> bytes:
    """The JSON POSTed: its project, delivery id, run, pipeline, state, commit, reason, failed
    steps with their log tails' last lines, and a link to the run's page."""
    body = {
        "project": run.get("project", "default"),
        "delivery": delivery_id,
        "run": run["id"],
        "pipeline": run["pipeline"],
        "state": run["state"],
        "commit": run.get("commit"),
        "branch": run.get("branch", ""),
        "reason": run.get("reason", ""),
        "failed_steps": failed,
        "url": page_url,
    }
    return json.dumps(body, sort_keys=True).encode()


def log_tail(data: bytes, lines: int = TAIL_LINES) -> list[str]:
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def next_try(attempts: int, first_at: float, now: float) -> float | None:
    """When to try again after `attempts` failed tries (1, 2, 4 ... 60 s apart), or None once
    DELIVERY_WINDOW_S has passed since the first."""
    at = now + min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempts - 1))
    return at if at - first_at <= DELIVERY_WINDOW_S else None


def send(
    url: str,
    body: bytes,
    key: str,
    delivery_id: str,
    allow: list[str],
    resolve: Resolver = _getaddrinfo,
    extra: dict[str, str] | None = None,
    now: float | None = None,
) -> int:
    """POST the body to the checked address of `url`, signed with the project's `key` (if
    any) and the time, with the `extra` headers (a commit status's credentials); the HTTP
    status. TargetRefused for a refused target, OSError-like httpx errors for a failed
    request."""
    import time

    import httpx

    address = checked_address(url, allow, resolve)
    parts = urlsplit(url)
    host_port = f"[{address}]" if ":" in address else address
    if parts.port:
        host_port += f":{parts.port}"
    pinned = urlunsplit((parts.scheme, host_port, parts.path or "/", parts.query, ""))
    headers = {
        "Content-Type": "application/json",
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "User-Agent": "cicd-ray",
        DELIVERY_HEADER: delivery_id,
    }
    if key:
        stamp = int(time.time() if now is None else now)
        headers[TIMESTAMP_HEADER] = str(stamp)
        headers[SIGNATURE_HEADER] = sign(body, key, stamp)
    headers.update(extra or {})
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    with httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False) as client:
        response = client.post(pinned, content=body, headers=headers, extensions=extensions)
    return response.status_code
