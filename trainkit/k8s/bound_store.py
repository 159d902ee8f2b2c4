"""TCPStore servers that listen on one address: torch's own bind every interface of the machine.

torch 2.13's TCPStore server ignores its host for listening (libuv binds ``[::]``/``0.0.0.0``); it
does accept an already bound socket (``master_listen_fd``), which is how the address is chosen here.
Never used for clients.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore

__all__ = ["listening_tcp_store"]


def listening_tcp_store(
    host: str, port: int, *, timeout: timedelta = timedelta(seconds=60), multi_tenant: bool = True
) -> TCPStore:
    """A TCPStore server listening on ``host``'s first address and ``port`` (0: a free port) only.

    Raises ``OSError`` when the address cannot be bound (in use, or not this machine's).
    """
    from torch.distributed import TCPStore

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As torch does for its own listener: a restarted store may reuse a port in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
        store = TCPStore(
            address[0],
            listener.getsockname()[1],
            is_master=True,
            multi_tenant=multi_tenant,
            wait_for_workers=False,
            timeout=timeout,
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the descriptor now and closes it
    return store
