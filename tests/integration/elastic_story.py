"""The elastic story on namespace pods: preempted, a pod lost, a pod gained, a network cut.

Shared by ``tests/integration/test_elastic_story.py`` (scaled down) and ``benchmarks/recovery.py``
(full size). Three training pods run ``trainkit-run`` with the ``k8s`` backend (``--nnodes 2:3``)
and the main example; the rendezvous store, an S3 server (moto) and Prometheus run in pods of
their own. Launcher output is stamped line by line on arrival; the example's ``--sample-log``
gives every step's sample ids and every save's and restore's weight digest. ``account`` turns
both into the verdict (exactly once per epoch, restores match saves) and per-failure phase times.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.podnet import Pod, PodNet

__all__ = ["ElasticStory", "StoryConfig", "account", "timeline"]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_minimal.py"
JOB_TOKEN = "story-token-0123456789abcdef"
S3_PORT, PROMETHEUS_PORT, METRICS_PORT = 5000, 9090, 9400
BUCKET = "story"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True, kw_only=True)
class StoryConfig:
    """Sizes of one story; the defaults are the full-size run of ``benchmarks/recovery.py``."""

    nproc_per_node: int = 2  # processes per pod
    rows: int = 8192  # samples in the dataset
    batch_size: int = 32  # samples per rank per step
    hidden: int = 256  # MLP width
    save_every: int = 20  # --save-every of the example
    steps_between: int = 40  # steps each world trains before the next event
    collective_timeout_s: float = 10.0  # --collective-timeout-s: bounds a cut peer's detection
    grace_period_s: int = 20  # TRAINKIT_GRACE_PERIOD_S: SIGTERM to exit
    dns_membership: bool = True  # rdzv-conf dns_membership (False: torch's timeouts alone)
    fork_workers: bool = True  # trainkit-run's fork server: restarts skip importing torch
    network_cut: bool = True  # include the cut-network chapter
    prometheus: bool = True  # scrape every pod's /metrics with a real Prometheus
    wait_s: float = 150.0  # the longest any one chapter may take


def _moto_command() -> list[str]:
    beside = Path(sys.executable).with_name("moto_server")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "moto.server"]


class StampedLog:
    """A process's output, each line stamped with its arrival time (Unix s), kept and written out."""

    def __init__(self, process: subprocess.Popen[str], path: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self.path = path
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        with self.path.open("w") as out:
            for line in process.stdout:  # type: ignore[union-attr]
                now = time.time()
                self.lines.append((now, line.rstrip("\n")))
                out.write(f"{now:.3f} {line}")
                out.flush()

    def first(self, pattern: str, after: float) -> float | None:
        compiled = re.compile(pattern)
        return next(
            (t for t, line in list(self.lines) if t >= after and compiled.search(line)), None
        )

    def tail(self, chars: int = 3000) -> str:
        return self.path.read_text()[-chars:] if self.path.exists() else ""


class SampleLogs:
    """The example's ``--sample-log`` files, read incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.events: list[dict] = []
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> list[dict]:
        for path in sorted(self.directory.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with path.open() as handle:
                handle.seek(offset)
                data = handle.read()
            complete = data[: data.rfind("\n") + 1]  # a killed writer may leave half a line
            self._offsets[path] = offset + len(complete.encode())
            host = path.name.split("-", 1)[1].rsplit("-", 1)[0]
            for line in complete.splitlines():
                event = json.loads(line)
                event["host"] = host
                self.events.append(event)
        return self.events


@dataclass
class Failure:
    """One event of the story and who was left to recover from it."""

    kind: str
    at: float
    survivors: list[str]
    victim: str | None = None
    exited: float | None = None  # SIGTERM: when the last launcher had exited


@dataclass
class ElasticStory:
    """Drive one story on ``net``; everything it starts dies with ``net.close()``."""

    net: PodNet
    workdir: Path
    config: StoryConfig = field(default_factory=StoryConfig)

    def __post_init__(self) -> None:
        self.sample_dir = self.workdir / "samples"
        self.sample_dir.mkdir(parents=True)
        self.samples = SampleLogs(self.sample_dir)
        self.pods: dict[str, Pod] = {}
        self.launchers: dict[str, subprocess.Popen[str]] = {}
        self.logs: dict[str, StampedLog] = {}
        self.failures: list[Failure] = []
        self.exit_codes: dict[str, list[int]] = {}
        self.started_at = time.time()
        self._incarnations: Counter[str] = Counter()

    # -- infrastructure ---------------------------------------------------------------------------
    def start_services(self) -> None:
        """The rdzv-store pod, the S3 pod (with the bucket) and, if asked, the Prometheus pod."""
        store = self.net.add_pod("rdzv-store-0", subdomain=None, in_service=False)
        self.net.add_host(self.net.service_fqdn("rdzv-store"), store.ip)
        self._spawn_logged(
            "rdzv-store",
            store,
            [sys.executable, "-m", "trainkit.k8s.cli", "rdzv-store", "--port", "29400"],
            {"PYTHONPATH": str(REPO)},
        )
        self.s3 = self.net.add_pod("s3-0", subdomain=None, in_service=False)
        self.endpoint = f"http://{self.s3.ip}:{S3_PORT}"
        self._spawn_logged(
            "s3",
            self.s3,
            [*_moto_command(), "-H", self.s3.ip, "-p", str(S3_PORT)],
            {"MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        create = (
            "import boto3, sys, time\n"
            "client = boto3.client('s3', endpoint_url=sys.argv[1])\n"
            "for _ in range(300):\n"
            "    try:\n"
            "        client.create_bucket(Bucket=sys.argv[2]); break\n"
            "    except Exception:\n"
            "        time.sleep(0.1)\n"
            "else:\n"
            "    sys.exit('no S3 server')\n"
        )
        result = self.s3.run(
            [sys.executable, "-c", create, self.endpoint, BUCKET], env=AWS, timeout=60
        )
        assert result.returncode == 0, result.stderr
        if self.config.prometheus:
            self.monitor = self.net.add_pod("prometheus-0", subdomain=None, in_service=False)
            self._start_prometheus()

    def _start_prometheus(self) -> None:
        directory = self.workdir / "prometheus"
        directory.mkdir()
        self.targets_file = directory / "targets.json"
        self.targets_file.write_text("[]")
        (directory / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: trainkit\n"
            "    honor_labels: true\n"
            f"    file_sd_configs: [{{files: ['{self.targets_file}'], refresh_interval: 1s}}]\n"
        )
        self._spawn_logged(
            "prometheus",
            self.monitor,
            [
                "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.monitor.ip}:{PROMETHEUS_PORT}",
            ],
            {},
        )

    def _spawn_logged(
        self, name: str, pod: Pod, argv: Sequence[str], env: dict[str, str]
    ) -> subprocess.Popen[str]:
        process = pod.spawn(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        self._incarnations[name] += 1
        self.logs[name] = StampedLog(
            process, self.workdir / f"{name}.{self._incarnations[name]}.log"
        )
        return process

    # -- training pods ----------------------------------------------------------------------------
    def launcher_env(self) -> dict[str, str]:
        return {
            **AWS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "LOGLEVEL": "INFO",
            "TRAINKIT_JOB_TOKEN": JOB_TOKEN,
            "TRAINKIT_GRACE_PERIOD_S": str(self.config.grace_period_s),
        }

    def launcher_argv(self) -> list[str]:
        c = self.config
        conf = f"store_service=rdzv-store,join_timeout=300,dns_membership={int(c.dns_membership)}"
        return [
            sys.executable, "-m", "launchers.run",
            "--nnodes", "2:3", "--nproc-per-node", str(c.nproc_per_node),
            "--rdzv-backend", "k8s", "--rdzv-endpoint", "train", "--rdzv-id", "story",
            "--rdzv-conf", conf, "--max-restarts", "100",
            "--fork-workers" if c.fork_workers else "--no-fork-workers",
            str(EXAMPLE),
            "--data", f"s3://{BUCKET}/data", "--checkpoint-dir", f"s3://{BUCKET}/checkpoints",
            "--rows", str(c.rows), "--batch-size", str(c.batch_size), "--hidden", str(c.hidden),
            "--save-every", str(c.save_every), "--steps", "1000000", "--log-every", "1000000",
            "--sample-log", str(self.sample_dir),
            "--collective-timeout-s", str(c.collective_timeout_s),
        ]  # fmt: skip

    def launch(self, hostname: str) -> None:
        if hostname not in self.pods:
            self.pods[hostname] = self.net.add_pod(hostname)
            self._write_targets()
        self.launchers[hostname] = self._spawn_logged(
            hostname, self.pods[hostname], self.launcher_argv(), self.launcher_env()
        )

    def _write_targets(self) -> None:
        if not self.config.prometheus:
            return
        targets = [{"targets": [f"{pod.ip}:{METRICS_PORT}"]} for pod in self.pods.values()]
        staging = self.targets_file.with_suffix(".tmp")
        staging.write_text(json.dumps(targets))
        staging.replace(self.targets_file)

    # -- waiting ----------------------------------------------------------------------------------
    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.config.wait_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        tails = "\n".join(
            f"--- {name}\n{log.tail()}" for name, log in self.logs.items() if name.startswith("w-")
        )
        raise AssertionError(f"timed out after {self.config.wait_s} s waiting for {what}\n{tails}")

    def trained(self, hosts: Iterable[str], steps: int, since: float) -> bool:
        """A round of exactly ``hosts`` (every process) trained ``steps`` steps after ``since``."""
        hosts = set(hosts)
        world_size = len(hosts) * self.config.nproc_per_node
        by_round: dict[str, tuple[set[str], set[int]]] = {}
        for event in self.samples.refresh():
            if (
                event["event"] == "step"
                and event["world_size"] == world_size
                and event["t"] >= since
            ):
                members, steps_seen = by_round.setdefault(event["round"], (set(), set()))
                members.add(event["host"])
                steps_seen.add(event["step"])
        return any(
            members == hosts and len(steps_seen) >= steps
            for members, steps_seen in by_round.values()
        )

    def wait_trained(self, hosts: Iterable[str], what: str) -> None:
        hosts, since = sorted(hosts), time.time()
        self.wait_until(lambda: self.trained(hosts, self.config.steps_between, since), what)

    # -- the chapters -----------------------------------------------------------------------------
    def preempt_all(self, kind: str = "sigterm") -> dict[str, int]:
        """SIGTERM to every training pod's launcher; returns their exit codes."""
        self.failures.append(Failure(kind, time.time(), sorted(self.launchers)))
        for process in self.launchers.values():
            process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.launchers.items():
            try:
                codes[name] = process.wait(timeout=self.config.grace_period_s + 30)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{name} still running after SIGTERM\n{self.logs[name].tail()}"
                ) from None
        self.failures[-1].exited = time.time()
        for name, code in codes.items():
            self.exit_codes.setdefault(name, []).append(code)
        return codes

    def restart_all(self) -> None:
        for name in list(self.launchers):
            self.launch(name)

    def kill_pod(self, victim: str) -> None:
        """SIGKILL every process of the pod; the endpoint controller drops its records."""
        survivors = sorted(set(self.live()) - {victim})
        self.failures.append(Failure("sigkill", time.time(), survivors, victim))
        self.pods[victim].kill()
        self.net.unpublish(self.pods[victim])
        self.launchers.pop(victim)

    def cut_network(self, victim: str) -> None:
        """The pod's link goes down: no crash, no RST, its DNS record stays."""
        survivors = sorted(set(self.live()) - {victim})
        self.failures.append(Failure("network-cut", time.time(), survivors, victim))
        subprocess.run(
            ["ip", "-n", self.pods[victim].name, "link", "set", "eth0", "down"], check=True
        )
        self.cut = self.launchers.pop(victim)

    def live(self) -> list[str]:
        return sorted(self.launchers)

    def grow(self, newcomer: str) -> None:
        self.failures.append(Failure("join", time.time(), self.live(), newcomer))
        self.launch(newcomer)

    def run(self) -> None:
        """The whole story; ``report()`` afterwards."""
        self.start_services()
        for name in ("w-0", "w-1", "w-2"):
            self.launch(name)
        self.wait_trained(["w-0", "w-1", "w-2"], "a world of 3 pods")
        codes = self.preempt_all()
        assert set(codes.values()) == {75}, {n: self.logs[n].tail() for n in codes}
        self.restart_all()
        self.wait_trained(["w-0", "w-1", "w-2"], "the 3 pods resuming after the preemption")
        self.kill_pod("w-2")
        self.wait_trained(["w-0", "w-1"], "the survivors re-forming a world of 2 pods")
        self.grow("w-3")
        self.wait_trained(["w-0", "w-1", "w-3"], "w-3 joining: a world of 3 pods again")
        if self.config.network_cut:
            self.cut_network("w-1")
            self.wait_trained(["w-0", "w-3"], "the pods still connected re-forming without w-1")
        final = self.preempt_all("end")
        assert set(final.values()) == {75}, {n: self.logs[n].tail() for n in final}
        self.finished_at = time.time()

    # -- results ----------------------------------------------------------------------------------
    def prometheus_query_range(self, promql: str) -> list[dict]:
        script = (
            "import json, sys, urllib.parse, urllib.request\n"
            "url = sys.argv[1] + '/api/v1/query_range?' + urllib.parse.urlencode("
            "{'query': sys.argv[2], 'start': sys.argv[3], 'end': sys.argv[4], 'step': '1'})\n"
            "print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
        )
        result = self.monitor.run(
            [
                sys.executable,
                "-c",
                script,
                f"http://{self.monitor.ip}:{PROMETHEUS_PORT}",
                promql,
                f"{self.started_at:.3f}",
                f"{time.time():.3f}",
            ],
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def goodput_series(self) -> list[tuple[float, float]]:
        """The job's goodput over time: the mean of every pod's ``trainkit_goodput_ratio``."""
        if not self.config.prometheus:
            return []
        rows = self.prometheus_query_range("avg(trainkit_goodput_ratio)")
        return [(float(t), float(v)) for t, v in rows[0]["values"]] if rows else []

    def report(self) -> dict:
        events = self.samples.refresh()
        result = account(
            events,
            rows=self.config.rows,
            save_every=self.config.save_every,
            batch_size=self.config.batch_size,
        )
        result["failures"] = [
            self.recovery(failure, events) for failure in self.failures if failure.kind != "end"
        ]
        goodput = self.goodput_series()
        result["goodput"] = goodput
        result["goodput_final"] = goodput[-1][1] if goodput else None
        result["exit_codes"] = self.exit_codes
        result["started_at"] = self.started_at
        result["timeline"] = timeline(events)
        return result

    def recovery(self, failure: Failure, events: list[dict]) -> dict:
        """Phases from the failure to the first step of the next round.

        Each survivor's launcher log gives its own detection, stop and rendezvous times (the
        latest survivor bounds the world); the workers' sample logs give process start, restore
        and the first step of the first round that started after the failure.
        """
        round_start: dict[str, float] = {}
        for e in events:
            if e["event"] == "start":
                round_start[e["round"]] = min(
                    round_start.get(e["round"], e["started"]), e["started"]
                )
        later = sorted((t, r) for r, t in round_start.items() if t >= failure.at)
        next_round = later[0][1] if later else None
        mine = [e for e in events if e["round"] == next_round]
        restored = [e for e in mine if e["event"] == "restored"]
        # A survivor learns of a loss from its own failed workers, or from a peer that already
        # re-joined (torch reports it as a node waiting); a join only from the latter.
        noticed = r"Worker group (FAILED|UNHEALTHY)|Detected \d+ new nodes"
        detect = {"sigkill": noticed, "network-cut": noticed, "join": noticed}.get(failure.kind)
        per_host: list[dict[str, float | None]] = []
        for host in failure.survivors:
            log = self.logs.get(host)
            if log is None:
                continue
            detected = (
                log.first(detect, failure.at)
                if detect
                else log.first(r"Rendezvous'ing worker group", failure.at)
            )
            begins = log.first(r"Rendezvous'ing worker group", detected or failure.at)
            done = log.first(r"Starting worker group", begins or failure.at)
            per_host.append(
                {"detected": detected, "rendezvous_begins": begins, "rendezvous_done": done}
            )

        def latest(name: str) -> float | None:
            found = [marks[name] for marks in per_host]
            return max(found) if found and None not in found else None  # type: ignore[type-var]

        marks: dict[str, float | None] = {"failure": failure.at}
        if failure.kind == "sigterm":  # every launcher exited 75, then the pods were restarted
            marks["exited"] = failure.exited
        marks["detected"] = latest("detected")
        marks["rendezvous_begins"] = latest("rendezvous_begins")
        marks["rendezvous_done"] = latest("rendezvous_done")
        marks["process_started"] = max(
            (e["started"] for e in mine if e["event"] == "start"), default=None
        )
        marks["restored"] = max((e["t"] for e in restored), default=None)
        marks["first_step"] = min((e["t"] for e in mine if e["event"] == "step"), default=None)
        phases = {}
        for before, after in itertools.pairwise(marks):
            if marks[before] is not None and marks[after] is not None:
                phases[f"{before}->{after}"] = round(marks[after] - marks[before], 3)  # type: ignore[operator]
        old_rounds = {r for r, t in round_start.items() if t < failure.at}
        last_step = max(
            (e["step"] for e in events if e["event"] == "step" and e["round"] in old_rounds),
            default=0,
        )
        resumed = restored[0]["step"] if restored else None
        return {
            "kind": failure.kind,
            "victim": failure.victim,
            "at": failure.at,
            "phases_s": phases,
            "total_s": round(marks["first_step"] - failure.at, 3) if marks["first_step"] else None,
            "restore_s": round(max(e["t"] - e["began"] for e in restored), 3) if restored else None,
            "last_step_before": last_step,
            "resumed_from": resumed,
            "steps_recomputed": last_step - resumed if resumed is not None else None,
            "world_size_after": mine[0]["world_size"] if mine else None,
        }

    def _stamp(self, host: str, pattern: str, since: float) -> float | None:
        log = self.logs.get(host)
        return log.first(pattern, since) if log is not None else None

    def close_launchers(self) -> None:
        for process in [*self.launchers.values(), getattr(self, "cut", None)]:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()


def timeline(events: list[dict]) -> dict[str, list[tuple[float, int]]]:
    """World size (0 between rounds), rank 0's steps and the saves over time, for the picture."""
    rounds: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for event in events:
        if event["event"] == "step":
            rounds.setdefault(event["round"], []).append(event["t"])
            sizes[event["round"]] = event["world_size"]
    world: list[tuple[float, int]] = []
    for key, times in sorted(rounds.items(), key=lambda item: min(item[1])):
        world += [(min(times), sizes[key]), (max(times), 0)]
    steps = sorted((e["t"], e["step"]) for e in events if e["event"] == "step" and e["rank"] == 0)
    saves = sorted((e["t"], e["step"]) for e in events if e["event"] == "saved")
    return {"world_size": world, "steps": steps, "saves": saves}


def account(events: list[dict], *, rows: int, save_every: int, batch_size: int) -> dict:
    """The verdict from the sample logs alone.

    A step counts from the newest round that ran it (a round that resumed from a checkpoint
    recomputes what the failed one did after it). Per epoch the counted sample ids must be unique;
    what is missing from a finished epoch is the reported remainder that could not fill a batch on
    every rank, at most one batch per rank per world that read the epoch. Every restore must load
    a step some earlier round saved, with the same weights digest.
    """
    starts: dict[str, float] = {}
    for event in events:
        if event["event"] == "start":
            starts[event["round"]] = min(starts.get(event["round"], event["t"]), event["t"])
    owner: dict[int, str] = {}
    for event in events:
        if event["event"] == "step":
            current = owner.get(event["step"])
            if current is None or starts[event["round"]] > starts[current]:
                owner[event["step"]] = event["round"]
    per_epoch: dict[int, Counter[int]] = {}
    worlds_per_epoch: dict[int, set[int]] = {}
    incomplete_steps = []
    ranks_per_step: dict[int, set[int]] = {}
    for event in events:
        if event["event"] == "step" and owner[event["step"]] == event["round"]:
            per_epoch.setdefault(event["epoch"], Counter()).update(event["ids"])
            worlds_per_epoch.setdefault(event["epoch"], set()).add(event["world_size"])
            ranks_per_step.setdefault(event["step"], set()).add(event["rank"])
    sizes = {e["round"]: e["world_size"] for e in events if e["event"] == "start"}
    for step, ranks in ranks_per_step.items():
        if len(ranks) != sizes[owner[step]]:
            incomplete_steps.append(step)
    epochs = {}
    last_epoch = max(per_epoch, default=-1)
    for epoch, counts in sorted(per_epoch.items()):
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        missing = rows - len(counts)
        allowed = sum(size * batch_size for size in worlds_per_epoch[epoch])
        epochs[epoch] = {
            "samples": sum(counts.values()),
            "unique": len(counts),
            "duplicates": duplicates[:20],
            "num_duplicates": len(duplicates),
            "missing": missing,
            "finished": epoch < last_epoch,
            "exactly_once": not duplicates and (epoch == last_epoch or missing < allowed),
        }
    saved = {e["step"]: e["digest"] for e in events if e["event"] == "saved"}
    restores = []
    for event in events:
        if event["event"] == "restored" and event["step"] > 0:
            restores.append(
                {
                    "round": event["round"],
                    "rank": event["rank"],
                    "step": event["step"],
                    "matches_save": saved.get(event["step"]) == event["digest"],
                }
            )
    return {
        "epochs": epochs,
        "restores": restores,
        "incomplete_steps": sorted(incomplete_steps),
        "steps": max(owner, default=0),
        "rounds": len(starts),
    }
