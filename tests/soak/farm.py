"""The soak's farm: control replicas on one database, simulator processes, workers attached to
them (each in its own network namespace where allowed), and experiment clients. Every process
it starts is tracked by pid and stopped by `close()` (also after Ctrl-C); nothing else is
touched. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.pg_cluster import PgCluster, free_port
from tests.soak import netns

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0

# The control's timers in the soak: a stopped or cut-off worker goes offline after OFFLINE
# (so "past the offline timeout" fits a short run), a killed client's reservations end after
# CLIENT_GRACE, an offline worker's after WORKER_GRACE.
OFFLINE = "6s"
OFFLINE_SECONDS = 6.0
CLIENT_GRACE = "15s"
WORKER_GRACE = "40s"
# The worker's hardware timeouts: short, so a board fault is noticed in a couple of seconds
# (the simulator answers in milliseconds plus the circuit time).
EVALUATE_TIMEOUT = "2s"
FLASH_TIMEOUT = "3s"
DRAIN_TIMEOUT = "20s"


@dataclass
class Proc:
    """One started process: its role, its Popen, its log file."""

    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False
    # Set when the soak ends it on purpose (a fault, or the end of the run).
    ended_on_purpose: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Sizes:
    replicas: int = 2
    workers: int = 4
    boards: int = 16
    clients: int = 20
    circuit: float = 0.3


@dataclass
class Farm:
    root: Path
    backend: str
    sizes: Sizes
    seed: int
    use_netns: bool
    database_url: str = ""
    cluster: PgCluster | None = None
    control_ports: list[int] = field(default_factory=list)
    worker_ports: list[int] = field(default_factory=list)
    controls: dict[int, Proc] = field(default_factory=dict)
    simulators: dict[int, Proc] = field(default_factory=dict)
    workers: dict[int, Proc] = field(default_factory=dict)
    clients: dict[int, Proc] = field(default_factory=dict)
    client_lives: dict[int, int] = field(default_factory=dict)
    namespaces: dict[int, netns.Namespace] = field(default_factory=dict)
    relay: netns.Relay | None = None
    every: list[Proc] = field(default_factory=list)
    until: float = 0.0

    # ------------------------------------------------------------ addresses and names

    @property
    def target(self) -> str:
        """A gRPC target naming every replica (the channel fails over between them)."""
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.control_ports)

    @property
    def stop_file(self) -> Path:
        return self.root / "stop-clients"

    def worker_name(self, index: int) -> str:
        return f"w{index}"

    def board_ids(self, index: int) -> list[str]:
        return [f"w{index}-{n:03d}" for n in range(self.sizes.boards)]

    def all_boards(self) -> list[str]:
        return [b for w in range(self.sizes.workers) for b in self.board_ids(w)]

    def sim_root(self, index: int) -> Path:
        return self.root / f"sim-{index}"

    def client_log(self, index: int, life: int) -> Path:
        return self.root / "clients" / f"client-{index}-{life}.jsonl"

    # ------------------------------------------------------------ starting

    def start(self) -> None:
        (self.root / "clients").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._start_database()
        self.control_ports = [free_port() for _ in range(self.sizes.replicas)]
        for index in range(self.sizes.replicas):
            self.start_control(index)
        if self.use_netns:
            self.relay = netns.Relay()
        for index in range(self.sizes.workers):
            self._start_simulator(index)
        self.worker_ports = [free_port() for _ in range(self.sizes.workers)]
        for index in range(self.sizes.workers):
            self._prepare_network(index)
            self.start_worker(index)

    def _start_database(self) -> None:
        if self.backend == "postgresql":
            self.cluster = PgCluster.create()
            self.cluster.start()
            self.database_url = self.cluster.create_database()
        else:
            self.database_url = f"sqlite+aiosqlite:///{self.root}/control.db"

    def unexpected_exits(self) -> list[str]:
        """Controls, workers and simulators that exited although the soak did not end them
        (a replica that could not start, a crash)."""
        procs = [*self.controls.values(), *self.workers.values(), *self.simulators.values()]
        return [
            f"{p.role} (pid {p.pid}) exited with {p.popen.returncode}; its log: {p.log}"
            for p in procs
            if not p.ended_on_purpose and not p.alive()
        ]

    def _spawn(self, role: str, argv: list[str], log_name: str) -> Proc:
        log = self.root / "logs" / log_name
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPOSITORY, start_new_session=True
            )
        proc = Proc(role, popen, log)
        self.every.append(proc)
        return proc

    def start_control(self, index: int) -> Proc:
        """Replica `index` on its fixed port (a restart is found at the same address)."""
        argv = [
            str(BIN / "icefarm-control"), "serve",
            "--listen", f"127.0.0.1:{self.control_ports[index]}",
            "--database", self.database_url,
            "--log-format", "json", "--log-level", "warning",
            "--offline-timeout", OFFLINE,
            "--client-grace", CLIENT_GRACE,
            "--worker-grace", WORKER_GRACE,
            "--shutdown-grace", "2s",
        ]  # fmt: skip
        proc = self._spawn(f"control-{index}", argv, f"control-{index}.log")
        self.controls[index] = proc
        return proc

    def _start_simulator(self, index: int) -> None:
        root = self.sim_root(index)
        root.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "icefarm_worker.simulator", "serve",
            "--count", str(self.sizes.boards), "--root", str(root),
            "--prefix", self.worker_name(index), "--circuit-time", str(self.sizes.circuit),
        ]  # fmt: skip
        self.simulators[index] = self._spawn(f"simulator-{index}", argv, f"simulator-{index}.log")
        wait_for(lambda: (root / "farm.json").exists(), START_TIMEOUT, f"simulator {index}")

    def _prepare_network(self, index: int) -> None:
        if not self.use_netns:
            return
        assert self.relay is not None
        space = netns.Namespace(f"icefarm-soak-{os.getpid()}-{index}")
        self.namespaces[index] = space
        for port in self.control_ports:
            self.relay.forward(space.name, port, None)
        self.relay.forward(None, self.worker_ports[index], space.name)

    def start_worker(self, index: int) -> Proc:
        port = self.worker_ports[index]
        argv = [
            str(BIN / "icefarm-worker"), "run",
            "--simulate-root", str(self.sim_root(index)),
            "--control", ",".join(f"127.0.0.1:{p}" for p in self.control_ports),
            "--name", self.worker_name(index),
            "--listen", f"127.0.0.1:{port}", "--advertise", f"127.0.0.1:{port}",
            "--evaluate-timeout", EVALUATE_TIMEOUT, "--flash-timeout", FLASH_TIMEOUT,
            "--drain-timeout", DRAIN_TIMEOUT,
            "--log-format", "json", "--log-level", "warning",
        ]  # fmt: skip
        space = self.namespaces.get(index)
        if space is not None:
            argv = space.command(argv)
        proc = self._spawn(f"worker-{index}", argv, f"worker-{index}.log")
        self.workers[index] = proc
        return proc

    def start_client(self, index: int) -> Proc:
        life = self.client_lives.get(index, -1) + 1
        self.client_lives[index] = life
        argv = [
            sys.executable, "-m", "tests.soak.experiment",
            "--control", self.target, "--index", str(index), "--life", str(life),
            "--seed", str(self.seed), "--boards", ",".join(self.all_boards()),
            "--log", str(self.client_log(index, life)), "--stop", str(self.stop_file),
            "--until", str(self.until),
        ]  # fmt: skip
        proc = self._spawn(f"client-{index}", argv, f"client-{index}.log")
        self.clients[index] = proc
        return proc

    # ------------------------------------------------------------ faults on processes

    def kill(self, proc: Proc) -> None:
        """SIGKILL (after SIGCONT, so a stopped process dies too) and reap."""
        proc.ended_on_purpose = True
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    def pause(self, proc: Proc) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        proc.stopped = True

    def resume(self, proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.stopped = False

    def inject(self, worker: int, commands: list[dict[str, object]], timeout: float = 10) -> None:
        """Board faults through worker `worker`'s simulator (SIGUSR2 + root/inject.json)."""
        root = self.sim_root(worker)
        seq = int(time.monotonic() * 1000)
        temporary = root / "inject.json.new"
        temporary.write_text(json.dumps({"seq": seq, "commands": commands}))
        temporary.replace(root / "inject.json")
        os.kill(self.simulators[worker].pid, signal.SIGUSR2)
        done = root / "inject.done"
        wait_for(lambda: done.exists() and done.read_text() == str(seq), timeout, "injection")

    # ------------------------------------------------------------ stopping

    def close(self) -> None:
        """Stop every process this farm started (by pid), remove namespaces and the cluster."""
        for proc in reversed(self.every):
            self.kill(proc)
        if self.relay is not None:
            self.relay.close()
        for space in self.namespaces.values():
            space.remove()
        if self.cluster is not None:
            self.cluster.remove()


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready within {timeout} s")


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
