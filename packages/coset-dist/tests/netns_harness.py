"""A shaped private network on one machine: network namespaces, veth pairs, a bridge, ``tc tbf``/``netem``.

Used by ``test_dist_shaped_link.py`` and ``benchmarks/bench_ddp_link.py`` to run one DDP rank per namespace
over TCP on a link of known speed, and to read the bytes that really crossed each interface.

Topology (every object lives inside namespaces this process creates; the root namespace is never touched,
so no traffic can leave them):

* ``hosts == 2``: ``h0 --veth-- h1`` (a point-to-point cable), both ends shaped.
* ``hosts > 2``: a switch namespace holding a bridge; every host has one veth to it. The host end is shaped
  (host -> switch) and so is the switch port (switch -> host), i.e. every host has a NIC of ``rate`` in
  each direction, like machines on a switch.

Addresses are ``10.231.0.(i+1)/24`` on the interface ``eth0`` of host i (private, reachable only inside the
namespaces). Names carry the pid of the creating process, so concurrent runs never collide.

Clean-up: :meth:`ShapedNetwork.close` kills the processes started through :meth:`ShapedNetwork.popen` (by pid,
their own process groups) and deletes every namespace created (which deletes its veths, bridge and qdiscs).
It runs on ``with`` exit, from ``atexit``, and on SIGINT/SIGTERM (the handlers are installed while a network
exists and restored afterwards).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass

__all__ = ["ShapedNetwork", "LinkSpec", "netns_unavailable_reason", "parse_rate"]

SUBNET = "10.231.0"
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def parse_rate(rate: str) -> float:
    """``"100mbit"`` -> 1e8 (bits per second); the tc spellings kbit/mbit/gbit."""
    r = rate.strip().lower()
    for u in ("kbit", "mbit", "gbit", "bit"):
        if r.endswith(u):
            try:
                return float(r[: -len(u)]) * _UNITS[u]
            except ValueError:
                break
    raise ValueError(f"rate must look like '100mbit' or '1gbit', got {rate!r}")


@dataclass(frozen=True)
class LinkSpec:
    """Shaping of every host's link: ``rate`` (tc spelling, e.g. "1gbit"; None = unshaped veth) and an
    optional one-way ``delay_ms`` (netem)."""

    rate: str | None = "100mbit"
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.rate is not None:
            parse_rate(self.rate)
        if not (self.delay_ms >= 0):
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")

    @property
    def label(self) -> str:
        r = self.rate or "unshaped"
        return r + (f"+{self.delay_ms:g}ms" if self.delay_ms else "")


def netns_unavailable_reason() -> str | None:
    """Why shaped networks cannot be built here (None if they can): needs root, ``ip`` and ``tc``."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command (iproute2) is not installed"
    return None


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")


