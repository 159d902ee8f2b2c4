"""The ``k8s`` rendezvous on namespace pods with real DNS: static, late DNS, failures and elasticity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.integration.podnet import Pod, PodNet, netns_unavailable_reason, podnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
]

WORKER = Path(__file__).resolve().parents[1] / "trainkit" / "k8s" / "allreduce_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAINKIT_RUN = [sys.executable, "-m", "launchers.run"]
REPO = Path(__file__).resolve().parents[2]
JOB_TOKEN = "job-token-0123456789abcdef"


def launcher_env(out_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "TORCHELASTIC_", "TRAINKIT_"))
    }
    env.update(
        OUT_DIR=str(out_dir),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        LOGLEVEL="INFO",
        TRAINKIT_JOB_TOKEN=JOB_TOKEN,  # every pod of a job gets the same Secret
    )
    env.update(extra)
    return env


def launch(
    pod: Pod, launcher: Sequence[str], args: Sequence[str], env: dict[str, str], log: Path
) -> subprocess.Popen:
    handle = log.open("w")
    return pod.spawn(
        [*launcher, *args, str(WORKER)], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO
    )


def records(out_dir: Path) -> list[dict]:
    found = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being written
    return found


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, logs: Sequence[Path] = ()
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


def finish(
    processes: Sequence[subprocess.Popen], logs: Sequence[Path], timeout_s: float
) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            raise AssertionError(f"launchers still running after {timeout_s} s\n{tails}") from None
    return codes


def k8s_args(nnodes: str, nproc: int, endpoint: str, rdzv_id: str, *extra: str) -> list[str]:
    """Launcher flags for the k8s rendezvous on the namespace pods' headless Service."""
    return [
        "--nnodes", nnodes, "--nproc-per-node", str(nproc), "--rdzv-backend", "k8s",
        "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id, *extra,
    ]  # fmt: skip


def node_ranks(found: list[dict]) -> dict[str, int]:
    return {r["hostname"]: r["group_rank"] for r in found}


@pytest.mark.timeout(120)
def test_static_world_plain_torchrun_ranks_follow_ordinals(podnet: PodNet, tmp_path: Path) -> None:
    pods = [podnet.add_pod(f"w-{i}") for i in (2, 0, 1)]  # start order must not matter
    env = launcher_env(tmp_path)
    args = k8s_args("3", 2, "train:29400", "static1", "--max-restarts", "0")
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    processes = [launch(pod, TORCHRUN, args, env, log) for pod, log in zip(pods, logs, strict=True)]
    assert finish(processes, logs, 90) == [0, 0, 0], [log.read_text()[-2000:] for log in logs]
    found = records(tmp_path)
    assert len(found) == 6 and all(r["ok"] and r["world_size"] == 6 for r in found)
    assert node_ranks(found) == {"w-0": 0, "w-1": 1, "w-2": 2}
    assert {r["rank"] for r in found} == set(range(6))
    pod0_ip = next(p.ip for p in pods if p.hostname == "w-0")
    assert {r["master_addr"] for r in found} == {pod0_ip}


@pytest.mark.timeout(90)
def test_store_pod_dns_record_5s_late_still_joins(podnet: PodNet, tmp_path: Path) -> None:
    pods = [
        podnet.add_pod("w-0", publish_after_s=5.0),
        podnet.add_pod("w-1"),
        podnet.add_pod("w-2"),
    ]
    env = launcher_env(tmp_path)
    args = k8s_args("3", 1, "train", "late1", "--max-restarts", "0")
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    started = time.monotonic()
    processes = [launch(pod, TORCHRUN, args, env, log) for pod, log in zip(pods, logs, strict=True)]
    assert finish(processes, logs, 70) == [0, 0, 0]
    assert time.monotonic() - started > 4.5  # pods 1 and 2 really waited for w-0's record
    found = records(tmp_path)
    assert node_ranks(found) == {"w-0": 0, "w-1": 1, "w-2": 2} and all(r["ok"] for r in found)


@pytest.mark.timeout(60)
def test_pod_that_never_appears_fails_with_clear_error_within_timeout(
    podnet: PodNet, tmp_path: Path
) -> None:
    pods = [podnet.add_pod("w-1"), podnet.add_pod("w-2")]  # w-0 is never created
    env = launcher_env(tmp_path)
    flags = ("--max-restarts", "0", "--rdzv-conf", "join_timeout=6")
    args = k8s_args("3", 1, "train", "never1", *flags)
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    processes = [launch(pod, TORCHRUN, args, env, log) for pod, log in zip(pods, logs, strict=True)]
    # finish() polls to a deadline far below torch's 600 s default: a launcher that ignored
    # join_timeout fails here; how fast they fail is no assertion on a shared machine.
    codes = finish(processes, logs, 40)
    assert all(code != 0 for code in codes)
    text = logs[0].read_text()
    assert "w-0.train.default.svc.cluster.local" in text
    assert "not found in DNS within 6 s (service train.default.svc.cluster.local)" in text
    assert "w-0.train.default.svc.cluster.local A: NXDOMAIN" in text
    assert "train.default.svc.cluster.local A: 10.213." in text  # the Service itself answers
    assert "spec.subdomain" in text and "Likely fix" in text
    assert not records(tmp_path)


