"""Autoscaling the worker processes by the Kubernetes HPA's rule, and the local controller.

The rule is the HorizontalPodAutoscaler's (kube-controller-manager, ``autoscaling/v2`` with
``behavior``), written as pure functions so that the same code decides for
``batchsender worker --autoscale MIN..MAX`` and for the model of production that replays a
measured trace (``loadtests/autoscale_model.py``):

1. Every metric proposes a count: ceil(current × metric / target), or the current count
   when the metric is within ``TOLERANCE`` (10 %, the controller manager's default) of its
   target. The queue is an ``AverageValue`` external metric (KEDA's nats-jetstream trigger,
   ``queue_proposal``): the depth is a total, so its proposal is ceil(depth / target). CPU
   is a ``Utilization`` resource metric (``cpu_proposal``): the mean over the ready
   processes, processes still starting counted at 0 % when that would scale up.
2. ``combine``: the largest proposal wins. A metric that cannot be read forbids a scale
   down and, when none can be read, nothing is decided: a NATS outage never reads as an
   empty queue (nor, as KEDA's scaler does for a missing consumer, as the stream's size).
3. ``decide``: the stabilisation windows (scale up to the lowest, down to the highest raw
   recommendation of their window), then the rate policies (per ``periodSeconds``, counting
   the changes made within it; ``selectPolicy`` picks among them), then min and max.

``PRODUCTION`` mirrors the workers' ScaledObject (``k8s/base/autoscaling``; a unit test
compares them). The local controller (``Autoscaler``) uses the same policies with a shorter
scale-down window, and a target per process that suits one machine (``TARGET``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import Settings

log = logging.getLogger(__name__)

TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
# Local defaults (the `worker --autoscale-*` options). Production's lagThreshold is 1,000
# chunks per pod because a pod takes 30-45 s to arrive (k8s/README.md); a local process
# takes about a second, so a tenth of that backlog is enough to ask for one, while staying
# well above the 32 chunks (WORKER_CONCURRENCY) a busy process holds unacknowledged
# itself, which count in the depth too (num_ack_pending).
TARGET = 100.0  # send-queue messages (chunks of up to 1,000 recipients) per process
CPU_TARGET = 0.6  # of one core per process, as the pods' 60 % of their one-core request
INTERVAL = 5.0  # seconds between two decisions (the HPA syncs every 15 s)
# Production waits 5 minutes before it removes a pod it may need again; a process costs
# far less to start again, so one minute (still longer than the gaps of a sending job).
DOWN_WINDOW = 60.0


# --- the rule -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """One HPAScalingPolicy: at most ``value`` pods (``Pods``) or percent of the count at the
    start of the period (``Percent``) added or removed within ``period`` seconds."""

    type: str
    value: int
    period: float

    def __post_init__(self) -> None:
        if self.type not in ("Pods", "Percent") or self.value <= 0 or self.period <= 0:
            raise ValueError(f"not a scaling policy: {self}")


@dataclass(frozen=True, slots=True)
class Rules:
    """HPAScalingRules of one direction."""

    window: float  # stabilizationWindowSeconds
    policies: tuple[Policy, ...]
    select: str = "Max"  # selectPolicy: Max (the largest change), Min, Disabled

    def __post_init__(self) -> None:
        if self.select not in ("Max", "Min", "Disabled") or self.window < 0:
            raise ValueError(f"not scaling rules: {self}")

    @property
    def longest_period(self) -> float:
        return max((p.period for p in self.policies), default=0.0)


@dataclass(frozen=True, slots=True)
class Behavior:
    up: Rules
    down: Rules

    @classmethod
    def from_manifest(cls, behavior: Mapping[str, Any] | None) -> Behavior:
        """From an HPA's ``behavior`` (a ScaledObject's
        ``advanced.horizontalPodAutoscalerConfig.behavior``); what it leaves out takes
        Kubernetes' defaults, field by field, as the API server fills them in."""
        behavior = behavior or {}

        def rules(key: str, default: Rules) -> Rules:
            spec = behavior.get(key) or {}
            policies = tuple(
                Policy(p["type"], int(p["value"]), float(p["periodSeconds"]))
                for p in spec.get("policies", ())
            )
            return Rules(
                float(spec.get("stabilizationWindowSeconds", default.window)),
                policies or default.policies,
                spec.get("selectPolicy", default.select),
            )

        return cls(rules("scaleUp", KUBERNETES.up), rules("scaleDown", KUBERNETES.down))


# What an HPA without `behavior` does (the API server's defaults).
KUBERNETES = Behavior(
    up=Rules(0, (Policy("Percent", 100, 15), Policy("Pods", 4, 15)), "Max"),
    down=Rules(300, (Policy("Percent", 100, 15),), "Max"),
)
# The workers' ScaledObject (k8s/base/autoscaling/worker-scaledobject.yaml): up at once, at
# most x2 or +8 pods per 15 s; down to the highest recommendation of 5 minutes, at most half
# the pods a minute.
PRODUCTION = Behavior(
    up=Rules(0, (Policy("Percent", 100, 15), Policy("Pods", 8, 15)), "Max"),
    down=Rules(300, (Policy("Percent", 50, 60),), "Min"),
)