class ShapedNetwork:
    """A private network of ``hosts`` namespaces shaped by ``link`` (see the module docstring).

    Parameters
    ----------
    hosts : int >= 2
    link : LinkSpec
    tag : str, optional, part of every name (default: this process's pid)

    Use as a context manager; ``addr(i)``, ``netns(i)`` and ``popen(i, argv)`` address host i;
    ``counters()`` reads the tx/rx byte counters of every host's ``eth0``.
    """

    def __init__(self, hosts: int, link: LinkSpec | None = None, tag: str | None = None) -> None:
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 2 <= hosts <= 200:
            raise ValueError(f"hosts must be an int in [2, 200], got {hosts!r}")
        reason = netns_unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot build a shaped network: {reason}")
        self.hosts = hosts
        self.link = link or LinkSpec()
        self.tag = tag or str(os.getpid())
        self._prefix = f"cosetnet-{self.tag}"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._lock = threading.Lock()
        self._old_handlers: dict[int, object] = {}
        self._install_cleanup()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ names
    def netns(self, i: int) -> str:
        return f"{self._prefix}-h{i}"

    @property
    def switch_ns(self) -> str:
        return f"{self._prefix}-sw"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    # ------------------------------------------------------------------ build / tear down
    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str) -> None:
        rate, delay = self.link.rate, self.link.delay_ms
        if rate is None and not delay:
            return
        parent = ["root"]
        if delay:
            try:
                _run(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "handle",
                    "1:",
                    "netem",
                    "delay",
                    f"{delay}ms",
                    "limit",
                    "100000",
                )
            except RuntimeError as e:
                if "unknown" in str(e).lower():
                    raise RuntimeError(
                        "delay_ms needs the netem qdisc, which this kernel lacks (sch_netem); use delay_ms=0"
                    ) from e
                raise
            parent = ["parent", "1:"]
        if rate is not None:
            bps = parse_rate(rate)
            # burst: 2 ms of traffic but at least 64 KiB (a GSO segment must fit, or tbf drops it);
            # latency bounds the queue (excess packets are dropped and TCP backs off, as on a real NIC).
            burst = max(65536, int(bps / 8 * 0.002))
            _run(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                *parent,
                "handle",
                "2:",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                "50ms",
            )

    def _build(self) -> None:
        t = self.tag
        for i in range(self.hosts):
            self._add_ns(self.netns(i))
        if self.hosts == 2:
            # one cable; both ends are created directly inside their namespaces (never in the root namespace)
            _run(
                "ip",
                "link",
                "add",
                f"cs{t}a",
                "netns",
                self.netns(0),
                "type",
                "veth",
                "peer",
                "name",
                f"cs{t}b",
                "netns",
                self.netns(1),
            )
            ends = [(self.netns(0), f"cs{t}a"), (self.netns(1), f"cs{t}b")]
        else:
            sw = self.switch_ns
            self._add_ns(sw)
            _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", sw, "link", "set", "br0", "up")
            ends = []
            for i in range(self.hosts):
                host_if, port = f"cs{t}h{i}", f"p{i}"
                _run(
                    "ip",
                    "link",
                    "add",
                    host_if,
                    "netns",
                    self.netns(i),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    sw,
                )
                _run("ip", "-n", sw, "link", "set", port, "master", "br0")
                _run("ip", "-n", sw, "link", "set", port, "up")
                self._shape(sw, port)  # switch -> host direction
                ends.append((self.netns(i), host_if))
        for i, (ns, dev) in enumerate(ends):
            _run("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            self._shape(ns, "eth0")  # host -> peer/switch direction

    def _install_cleanup(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.close()
            old = self._old_handlers.get(signum)
            if callable(old):
                old(signum, frame)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        for s in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[s] = signal.getsignal(s)
            signal.signal(s, handler)

    def close(self) -> None:
        """Kill the processes started here, delete every namespace created here (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session (start_new_session=True)
                except ProcessLookupError:
                    pass
                p.wait()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        if threading.current_thread() is threading.main_thread():
            for s, h in self._old_handlers.items():
                signal.signal(s, h)  # type: ignore[arg-type]
        atexit.unregister(self.close)

    def __enter__(self) -> ShapedNetwork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ use
    def popen(self, i: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` inside host i's namespace (own session, so it can be killed as a group)."""
        if self._closed:
            raise RuntimeError("the network is closed")
        e = dict(os.environ if env is None else env)
        e.setdefault("GLOO_SOCKET_IFNAME", "eth0")  # gloo must use the shaped interface, not a hostname lookup
        p = subprocess.Popen(["ip", "netns", "exec", self.netns(i), *argv], env=e, start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def counters(self) -> list[dict]:
        """Per host: ``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}`` of its ``eth0`` (kernel counters)."""
        out = []
        for i in range(self.hosts):
            r = subprocess.run(
                ["ip", "-n", self.netns(i), "-j", "-s", "link", "show", "dev", "eth0"],
                capture_output=True,
                text=True,
                check=True,
            )
            st = json.loads(r.stdout)[0]["stats64"]
            out.append(
                {
                    "tx_bytes": st["tx"]["bytes"],
                    "rx_bytes": st["rx"]["bytes"],
                    "tx_packets": st["tx"]["packets"],
                    "rx_packets": st["rx"]["packets"],
                }
            )
        return out

    def exists(self) -> bool:
        """True while every namespace of this network is listed by ``ip netns``."""
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
        return bool(self._namespaces) and all(n in names for n in self._namespaces)
