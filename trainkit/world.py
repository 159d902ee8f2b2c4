"""Who am I in the training world: rank, sizes, node and master, read from any launcher's environment.

This module and ``trainkit.k8s`` are the only places that read launcher variables. It never mutates
the environment and imports torch only to answer ``World.device``: a ``World`` is plain data, built
in tests with keywords.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from trainkit.env_vars import NNODES_VARIABLE, NodeCount, parse_nnodes, read_nnodes

if TYPE_CHECKING:
    import torch

__all__ = ["SOURCES", "World"]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True, kw_only=True)
class World:
    """The shape of the job as seen by one process.

    ``source`` names the environment it was read from: ``"torchrun"`` (torchrun, trainkit-run and
    the trainkit Ray launcher), ``"pytorchjob"`` (Kubeflow PyTorchJob / TrainJob ``PET_*`` without a
    launcher in between), ``"ray"`` (Ray Train workers), ``"indexed-job"`` (Kubernetes indexed Job or
    JobSet, one process per pod), ``"env"`` (a bare ``RANK``/``WORLD_SIZE`` pair) or ``"single"``
    (``python script.py``, a world of one).

    ``use_agent_store`` is True when the launcher's agent serves the store at
    ``master_addr:master_port`` for the workers to join (torchrun's ``TORCHELASTIC_USE_AGENT_STORE``);
    otherwise rank 0 hosts it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    restart_count: int = 0
    run_id: str = "none"
    source: str = "single"
    use_agent_store: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.world_size >= 1, f"world_size ({self.world_size}) must be at least 1"),
            (
                0 <= self.rank < self.world_size,
                f"rank ({self.rank}) must be in [0, world_size={self.world_size})",
            ),
            (
                self.local_world_size >= 1,
                f"local_world_size ({self.local_world_size}) must be at least 1",
            ),
            (
                0 <= self.local_rank < self.local_world_size,
                f"local_rank ({self.local_rank}) must be in [0, local_world_size={self.local_world_size})",
            ),
            (self.num_nodes >= 1, f"num_nodes ({self.num_nodes}) must be at least 1"),
            (
                0 <= self.node_rank < self.num_nodes,
                f"node_rank ({self.node_rank}) must be in [0, num_nodes={self.num_nodes})",
            ),
            (
                self.local_world_size <= self.world_size,
                f"local_world_size ({self.local_world_size}) cannot exceed world_size ({self.world_size})",
            ),
            (0 < self.master_port < 65536, f"master_port ({self.master_port}) must be in 1..65535"),
            (self.restart_count >= 0, f"restart_count ({self.restart_count}) must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError(f"invalid World from source {self.source!r}: " + "; ".join(problems))

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that writes shared files and logs summaries."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This process's device: ``cuda:<local_rank>`` when CUDA is available and the process
        group (if one is initialised) has a CUDA backend (``trainkit.init()``'s ``auto`` picks
        ``cpu:gloo,cuda:nccl`` then), else ``cpu``."""
        import torch

        return torch.device("cuda", self.local_rank) if _uses_cuda(torch) else torch.device("cpu")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """Read the world from ``env`` (default ``os.environ``), trying launchers in ``SOURCES`` order.

        The first reader whose marker variables are present wins; a contradictory environment
        (``RANK=4`` with ``WORLD_SIZE=4``, a non-integer ``LOCAL_RANK``) raises ``ValueError`` naming
        the variables and their values.
        """
        env = os.environ if env is None else env
        for _name, applies, read in SOURCES:
            if applies(env):
                return read(env)
        return cls()


def _uses_cuda(torch: Any) -> bool:
    if not torch.cuda.is_available():
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    # A CUDA backend other than gloo (nccl, or a device map such as "cpu:gloo,cuda:nccl"); plain
    # "gloo" reports "cpu:gloo,cuda:gloo" and keeps training on the CPU.
    entries = dict(
        entry.split(":", 1) for entry in str(dist.get_backend_config()).split(",") if ":" in entry
    )
    return entries.get("cuda", "gloo") != "gloo"


class _Env:
    """Typed, error-reporting access to environment variables for one reader."""

    def __init__(self, env: Mapping[str, str], source: str) -> None:
        self.env = env
        self.source = source

    def has(self, *names: str) -> bool:
        return all(self.env.get(name, "") != "" for name in names)

    def first(self, *names: str) -> str | None:
        for name in names:
            value = self.env.get(name, "")
            if value != "":
                return name
        return None

    def int(self, *names: str, default: int | None = None) -> int:
        name = self.first(*names)
        if name is None:
            if default is None:
                raise ValueError(
                    f"{self.source} environment: none of {', '.join(names)} is set; "
                    f"set {names[0]} (or start the script with trainkit-run)"
                )
            return default
        raw = self.env[name]
        try:
            return int(raw)
        except ValueError:
            raise ValueError(
                f"{self.source} environment: {name}={raw!r} is not an integer"
            ) from None

    def str(self, *names: str, default: str) -> str:
        name = self.first(*names)
        return default if name is None else self.env[name]

    def build(self, **fields: object) -> World:
        try:
            return World(source=self.source, **fields)  # type: ignore[arg-type]
        except ValueError as error:
            shown = {
                key: self.env[key]
                for key in sorted(self.env)
                if key in _DESCRIBED_VARIABLES and self.env[key] != ""
            }
            detail = ", ".join(f"{key}={value}" for key, value in shown.items())
            raise ValueError(f"{error} (environment: {detail})") from None


_DESCRIBED_VARIABLES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "JOB_COMPLETION_INDEX",
    NNODES_VARIABLE,
}


def _is_torchrun(env: Mapping[str, str]) -> bool:
    # torchrun (and everything that copies its worker environment) always sets these together.
    return _Env(env, "torchrun").has("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _read_torchrun(env: Mapping[str, str]) -> World:
    e = _Env(env, "torchrun")
    world_size = e.int("WORLD_SIZE")
    local_world_size = e.int("LOCAL_WORLD_SIZE", default=1)
    return e.build(
        rank=e.int("RANK"),
        world_size=world_size,
        local_rank=e.int("LOCAL_RANK"),
        local_world_size=local_world_size,
        node_rank=e.int("GROUP_RANK", default=0),
        num_nodes=e.int("GROUP_WORLD_SIZE", default=max(1, world_size // local_world_size)),
        master_addr=e.str("MASTER_ADDR", default=DEFAULT_MASTER_ADDR),
        master_port=e.int("MASTER_PORT", default=DEFAULT_MASTER_PORT),
        restart_count=e.int("TORCHELASTIC_RESTART_COUNT", default=0),
        run_id=e.str("TORCHELASTIC_RUN_ID", default="none"),
        # torch's agent writes str(bool); only its literal "True" means the store is the agent's.
        use_agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def _is_ray(env: Mapping[str, str]) -> bool:
    # Ray Train's torch backend sets NODE_RANK (not torchrun's GROUP_RANK) next to the usual four.
    e = _Env(env, "ray")
    return e.has("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK") and not e.has("GROUP_RANK")


def _read_ray(env: Mapping[str, str]) -> World:
    e = _Env(env, "ray")
    world_size = e.int("WORLD_SIZE")
    local_world_size = e.int("LOCAL_WORLD_SIZE", default=1)
    return e.build(
        rank=e.int("RANK"),
        world_size=world_size,
        local_rank=e.int("LOCAL_RANK"),
        local_world_size=local_world_size,
        node_rank=e.int("NODE_RANK"),
        num_nodes=max(1, -(-world_size // local_world_size)),
        master_addr=e.str("MASTER_ADDR", default=DEFAULT_MASTER_ADDR),
        master_port=e.int("MASTER_PORT", default=DEFAULT_MASTER_PORT),
        run_id=e.str("RAY_TRAIN_RUN_ID", "RAY_JOB_ID", default="none"),
    )


def _is_pytorchjob(env: Mapping[str, str]) -> bool:
    # Kubeflow's training operator (PyTorchJob) and Trainer (TrainJob) set PET_* for torchrun; a
    # process started directly in such a pod sees them without torchrun's worker variables.
    return _Env(env, "pytorchjob").has("PET_NNODES") or _Env(env, "pytorchjob").has("PET_NODE_RANK")


def _read_pytorchjob(env: Mapping[str, str]) -> World:
    e = _Env(env, "pytorchjob")
    num_nodes = 1
    if e.has("PET_NNODES"):
        num_nodes = _fixed_node_count(
            parse_nnodes(env["PET_NNODES"], "PET_NNODES"), "PET_NNODES", "pytorchjob"
        )
    nproc = env.get("PET_NPROC_PER_NODE", "1") or "1"
    if nproc != "1":
        raise ValueError(
            f"pytorchjob environment: PET_NPROC_PER_NODE={nproc} asks for several processes per pod, "
            "but this process was started directly; start the script with trainkit-run (or torchrun) "
            "so each process gets its own rank"
        )
    # PyTorchJob sets RANK to the replica index (Master 0, Workers 1..n); TrainJob sets PET_NODE_RANK.
    node_rank = e.int("PET_NODE_RANK", "RANK", default=0)
    world_size = e.int("WORLD_SIZE", default=num_nodes)
    if world_size != num_nodes:
        raise ValueError(
            f"pytorchjob environment: WORLD_SIZE={world_size} but PET_NNODES={num_nodes} with one "
            "process per pod; these must agree"
        )
    return e.build(
        rank=node_rank,
        world_size=num_nodes,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=e.str("PET_MASTER_ADDR", "MASTER_ADDR", default=DEFAULT_MASTER_ADDR),
        master_port=e.int("PET_MASTER_PORT", "MASTER_PORT", default=DEFAULT_MASTER_PORT),
        run_id=e.str("PET_RDZV_ID", "JOB_NAME", default="none"),
    )


def _fixed_node_count(node_count: NodeCount, name: str, source: str) -> int:
    if not node_count.is_fixed:
        raise ValueError(
            f"{source} environment: {name}='{node_count}' is an elastic range, but a process "
            "started without a launcher joins a fixed world; set a single number of pods, or start "
            "the script with trainkit-run"
        )
    return node_count.min_nodes


def _is_indexed_job(env: Mapping[str, str]) -> bool:
    return _Env(env, "indexed-job").has("JOB_COMPLETION_INDEX")


def _read_indexed_job(env: Mapping[str, str]) -> World:
    e = _Env(env, "indexed-job")
    node_count = read_nnodes(env)
    if node_count is not None:
        num_nodes = _fixed_node_count(node_count, NNODES_VARIABLE, "indexed-job")
    elif e.has("WORLD_SIZE"):
        num_nodes = e.int("WORLD_SIZE")
    else:
        raise ValueError(
            f"indexed-job environment: neither {NNODES_VARIABLE} nor WORLD_SIZE is set; set "
            f"{NNODES_VARIABLE} to the Job's completions (its number of pods)"
        )
    index = e.int("JOB_COMPLETION_INDEX")
    return e.build(
        rank=index,
        world_size=num_nodes,
        node_rank=index,
        num_nodes=num_nodes,
        master_addr=e.str("MASTER_ADDR", default=DEFAULT_MASTER_ADDR),
        master_port=e.int("MASTER_PORT", default=DEFAULT_MASTER_PORT),
        run_id=e.str("JOB_NAME", default="none"),
    )


def _is_plain_env(env: Mapping[str, str]) -> bool:
    return _Env(env, "env").has("RANK", "WORLD_SIZE")


def _read_plain_env(env: Mapping[str, str]) -> World:
    e = _Env(env, "env")
    world_size = e.int("WORLD_SIZE")
    local_world_size = e.int("LOCAL_WORLD_SIZE", default=1)
    return e.build(
        rank=e.int("RANK"),
        world_size=world_size,
        local_rank=e.int("LOCAL_RANK", default=0),
        local_world_size=local_world_size,
        node_rank=e.int("GROUP_RANK", "NODE_RANK", default=0),
        num_nodes=e.int("GROUP_WORLD_SIZE", default=max(1, -(-world_size // local_world_size))),
        master_addr=e.str("MASTER_ADDR", default=DEFAULT_MASTER_ADDR),
        master_port=e.int("MASTER_PORT", default=DEFAULT_MASTER_PORT),
    )


Reader = tuple[str, Callable[[Mapping[str, str]], bool], Callable[[Mapping[str, str]], World]]

#: Readers in the order ``World.from_env`` tries them; the first that applies wins.
SOURCES: tuple[Reader, ...] = (
    ("torchrun", _is_torchrun, _read_torchrun),
    ("ray", _is_ray, _read_ray),
    ("pytorchjob", _is_pytorchjob, _read_pytorchjob),
    ("indexed-job", _is_indexed_job, _read_indexed_job),
    ("env", _is_plain_env, _read_plain_env),
)
