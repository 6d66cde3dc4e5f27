"""A real pseudo-terminal pair, so the host link uses the very same serial code path as on hardware."""

from __future__ import annotations

import os
import threading
import tty

_slave_fds: dict[int, int] = {}
_lock = threading.Lock()


def open_pty_pair() -> tuple[int, str]:
    """Open a pty; return ``(master_fd, slave_path)``.

    The master is non-blocking (the simulator must never stall on a host that does not read). The slave
    is set raw (no echo, no line editing, 8-bit clean) and kept open here until :func:`close_pty_pair`,
    because a pty whose slave side has no opener returns EIO on the master (a busy loop for the
    simulator) while the host is not connected yet.
    """
    master_fd, slave_fd = os.openpty()
    tty.setraw(slave_fd)
    os.set_blocking(master_fd, False)
    with _lock:
        _slave_fds[master_fd] = slave_fd
    return master_fd, os.ttyname(slave_fd)


def close_pty_pair(master_fd: int) -> None:
    """Close the master and the slave fd held by :func:`open_pty_pair`.

    Safe to call twice: an fd this module did not open (or already closed) is left alone, because its
    number may by now belong to an unrelated file.
    """
    with _lock:
        slave_fd = _slave_fds.pop(master_fd, None)
    if slave_fd is None:
        return
    for fd in (master_fd, slave_fd):
        try:
            os.close(fd)
        except OSError:
            pass