def local_behavior(down_window: float = DOWN_WINDOW) -> Behavior:
    """Production's policies with a scale-down window of ``down_window`` seconds."""
    return dataclasses.replace(
        PRODUCTION, down=dataclasses.replace(PRODUCTION.down, window=down_window)
    )


def queue_proposal(current: int, depth: float, target: float) -> int:
    """The count an ``AverageValue`` external metric asks for: ``depth`` is the total over
    all processes, ``target`` the value per process (KEDA's lagThreshold)."""
    ratio = depth / (target * current)
    if abs(1.0 - ratio) <= TOLERANCE:
        return current
    return math.ceil(depth / target)


def cpu_proposal(current: int, ready: Sequence[float], unready: int, target: float) -> int | None:
    """The count a ``Utilization`` resource metric asks for: ``ready`` holds each ready
    process's use of its request (0.5 = half a core of one), ``unready`` counts those still
    starting. None when no process is ready (the HPA has no CPU figure then)."""
    if not ready:
        return None
    ratio = _percent(sum(ready), len(ready)) / (100 * target)
    if not (unready and ratio > 1.0):
        if abs(1.0 - ratio) <= TOLERANCE:
            return current
        return math.ceil(ratio * len(ready))
    # Scaling up with processes still starting: they count as using nothing, so a start-up
    # does not look like load, and the proposal is dropped when that flips its direction.
    counted = len(ready) + unready
    ratio = _percent(sum(ready), counted) / (100 * target)
    if ratio <= 1.0 + TOLERANCE:
        return current
    return max(current, math.ceil(ratio * counted))


def _percent(used: float, processes: int) -> int:
    """Utilisation in whole percent of the processes' requests, as the HPA rounds it."""
    return int(100 * used / processes + 1e-9)


def combine(current: int, proposals: Sequence[int | None]) -> int | None:
    """The largest proposal; None (decide nothing) when no metric could be read, or when one
    could not and the others would scale down."""
    known = [p for p in proposals if p is not None]
    if not known:
        return None
    best = max(known)
    if len(known) < len(proposals) and best < current:
        return None
    return best


@dataclass(frozen=True, slots=True)
class History:
    """What the HPA remembers between decisions: its raw recommendations within the longer
    stabilisation window, and the changes it made within the longest policy period."""

    recommendations: tuple[tuple[float, int], ...] = ()
    ups: tuple[tuple[float, int], ...] = ()  # (when, pods added)
    downs: tuple[tuple[float, int], ...] = ()  # (when, pods removed)


def decide(
    now: float,
    current: int,
    proposal: int | None,
    minimum: int,
    maximum: int,
    behavior: Behavior,
    history: History,
) -> tuple[int, History]:
    """The new count and what to remember, from the raw recommendation ``proposal``
    (``combine``'s) at time ``now`` (seconds, any monotonic origin)."""
    if current > maximum:
        new = maximum
    elif current < minimum:
        new = minimum
    elif proposal is None:
        return current, history
    else:
        stabilised = _stabilise(now, current, proposal, behavior, history.recommendations)
        keep = max(behavior.up.window, behavior.down.window)
        recommendations = tuple(r for r in history.recommendations if r[0] >= now - keep)
        history = dataclasses.replace(history, recommendations=(*recommendations, (now, proposal)))
        new = _limit(now, current, stabilised, minimum, maximum, behavior, history)
    if new > current:
        cutoff = now - behavior.up.longest_period
        ups = tuple(e for e in history.ups if e[0] > cutoff)
        history = dataclasses.replace(history, ups=(*ups, (now, new - current)))
    elif new < current:
        cutoff = now - behavior.down.longest_period
        downs = tuple(e for e in history.downs if e[0] > cutoff)
        history = dataclasses.replace(history, downs=(*downs, (now, current - new)))
    return new, history


def _stabilise(
    now: float,
    current: int,
    proposal: int,
    behavior: Behavior,
    recommendations: Sequence[tuple[float, int]],
) -> int:
    """Up no further than the lowest, down no further than the highest recommendation of
    the direction's window (this one included)."""
    up = down = proposal
    for when, value in recommendations:
        if when > now - behavior.up.window:
            up = min(up, value)
        if when > now - behavior.down.window:
            down = max(down, value)
    return min(max(current, up), down)


def _changed(events: Sequence[tuple[float, int]], now: float, period: float) -> int:
    return sum(n for when, n in events if when > now - period)


