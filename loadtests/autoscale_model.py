"""The measured trace of ``loadtests.autoscale_run`` replayed through a model of KEDA and the
Kubernetes HPA with the production settings: how many worker pods, over time.

    python -m loadtests.autoscale_model [--startup 30] [--capacity CHUNKS_PER_S]

The settings are read from the manifest itself (``k8s/base/autoscaling/
worker-scaledobject.yaml``: min/max replicas, lagThreshold, the cpu target, the HPA's
``behavior``) and the decisions are ``engine.autoscale``'s, the same code as the local
autoscaler's. What the manifest does not say is Kubernetes' default or an assumption, each
named here and in loadtests/RESULTS.md:

- the HPA syncs every 15 s (``--horizontal-pod-autoscaler-sync-period``) and reads the
  queue's depth at that moment: KEDA's metrics server asks NATS on each HPA query (the
  ScaledObject does not set ``useCachedMetrics``). KEDA's own ``pollingInterval`` (15 s)
  and ``cooldownPeriod`` (300 s) only take a Deployment from and to zero replicas, which
  ``minReplicaCount: 2`` never does;
- CPU is each ready pod's use of its one-core request, averaged over the last 15 s
  (metrics-server's resolution); pods still starting are unready (0 % when scaling up);
- a new pod takes ``--startup`` seconds (default 30: scheduling on a node that has room,
  the image cached, the process started, its connections open) before it takes chunks;
  a removed pod stops taking chunks at once (it drains those it holds);
- arrivals are the chunks published in each second of the trace; a ready pod completes
  ``--capacity`` chunks a second at most (default: the measured throughput of one worker
  process while the queue was never empty, ``capacity``); after the trace nothing arrives.

Writes ``loadtests/autoscale/model.csv`` and draws ``loadtests/autoscale.png`` (the trace
and the model; matplotlib, ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.autoscale import (
    Behavior,
    History,
    combine,
    cpu_proposal,
    decide,
    queue_proposal,
)

ROOT = Path(__file__).resolve().parents[1]
SCALED_OBJECT = ROOT / "k8s" / "base" / "autoscaling" / "worker-scaledobject.yaml"
OUT = ROOT / "loadtests" / "autoscale"
PLOT = ROOT / "loadtests" / "autoscale.png"
HPA_SYNC = 15.0  # --horizontal-pod-autoscaler-sync-period
CPU_WINDOW = 15  # seconds metrics-server averages a pod's CPU over
STARTUP = 30.0  # seconds from a scale-up to the new pod taking chunks (assumed)
TAIL = 3600  # seconds the model may run on after the trace, at most


@dataclass(frozen=True, slots=True)
class Production:
    """What the workers' ScaledObject says."""

    minimum: int
    maximum: int
    lag_threshold: float
    cpu_target: float  # of the request
    polling_interval: float
    cooldown: float
    behavior: Behavior

    @classmethod
    def read(cls, path: Path = SCALED_OBJECT) -> Production:
        spec = yaml.safe_load(path.read_text())["spec"]
        triggers = {t["type"]: t["metadata"] for t in spec["triggers"]}
        hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        return cls(
            minimum=int(spec["minReplicaCount"]),
            maximum=int(spec["maxReplicaCount"]),
            lag_threshold=float(triggers["nats-jetstream"]["lagThreshold"]),
            cpu_target=float(triggers["cpu"]["value"]) / 100,
            polling_interval=float(spec.get("pollingInterval", 30)),
            cooldown=float(spec.get("cooldownPeriod", 300)),
            behavior=Behavior.from_manifest(hpa.get("behavior")),
        )


@dataclass
class Trace:
    """The columns of ``trace.csv`` this model needs, at the seconds they were sampled."""

    t: list[float]
    depth: list[int]
    pending: list[int]
    published: list[int]
    worker_cpu: list[float]
    processes: list[int]
    wanted: list[int]
    sent: list[int] = field(default_factory=list)
    machine_cpu: list[float] = field(default_factory=list)
    users: list[int] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Trace:
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        ints = ("depth", "pending", "published", "processes", "wanted", "sent", "users")
        floats = ("t", "worker_cpu", "machine_cpu")
        columns = {name: [int(r[name]) for r in rows] for name in ints}
        columns |= {name: [float(r[name]) for r in rows] for name in floats}
        return cls(**columns)

    def arrivals(self) -> list[float]:
        """Chunks published in each whole second from 0 (the cumulative count, linearly
        interpolated between samples)."""
        end = int(self.t[-1])
        at = [_interpolate(self.t, self.published, float(s)) for s in range(end + 1)]
        return [max(0.0, b - a) for a, b in zip(at, at[1:], strict=False)]

    def capacity(self, window: float = 5.0) -> dict[int, float]:
        """Chunks a second one worker process completed, by the number of processes: the
        median over windows of ``window`` seconds in which the queue always had chunks
        nobody had fetched yet (so every process was full) and the count did not change."""
        done = [p - d for p, d in zip(self.published, self.depth, strict=True)]
        rates: dict[int, list[float]] = {}
        j = 0
        for i in range(len(self.t)):
            while j < len(self.t) and self.t[j] < self.t[i] + window:
                j += 1
            if j >= len(self.t):
                break
            span = range(i, j + 1)
            counts = {self.processes[k] for k in span} | {self.wanted[k] for k in span}
            if len(counts) != 1 or min(self.pending[k] for k in span) <= 0:
                continue
            n = counts.pop()
            rates.setdefault(n, []).append((done[j] - done[i]) / (self.t[j] - self.t[i]) / n)
        return {n: statistics.median(r) for n, r in sorted(rates.items())}

    def cpu_per_chunk(self) -> float:
        """Worker CPU seconds per chunk completed, over the whole run."""
        seconds = sum(
            c * (b - a) for c, a, b in zip(self.worker_cpu[1:], self.t, self.t[1:], strict=False)
        )
        done = self.published[-1] - self.depth[-1]
        return seconds / done if done else 0.0


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    if x <= xs[0]:
        return float(ys[0])
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else float(y1)
    return float(ys[-1])


