"""Headless-Service discovery through DNS: A/AAAA, per-pod names and SRV records, with backoff.

Owns the lookups and the wait-until-present loops, and the error that says which names were
tried, what each returned and the likely fix. Never caches answers: a retry always asks the server.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Answer",
    "DiscoveryError",
    "DiscoveryTimeoutError",
    "DnsPythonResolver",
    "FastPathResolver",
    "Resolver",
    "ServiceMembers",
    "SystemResolver",
    "answer_from_response",
    "default_resolver",
    "format_host_port",
    "resolve_headless_service",
    "wait_for_name",
]

#: Statuses an ``Answer`` can carry.
OK, NXDOMAIN, NODATA, TIMEOUT, SERVFAIL, ERROR = (
    "ok",
    "NXDOMAIN",
    "NODATA",
    "TIMEOUT",
    "SERVFAIL",
    "ERROR",
)


@dataclass(frozen=True)
class Answer:
    """One lookup: ``values`` are addresses for A/AAAA and ``target:port`` strings for SRV."""

    name: str
    rdtype: str
    status: str
    values: tuple[str, ...] = ()
    detail: str = ""

    def describe(self) -> str:
        if self.status == OK:
            return ", ".join(self.values)
        return self.status + (f" ({self.detail})" if self.detail else "")


class Resolver(Protocol):
    def query(self, name: str, rdtype: str) -> Answer: ...


class DiscoveryError(RuntimeError):
    """DNS does not (yet) describe the peers the rendezvous needs."""


class DiscoveryTimeoutError(DiscoveryError, TimeoutError):
    """The expected records did not appear before the timeout."""


def answer_from_response(name: str, rdtype: str, response: object) -> Answer:
    """Turn a ``dns.message.Message`` (live or captured) into an ``Answer``; CNAMEs are followed."""
    import dns.rcode
    import dns.rdatatype

    rcode = response.rcode()  # type: ignore[attr-defined]
    if rcode == dns.rcode.NXDOMAIN:
        return Answer(name, rdtype, NXDOMAIN)
    if rcode != dns.rcode.NOERROR:
        return Answer(name, rdtype, SERVFAIL, detail=dns.rcode.to_text(rcode))
    wanted = dns.rdatatype.from_text(rdtype)
    values: list[str] = []
    for rrset in response.answer:  # type: ignore[attr-defined]
        if rrset.rdtype != wanted:
            continue
        for rdata in rrset:
            if wanted == dns.rdatatype.SRV:
                values.append(f"{str(rdata.target).rstrip('.')}:{rdata.port}")
            else:
                values.append(str(rdata.address))
    if not values:
        return Answer(name, rdtype, NODATA)
    return Answer(name, rdtype, OK, tuple(sorted(set(values), key=_address_sort_key)))


def _address_sort_key(value: str) -> tuple[int, object]:
    try:
        address = ipaddress.ip_address(value)
        return (address.version, int(address))
    except ValueError:
        return (99, value)


class DnsPythonResolver:
    """Asks the nameservers of /etc/resolv.conf directly (UDP, then TCP if truncated), no cache."""

    def __init__(self, *, timeout_s: float = 1.0, nameservers: Sequence[str] | None = None) -> None:
        import dns.resolver

        self.timeout_s = timeout_s
        if nameservers is None:
            nameservers = list(dns.resolver.Resolver(configure=True).nameservers)
        if not nameservers:
            raise DiscoveryError(
                "no nameserver in /etc/resolv.conf; a pod always has one - is this a pod?"
            )
        self.nameservers = [str(server) for server in nameservers]

    def query(self, name: str, rdtype: str) -> Answer:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.query

        request = dns.message.make_query(name.rstrip(".") + ".", rdtype)
        last = Answer(name, rdtype, TIMEOUT, detail=f"no answer from {', '.join(self.nameservers)}")
        for server in self.nameservers:
            try:
                response = dns.query.udp(request, server, timeout=self.timeout_s)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(request, server, timeout=self.timeout_s)
            except dns.exception.Timeout:
                last = Answer(
                    name, rdtype, TIMEOUT, detail=f"{server} did not answer in {self.timeout_s} s"
                )
                continue
            except OSError as error:
                last = Answer(name, rdtype, ERROR, detail=f"{server}: {error}")
                continue
            answer = answer_from_response(name, rdtype, response)
            if answer.status != SERVFAIL:
                return answer
            last = answer
        return last


class SystemResolver:
    """getaddrinfo-based A/AAAA lookups, used when dnspython is missing; cannot tell NXDOMAIN from NODATA."""

    def query(self, name: str, rdtype: str) -> Answer:
        family = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}.get(rdtype)
        if family is None:
            raise DiscoveryError(
                f"{rdtype} lookups need dnspython: pip install 'dnspython>=2.6' (or trainkit[dev])"
            )
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as error:
            status = TIMEOUT if error.errno == socket.EAI_AGAIN else NXDOMAIN
            return Answer(name, rdtype, status, detail=f"getaddrinfo: {error.strerror}")
        values = tuple(sorted({info[4][0] for info in infos}, key=_address_sort_key))
        return Answer(name, rdtype, OK, values) if values else Answer(name, rdtype, NODATA)


class FastPathResolver:
    """getaddrinfo first (no import, the common case: the record is there); on a miss, or for SRV,
    dnspython's exact answer (NXDOMAIN vs NODATA vs timeout) for the retry loop and the error."""

    def __init__(self, *, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self._exact: Resolver | None = None

    def query(self, name: str, rdtype: str) -> Answer:
        if rdtype in {"A", "AAAA"}:
            # The trailing dot keeps the search list (ndots:5 in pods) out of the lookup.
            answer = SystemResolver().query(name.rstrip(".") + ".", rdtype)
            if answer.status == OK:
                return Answer(name, rdtype, OK, answer.values)
        if self._exact is None:
            try:
                import dns.message  # noqa: F401
            except ImportError:
                self._exact = SystemResolver()
            else:
                self._exact = DnsPythonResolver(timeout_s=self.timeout_s)
        return self._exact.query(name, rdtype)


def default_resolver(*, timeout_s: float = 1.0) -> Resolver:
    """The system resolver for hits, dnspython (when installed) for misses and SRV."""
    return FastPathResolver(timeout_s=timeout_s)


def format_host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _families(family: str) -> tuple[str, ...]:
    choices = {"auto": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}
    if family not in choices:
        raise ValueError(f"ip family {family!r}: expected auto, ipv4 or ipv6")
    return choices[family]


@dataclass
class _Attempts:
    """The last answer and the number of tries for each (name, type), for the timeout message."""

    last: dict[tuple[str, str], Answer] = field(default_factory=dict)
    count: dict[tuple[str, str], int] = field(default_factory=dict)

    def ask(self, resolver: Resolver, name: str, rdtype: str) -> Answer:
        answer = resolver.query(name, rdtype)
        key = (name, rdtype)
        self.last[key] = answer
        self.count[key] = self.count.get(key, 0) + 1
        return answer

    def lines(self) -> list[str]:
        return [
            f"  {name} {rdtype}: {answer.describe()} ({_tries(self.count[(name, rdtype)])})"
            for (name, rdtype), answer in self.last.items()
        ]


def _tries(count: int) -> str:
    return "1 try" if count == 1 else f"{count} tries"


def _backoff(initial_s: float = 0.05, maximum_s: float = 1.0) -> Iterable[float]:
    delay = initial_s
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, maximum_s)