def _limit(
    now: float,
    current: int,
    desired: int,
    minimum: int,
    maximum: int,
    behavior: Behavior,
    history: History,
) -> int:
    """``desired`` within min, max and the rate policies of its direction."""
    if desired > current:
        rules = behavior.up
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - _changed(history.ups, now, p.period)
            start += _changed(history.downs, now, p.period)
            if p.type == "Pods":
                limits.append(start + p.value)
            else:
                limits.append(math.ceil(start * (1 + p.value / 100)))
        limit = max(current, (min if rules.select == "Min" else max)(limits))
        return min(desired, maximum, limit)
    if desired < current:
        rules = behavior.down
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - _changed(history.ups, now, p.period)
            start += _changed(history.downs, now, p.period)
            if p.type == "Pods":
                limits.append(start - p.value)
            else:
                limits.append(int(start * (1 - p.value / 100)))
        limit = min(current, (max if rules.select == "Min" else min)(limits))
        return max(desired, minimum, limit)
    return desired


# --- the local controller --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU of the active worker processes over the last interval."""

    ready: tuple[float, ...]  # cores used by each process that was running before
    unready: int  # processes too new to have a figure


@dataclass
class Autoscaler:
    """The HPA of one supervisor: ``step`` takes the send consumer's depth and the worker
    processes' CPU and returns how many processes to run. The supervisor
    (``engine.supervisor``) calls it every ``interval`` seconds, starts what is missing and
    stops what is too many; a stopped process drains (its chunks finish first)."""

    minimum: int
    maximum: int
    target: float = TARGET
    cpu_target: float = CPU_TARGET  # 0: CPU is not a metric
    interval: float = INTERVAL
    behavior: Behavior = field(default_factory=local_behavior)
    history: History = field(default_factory=History)

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(
                f"autoscale range {self.minimum}..{self.maximum}: need 1 <= MIN <= MAX"
            )
        if self.target <= 0 or self.cpu_target < 0 or self.interval <= 0:
            raise ValueError("the autoscaler's target and interval must be positive")

    def step(self, now: float, current: int, depth: int | None, cpu: Cpu | None) -> int:
        proposals = [None if depth is None else queue_proposal(current, depth, self.target)]
        if self.cpu_target:
            ready = cpu_proposal(current, cpu.ready, cpu.unready, self.cpu_target) if cpu else None
            proposals.append(ready)
        wanted, self.history = decide(
            now,
            current,
            combine(current, proposals),
            self.minimum,
            self.maximum,
            self.behavior,
            self.history,
        )
        return wanted


class CpuSampler:
    """Each process's CPU (user + system, from ``/proc/<pid>/stat``) between two samples, in
    cores. A process is "unready" for its first two samples, so its start (connections,
    pools) is not taken for load, as the HPA ignores a new pod's first CPU figures."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._seen: dict[int, tuple[float, float, int]] = {}  # pid -> (when, cpu s, samples)

    @staticmethod
    def available() -> bool:
        return os.path.exists(f"/proc/{os.getpid()}/stat")

    def cpu_seconds(self, pid: int) -> float | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / self._tick

    def sample(self, pids: Sequence[int], now: float) -> Cpu:
        ready: list[float] = []
        unready = 0
        seen: dict[int, tuple[float, float, int]] = {}
        for pid in pids:
            used = self.cpu_seconds(pid)
            if used is None:
                continue
            when, before, samples = self._seen.get(pid, (now, used, 0))
            seen[pid] = (now, used, samples + 1)
            if samples >= 2 and now > when:
                ready.append(max(0.0, used - before) / (now - when))
            else:
                unready += 1
        self._seen = seen
        return Cpu(tuple(ready), unready)


async def send_depth(settings: Settings, within: float = 2.0) -> int:
    """The send consumer's ``num_pending + num_ack_pending`` (chunks waiting plus chunks in
    flight: ``nats_queue_depth{consumer="send"}``), over a connection of its own. Raises when
    NATS or the consumer does not answer."""
    import nats

    from engine.topology import Topology

    async def quiet(_exc: Exception) -> None:  # the caller says what failed, once
        pass

    nc = await nats.connect(
        settings.nats_url,
        name="batchsender-autoscaler",
        allow_reconnect=False,
        connect_timeout=within,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )
    try:
        js = nc.jetstream(timeout=within)
        info = await js.consumer_info(Topology(settings.nats_prefix).send_stream, "send")
        return info.num_pending + info.num_ack_pending
    finally:
        await nc.close()


def read_depth(settings: Settings, timeout: float = 2.0) -> int | None:
    """``send_depth`` from synchronous code (the supervisor, which runs no event loop of its
    own: this one is gone when it returns); None when it cannot be read."""
    try:
        return asyncio.run(asyncio.wait_for(send_depth(settings, timeout), timeout * 2))
    except Exception as exc:  # NATS down, the consumer not created yet
        log.debug("send queue depth unavailable: %r", exc)
        return None
