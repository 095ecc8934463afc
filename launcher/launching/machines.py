"""A job spanning machines: who holds which ranks, which machine was lost, and a bound on every wait.

Runs in the ``launcher`` process of each machine (multi-machine ``launcher run`` only). Each machine writes
its record (hostname, address, global ranks) into the rendezvous store and bumps a counter there every
second; after a failure, a machine whose counter stands still, or the store itself not answering, names the
machine that was lost. The watchdog bounds what torch elastic leaves unbounded: a machine cut off from the
rendezvous host waits forever in a store call while its ranks have long ended (their collectives time out);
once this machine's ranks are gone and the agent has not returned within the grace, the launcher reports
and exits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..errors import UsageError

#: Seconds between a machine's liveness bumps in the store.
BEAT_S = 1.0
#: How long a store read may take when judging which machine was lost.
PROBE_TIMEOUT_S = 3.0
#: How long the agent may stay in a store call once this machine's ranks have ended (it returns in well
#: under a second when the store answers).
STUCK_S = 4.0


class Roster:
    """This machine's record in the rendezvous store, its liveness counter, and the others' records."""

    def __init__(self, host_ip: str, port: int, run_id: str, local_addr: str) -> None:
        self.host_ip, self.port, self.local_addr = host_ip, port, local_addr
        self.prefix = f"launcher/{run_id}"
        self.machine = -1
        self.machines = 0
        self._stop = threading.Event()
        self._client_store: Any = None
        self._thread: threading.Thread | None = None

    def _client(self) -> Any:
        from torch.distributed import TCPStore

        return TCPStore(self.host_ip, self.port, is_master=False, timeout=timedelta(seconds=PROBE_TIMEOUT_S),
                        wait_for_workers=False)

    def publish(self, machine: int, machines: int, ranks: list[int]) -> None:
        """After each rendezvous: this machine is number ``machine`` of ``machines`` and holds ``ranks``."""
        self.machine, self.machines = machine, machines
        record = {"host": socket.gethostname(), "addr": self.local_addr, "ranks": [min(ranks), max(ranks)]}
        with contextlib.suppress(Exception):  # the record only improves a report; never fail a run for it
            self._store().set(f"{self.prefix}/machine/{machine}", json.dumps(record))
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="launcher-liveness", daemon=True)
            self._thread.start()

    def _store(self) -> Any:
        if self._client_store is None:
            self._client_store = self._client()
        return self._client_store

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._store().add(f"{self.prefix}/alive/{self.machine}", 1)
            except Exception:  # noqa: BLE001  (the store host may be gone: a report says so, not this thread)
                return

    def stop(self) -> None:
        self._stop.set()

    def lost(self) -> str:
        """Which machines stopped answering, in words ("" when all answer or nothing is known)."""
        if self.machines <= 1:
            return ""
        try:
            # a plain connect first: torch's store client logs a C++ stack trace when it cannot connect
            socket.create_connection((self.host_ip, self.port), timeout=PROBE_TIMEOUT_S).close()
            store = self._client()
            keys = [f"{self.prefix}/alive/{m}" for m in range(self.machines) if m != self.machine]
            before = [store.add(k, 0) for k in keys]
            time.sleep(2.5 * BEAT_S)
            after = [store.add(k, 0) for k in keys]
        except Exception:  # noqa: BLE001
            return (f"the machine hosting the rendezvous ({self.host_ip}:{self.port}) does not answer: it, "
                    "or this machine's link to it, was lost")
        lost = []
        for k, a, b in zip(keys, before, after):
            if a == b:
                m = int(k.rsplit("/", 1)[1])
                try:
                    r = json.loads(store.get(f"{self.prefix}/machine/{m}"))
                    first, last = r["ranks"]
                    lost.append(f"machine {m} ({r['host']}, {r['addr']}, ranks {first}-{last})")
                except Exception:  # noqa: BLE001
                    lost.append(f"machine {m}")
        if not lost:
            return ""
        return f"lost {', '.join(lost)}: it stopped answering, so the ranks here failed"


class Meeting:
    """Where this machine meets the others: the endpoint by address, whether this machine hosts the store,
    and this machine's own address on the route there.

    Machines are named by address throughout: a hostname that does not resolve on every machine (a common
    cluster set-up) would otherwise make torch's host test fail, put an unreachable name into MASTER_ADDR, and
    make Gloo fall back to loopback. The interface carrying that address goes to Gloo and NCCL
    (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``) unless the user set them.
    """

    def __init__(self, endpoint: str) -> None:
        host, _, port = endpoint.rpartition(":")
        try:
            info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            raise UsageError(f"distributed.rdzv_endpoint: {host} does not resolve here ({e})\n"
                             "HINT: give the address of the machine that hosts the rendezvous") from None
        family, _, _, _, address = info[0]
        self.host_ip, self.port = str(address[0]), int(port)
        self.endpoint = f"[{self.host_ip}]:{port}" if family == socket.AF_INET6 else f"{self.host_ip}:{port}"
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(address)  # a UDP connect only picks the route: nothing is sent
            self.local_addr = str(s.getsockname()[0])
        self.is_host = self.local_addr == self.host_ip or ipaddress.ip_address(self.host_ip).is_loopback
        self.env: dict[str, str] = {}
        interface = _interface_with(self.local_addr)
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if interface and key not in os.environ:
                self.env[key] = interface
        # torch 2.14's shared rendezvous store breaks a restart with a machine that comes back: the host
        # keeps the first round's MASTER_ADDR and never writes the new round's, so the returning machine waits
        # for it until the store times out (seen with max_restarts=1). Unshared, every round writes it (rank 0
        # picks the ranks' port then, as torchrun did before the sharing).
        if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
            self.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"


def _interface_with(address: str) -> str | None:
    """The network interface whose (IPv4) address is ``address``, if any."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


def watchdog(ranks_gone: Callable[[], bool], limit_s: Callable[[], float], why: Callable[[], str],
             cleanup: Callable[[], None]) -> threading.Event:
    """Exit the launcher when this machine's ranks are all gone and the agent has not moved on within
    ``limit_s()`` seconds (it depends on what the agent is waiting for). Returns the event that disarms it
    (set it once the agent has returned and let go of the rendezvous)."""
    done = threading.Event()

    def run() -> None:
        since = None
        while not done.wait(0.5):
            if not ranks_gone():
                since = None
                continue
            since = since or time.monotonic()
            limit = limit_s()
            if time.monotonic() - since > limit and not done.is_set():
                print(f"launcher: this machine's ranks ended {limit:.0f} s ago and torch elastic's agent is "
                      f"still waiting on the rendezvous: {why() or 'the other machines do not answer'}; "
                      "exiting", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    cleanup()
                os._exit(1)

    threading.Thread(target=run, name="launcher-watchdog", daemon=True).start()
    return done
