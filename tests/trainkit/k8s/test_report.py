"""describe_pod / format_pod_report with captured pod files and scripted DNS answers."""

from __future__ import annotations

import json

import pytest

import trainkit.k8s.report as report_module
from trainkit.k8s.dns import Answer
from trainkit.k8s.identity import PodFiles, read_pod_identity
from trainkit.k8s.report import describe_pod, format_pod_report

SERVICE = "train.ml.svc.cluster.local"


class TableResolver:
    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        self.table = table

    def query(self, name: str, rdtype: str) -> Answer:
        values = self.table.get(name, ()) if rdtype == "A" else ()
        return Answer(name, rdtype, "ok", values) if values else Answer(name, rdtype, "NXDOMAIN")


@pytest.fixture
def pod_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hosts").write_text("10.4.0.8\tw-1.train.ml.svc.cluster.local\tw-1\n")
    (tmp_path / "resolv.conf").write_text(
        "search ml.svc.cluster.local svc.cluster.local cluster.local\n"
    )
    files = PodFiles(
        hosts=str(tmp_path / "hosts"),
        resolv_conf=str(tmp_path / "resolv.conf"),
        namespace=str(tmp_path / "none"),
    )
    monkeypatch.setattr(
        report_module,
        "read_pod_identity",
        lambda env: read_pod_identity(env, hostname="w-1", files=files),
    )


def test_report_lists_identity_peers_and_missing_records(pod_files: None) -> None:
    resolver = TableResolver(
        {
            SERVICE: ("10.4.0.7", "10.4.0.8"),
            f"w-0.{SERVICE}": ("10.4.0.7",),
            f"w-1.{SERVICE}": ("10.4.0.8",),
        }
    )
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "TRAINKIT_NNODES": "3"}
    report = describe_pod(env, resolver=resolver)
    json.dumps(report)  # JSON-able, for doctor --json
    assert report["identity"]["ordinal"] == 1 and report["identity"]["pod_ip"] == "10.4.0.8"
    assert report["service"] == {"name": SERVICE, "source": "pod subdomain"}
    assert [e["name"] for e in report["dns"] if e["type"] == "A"] == [SERVICE] + [
        f"w-{i}.{SERVICE}" for i in range(3)
    ]
    assert report["problems"] == [
        f"no records for w-2.{SERVICE}: those pods are missing, not yet started, "
        "or lack spec.subdomain: train"
    ]
    text = format_pod_report(report)
    assert (
        "ordinal         1" in text and f"w-2.{SERVICE} A: NXDOMAIN" in text and "Problems" in text
    )


def test_report_outside_a_pod_says_so(pod_files: None) -> None:
    report = describe_pod(
        {"TRAINKIT_SERVICE": "train"}, resolver=TableResolver({SERVICE: ("10.4.0.7",)})
    )
    assert any("does not look like a pod" in p for p in report["problems"])
    assert format_pod_report({"identity": None, "problems": []}).endswith("No problems found")
