"""DNS answers (captured from dnsmasq serving headless-Service records), backoff and timeout errors."""

from __future__ import annotations

import dns.message
import pytest

from trainkit.k8s.dns import (
    Answer,
    DiscoveryTimeoutError,
    answer_from_response,
    format_host_port,
    resolve_headless_service,
    wait_for_name,
)

SERVICE = "train.default.svc.cluster.local"

CAPTURED = {
    ("train.default.svc.cluster.local", "A"): """id 31297
opcode QUERY
rcode NOERROR
flags QR AA RD RA
;QUESTION
train.default.svc.cluster.local. IN A
;ANSWER
train.default.svc.cluster.local. 0 IN A 10.213.0.11
train.default.svc.cluster.local. 0 IN A 10.213.0.10
;AUTHORITY
;ADDITIONAL
""",
    ("_c10d._tcp.train.default.svc.cluster.local", "SRV"): """id 45912
opcode QUERY
rcode NOERROR
flags QR AA RD RA
;QUESTION
_c10d._tcp.train.default.svc.cluster.local. IN SRV
;ANSWER
_c10d._tcp.train.default.svc.cluster.local. 0 IN SRV 0 0 29400 w-10.train.default.svc.cluster.local.
_c10d._tcp.train.default.svc.cluster.local. 0 IN SRV 0 0 29400 w-0.train.default.svc.cluster.local.
;AUTHORITY
;ADDITIONAL
w-0.train.default.svc.cluster.local. 0 IN A 10.213.0.10
""",
    ("w-2.train.default.svc.cluster.local", "A"): """id 45328
opcode QUERY
rcode NXDOMAIN
flags QR RD RA
;QUESTION
w-2.train.default.svc.cluster.local. IN A
;ANSWER
;AUTHORITY
;ADDITIONAL
""",
    ("w-0.train.default.svc.cluster.local", "AAAA"): """id 63167
opcode QUERY
rcode NOERROR
flags QR RD RA
;QUESTION
w-0.train.default.svc.cluster.local. IN AAAA
;ANSWER
;AUTHORITY
;ADDITIONAL
""",
}


def parse(name: str, rdtype: str) -> Answer:
    return answer_from_response(name, rdtype, dns.message.from_text(CAPTURED[(name, rdtype)]))


def test_captured_answers() -> None:
    assert parse(SERVICE, "A") == Answer(SERVICE, "A", "ok", ("10.213.0.10", "10.213.0.11"))
    srv = parse(f"_c10d._tcp.{SERVICE}", "SRV")
    assert srv.values == (f"w-0.{SERVICE}:29400", f"w-10.{SERVICE}:29400")
    assert parse(f"w-2.{SERVICE}", "A").status == "NXDOMAIN"
    assert parse(f"w-0.{SERVICE}", "AAAA").status == "NODATA"


def test_servfail_is_not_mistaken_for_absence() -> None:
    text = CAPTURED[(f"w-2.{SERVICE}", "A")].replace("NXDOMAIN", "SERVFAIL")
    answer = answer_from_response(f"w-2.{SERVICE}", "A", dns.message.from_text(text))
    assert (answer.status, answer.detail) == ("SERVFAIL", "SERVFAIL")


class ScriptedResolver:
    """Answers from a table that changes over (fake) time: records appear when their time comes."""

    def __init__(
        self, clock: list[float], records: dict[tuple[str, str], tuple[float, tuple[str, ...]]]
    ) -> None:
        self.clock = clock
        self.records = records
        self.queries: list[tuple[str, str]] = []

    def query(self, name: str, rdtype: str) -> Answer:
        self.queries.append((name, rdtype))
        appears_at, values = self.records.get((name, rdtype), (float("inf"), ()))
        if self.clock[0] >= appears_at:
            return Answer(name, rdtype, "ok", values)
        return Answer(name, rdtype, "NXDOMAIN" if rdtype == "A" else "NODATA")