ELASTIC_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60,store_grace=3"


def elastic_args(run_id: str, extra_conf: str = "") -> list[str]:
    conf = ELASTIC_CONF + (f",{extra_conf}" if extra_conf else "")
    flags = ("--max-restarts", "5", "--monitor-interval", "0.5", "--rdzv-conf", conf)
    return k8s_args("2:3", 2, "train", run_id, *flags)


def world_of(out_dir: Path, hostnames: set[str], world_size: int) -> bool:
    """Every process of exactly ``hostnames`` reported a correct all_reduce in a world of ``world_size``."""
    found = [r for r in records(out_dir) if r["world_size"] == world_size and r["ok"]]
    by_restart: dict[tuple[str, int], set[str]] = {}
    for r in found:
        by_restart.setdefault((r["master_addr"], r["master_port"]), set()).add(
            f"{r['hostname']}/{r['rank']}"
        )
    return any(
        {name.split("/")[0] for name in names} == hostnames and len(names) == world_size
        for names in by_restart.values()
    )


def run_elastic_scenario(net: PodNet, tmp_path: Path, *, victim: str, extra_conf: str = "") -> None:
    stop = tmp_path / "STOP"
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env(out, STOP_FILE=str(stop))
    args = elastic_args("elastic1", extra_conf)
    pods = {name: net.add_pod(name) for name in ("w-0", "w-1", "w-2")}
    logs = {name: tmp_path / f"{name}.log" for name in pods}
    processes = {
        name: launch(pod, TRAINKIT_RUN, args, env, logs[name]) for name, pod in pods.items()
    }
    all_logs = list(logs.values())
    wait_until(lambda: world_of(out, set(pods), 6), 60, "a world of 3 pods x 2", all_logs)

    pods[victim].kill()  # SIGKILL the launcher and its workers, like a lost node
    net.unpublish(pods[victim])  # the endpoint controller drops the dead pod's records
    survivors = set(pods) - {victim}
    wait_until(
        lambda: world_of(out, survivors, 4),
        60,
        f"the survivors {survivors} re-forming 2 x 2",
        all_logs,
    )

    newcomer = net.add_pod("w-3")
    logs["w-3"] = tmp_path / "w-3.log"
    processes["w-3"] = launch(newcomer, TRAINKIT_RUN, args, env, logs["w-3"])
    all_logs.append(logs["w-3"])
    wait_until(
        lambda: world_of(out, survivors | {"w-3"}, 6), 60, "w-3 joining the next round", all_logs
    )

    stop.write_text("stop")
    live = [processes[name] for name in sorted(survivors | {"w-3"})]
    assert finish(live, all_logs, 40) == [0, 0, 0]
    grown = [r for r in records(out) if r["world_size"] == 6 and r["hostname"] == "w-3"]
    # Node ranks follow ordinals in every round: w-3 is the highest ordinal, so the last node.
    assert {r["group_rank"] for r in grown} == {2}


@pytest.mark.timeout(180)
def test_elastic_world_survives_a_killed_pod_and_admits_a_new_one(
    podnet: PodNet, tmp_path: Path
) -> None:
    run_elastic_scenario(podnet, tmp_path, victim="w-2")


@pytest.mark.timeout(180)
def test_separate_store_pod_makes_losing_pod_0_survivable(podnet: PodNet, tmp_path: Path) -> None:
    store_pod = podnet.add_pod("rdzv-store-0", subdomain=None, in_service=False)
    podnet.add_host(podnet.service_fqdn("rdzv-store"), store_pod.ip)
    store_log = (tmp_path / "store.log").open("w")
    store = store_pod.spawn(
        [sys.executable, "-m", "trainkit.k8s.cli", "rdzv-store", "--port", "29400"],
        env={"PYTHONPATH": str(REPO)},
        stdout=store_log,
        stderr=subprocess.STDOUT,
    )
    run_elastic_scenario(podnet, tmp_path, victim="w-0", extra_conf="store_service=rdzv-store")
    assert store.poll() is None  # the store pod served every round