def _hints(
    service: str, attempts: _Attempts, *, expected: int | None, pod_names: Sequence[str]
) -> list[str]:
    service_answers = [a for (n, _), a in attempts.last.items() if n == service]
    service_ok = [a for a in service_answers if a.status == OK]
    num_service_addresses = len({v for a in service_ok for v in a.values})
    statuses = {a.status for a in attempts.last.values()}
    hints: list[str] = []
    if statuses & {TIMEOUT, ERROR, SERVFAIL}:
        hints.append(
            "the DNS server did not answer or failed: check the nameserver in /etc/resolv.conf "
            "(CoreDNS running? a NetworkPolicy blocking port 53?)"
        )
    if service_answers and not service_ok:
        hints.append(
            f"the Service {service} has no records: create it headless (clusterIP: None) with a "
            "selector matching the pods, in this namespace, and set publishNotReadyAddresses: true "
            "so pods resolve before they are Ready"
        )
    elif expected is not None and num_service_addresses < expected:
        hints.append(
            f"only {num_service_addresses} of {expected} pods are behind {service}: set "
            "publishNotReadyAddresses: true on the Service (pods are listed only once Ready otherwise), "
            "and check that every pod started (kubectl get pods)"
        )
    if pod_names and service_ok:
        hints.append(
            f"{service} resolves but the pod name(s) {', '.join(pod_names)} do not: set "
            f"spec.subdomain to the Service name (StatefulSet: serviceName) and spec.hostname, and "
            "check the pod with that ordinal exists"
        )
    if pod_names:
        hints.append(
            "if the pod exists but is not Ready, its records are hidden unless the Service sets "
            "publishNotReadyAddresses: true"
        )
    if pod_names and not service_ok:
        hints.append(
            f"the pod(s) {', '.join(pod_names)} never appeared: check they were scheduled and that "
            "their spec.subdomain names this Service"
        )
    return hints