def fake_time() -> tuple[list[float], object, object]:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return now, sleep, lambda: now[0]


def test_wait_for_name_retries_until_the_record_appears() -> None:
    now, sleep, clock = fake_time()
    resolver = ScriptedResolver(now, {(f"w-0.{SERVICE}", "A"): (5.0, ("10.0.0.5",))})
    found = wait_for_name(
        f"w-0.{SERVICE}", service=SERVICE, timeout_s=30, resolver=resolver, sleep=sleep, clock=clock
    )
    assert found == ("10.0.0.5",)
    assert 5.0 <= now[0] < 7.0  # backoff is capped at ~1 s, so it notices within a second
    assert 8 <= len(resolver.queries) // 2 <= 20


def test_wait_for_name_timeout_names_everything_and_the_fix() -> None:
    now, sleep, clock = fake_time()
    resolver = ScriptedResolver(now, {(SERVICE, "A"): (0.0, ("10.0.0.6",))})
    with pytest.raises(DiscoveryTimeoutError) as caught:
        wait_for_name(
            f"w-0.{SERVICE}",
            service=SERVICE,
            timeout_s=8,
            resolver=resolver,
            sleep=sleep,
            clock=clock,
        )
    assert now[0] <= 8.0
    text = str(caught.value)
    assert f"w-0.{SERVICE} not found in DNS within 8 s (service {SERVICE})" in text
    assert f"w-0.{SERVICE} A: NXDOMAIN (" in text and f"{SERVICE} A: 10.0.0.6" in text
    assert "spec.subdomain" in text


def test_missing_service_suggests_creating_it_headless() -> None:
    now, sleep, clock = fake_time()
    with pytest.raises(
        DiscoveryTimeoutError, match=r"clusterIP: None[\s\S]*publishNotReadyAddresses"
    ):
        resolve_headless_service(
            SERVICE,
            min_members=2,
            timeout_s=3,
            resolver=ScriptedResolver(now, {}),
            sleep=sleep,
            clock=clock,
        )


def test_partial_answers_wait_for_all_members_and_srv() -> None:
    now, sleep, clock = fake_time()
    records = {
        (SERVICE, "A"): (2.0, ("10.0.0.1", "10.0.0.2", "10.0.0.3")),
        (f"_c10d._tcp.{SERVICE}", "SRV"): (
            4.0,
            (f"w-0.{SERVICE}:29400", f"w-1.{SERVICE}:29400", f"w-2.{SERVICE}:29400"),
        ),
        (f"w-2.{SERVICE}", "A"): (3.0, ("10.0.0.3",)),
    }
    members = resolve_headless_service(
        SERVICE,
        min_members=3,
        pod_names=[f"w-2.{SERVICE}"],
        port_name="c10d",
        timeout_s=20,
        resolver=ScriptedResolver(now, records),
        family="ipv4",
        sleep=sleep,
        clock=clock,
    )
    assert now[0] >= 4.0
    assert members.addresses == ("10.0.0.1", "10.0.0.2", "10.0.0.3")
    assert members.srv[0] == (f"w-0.{SERVICE}", 29400)
    assert members.as_dict()["pods"] == {f"w-2.{SERVICE}": ["10.0.0.3"]}


def test_too_few_members_suggests_publish_not_ready_addresses() -> None:
    now, sleep, clock = fake_time()
    resolver = ScriptedResolver(now, {(SERVICE, "A"): (0.0, ("10.0.0.1",))})
    with pytest.raises(
        DiscoveryTimeoutError, match=r"only 1 of 3 pods[\s\S]*publishNotReadyAddresses: true"
    ):
        resolve_headless_service(
            SERVICE, min_members=3, timeout_s=2, resolver=resolver, sleep=sleep, clock=clock
        )


def test_format_host_port_brackets_ipv6() -> None:
    assert format_host_port("10.0.0.1", 29400) == "10.0.0.1:29400"
    assert format_host_port("fd00::1", 29400) == "[fd00::1]:29400"