@pytest.mark.timeout(120)
def test_trainkit_run_elastic_world_orders_ordinal_2_before_10(
    podnet: PodNet, tmp_path: Path
) -> None:
    # Added in this order, w-10 gets the lowest address: torch alone would make it node 0.
    pods = [podnet.add_pod(name) for name in ("w-10", "w-2", "w-0")]
    env = launcher_env(tmp_path)
    args = k8s_args("2:3", 2, "train:29400", "ord1", "--rdzv-conf", "last_call_timeout=5")
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    processes = [
        launch(pod, TRAINKIT_RUN, args, env, log) for pod, log in zip(pods, logs, strict=True)
    ]
    assert finish(processes, logs, 90) == [0, 0, 0]
    found = records(tmp_path)
    assert len(found) == 6 and all(r["ok"] and r["world_size"] == 6 for r in found)
    assert node_ranks(found) == {"w-0": 0, "w-2": 1, "w-10": 2}
    ranks = {(r["hostname"], r["local_rank"]): r["rank"] for r in found}
    assert ranks[("w-10", 0)] == 4 and ranks[("w-10", 1)] == 5


@pytest.mark.timeout(120)
def test_trainkit_run_pod_defaults_need_no_rendezvous_flags(podnet: PodNet, tmp_path: Path) -> None:
    pods = [podnet.add_pod(f"w-{i}") for i in range(3)]
    env = launcher_env(tmp_path, TRAINKIT_NNODES="3")  # the Service comes from the pod's subdomain
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    processes = [
        launch(pod, TRAINKIT_RUN, ["--nproc-per-node", "2"], env, log)
        for pod, log in zip(pods, logs, strict=True)
    ]
    assert finish(processes, logs, 90) == [0, 0, 0]
    found = records(tmp_path)
    assert node_ranks(found) == {"w-0": 0, "w-1": 1, "w-2": 2} and all(
        r["ok"] and r["world_size"] == 6 for r in found
    )
    assert "--rdzv-backend k8s --rdzv-endpoint train:29400" in logs[0].read_text()


FORGE = Path(__file__).resolve().parent / "scripts" / "forge_rdzv_state.py"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned-control"])
def test_forged_rendezvous_state_from_another_address_never_runs(
    podnet: PodNet, tmp_path: Path, signed: bool
) -> None:
    pods = [podnet.add_pod("w-0"), podnet.add_pod("w-1")]
    intruder = podnet.add_pod("intruder", subdomain=None, in_service=False)
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    env = launcher_env(out)
    if not signed:  # the opt-out: torch's own unauthenticated state, to show the attack is real
        del env["TRAINKIT_JOB_TOKEN"]
        env["TRAINKIT_RDZV_ALLOW_UNAUTHENTICATED"] = "1"
    # w-1 joins after w-0 refused the forged state and exited: read_timeout makes it fail fast.
    args = k8s_args(
        "2",
        1,
        "train",
        "forge1",
        "--max-restarts",
        "0",
        "--rdzv-conf",
        "join_timeout=40,read_timeout=15",
    )
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    first = launch(pods[0], TRAINKIT_RUN, args, env, logs[0])  # w-0 hosts the store on its pod IP
    forge_log = tmp_path / "intruder.log"
    intruder.spawn(
        [sys.executable, str(FORGE), pods[0].ip, "29400", "forge1", str(marker), "60"],
        env={"PYTHONPATH": str(REPO)},
        stdout=forge_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: "forged" in forge_log.read_text(), 60, "the forged state", [forge_log])
    second = launch(pods[1], TRAINKIT_RUN, args, env, logs[1])
    if not signed:
        wait_until(marker.exists, 60, "the unsigned launcher to run the forged pickle", logs)
        return
    codes = finish([first, second], logs, 90)
    assert all(code != 0 for code in codes), codes
    assert not marker.exists(), "a launcher unpickled the forged state"
    assert not records(out), "workers ran on a forged rendezvous"
    text = logs[0].read_text() + logs[1].read_text()
    assert (
        "rendezvous state under store key 'torch.rendezvous.forge1' failed authentication" in text
    )
    assert "trainkit-run: rendezvous failed (RendezvousAuthError)" in text


@pytest.mark.timeout(120)
def test_pod_with_another_job_token_is_refused_with_a_clear_error(
    podnet: PodNet, tmp_path: Path
) -> None:
    pods = [podnet.add_pod("w-0"), podnet.add_pod("w-1")]
    args = k8s_args(
        "2", 1, "train", "tokens1", "--max-restarts", "0", "--rdzv-conf", "join_timeout=20"
    )
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    tokens = ["job-token-0123456789abcdef", "other-token-0123456789abcdef"]
    processes = [
        launch(pod, TRAINKIT_RUN, args, launcher_env(tmp_path, TRAINKIT_JOB_TOKEN=token), log)
        for pod, log, token in zip(pods, logs, tokens, strict=True)
    ]
    assert all(code != 0 for code in finish(processes, logs, 80))
    assert not records(tmp_path)
    text = logs[0].read_text() + logs[1].read_text()
    assert "failed authentication" in text and "different TRAINKIT_JOB_TOKEN" in text
