"""The supervisor: forks N worker processes and keeps them alive (gunicorn's arbiter shape).

The main loop sleeps on a signal queue; signal handlers only enqueue. Each turn it reaps
dead children, kills hung ones (heartbeat file older than ``WORKER_HEARTBEAT_TIMEOUT``;
the heartbeat is written by the child's event loop, so a blocked loop is noticed) and
spawns children up to the wanted number. SIGTERM/SIGINT drain (children finish their
chunks, flush, exit; SIGKILL after ``DRAIN_TIMEOUT``); a second one kills them at once.
SIGTTIN/SIGTTOU add or remove a child. Children that keep dying make it stop instead of
spinning: more than ``CRASH_LIMIT`` failures within ``CRASH_WINDOW`` seconds halts it.

With an ``Autoscaler`` (``batchsender worker --autoscale MIN..MAX``) the wanted number is
its decision, taken every ``interval`` seconds from the send consumer's depth and the
children's CPU (``engine.autoscale``: the Kubernetes HPA's rule). A child that is too many
is retired as in a drain: SIGTERM, so it fetches no more chunks, finishes and records those
it holds, flushes and exits (``engine.worker``); nothing it held is lost or sent twice. The
newest children go first. A SIGTTIN/SIGTTOU is then only the count the next decision starts
from, as ``kubectl scale`` of a Deployment an HPA owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
import tempfile
import time
from collections import deque

from engine import autoscale, metrics
from engine.config import Settings

log = logging.getLogger(__name__)

CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        processes: int | None = None,
        autoscaler: autoscale.Autoscaler | None = None,
    ):
        self.settings = settings
        self.autoscaler = autoscaler
        self.wanted = autoscaler.minimum if autoscaler else processes or settings.worker_processes
        self.children: dict[int, str] = {}  # pid -> heartbeat file
        self.retiring: set[int] = set()  # told to stop by a scale-down; not counted
        self.hung: set[int] = set()  # killed for a silent heartbeat
        self.metrics_pid: int | None = None  # the child serving WORKER_METRICS_PORT
        self._metrics_after = 0.0
        self.signals: deque[int] = deque()
        self.crashes: deque[float] = deque()
        self.draining_since: float | None = None
        self.exit_code = 0
        self._spawn_after = 0.0
        self._decide_after = 0.0  # the autoscaler's next decision (monotonic)
        self._cpu = autoscale.CpuSampler()
        self._depth_read = True  # the last decision had the queue's depth
        self._wake_r, self._wake_w = os.pipe()
        self._heartbeats = tempfile.mkdtemp(prefix="batchsender-heartbeat-")

    # --- main loop ------------------------------------------------------------------
    def run(self) -> int:
        from engine.migrate import migrate_all

        asyncio.run(migrate_all(self.settings))  # before forking: no loop survives into children
        for reason in ("exited", "unresponsive"):  # both series exist from the start, at 0
            metrics.WORKER_RESTARTS.labels(reason)
        os.set_blocking(self._wake_w, False)
        for sig in _SIGNALS:
            signal.signal(sig, self._enqueue)
        if self.autoscaler is not None and not self._cpu.available():
            log.warning("no /proc here: the autoscaler scales on the queue's depth alone")
            self.autoscaler.cpu_target = 0.0
        log.info("supervisor started", extra={"pid": os.getpid(), "processes": self.wanted})
        while True:
            self._sleep()
            while self.signals:
                getattr(self, f"handle_{signal.Signals(self.signals.popleft()).name.lower()}")()
            self.reap_workers()
            if self.draining_since is not None:
                if not self.children:
                    break
                if time.monotonic() - self.draining_since > self.settings.drain_timeout:
                    log.warning("drain deadline passed; killing %d workers", len(self.children))
                    self.kill_workers(signal.SIGKILL)
                continue
            if self._crash_looping():
                log.error(
                    "workers keep dying (%d in %.0fs); stopping", len(self.crashes), CRASH_WINDOW
                )
                self.exit_code = 3
                self.begin_drain()
                continue
            self.murder_hung_workers()
            if self.autoscaler is not None:
                self.autoscale_workers()
            self.manage_workers()
            if self.settings.worker_metrics_port and self.metrics_pid is None:
                if time.monotonic() >= self._metrics_after:  # e.g. its port is taken
                    self._metrics_after = time.monotonic() + 5.0
                    self.spawn_metrics_server()
        self.stop_metrics_server()
        log.info("supervisor stopped")
        return self.exit_code

    def _enqueue(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except BlockingIOError:
            pass

    def _sleep(self) -> None:
        if self.signals:
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], 1.0)
            if ready:
                os.read(self._wake_r, 4096)
        except InterruptedError:
            pass

    # --- signals --------------------------------------------------------------------
    def handle_sigterm(self) -> None:
        if self.draining_since is not None:
            log.warning("second stop signal: killing workers now")
            self.kill_workers(signal.SIGKILL)
            for pid in list(self.children):  # SIGKILL is immediate: wait them out
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            self.stop_metrics_server()
            sys.exit(1)
        self.begin_drain()

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        self.draining_since = self.draining_since or time.monotonic()
        self.handle_sigterm()

    def handle_sigchld(self) -> None:
        pass  # reaped every turn

    def handle_sigttin(self) -> None:
        self.wanted += 1
        log.info("workers wanted: %d", self.wanted)

    def handle_sigttou(self) -> None:
        self.wanted = max(1, self.wanted - 1)
        log.info("workers wanted: %d", self.wanted)

    # --- children -------------------------------------------------------------------
    def begin_drain(self) -> None:
        log.info("draining %d workers", len(self.children))
        self.draining_since = time.monotonic()
        self.kill_workers(signal.SIGTERM)

    def kill_workers(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.metrics_pid:  # started again by the main loop (unless draining)
                self.metrics_pid = None
                if self.draining_since is None:
                    log.warning("metrics server %d exited; restarting", pid)
                continue
            heartbeat = self.children.pop(pid, None)
            if heartbeat is None:
                continue
            retired = pid in self.retiring
            self.retiring.discard(pid)
            metrics.mark_process_dead(pid)
            try:
                os.unlink(heartbeat)
            except FileNotFoundError:
                pass
            code = os.waitstatus_to_exitcode(status)
            hung = pid in self.hung
            self.hung.discard(pid)
            if self.draining_since is None and not retired:
                log.warning("worker %d exited with %d; restarting", pid, code)
                metrics.WORKER_RESTARTS.labels("unresponsive" if hung else "exited").inc()
                self.crashes.append(time.monotonic())
                self._spawn_after = time.monotonic() + min(5.0, 0.1 * 2 ** len(self.crashes))

    def murder_hung_workers(self) -> None:
        limit = self.settings.worker_heartbeat_timeout
        now = time.time()
        for pid, heartbeat in list(self.children.items()):
            try:
                age = now - os.stat(heartbeat).st_mtime
            except FileNotFoundError:
                continue
            if age > limit:
                log.error("worker %d silent for %.0fs; killing it", pid, age)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                else:
                    self.hung.add(pid)

    def autoscale_workers(self) -> None:
        """One decision of the autoscaler, every its interval: ``wanted`` from the send
        queue's depth and the active children's CPU (``manage_workers`` does the rest)."""
        scaler = self.autoscaler
        assert scaler is not None
        now = time.monotonic()
        if now < self._decide_after:
            return
        self._decide_after = now + scaler.interval
        depth = autoscale.read_depth(self.settings)
        if (depth is not None) != self._depth_read:
            self._depth_read = depth is not None
            if depth is None:
                log.warning("send queue depth unavailable (NATS?): no scaling down meanwhile")
            else:
                log.info("send queue depth readable again", extra={"depth": depth})
        active = [pid for pid in self.children if pid not in self.retiring]
        cpu = self._cpu.sample(active, now) if scaler.cpu_target else None
        wanted = scaler.step(now, self.wanted, depth, cpu)
        if wanted != self.wanted:
            used = sum(cpu.ready) / len(cpu.ready) if cpu and cpu.ready else None
            log.info(
                "autoscale: %d -> %d worker processes",
                self.wanted,
                wanted,
                extra={
                    "from": self.wanted,
                    "to": wanted,
                    "depth": depth,
                    "cpu_percent": None if used is None else round(100 * used),
                },
            )
            self.wanted = wanted

    def manage_workers(self) -> None:
        metrics.WORKER_PROCESSES_WANTED.set(self.wanted)
        active = [pid for pid in self.children if pid not in self.retiring]
        for pid in sorted(active)[self.wanted :]:
            os.kill(pid, signal.SIGTERM)  # drains; reaped later, not a crash
            self.retiring.add(pid)
            log.info("retiring worker %d; it drains its chunks", pid, extra={"worker": pid})
        if time.monotonic() < self._spawn_after:
            return
        for _ in range(self.wanted - len(active)):
            self.spawn_worker()

    def _crash_looping(self) -> bool:
        cutoff = time.monotonic() - CRASH_WINDOW
        while self.crashes and self.crashes[0] < cutoff:
            self.crashes.popleft()
        return len(self.crashes) > CRASH_LIMIT

    def spawn_metrics_server(self) -> None:
        """A child serving this host's metrics on WORKER_METRICS_PORT (engine.metrics.serve);
        forked like a worker, so the supervisor itself never runs a thread."""
        pid = os.fork()
        if pid:
            self.metrics_pid = pid
            return
        code = 0
        try:
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            metrics.serve(self.settings.api_host, self.settings.worker_metrics_port)
        except BaseException:
            log.exception("metrics server failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def stop_metrics_server(self) -> None:
        if self.metrics_pid is None:
            return
        try:
            os.kill(self.metrics_pid, signal.SIGTERM)
            os.waitpid(self.metrics_pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.metrics_pid = None

    def spawn_worker(self) -> None:
        fd, heartbeat = tempfile.mkstemp(dir=self._heartbeats, prefix="worker-")
        os.close(fd)
        pid = os.fork()
        if pid:
            self.children[pid] = heartbeat
            return
        # --- in the child ---
        code = 0
        try:
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            import uvloop

            from engine import gc_tuning
            from engine.worker import Worker

            gc_tuning.tune_gc(gc_tuning.WORKER)
            uvloop.run(Worker(self.settings, heartbeat).run())
        except BaseException:
            log.exception("worker crashed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
