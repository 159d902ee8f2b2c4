"""Signed rendezvous state on a real loopback TCPStore: forged or foreign state is never unpickled."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousStateError
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from trainkit.k8s.bound_store import listening_tcp_store
from trainkit.k8s.signed_state import (
    ALLOW_UNAUTHENTICATED_VARIABLE,
    JOB_TOKEN_VARIABLE,
    RendezvousAuthError,
    SignedRendezvousBackend,
    read_job_token,
    require_job_token,
    sign_state,
    verify_state,
)

KEY = b"k" * 32
RUN_ID = "job-1"
STORE_KEY = f"torch.rendezvous.{RUN_ID}"


class Touch:
    """A pickle that creates a file when loaded: what an attacker would put into the store."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_sign_and_verify_round_trip_and_refusals() -> None:
    signed = sign_state(KEY, STORE_KEY, b"state")
    assert verify_state(KEY, STORE_KEY, signed) == b"state"
    assert verify_state(b"x" * 32, STORE_KEY, signed) is None  # another job's token
    assert verify_state(KEY, "torch.rendezvous.other", signed) is None  # another run's state
    assert verify_state(KEY, STORE_KEY, signed[:-1] + b"X") is None  # tampered
    assert verify_state(KEY, STORE_KEY, b"short") is None


def test_job_token_is_required_unless_explicitly_waived() -> None:
    with pytest.raises(ValueError, match=f"{JOB_TOKEN_VARIABLE} is not set.*secretKeyRef"):
        require_job_token({})
    assert require_job_token({ALLOW_UNAUTHENTICATED_VARIABLE: "1"}) is None
    assert require_job_token({JOB_TOKEN_VARIABLE: " " + "t" * 20 + "\n"}) == b"t" * 20
    with pytest.raises(ValueError, match=f"{JOB_TOKEN_VARIABLE} has 5 bytes; use at least 16"):
        read_job_token({JOB_TOKEN_VARIABLE: "short"})
    assert read_job_token({JOB_TOKEN_VARIABLE: ""}) is None


@pytest.fixture
def store() -> TCPStore:
    return listening_tcp_store("127.0.0.1", 0, timeout=timedelta(seconds=10))


def signed_backend(store: TCPStore, key: bytes = KEY) -> SignedRendezvousBackend:
    return SignedRendezvousBackend(
        C10dRendezvousBackend(store, RUN_ID), key=key, store_key=STORE_KEY
    )


def test_signed_backend_round_trip(store: TCPStore) -> None:
    backend = signed_backend(store)
    assert backend.get_state() is None
    state, token, has_set = backend.set_state(b"first")  # type: ignore[misc]
    assert (state, has_set) == (b"first", True)
    assert backend.get_state()[0] == b"first"  # type: ignore[index]
    # A stale token loses the compare-and-set and gets the current, verified state back.
    assert signed_backend(store).set_state(b"second", b"stale")[::2] == (b"first", False)  # type: ignore[index]
    assert backend.set_state(b"second", token)[::2] == (b"second", True)  # type: ignore[index]


def test_forged_state_is_refused_before_unpickling(
    store: TCPStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    backend = signed_backend(store)
    backend.set_state(b"legit")
    attacker = TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    attacker.set(STORE_KEY, base64.b64encode(pickle.dumps(Touch(marker))))
    params = RendezvousParameters("k8s", "", RUN_ID, 1, 1, join_timeout=10)
    handler = create_handler(store, backend, params)
    with caplog.at_level(logging.WARNING), pytest.raises(RendezvousAuthError) as raised:
        handler.next_rendezvous()
    assert isinstance(raised.value, RendezvousStateError)
    assert f"store key '{STORE_KEY}' failed authentication" in str(raised.value)
    assert JOB_TOKEN_VARIABLE in str(raised.value) and "NetworkPolicy" in str(raised.value)
    assert any(STORE_KEY in record.getMessage() for record in caplog.records)
    assert not marker.exists()
    # The same pickle unsigned would have run: the marker proves the attack is real.
    pickle.loads(pickle.dumps(Touch(marker)))
    assert marker.exists()


def test_state_signed_with_another_token_is_refused(store: TCPStore) -> None:
    signed_backend(store, key=b"a" * 32).set_state(b"theirs")
    with pytest.raises(RendezvousAuthError, match="different TRAINKIT_JOB_TOKEN"):
        signed_backend(store).get_state()
    with pytest.raises(RendezvousAuthError):
        signed_backend(store).set_state(b"mine")  # the answer to a lost compare-and-set too


def test_store_listens_on_its_address_only() -> None:
    # 127.0.0.2 is this machine too: a store bound to every address (torch's own) accepts there.
    torch_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with socket.create_connection(("127.0.0.2", torch_store.port), timeout=5):
        pass
    bound = listening_tcp_store("127.0.0.1", 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", bound.port), timeout=5)
    client = TCPStore("127.0.0.1", bound.port, is_master=False, timeout=timedelta(seconds=5))
    client.set("k", "v")
    assert bound.get("k") == b"v"
