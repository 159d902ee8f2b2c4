"""Authenticated rendezvous state: torch's dynamic rendezvous pickles its state into the store.

``SignedRendezvousBackend`` wraps a torch rendezvous backend, signs what it sets with HMAC-SHA256
under the job token and refuses state that fails the check before anything unpickles it. It never
logs or returns the token. Imports torch: the ``k8s`` handler loads it when torchrun creates it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousStateError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

__all__ = [
    "ALLOW_UNAUTHENTICATED_VARIABLE",
    "JOB_TOKEN_VARIABLE",
    "MIN_TOKEN_BYTES",
    "RendezvousAuthError",
    "SignedRendezvousBackend",
    "read_job_token",
    "require_job_token",
    "sign_state",
    "verify_state",
]

logger = logging.getLogger("trainkit.k8s.signed_state")

#: The job's shared secret, e.g. from a Kubernetes Secret through ``valueFrom.secretKeyRef``.
JOB_TOKEN_VARIABLE = "TRAINKIT_JOB_TOKEN"
#: ``1`` lets the k8s backend run without a token (unauthenticated state, as torch's c10d backend).
ALLOW_UNAUTHENTICATED_VARIABLE = "TRAINKIT_RDZV_ALLOW_UNAUTHENTICATED"
MIN_TOKEN_BYTES = 16

_MAGIC = b"TKRS1"
_DIGEST_BYTES = hashlib.sha256().digest_size


def read_job_token(env: Mapping[str, str]) -> bytes | None:
    """The job token from ``TRAINKIT_JOB_TOKEN`` (None when unset or empty); ValueError if too short."""
    token = env.get(JOB_TOKEN_VARIABLE, "").strip()
    if not token:
        return None
    if len(token.encode()) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"{JOB_TOKEN_VARIABLE} has {len(token.encode())} bytes; use at least {MIN_TOKEN_BYTES} "
            "random bytes, e.g. `kubectl create secret generic <job>-token "
            '--from-literal=token="$(openssl rand -hex 32)"`'
        )
    return token.encode()


def require_job_token(env: Mapping[str, str]) -> bytes | None:
    """The job token that signs the rendezvous state; None only with the explicit opt-out.

    Without a token anyone who can reach the store port can run code as the launcher's user
    (torch unpickles the state on every sync), so the default is to refuse to start.
    """
    token = read_job_token(env)
    if token is not None:
        return token
    if env.get(ALLOW_UNAUTHENTICATED_VARIABLE, "").strip() == "1":
        logger.warning(
            "k8s rendezvous: %s=1 and no %s: the rendezvous state is not authenticated; anyone "
            "who can reach the store port can run code as this user",
            ALLOW_UNAUTHENTICATED_VARIABLE,
            JOB_TOKEN_VARIABLE,
        )
        return None
    raise ValueError(
        f"k8s rendezvous: {JOB_TOKEN_VARIABLE} is not set; the rendezvous state is a pickle that "
        "every pod loads, so it must be signed: give every pod of the job the same token from a "
        f"Secret (env {JOB_TOKEN_VARIABLE} valueFrom secretKeyRef), or set "
        f"{ALLOW_UNAUTHENTICATED_VARIABLE}=1 to run without (only where nothing else can reach "
        "the store port)"
    )


def _mac(key: bytes, store_key: str, state: bytes) -> bytes:
    # The store key is part of the message, so state signed for one run id is refused in another.
    message = b"trainkit rendezvous state\0" + store_key.encode() + b"\0" + state
    return hmac.new(key, message, hashlib.sha256).digest()


def sign_state(key: bytes, store_key: str, state: bytes) -> bytes:
    """``state`` with a header and its HMAC-SHA256, as stored under ``store_key``."""
    return _MAGIC + _mac(key, store_key, state) + state


def verify_state(key: bytes, store_key: str, signed: bytes) -> bytes | None:
    """The state inside ``signed`` when its HMAC checks out under ``key``, else None."""
    header = len(_MAGIC) + _DIGEST_BYTES
    if len(signed) < header or not signed.startswith(_MAGIC):
        return None
    digest, state = signed[len(_MAGIC) : header], signed[header:]
    return state if hmac.compare_digest(digest, _mac(key, store_key, state)) else None


class RendezvousAuthError(RendezvousStateError):
    """Rendezvous state in the store failed authentication; it was never unpickled."""


class SignedRendezvousBackend(RendezvousBackend):
    """A torch ``RendezvousBackend`` whose state is signed on set and verified on get.

    ``inner`` is the backend that talks to the store (torch's ``C10dRendezvousBackend``);
    ``store_key`` the key it keeps the state under (``torch.rendezvous.<run id>``), named in errors.
    Every state read back, including the answer to a failed compare-and-set, is verified before it
    is returned to torch's state holder, which unpickles it.
    """

    def __init__(self, inner: RendezvousBackend, *, key: bytes, store_key: str) -> None:
        if len(key) < MIN_TOKEN_BYTES:
            raise ValueError(f"rendezvous signing key has {len(key)} bytes; use {MIN_TOKEN_BYTES}+")
        self._inner = inner
        self._key = key
        self.store_key = store_key

    @property
    def name(self) -> str:
        return self._inner.name

    def _verified(self, signed: bytes) -> bytes:
        state = verify_state(self._key, self.store_key, signed)
        if state is None:
            logger.warning(
                "rendezvous state under store key %r failed authentication (%d bytes); refused "
                "without unpickling it",
                self.store_key,
                len(signed),
            )
            raise RendezvousAuthError(
                f"rendezvous state under store key {self.store_key!r} failed authentication "
                f"(HMAC-SHA256 with {JOB_TOKEN_VARIABLE}) and was refused without unpickling it: "
                f"either a pod of this job has a different {JOB_TOKEN_VARIABLE} (give every pod the "
                "same Secret) or something else wrote to the rendezvous store (confine its port "
                "with a NetworkPolicy)"
            )
        return state

    def get_state(self) -> tuple[bytes, Any] | None:
        result = self._inner.get_state()
        if result is None:
            return None
        signed, token = result
        return self._verified(signed), token

    def set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool] | None:
        result = self._inner.set_state(sign_state(self._key, self.store_key, state), token)
        if result is None:
            return None
        signed, new_token, has_set = result
        return self._verified(signed), new_token, has_set
