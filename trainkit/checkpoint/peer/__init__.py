"""Peer replicas of memory snapshots: a channel that copies snapshot directories between pods.

A snapshot is a directory of regular files that the memory tier wrote and committed; the channel
moves such directories byte-exactly and never interprets their content. The API::

    server = ReplicaServer(root, host=pod_ip, port=DEFAULT_REPLICA_PORT, token=token,
                           keep=2, max_bytes=None)     # a thread of the trainkit-run agent
    server.start(); server.address                     # the bound (host, port)
    server.steps(owner); server.snapshot_path(owner, step); server.stats; server.close()

    push_snapshot(address, token, owner="rank-3", step=120, directory=snapshot_dir,
                  rate_bytes_per_s=None, timeout_s=60.0) -> int          # bytes sent
    list_snapshots(address, token, owner="rank-3", timeout_s=10.0) -> list[int]  # complete steps
    fetch_snapshot(address, token, owner="rank-3", step=120, dest=new_dir,
                   timeout_s=60.0) -> int              # bytes; dest appears only when verified
    token_from_env(env=os.environ) -> bytes | None     # TRAINKIT_JOB_TOKEN (from a Secret)

The server stores ``root/<owner>/<step:012d>/`` (plus its record ``.trainkit-replica.json``),
committed-or-invisible: received into ``root/.incoming`` (emptied at start), every file's size and
checksum verified, then renamed into place; the newest ``keep`` steps per owner are kept, a push
of a step older than all of them is refused, and a push of a step already held replaces it whole.
A push over ``max_bytes`` (in-flight pushes included; the owner's steps it would retire go first)
or one this peer cannot store (a full volume) is refused with the reason. ``owner`` is a name such
as ``rank-3`` or ``node-1`` (letters, digits, ``._-``). ``timeout_s`` bounds each stall, not the
whole transfer; a throttled push (``rate_bytes_per_s``) never exceeds its rate on average.

Wire format (``protocol``): TCP; each side sends a 32-byte random nonce; the session key is
HMAC-SHA256(job token, both nonces); every frame is ``TKR1``, kind, length, body and
HMAC-SHA256(session key, direction, sequence number, frame). Bodies are JSON control objects
(at most 1 MiB) or raw file bytes (at most 4 MiB per frame); per-file checksums are xxh3_64
(CRC32 without xxhash). Nothing is unpickled or evaluated, and nothing is parsed before its MAC
checked out. Errors: ``ReplicationError`` (names the peer and what failed) and its subclass
``ReplicaRefusedError`` (the peer answered no). The default port is ``DEFAULT_REPLICA_PORT``
(29410, ``TRAINKIT_REPLICA_PORT``).
"""

from trainkit.checkpoint.peer.client import (
    fetch_snapshot,
    list_snapshots,
    push_snapshot,
    token_from_env,
)
from trainkit.checkpoint.peer.protocol import ReplicaRefusedError, ReplicationError
from trainkit.checkpoint.peer.server import ReplicaServer
from trainkit.env_vars import DEFAULT_REPLICA_PORT

__all__ = [
    "DEFAULT_REPLICA_PORT",
    "ReplicaRefusedError",
    "ReplicaServer",
    "ReplicationError",
    "fetch_snapshot",
    "list_snapshots",
    "push_snapshot",
    "token_from_env",
]