def _timeout_error(
    what: str,
    service: str,
    attempts: _Attempts,
    timeout_s: float,
    *,
    expected: int | None,
    pod_names: Sequence[str],
    purpose: str | None = None,
) -> DiscoveryTimeoutError:
    lines = [f"k8s discovery: {what} not found in DNS within {timeout_s:g} s (service {service})."]
    if purpose:
        lines.append(f"Needed because: {purpose}.")
    lines.append("Names tried:")
    lines += attempts.lines()
    hints = _hints(service, attempts, expected=expected, pod_names=pod_names)
    if hints:
        lines.append("Likely fix:")
        lines += [f"  - {hint}" for hint in hints]
    return DiscoveryTimeoutError("\n".join(lines))


def wait_for_name(
    name: str,
    *,
    service: str,
    timeout_s: float,
    resolver: Resolver | None = None,
    family: str = "auto",
    purpose: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, ...]:
    """Addresses of ``name`` (a pod's FQDN), retrying NXDOMAIN/NODATA with backoff until ``timeout_s``.

    Raises ``DiscoveryTimeoutError`` naming ``name``, the Service, every answer and the likely fix.
    """
    resolver = resolver or default_resolver()
    attempts = _Attempts()
    deadline = clock() + timeout_s
    for delay in _backoff():
        addresses = _lookup_addresses(resolver, attempts, name, family)
        if addresses:
            return addresses
        if clock() + delay > deadline:
            # One look at the Service itself makes the error say which half of the setup is missing.
            for rdtype in _families(family):
                attempts.ask(resolver, service, rdtype)
            raise _timeout_error(
                name, service, attempts, timeout_s, expected=None, pod_names=[name], purpose=purpose
            )
        sleep(delay)
    raise AssertionError("unreachable")


def _lookup_addresses(
    resolver: Resolver, attempts: _Attempts, name: str, family: str
) -> tuple[str, ...]:
    found: list[str] = []
    for rdtype in _families(family):
        answer = attempts.ask(resolver, name, rdtype)
        found.extend(answer.values if answer.status == OK else ())
    return tuple(found)


@dataclass(frozen=True)
class ServiceMembers:
    """What DNS says about a headless Service: its pod addresses, SRV targets and per-pod names."""

    service: str
    addresses: tuple[str, ...]
    srv: tuple[tuple[str, int], ...] = ()
    pods: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "service": self.service,
            "addresses": list(self.addresses),
            "srv": [f"{target}:{port}" for target, port in self.srv],
            "pods": {name: list(addresses) for name, addresses in self.pods},
        }


def resolve_headless_service(
    service: str,
    *,
    min_members: int = 1,
    pod_names: Sequence[str] = (),
    port_name: str | None = None,
    timeout_s: float = 60.0,
    resolver: Resolver | None = None,
    family: str = "auto",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ServiceMembers:
    """Wait until ``service`` (an FQDN) lists ``min_members`` addresses and every name in ``pod_names`` resolves.

    With ``port_name`` the SRV records ``_<port_name>._tcp.<service>`` must list ``min_members``
    targets too. Partial answers and NXDOMAIN are retried with backoff until ``timeout_s``; then
    ``DiscoveryTimeoutError`` names every lookup, its last answer and the likely fix.
    """
    resolver = resolver or default_resolver()
    attempts = _Attempts()
    deadline = clock() + timeout_s
    srv_name = f"_{port_name}._tcp.{service}" if port_name else None
    for delay in _backoff():
        addresses = _lookup_addresses(resolver, attempts, service, family)
        pods = [(name, _lookup_addresses(resolver, attempts, name, family)) for name in pod_names]
        srv: list[tuple[str, int]] = []
        if srv_name is not None:
            answer = attempts.ask(resolver, srv_name, "SRV")
            for value in answer.values if answer.status == OK else ():
                target, _, port = value.rpartition(":")
                srv.append((target, int(port)))
        missing = [name for name, found in pods if not found]
        complete = (
            len(addresses) >= min_members
            and not missing
            and (srv_name is None or len(srv) >= min_members)
        )
        if complete:
            return ServiceMembers(service, addresses, tuple(sorted(srv)), tuple(pods))
        if clock() + delay > deadline:
            what = f"{min_members} member(s) of {service}" + (
                f" and {', '.join(missing)}" if missing else ""
            )
            raise _timeout_error(
                what, service, attempts, timeout_s, expected=min_members, pod_names=missing
            )
        sleep(delay)
    raise AssertionError("unreachable")
