"""Pods as network namespaces on a private bridge, with a real dnsmasq serving headless-Service records.

Reusable by any test that needs "pods" with their own IP, hostname, /etc/hosts and resolv.conf:

    from tests.integration.podnet import PodNet, netns_unavailable_reason, podnet  # podnet: pytest fixture

    @pytest.mark.netns
    @pytest.mark.skipif(netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or "")
    def test_x(podnet):                       # or: with PodNet(service="train") as net: ...
        pod = podnet.add_pod("w-0")           # netns + veth + 10.213.<k>.<n>, DNS records published
        late = podnet.add_pod("w-1", publish_after_s=5.0)   # its records appear 5 s later
        proc = pod.spawn([sys.executable, "-c", "..."], env={...})   # hostname w-0 in its own UTS ns
        pod.kill()                            # SIGKILL every process of the pod (netns stays)
        podnet.unpublish(pod); podnet.publish(pod)          # remove / add its DNS records

``PodNet(service=, namespace=, cluster_domain=, named_ports={name: port}, store_service=None)``;
``add_pod(hostname, subdomain=service, publish=True, publish_after_s=0, in_service=True)`` returns a
``Pod`` with ``name`` (netns), ``hostname``, ``ip``, ``fqdn``, ``env`` (POD_IP/POD_NAME/POD_NAMESPACE,
KUBERNETES_SERVICE_HOST) and ``spawn``/``run``/``kill``. ``add_host(name, ip)`` adds any A record.
Records are what CoreDNS serves for a headless Service: ``<svc>.<ns>.svc.<zone>`` A (one per pod),
``<host>.<svc>.<ns>.svc.<zone>`` A, PTR, and SRV ``_<port>._tcp.<svc>...`` for ``named_ports``.
Each pod's /etc/resolv.conf has Kubernetes' search list and /etc/hosts kubelet's FQDN line.
Nothing is routed outside the bridge (no address on the host side). ``close()`` (also on fixture
teardown, atexit, and for leftovers of dead test processes at the next start) kills every process
in the namespaces and dnsmasq, deletes namespaces, links, /etc/netns/<name> and the records dir.
Needs root, iproute2 (``ip``), util-linux (``unshare``) and dnsmasq (apt-get install dnsmasq iproute2).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Pod", "PodNet", "netns_unavailable_reason", "podnet"]

STATE_DIR = Path("/run/trainkit-podnet")
DNS_HOST = 2  # dnsmasq's address in the subnet: 10.213.<k>.2
FIRST_POD_HOST = 10


def netns_unavailable_reason() -> str | None:
    """Why namespace pods cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns / veth / bridge"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("dnsmasq", "dnsmasq")):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not found: apt-get install {package}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _netns_pids(name: str) -> list[int]:
    result = _ip("netns", "pids", name, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _kill_netns_processes(name: str) -> None:
    for _ in range(50):
        pids = _netns_pids(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _remove_everything(uid: str, netns_names: Sequence[str], bridge: str) -> None:
    for name in netns_names:
        _kill_netns_processes(name)
        _ip("netns", "delete", name, check=False)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    _ip("link", "delete", bridge, check=False)
    shutil.rmtree(STATE_DIR / uid, ignore_errors=True)
    (STATE_DIR / f"{uid}.json").unlink(missing_ok=True)


def _clean_leftovers() -> None:
    """Remove networks whose creating process died without cleaning up (killed test runs)."""
    for record in STATE_DIR.glob("*.json"):
        try:
            data = json.loads(record.read_text())
            os.kill(int(data["owner_pid"]), 0)
            continue  # owner alive: not ours to touch
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            continue
        _remove_everything(data["uid"], data.get("netns", []), data["bridge"])


@dataclass
class Pod:
    """One namespace pod. ``env`` is what the downward API and kubelet would give its containers."""

    net: PodNet
    name: str
    hostname: str
    ip: str
    subdomain: str | None
    in_service: bool
    processes: list[subprocess.Popen] = field(default_factory=list)
    shm_bytes: int | None = None  # a private /dev/shm (tmpfs of this size) instead of the host's

    @property
    def fqdn(self) -> str:
        return (
            f"{self.hostname}.{self.subdomain}.{self.net.namespace}.svc.{self.net.cluster_domain}"
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "POD_IP": self.ip,
            "POD_NAME": self.hostname,
            "POD_NAMESPACE": self.net.namespace,
            "KUBERNETES_SERVICE_HOST": "10.213.255.1",  # never contacted; marks "inside a pod"
            "KUBERNETES_SERVICE_PORT": "443",
        }

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside this pod: its netns, /etc/netns files and its own hostname
        (and, with ``shm_bytes``, its own mount namespace with an empty tmpfs at /dev/shm)."""
        if self.shm_bytes is None:
            unshare, setup = ["--uts"], 'hostname "$0"'
        else:
            unshare = ["--uts", "--mount", "--propagation", "private"]
            setup = f'hostname "$0" && mount -t tmpfs -o size={self.shm_bytes} tmpfs /dev/shm'
        return [
            "ip",
            "netns",
            "exec",
            self.name,
            "unshare",
            *unshare,
            "sh",
            "-c",
            f'{setup} && exec "$@"',
            self.hostname,
            *argv,
        ]

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **popen: object
    ) -> subprocess.Popen:
        """Start ``argv`` in the pod with ``os.environ`` + ``self.env`` + ``env``; killed at close()."""
        full_env = {**os.environ, **self.env, **(env or {})}
        process = subprocess.Popen(
            self.command(argv), env=full_env, start_new_session=True, **popen
        )  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **self.env, **(env or {})}
        return subprocess.run(
            self.command(argv), env=full_env, capture_output=True, text=True, timeout=timeout
        )

    def kill(self) -> None:
        """SIGKILL every process in the pod, like a node failure; the namespace (and its IP) stays."""
        _kill_netns_processes(self.name)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


class PodNet:
    """A bridge, a DNS namespace running dnsmasq, and pods added on demand. Use as a context manager."""

    def __init__(
        self,
        *,
        service: str = "train",
        namespace: str = "default",
        cluster_domain: str = "cluster.local",
        named_ports: Mapping[str, int] | None = None,
        subnet: int | None = None,
    ) -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"PodNet: {reason}")
        self.service = service
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.named_ports = dict(named_ports or {})
        self.uid = secrets.token_hex(3)
        # Bridges are isolated from each other, so concurrent PodNets may share a subnet.
        self.subnet = subnet if subnet is not None else 0
        self.bridge = f"tkb{self.uid}"
        self.dns_ns = f"tk{self.uid}-dns"
        self.dns_ip = self._address(DNS_HOST)
        self.pods: dict[str, Pod] = {}
        self._extra_hosts: dict[str, list[str]] = {}
        self._published: set[str] = set()
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._dnsmasq: subprocess.Popen | None = None
        self._closed = False
        self.records_dir = STATE_DIR / self.uid / "hosts.d"
        self.started = False

    def _address(self, host: int) -> str:
        return f"10.213.{self.subnet}.{host}"

    def service_fqdn(self, service: str | None = None) -> str:
        return f"{service or self.service}.{self.namespace}.svc.{self.cluster_domain}"

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> PodNet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save_state(self) -> None:
        record = {
            "uid": self.uid,
            "owner_pid": os.getpid(),
            "bridge": self.bridge,
            "netns": [self.dns_ns, *(pod.name for pod in self.pods.values())],
        }
        (STATE_DIR / f"{self.uid}.json").write_text(json.dumps(record))

    def start(self) -> PodNet:
        STATE_DIR.mkdir(mode=0o755, exist_ok=True)
        _clean_leftovers()
        self.records_dir.mkdir(parents=True)
        for path in (STATE_DIR, STATE_DIR / self.uid, self.records_dir):
            path.chmod(0o755)  # dnsmasq reads as user nobody
        self._save_state()
        atexit.register(self.close)
        self.started = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        self._add_namespace(self.dns_ns, self.dns_ip, f"tkv{self.uid}d")
        self._start_dnsmasq()
        return self

    def _add_namespace(self, name: str, address: str, host_link: str) -> None:
        _ip("netns", "add", name)
        self._save_state()
        _ip("link", "add", host_link, "type", "veth", "peer", "name", f"{host_link}p")
        _ip("link", "set", f"{host_link}p", "netns", name)
        _ip("link", "set", host_link, "master", self.bridge, "up")
        _ip("-n", name, "link", "set", f"{host_link}p", "name", "eth0")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")

    def _dnsmasq_argv(self) -> list[str]:
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--listen-address={self.dns_ip}",
            "--bind-interfaces",
            "--no-negcache",
            f"--hostsdir={self.records_dir}",
            f"--local=/{self.cluster_domain}/",
            "--local-ttl=0",
            "--bogus-priv",
            "--domain-needed",
            "--user=nobody",
            "--log-facility=-",
            "--pid-file=",
        ]
        for port_name, port in self.named_ports.items():
            srv_name = f"_{port_name}._tcp.{self.service_fqdn()}"
            for pod in self.pods.values():
                if pod.in_service and pod.name in self._published and pod.subdomain == self.service:
                    argv.append(f"--srv-host={srv_name},{pod.fqdn},{port}")
        return argv

    def _start_dnsmasq(self) -> None:
        self._dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", self.dns_ns, *self._dnsmasq_argv()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(100):
            if self._dnsmasq.poll() is not None:
                raise RuntimeError(
                    f"dnsmasq exited {self._dnsmasq.returncode}: {self._dnsmasq.stderr.read()}"
                )  # type: ignore[union-attr]
            probe = _ip("netns", "exec", self.dns_ns, "ss", "-lun", check=False).stdout
            if f"{self.dns_ip}:53" in probe:
                return
            time.sleep(0.02)
        raise RuntimeError("dnsmasq did not start listening within 2 s")

    def _restart_dnsmasq(self) -> None:
        if self._dnsmasq is not None:
            self._dnsmasq.kill()
            self._dnsmasq.wait()
        self._start_dnsmasq()

    def close(self) -> None:
        if self._closed or not self.started:
            return
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        if self._dnsmasq is not None:
            self._dnsmasq.kill()
            self._dnsmasq.wait()
        for pod in self.pods.values():
            for process in pod.processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
        _remove_everything(
            self.uid, [self.dns_ns, *(pod.name for pod in self.pods.values())], self.bridge
        )
        for pod in self.pods.values():
            for process in pod.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)

    # -- pods and records ------------------------------------------------------------------------
    def add_pod(
        self,
        hostname: str,
        *,
        subdomain: str | None = "",
        publish: bool = True,
        publish_after_s: float = 0.0,
        in_service: bool = True,
        shm_bytes: int | None = None,
    ) -> Pod:
        """A new pod with the next free address; ``subdomain=None`` models a pod without spec.subdomain;
        ``shm_bytes`` gives each of its commands a private /dev/shm of that size (a pod's emptyDir)."""
        index = len(self.pods)
        name = f"tk{self.uid}-{index}"
        subdomain = self.service if subdomain == "" else subdomain
        pod = Pod(
            self,
            name,
            hostname,
            self._address(FIRST_POD_HOST + index),
            subdomain,
            in_service,
            shm_bytes=shm_bytes,
        )
        self.pods[name] = pod
        self._add_namespace(name, pod.ip, f"tkv{self.uid}{index}")
        etc = Path(f"/etc/netns/{name}")
        etc.mkdir(parents=True, exist_ok=True)
        search = f"{self.namespace}.svc.{self.cluster_domain} svc.{self.cluster_domain} {self.cluster_domain}"
        (etc / "resolv.conf").write_text(
            f"nameserver {self.dns_ip}\nsearch {search}\noptions ndots:5\n"
        )
        names = f"{pod.fqdn}\t{hostname}" if subdomain else hostname
        (etc / "hosts").write_text(
            f"# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n{pod.ip}\t{names}\n"
        )
        if publish and publish_after_s > 0:
            timer = threading.Timer(publish_after_s, self.publish, args=(pod,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        elif publish:
            self.publish(pod)
        return pod

    def add_host(self, name: str, ip: str) -> None:
        """An extra A record (e.g. a store Service's name pointing at a pod)."""
        with self._lock:
            self._extra_hosts.setdefault(name, []).append(ip)
            self._write_records()

    def publish(self, pod: Pod) -> None:
        with self._lock:
            if self._closed:
                return
            self._published.add(pod.name)
            self._write_records()

    def unpublish(self, pod: Pod) -> None:
        with self._lock:
            self._published.discard(pod.name)
            self._write_records()

    def _write_records(self) -> None:
        lines = []
        for pod in self.pods.values():
            if pod.name not in self._published:
                continue
            if pod.subdomain:
                lines.append(f"{pod.ip}\t{pod.fqdn}")
            if pod.in_service:
                lines.append(f"{pod.ip}\t{self.service_fqdn()}")
        for name, ips in self._extra_hosts.items():
            lines += [f"{ip}\t{name}" for ip in ips]
        # Write then rename: dnsmasq's inotify sees one complete file.
        staging = STATE_DIR / self.uid / "records.tmp"
        staging.write_text("\n".join(lines) + "\n")
        staging.chmod(0o644)
        os.replace(staging, self.records_dir / "records")
        if self.named_ports and self._dnsmasq is not None:
            self._restart_dnsmasq()  # dnsmasq reads --srv-host only at start
        time.sleep(0.05)  # let inotify deliver before callers query


@pytest.fixture
def podnet() -> Iterator[PodNet]:
    """A started ``PodNet`` (service ``train`` in ``default``), always torn down."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with PodNet() as net:
        yield net
