"""engine.autoscale: the HPA's rule (per-metric proposals, tolerance, the largest proposal,
stabilisation windows, rate policies, min/max), the production behaviour read from the
ScaledObject itself, the CPU sampler, the depth reader when NATS is down, and the supervisor's
decision and the CLI's options around them."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from devkit.stack import free_port
from engine import autoscale
from engine.autoscale import (
    KUBERNETES,
    PRODUCTION,
    Autoscaler,
    Behavior,
    Cpu,
    CpuSampler,
    History,
    Policy,
    Rules,
    combine,
    cpu_proposal,
    decide,
    queue_proposal,
)
from engine.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
SCALED_OBJECT = ROOT / "k8s/base/autoscaling/worker-scaledobject.yaml"


def scaled_object() -> dict:
    return yaml.safe_load(SCALED_OBJECT.read_text())


# --- one metric ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "wanted"),
    [
        (400, 4),  # on target
        (439, 4),  # +9.75 %: within the tolerance
        (441, 5),  # beyond it: ceil(441 / 100)
        (360, 4),  # -10 %
        (359, 4),  # beyond it, but ceil(3.59) is still 4
        (300, 3),
        (0, 0),  # min/max are decide's
        (5_000, 50),
    ],
)
def test_queue_proposal_is_ceil_of_depth_over_target_outside_the_tolerance(depth, wanted):
    assert queue_proposal(4, depth, 100) == wanted


def test_queue_proposal_is_an_average_value_so_it_does_not_depend_on_the_current_count():
    assert {queue_proposal(n, 2_500, 1_000) for n in (1, 2, 5, 10)} == {3}


def test_cpu_proposal_scales_the_ready_processes_by_utilisation_over_target():
    assert cpu_proposal(2, [1.0, 1.0], 0, 0.6) == 4  # 100 % / 60 % x 2 = 3.33
    assert cpu_proposal(2, [0.64, 0.6], 0, 0.6) == 2  # 62 %: within 10 %
    assert cpu_proposal(4, [0.1] * 4, 0, 0.6) == 1  # 10 % / 60 % x 4 = 0.67
    assert cpu_proposal(3, [], 3, 0.6) is None  # nobody ready: no figure


def test_processes_still_starting_count_as_idle_when_scaling_up():
    # One busy process and one starting: 90 % alone would ask for 2, but with the new one
    # at 0 % the mean is 45 %, below target: nothing changes.
    assert cpu_proposal(2, [0.9], 1, 0.6) == 2
    # Two at 100 % and one starting: 66 % over 3 is within 10 % of 60 %: no change either.
    assert cpu_proposal(3, [1.0, 1.0], 1, 0.6) == 3
    # Still far above target with the newcomers at 0 %: up.
    assert cpu_proposal(3, [1.0, 1.0], 1, 0.3) == 7  # 66 % / 30 % x 3 = 6.67


def test_combine_takes_the_largest_and_an_unreadable_metric_forbids_a_scale_down():
    assert combine(3, [2, 5]) == 5
    assert combine(3, [2, 1]) == 2
    assert combine(3, [None, 5]) == 5  # up is still fine
    assert combine(3, [None, 1]) is None  # down is not
    assert combine(3, [None, None]) is None


# --- behaviour --------------------------------------------------------------------------


def run(behavior: Behavior, current: int, proposals, minimum=2, maximum=50, every=15.0):
    """The counts decided for ``proposals``, one per sync of ``every`` seconds."""
    history, counts = History(), []
    for i, proposal in enumerate(proposals):
        current, history = decide(i * every, current, proposal, minimum, maximum, behavior, history)
        counts.append(current)
    return counts


def test_production_scales_up_at_most_x2_or_plus_8_per_15_s():
    # From 2: +8 (more than x2); then x2 of the count at the start of each period.
    assert run(PRODUCTION, 2, [200] * 6) == [10, 20, 40, 50, 50, 50]
    # Within one period the earlier additions count: no second step before 15 s.
    history = History()
    current, history = decide(0, 2, 200, 2, 50, PRODUCTION, history)
    assert current == 10
    current, history = decide(5, current, 200, 2, 50, PRODUCTION, history)
    assert current == 10
    current, history = decide(15.5, current, 200, 2, 50, PRODUCTION, history)
    assert current == 20


def test_production_scales_down_after_5_minutes_at_most_half_a_minute():
    counts = run(PRODUCTION, 2, [20] + [2] * 60)  # a sync every 15 s, for 15 minutes
    assert counts[0] == 10  # +8
    # The highest recommendation of the last 300 s is 20 until it is 300 s old: at 300 s
    # (sync 20) the count may fall, to half; a minute later to 2 (the minimum), not before.
    assert set(counts[:20]) == {10}
    assert counts[20:25] == [5, 5, 5, 5, 2]
    assert counts[-1] == 2


def test_scale_down_window_holds_the_highest_recommendation():
    behavior = Behavior(
        up=KUBERNETES.up, down=Rules(60, (Policy("Percent", 100, 15),), "Max")
    )  # no rate limit downwards: the window alone
    counts = run(behavior, 10, [10, 8, 6, 4, 2, 2, 2, 2, 2], minimum=1)
    # Each sync takes the highest proposal of the last 60 s (4 syncs): 10 until the 10 is
    # older than that, then 8, 6, 4, 2.
    assert counts == [10, 10, 10, 10, 8, 6, 4, 2, 2]


def test_a_recent_scale_up_counts_in_the_scale_down_period():
    # The rate policies count every change within their period from its start: after
    # 2 -> 10 less than a minute ago, the minute started at 2, so "half of it" allows 2.
    behavior = Behavior(up=PRODUCTION.up, down=Rules(0, PRODUCTION.down.policies, "Min"))
    assert run(behavior, 2, [10, 2]) == [10, 2]
    # Without the scale-up in the period, half of 10 is the floor.
    assert run(behavior, 10, [10, 2, 2, 2, 2, 2]) == [10, 5, 5, 5, 5, 2]


def test_min_max_and_an_undecided_sync():
    history = History(recommendations=((0.0, 7),))
    assert decide(30, 60, 80, 2, 50, PRODUCTION, history)[0] == 50  # above max: max at once
    assert decide(30, 1, 0, 2, 50, PRODUCTION, history)[0] == 2  # below min: min at once
    assert decide(30, 7, None, 2, 50, PRODUCTION, history) == (7, history)  # nothing known
    assert run(PRODUCTION, 2, [0, 0])[-1] == 2
    assert run(PRODUCTION, 40, [500])[-1] == 50


def test_disabled_select_policy_never_changes_that_direction():
    behavior = Behavior(up=Rules(0, PRODUCTION.up.policies, "Disabled"), down=KUBERNETES.down)
    assert run(behavior, 2, [20, 20]) == [2, 2]


# --- production, from the manifest ------------------------------------------------------


def test_production_is_the_scaled_objects_behaviour():
    spec = scaled_object()["spec"]
    manifest = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert Behavior.from_manifest(manifest) == PRODUCTION
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 50)
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert triggers["nats-jetstream"]["metadata"]["lagThreshold"] == "1000"
    assert triggers["nats-jetstream"]["metricType"] == "AverageValue"
    assert triggers["cpu"]["metadata"]["value"] == "60"


def test_an_hpa_without_behaviour_gets_kubernetes_defaults_field_by_field():
    assert Behavior.from_manifest(None) == KUBERNETES
    only_window = Behavior.from_manifest({"scaleDown": {"stabilizationWindowSeconds": 30}})
    assert only_window.down == Rules(30, KUBERNETES.down.policies, "Max")
    assert only_window.up == KUBERNETES.up


def test_local_behaviour_is_productions_with_its_own_scale_down_window():
    local = autoscale.local_behavior(20)
    assert local.up == PRODUCTION.up
    assert local.down.policies == PRODUCTION.down.policies and local.down.window == 20


def test_the_local_default_target_is_above_what_a_busy_process_holds_itself():
    """A process holds up to WORKER_CONCURRENCY chunks unacknowledged (32), which count in
    the depth: a target near that would keep idle capacity scaled up."""
    concurrency = load_settings({"BATCHSENDER_ENV": "test"}).worker_concurrency
    assert autoscale.TARGET >= 3 * concurrency
    # One process holding its own chunks asks for no second one.
    assert queue_proposal(1, concurrency, autoscale.TARGET) == 1


# --- the local controller ----------------------------------------------------------------


def test_autoscaler_steps_through_a_backlog_and_back():
    scaler = Autoscaler(
        1, 4, target=100, cpu_target=0, interval=5, behavior=autoscale.local_behavior(10)
    )
    idle = Cpu((), 0)
    counts = []
    current = 1
    for i, depth in enumerate([0, 900, 900, 700, 300, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0]):
        current = scaler.step(i * 5.0, current, depth, idle)
        counts.append(current)
    assert counts[:2] == [1, 4]  # up at once, capped at the maximum
    assert max(counts) == 4 and counts[-1] == 1
    falling = counts[counts.index(4) :]
    assert falling == sorted(falling, reverse=True), "down only, once the backlog is going"


def test_autoscaler_does_not_scale_down_on_an_unknown_depth_or_cpu():
    scaler = Autoscaler(
        1, 4, target=100, cpu_target=0.6, interval=5, behavior=autoscale.local_behavior(0)
    )
    assert scaler.step(0.0, 3, None, Cpu((0.0, 0.0, 0.0), 0)) == 3
    assert scaler.step(5.0, 3, 0, None) == 3
    assert scaler.step(10.0, 3, 0, Cpu((0.0, 0.0, 0.0), 0)) == 1
    assert scaler.step(15.0, 1, None, Cpu((1.0,), 0)) == 2  # CPU alone may scale up


def test_autoscaler_refuses_a_nonsense_range():
    for low, high in ((0, 3), (3, 2)):
        with pytest.raises(ValueError):
            Autoscaler(low, high)


def test_cpu_sampler_reports_a_process_from_its_third_sample():
    sampler = CpuSampler()
    assert sampler.available()
    me = os.getpid()
    assert sampler.sample([me, 2**22 + 1], time.monotonic()) == Cpu((), 1)  # the other is gone
    wall, used = time.monotonic(), time.process_time()
    sampler.sample([me], wall)
    while time.process_time() - used < 0.3:  # 0.3 s of CPU, however busy the machine is
        math.sqrt(12345.678)
    now = time.monotonic()
    cpu = sampler.sample([me], now)
    assert cpu.unready == 0 and len(cpu.ready) == 1
    expected = (time.process_time() - used) / (now - wall)
    assert abs(cpu.ready[0] - expected) <= 0.05 + 0.03 / (now - wall)  # clock ticks of 10 ms


def test_read_depth_is_none_when_nats_does_not_answer_and_leaves_no_thread():
    """The supervisor forks after it: no event loop nor executor thread may survive."""
    settings = load_settings(
        {"BATCHSENDER_ENV": "test", "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    )
    threads = threading.active_count()
    started = time.monotonic()
    assert autoscale.read_depth(settings, timeout=0.5) is None
    assert time.monotonic() - started < 3
    assert threading.active_count() == threads


def test_supervisor_decision_sets_wanted_from_the_depth(monkeypatch):
    from engine.supervisor import Supervisor

    settings = load_settings({"BATCHSENDER_ENV": "test"})
    scaler = Autoscaler(1, 4, target=100, cpu_target=0.6, interval=5)
    supervisor = Supervisor(settings, autoscaler=scaler)
    try:
        assert supervisor.wanted == 1  # starts at the minimum
        depths = iter([1_000, None])
        monkeypatch.setattr(autoscale, "read_depth", lambda _settings: next(depths))
        supervisor.autoscale_workers()
        assert supervisor.wanted == 4  # no child has a CPU figure yet: the queue decides
        supervisor.autoscale_workers()
        assert supervisor.wanted == 4  # not yet time for the next decision
        supervisor._decide_after = 0.0
        supervisor.autoscale_workers()  # depth unknown: no scaling down
        assert supervisor.wanted == 4
    finally:
        shutil.rmtree(supervisor._heartbeats, ignore_errors=True)


# --- the command line -------------------------------------------------------------------


def test_worker_autoscale_options():
    parse = build_parser().parse_args
    args = parse(["worker", "--autoscale", "1..4", "--autoscale-target", "1000"])
    assert args.autoscale == (1, 4) and args.autoscale_target == 1000 and args.processes is None
    defaults = parse(["worker", "--autoscale", "2..2"])
    assert defaults.autoscale_target == autoscale.TARGET
    assert defaults.autoscale_cpu == 60 and defaults.autoscale_down_window == 60
    for bad in (["--autoscale", "4..1"], ["--autoscale", "0..3"], ["--autoscale", "3"],
                ["-n", "2", "--autoscale", "1..2"], ["--autoscale", "1..2", "--autoscale-cpu", "150"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(["worker", *bad])


# --- the model of KEDA + the HPA (loadtests/autoscale_model.py) -------------------------


def test_the_model_reads_production_from_the_scaled_object():
    from loadtests.autoscale_model import Production

    production = Production.read()
    assert (production.minimum, production.maximum) == (2, 50)
    assert production.lag_threshold == 1000 and production.cpu_target == 0.6
    assert production.behavior == PRODUCTION
    assert production.polling_interval == 15 and production.cooldown == 300


def test_the_model_goes_from_2_pods_up_and_back_to_2_within_the_hpa_rules():
    from loadtests.autoscale_model import Production, simulate, summary

    production = Production.read()
    arrivals = [60.0] * 100  # 6,000 chunks in 100 s, then nothing
    steps = simulate(arrivals, production, capacity=6.0, cpu_per_chunk=0.03, startup=30)
    pods = [s.pods for s in steps]
    assert pods[0] == 2 and max(pods) > 2 and pods[-1] == 2
    # Up on the first sync whose depth is more than 10 % above 2 x 1,000: at 45 s, 46 s of
    # arrivals less what 2 pods did, 48 x 46 = 2,208 (at 30 s, 1,488: no).
    assert summary(steps, production)["first_scale_up_s"] == 45
    # The new pods take chunks once started.
    assert next(s.t for s in steps if s.ready > 2) == 45 + 30
    for before, after in zip(steps, steps[1:], strict=False):
        if after.pods < before.pods:  # never below a proposal of the last 5 minutes
            window = [s.proposal for s in steps if after.t - 300 < s.t <= after.t]
            assert max(p for p in window if p is not None) <= after.pods
    assert all(s.cpu < production.cpu_target for s in steps)  # 6/s x 30 ms: the queue decides


def test_the_measured_capacity_is_per_process_while_every_process_was_busy():
    from loadtests.autoscale_model import Trace

    seconds = [float(t) for t in range(30)]
    processes = [1] * 10 + [2] * 20
    done = [0.0]
    for n in processes[1:]:
        done.append(done[-1] + 5 * n)  # 5 chunks/s per process
    trace = Trace(
        t=seconds,
        depth=[1_000 - int(d) for d in done],
        pending=[500] * 30,
        published=[1_000] * 30,
        worker_cpu=[0.1 * n for n in processes],
        processes=processes,
        wanted=processes,
    )
    assert trace.capacity() == {1: 5.0, 2: 5.0}
    assert trace.arrivals()[:3] == [0.0, 0.0, 0.0]
