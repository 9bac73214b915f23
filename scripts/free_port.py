#!/usr/bin/env python3
"""Prints a TCP port a test server can bind: one below the kernel's ephemeral range.

A port the kernel hands out for bind(0) lies inside the ephemeral range, where every
outgoing connection also takes its local port: between our check and the server's own
bind, a connection of a parallel test (or of anything else on the machine) can take it,
and the server fails with "Address already in use" (CI saw it once). Below that range
the kernel never picks a port by itself, so only another test choosing the same random
port could collide. tests/common/process.rs picks its ports the same way.

Used by scripts/browser-test and scripts/container-test (python3 scripts/free_port.py)
and imported by scripts/loadtest.py.
"""

import random
import socket

LOWEST = 20000


def ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def wildcard_socket():
    """IPv6 (dual stack, so IPv4 too) where the kernel has it, as the server listens."""
    try:
        return socket.socket(socket.AF_INET6)
    except OSError:
        return socket.socket(socket.AF_INET)


def bindable(port):
    try:
        with wildcard_socket() as s:
            s.bind(("", port))
        return True
    except OSError:
        return False


def free_port():
    high = ephemeral_low()
    if high - LOWEST >= 1000:
        for _ in range(200):
            port = random.randrange(LOWEST, high)
            if bindable(port):
                return port
    # A machine whose ephemeral range starts low: the kernel's choice, with its small risk.
    with wildcard_socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(free_port())