@dataclass(slots=True)
class Pod:
    ready_at: float


@dataclass(slots=True)
class Step:
    t: int
    arrivals: float
    depth: float
    pods: int  # the Deployment's replicas (what the HPA set)
    ready: int  # pods taking chunks
    cpu: float  # mean CPU of the ready pods, of their request
    proposal: int | None  # the HPA's raw recommendation at a sync, else None


def simulate(
    arrivals: Sequence[float],
    production: Production,
    capacity: float,
    cpu_per_chunk: float,
    startup: float = STARTUP,
    tail: int = TAIL,
) -> list[Step]:
    """Second by second: chunks arrive, ready pods complete up to ``capacity`` each, and
    every ``HPA_SYNC`` seconds the HPA decides; runs on after the arrivals until the pods
    are back at the minimum with nothing queued (at most ``tail`` seconds more)."""
    pods = [Pod(ready_at=0.0) for _ in range(production.minimum)]
    history = History()
    depth = 0.0
    cpu_samples: list[float] = []
    steps: list[Step] = []
    t = 0
    while t < len(arrivals) + tail:
        arrived = arrivals[t] if t < len(arrivals) else 0.0
        ready = sum(1 for p in pods if p.ready_at <= t)
        done = min(depth + arrived, ready * capacity)
        depth += arrived - done
        cpu = min(1.0, done / ready * cpu_per_chunk) if ready else 0.0
        cpu_samples = (cpu_samples + [cpu])[-CPU_WINDOW:]
        proposal = None
        if t % HPA_SYNC == 0 and t > 0:
            current = len(pods)
            unready = current - ready
            cpu_now = sum(cpu_samples) / len(cpu_samples)
            proposal = combine(
                current,
                [
                    queue_proposal(current, math.ceil(depth), production.lag_threshold),
                    cpu_proposal(current, [cpu_now] * ready, unready, production.cpu_target),
                ],
            )
            wanted, history = decide(
                t,
                current,
                proposal,
                production.minimum,
                production.maximum,
                production.behavior,
                history,
            )
            if wanted > current:
                pods += [Pod(ready_at=t + startup) for _ in range(wanted - current)]
            elif wanted < current:  # not-ready pods go first, then the newest
                pods.sort(key=lambda p: p.ready_at)
                pods = pods[:wanted]
        steps.append(Step(t, arrived, depth, len(pods), ready, cpu, proposal))
        if t >= len(arrivals) and depth < 1 and len(pods) == production.minimum:
            break
        t += 1
    return steps


def summary(steps: Sequence[Step], production: Production) -> dict[str, float]:
    peak = max(steps, key=lambda s: s.pods)
    drained = next((s.t for s in steps if s.t > peak.t and s.depth < 1), None)
    back = next((s.t for s in steps if s.t > peak.t and s.pods == production.minimum), steps[-1].t)
    first_up = next((s.t for s in steps if s.pods > production.minimum), None)
    return {
        "peak_pods": peak.pods,
        "peak_depth": round(max(s.depth for s in steps)),
        "first_scale_up_s": first_up,
        "peak_pods_at_s": peak.t,
        "queue_empty_at_s": drained,
        "back_to_min_at_s": back,
        "peak_cpu_percent": round(100 * max(s.cpu for s in steps)),
    }


