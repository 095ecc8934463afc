"""Machines for multi-node tests: network namespaces on this machine, each with its own address and hostname.

A switch namespace holds a bridge (no address); each node namespace holds one end of a veth pair (address
10.213.X.N/24, X from the test process's pid) whose other end is on the bridge. Every address exists only
inside namespaces made here, and nothing is routed anywhere else. Needs root (CI runs as root); tests skip
with the reason otherwise. :meth:`Nodes.popen` runs a command "on node N" (its network, its own hostname),
:meth:`Nodes.cut` takes a node's link down. Leaving the context kills whatever still runs in the namespaces
and deletes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Self


def available() -> str:
    """Empty when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


class Nodes:
    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 10000:04d}"
        self.switch = f"lsw{tag}"
        self.names = [f"ln{tag}n{i}" for i in range(count)]
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.addresses = [f"{self.subnet}.{i + 1}" for i in range(count)]

    def __enter__(self) -> Self:
        try:
            self._ip("netns", "add", self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, addr) in enumerate(zip(self.names, self.addresses)):
                self._ip("netns", "add", name)
                self._ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                         "netns", name)
                self._ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                self._ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
                self._ip("-n", name, "link", "set", "eth0", "up")
                self._ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in [*self.names, self.switch]:
            _kill(_pids(name))
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        time.sleep(0.1)

    def pids(self, node: int) -> list[int]:
        """Every process running on ``node``."""
        return _pids(self.names[node])

    def kill(self, node: int) -> None:
        """SIGKILL every process on ``node``: the machine is lost (it may be started again)."""
        _kill(self.pids(node))

    def command(self, node: int, argv: list[str], hosts: str | None = None) -> list[str]:
        """``argv`` as run on ``node``: its network namespace, a hostname and a /dev/shm of its own (in a
        mount namespace of its own: a killed machine's shared memory and semaphores go with it, as on a real
        one, instead of staying in this machine's /dev/shm); with ``hosts`` (a file listing every node, see
        :meth:`hosts_file`) mounted over /etc/hosts, so that the nodes' names resolve (without it they do not,
        as on some clusters)."""
        mount = "mount -t tmpfs -o mode=1777 shm /dev/shm && "
        mount += f"mount --bind {hosts} /etc/hosts && " if hosts else ""
        return ["nsenter", f"--net=/run/netns/{self.names[node]}", "unshare", "--uts", "--mount", "sh", "-c",
                f'hostname {self.names[node]} && {mount}exec "$@"', "sh", *argv]

    def hosts_file(self, folder: Path) -> str:
        path = folder / "hosts"
        path.write_text("127.0.0.1 localhost\n" + "".join(
            f"{addr} {name}\n" for name, addr in zip(self.names, self.addresses)))
        return str(path)

    def popen(self, node: int, argv: list[str], hosts: str | None = None, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(node, argv, hosts), text=True, start_new_session=True, **kw)

    def cut(self, node: int) -> None:
        """Take ``node``'s link down: its peers stop hearing from it, and it from them."""
        self._ip("-n", self.switch, "link", "set", f"p{node}", "down")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _pids(namespace: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
