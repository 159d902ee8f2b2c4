"""`trainkit doctor` on fixture trees: one screen for humans, JSON for tools, exit 1 on errors."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.trainkit.comms.conftest import load_machine, machines_root
from trainkit import doctor
from trainkit.comms import cli as bench_cli


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="trainkit")
    subparsers = parser.add_subparsers()
    doctor.register(subparsers)
    bench_cli.register(subparsers)
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_human_report_on_one_screen(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["doctor", "--root", load_machine("dgx-h100-ib8").root, "--no-peers"], capsys)
    assert code == 0
    assert "== collectives plan" in out and "NCCL_IB_HCA==mlx5_0:1" in out and "[port-down]" in out
    assert "verdict: ok" in out
    assert len(out.splitlines()) <= 40


def test_json_report_and_exit_code_on_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(
        ["doctor", "--json", "--root", load_machine("memlock-64k").root, "--no-peers"], capsys
    )
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["plan"]["transport"] == "tcp" and report["plan"]["rdma_usable"] is False
    findings = {f["code"]: f for f in report["plan"]["findings"]}
    assert findings["memlock"]["severity"] == "error" and "IPC_LOCK" in findings["memlock"]["fix"]
    assert {s["name"]: s["source"] for s in report["plan"]["settings"]}[
        "NCCL_IB_DISABLE"
    ] == "detected"


def test_identity_section_is_present(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    report = doctor.collect_report({}, root=load_machine("roce-gid3").root, timeout_s=0.5)
    identity = report["identity"]
    assert isinstance(identity, dict) and ("report" in identity or "reason" in identity)
    text = doctor.format_report(report)
    assert text.startswith("== identity and peers") and "NCCL_IB_GID_INDEX=3" in text


def test_every_fixture_has_a_report(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    names = sorted(
        n
        for n in os.listdir(machines_root())
        if os.path.isfile(os.path.join(machines_root(), n, "machine.json"))
    )
    assert len(names) >= 5
    for name in names:
        report = doctor.collect_report({}, root=load_machine(name).root, peers=False)
        assert report["plan"]["settings"], name


def test_a_malformed_require_rdma_is_named_not_ignored() -> None:
    # "yes" used to be read as "not required": the job then ran on TCP without a word.
    report = doctor.collect_report(
        {"TRAINKIT_REQUIRE_RDMA": "yes"}, root=load_machine("dgx-h100-ib8").root, peers=False
    )
    assert report["ok"] is False and report["plan"] is None
    assert "TRAINKIT_REQUIRE_RDMA='yes': expected 1" in str(report["plan_error"])
    assert "TRAINKIT_REQUIRE_RDMA='yes'" in doctor.format_report(report)