def plot(
    trace: Trace, steps: Sequence[Step], production: Production, note: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (local, cpu, model) = plt.subplots(
        3, 1, figsize=(11, 10), sharex=True, height_ratios=(3, 1.4, 3), constrained_layout=True
    )
    end = max(trace.t[-1], steps[-1].t)
    locust = [t for t, u in zip(trace.t, trace.users, strict=True) if u > 0]

    def shade(ax) -> None:
        if locust:
            ax.axvspan(locust[0], locust[-1], color="0.92", zorder=0, label="Locust running")

    shade(local)
    local.fill_between(trace.t, trace.depth, color="tab:blue", alpha=0.35)
    local.plot(trace.t, trace.depth, color="tab:blue", lw=1, label="send-queue depth (chunks)")
    local.set_ylabel("depth (chunks of 1,000)")
    local.set_title(
        f"Measured on this machine: batchsender worker --autoscale ({note})", loc="left"
    )
    right = local.twinx()
    right.step(
        trace.t,
        trace.processes,
        where="post",
        color="tab:red",
        lw=2,
        label="worker processes (live)",
    )
    right.step(
        trace.t,
        trace.wanted,
        where="post",
        color="tab:orange",
        lw=1.2,
        ls="--",
        label="wanted by the autoscaler",
    )
    right.set_ylabel("processes")
    right.set_ylim(0, max(trace.processes + trace.wanted) + 1)
    _legend(local, right)

    shade(cpu)
    cores = os.cpu_count() or 1
    cpu.plot(trace.t, trace.worker_cpu, color="tab:green", lw=1, label="worker processes")
    machine = [c * cores / 100 for c in trace.machine_cpu]
    label = "whole machine (PostgreSQL, NATS, API, Locust, other work)"
    cpu.plot(trace.t, machine, color="0.5", lw=1, label=label)
    cpu.set_ylabel(f"CPU (cores of {cores})")
    cpu.set_ylim(0, cores * 1.05)
    cpu.legend(loc="upper right", fontsize=8)

    ts = [s.t for s in steps]
    model.fill_between(ts, [s.depth for s in steps], color="tab:blue", alpha=0.35)
    model.plot(
        ts, [s.depth for s in steps], color="tab:blue", lw=1, label="send-queue depth (chunks)"
    )
    model.set_ylabel("depth (chunks of 1,000)")
    model.set_title(
        f"Modelled on Kubernetes: KEDA + HPA, production settings (min {production.minimum}, "
        f"lagThreshold {production.lag_threshold:g}, 5 min scale-down window)",
        loc="left",
    )
    model.set_xlabel("seconds since the run started")
    right = model.twinx()
    right.step(
        ts,
        [s.pods for s in steps],
        where="post",
        color="tab:red",
        lw=2,
        label="worker pods (replicas)",
    )
    right.step(
        ts,
        [s.ready for s in steps],
        where="post",
        color="tab:purple",
        lw=1.2,
        ls="--",
        label="pods ready (taking chunks)",
    )
    right.set_ylabel("pods")
    right.set_ylim(0, max(s.pods for s in steps) + 1)
    _legend(model, right)
    model.set_xlim(0, end * 1.03)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(left, right) -> None:
    handles, labels = left.get_legend_handles_labels()
    more, names = right.get_legend_handles_labels()
    left.legend(handles + more, labels + names, loc="upper right", fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.autoscale_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--trace", type=Path, default=OUT / "trace.csv")
    parser.add_argument("--startup", type=float, default=STARTUP, help="seconds to a ready pod")
    parser.add_argument("--capacity", type=float, help="chunks/s per pod (default: measured)")
    parser.add_argument("--lag-threshold", type=float, help="what if (default: the manifest's)")
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    production = Production.read()
    if args.lag_threshold:
        production = dataclasses.replace(production, lag_threshold=args.lag_threshold)
    trace = Trace.read(args.trace)
    measured = trace.capacity()
    if not measured and args.capacity is None:
        raise SystemExit("the trace has no window with every process busy: give --capacity")
    # The least contended figure: on Kubernetes a pod has a core of its own (request = limit
    # = 1), here every process shares two cores with PostgreSQL, NATS, the API and Locust.
    capacity = args.capacity or max(measured.values())
    per_chunk = trace.cpu_per_chunk()
    steps = simulate(trace.arrivals(), production, capacity, per_chunk, args.startup)
    result = {
        "production": {
            "min": production.minimum,
            "max": production.maximum,
            "lag_threshold": production.lag_threshold,
            "cpu_target": production.cpu_target,
            "polling_interval_s": production.polling_interval,
            "cooldown_s": production.cooldown,
            "hpa_sync_s": HPA_SYNC,
            "startup_s": args.startup,
        },
        "measured_chunks_per_s_per_process": {n: round(c, 2) for n, c in measured.items()},
        "capacity_chunks_per_s_per_pod": round(capacity, 2),
        "worker_cpu_ms_per_chunk": round(1000 * per_chunk, 1),
        "local": {
            "peak_depth": max(trace.depth),
            "peak_processes": max(trace.processes),
            "chunks": trace.published[-1],
        },
        "model": summary(steps, production),
    }
    with (OUT / "model.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t", "arrivals", "depth", "pods", "ready", "cpu", "proposal"])
        for s in steps:
            writer.writerow([s.t, round(s.arrivals, 1), round(s.depth, 1), s.pods, s.ready,
                             round(s.cpu, 3), "" if s.proposal is None else s.proposal])  # fmt: skip
    (OUT / "model.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    run = (
        json.loads((args.trace.parent / "run.json").read_text())
        if (args.trace.parent / "run.json").exists()
        else {}
    )
    p = run.get("parameters", {})
    note = (
        f"1..{p.get('max', '?')}, target {p.get('target', '?'):g} chunks/process" if p else "trace"
    )
    plot(trace, steps, production, note, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
