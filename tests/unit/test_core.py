"""The master's core without Ray: an in-memory store, a clock the test moves, and the inline
driver running steps through the real executor in this process."""

from __future__ import annotations

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import StoreError
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import Conflict, Rejected, Submitted
from cicd_ray.reads.runs import run_view
from cicd_ray.states import RunState, StepState
from cicd_ray.store.memory import MemoryStore
from cicd_ray.testing.clock import ManualClock
from tests.builders import make, submitted

CHAIN = {
    "name": "chain",
    "steps": [
        {"name": "a", "run": "echo from-a"},
        {"name": "b", "needs": ["a"], "run": "echo from-b; echo to-stderr >&2"},
    ],
}


class FailingStore(MemoryStore):
    """A store whose writes of batches fail while `failing` is set (as Redis refusing writes)."""

    failing = False

    def save(self, changes) -> None:
        if self.failing:
            raise StoreError("write refused")
        super().save(changes)


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, pools={"default": PoolConfig(name="default", workers=1, cpus=2)})


def test_submit_dispatch_outcome_commit(settings):
    clock = ManualClock(1000.0)
    core, driver = make(settings, clock=clock)
    run_id = submitted(core.submit(CHAIN))
    assert core.store.get_run(run_id).state is RunState.QUEUED  # durable before answered
    driver.run_until_idle()
    view = run_view(core.store, run_id)
    assert view.run.state is RunState.SUCCEEDED
    assert (view.run.created_at, view.run.finished_at) == (1000.0, 1000.0)  # the core's clock
    assert [(s.name, s.state, s.attempts) for s in view.steps] == [
        ("a", StepState.SUCCEEDED, 1),
        ("b", StepState.SUCCEEDED, 1),
    ]
    logs = {a.step: core.store.read_log(a.id) for a in view.attempts}
    assert logs == {"a": b"from-a\n", "b": b"from-b\nto-stderr\n"}
    # What observers were told, in commit order (a batch's steps before its run): b ran only
    # after a had succeeded.
    seen = [
        (e["kind"], e.get("step"), e["state"])
        for e in core.events.page(0, None)["events"]
        if e["run_id"] == run_id
    ]
    assert seen == [
        ("step", "a", "queued"),
        ("step", "b", "queued"),
        ("run", None, "queued"),
        ("step", "a", "running"),
        ("run", None, "running"),
        ("step", "a", "succeeded"),
        ("step", "b", "running"),
        ("step", "b", "succeeded"),
        ("run", None, "succeeded"),
    ]


def test_bad_submissions_change_nothing_and_keys_answer_once(settings):
    core, _ = make(settings)
    assert core.submit({"name": "x", "steps": []}) == Rejected(
        problems=["steps: must list at least one step"]
    )
    assert core.store.list_runs() == [] and not core.take_effects().dispatch
    first = submitted(core.submit(CHAIN, key="k1"))
    assert core.submit(CHAIN, key="k1") == Submitted(run_id=first, existing=True)
    assert core.submit({**CHAIN, "name": "other"}, key="k1") == Conflict(run_id=first)
    assert len(core.store.list_runs()) == 1


def test_a_duplicate_outcome_is_applied_once(settings):
    core, driver = make(settings)
    run_id = submitted(core.submit(CHAIN))
    [(_, task)] = driver.until_dispatched()
    outcome = driver.execute(task)
    driver.pending.clear()
    assert driver.report(outcome) is True
    assert driver.report(outcome) is False  # the same report again: ignored
    core.tick()
    driver.carry_out()
    assert [t.step.name for _, t in driver.pending] == ["b"]  # b dispatched once
    driver.run_until_idle()
    view = run_view(core.store, run_id)
    assert view.run.state is RunState.SUCCEEDED
    assert [(a.step, a.number) for a in view.attempts] == [("a", 1), ("b", 1)]


@pytest.mark.parametrize("still_runs", [False, True])
def test_a_restart_from_the_store_mid_run(settings, still_runs):
    """The master dies after dispatching `a`; a new core rebuilt from the store takes the run
    up. The worker registers again saying it finished `a` (its result is applied, `a` ran
    once), or that it no longer runs it (lost with its worker: retried automatically)."""
    store = MemoryStore()
    core, driver = make(settings, store)
    run_id = submitted(core.submit(CHAIN))
    [(worker_id, task)] = driver.until_dispatched()
    outcome = driver.execute(task)  # the step ran; its report never reached the master
    worker = driver.workers[worker_id]

    fresh, driver = make(settings, store)  # the restarted master
    assert fresh.recovered == 1
    assert fresh.store.get_steps(run_id)[0].state is StepState.RUNNING
    if still_runs:
        driver.start(worker, running=[], finished=[outcome])
    else:
        driver.start(worker, running=[], finished=[])
    driver.run_until_idle()
    view = run_view(store, run_id)
    assert view.run.state is RunState.SUCCEEDED
    a = view.attempts_of("a")
    if still_runs:
        assert [x.state for x in a] == [StepState.SUCCEEDED]
    else:
        assert [x.state for x in a] == [StepState.FAILED, StepState.SUCCEEDED]
        assert "no longer ran it after the master restarted" in a[0].reason
    assert [x.number for x in view.attempts_of("b")] == [1]


def test_a_commit_that_fails_leaves_nothing_half_done(settings):
    store = FailingStore()
    core, driver = make(settings, store)
    # A submission whose write fails is not answered and leaves no trace.
    store.failing = True
    with pytest.raises(StoreError, match="write refused"):
        core.submit(CHAIN)
    assert store.list_runs() == [] and not core.take_effects()
    assert core.events.seq == 0  # observers hear only of what was written

    # Mid-run: the outcome of `a` cannot be written. Nothing of it happens: `b` is not
    # dispatched and the store still has `a` running.
    store.failing = False
    core, driver = make(settings, store)
    run_id = submitted(core.submit(CHAIN))
    [(worker_id, task)] = driver.until_dispatched()
    outcome = driver.execute(task)
    events = core.events.seq
    store.failing = True
    assert driver.report(outcome) is True  # applied in memory; written with the next tick
    with pytest.raises(StoreError):
        core.tick()
    assert not core.take_effects() and core.events.seq == events
    assert [s.state for s in store.get_steps(run_id)] == [StepState.RUNNING, StepState.QUEUED]

    # The core is dropped (the actor exits); its successor, from the store, finishes the run.
    store.failing = False
    fresh, driver = make(settings, store)
    driver.start(fresh.sched.workers[worker_id], running=[], finished=[outcome])
    driver.run_until_idle()
    view = run_view(store, run_id)
    assert view.run.state is RunState.SUCCEEDED
    assert [(a.step, a.number, a.state) for a in view.attempts] == [
        ("a", 1, StepState.SUCCEEDED),
        ("b", 1, StepState.SUCCEEDED),
    ]


def test_cancel_through_the_core(settings):
    core, driver = make(settings)
    run_id = submitted(core.submit(CHAIN))
    driver.until_dispatched()
    assert core.cancel(run_id) == "running"  # a is dispatched: killed, then the run ends
    driver.run_until_idle()
    assert core.store.get_run(run_id).state is RunState.CANCELLED
    assert [s.state for s in core.store.get_steps(run_id)] == [StepState.CANCELLED] * 2
    assert core.cancel(run_id) == "cancelled" and core.cancel("nope") is None


# --- notifications: the outbox ----------------------------------------------------------------

NOTIFIED = {
    "name": "notified",
    "notify": [
        {"webhook": "https://hooks.example.com/ci", "when": ["failed"]},
        {"webhook": "https://other.example.com/ci", "when": ["succeeded"]},
    ],
    "steps": [{"name": "a", "run": "echo out; exit 3"}],
}


def test_a_run_end_records_its_notifications_in_the_same_batch(settings):
    store = MemoryStore()
    core, driver = make(settings, store)
    run_id = submitted(core.submit(NOTIFIED))
    driver.run_until_idle()
    view = run_view(store, run_id)
    assert view.run.state is RunState.FAILED
    # Only the target whose `when` names the run's end state.
    assert [(d.url, d.state) for d in view.deliveries] == [
        ("https://hooks.example.com/ci", "pending")
    ]
    body = core.outbox.body(view.deliveries[0])
    import json

    doc = json.loads(body)
    assert (doc["run"], doc["pipeline"], doc["state"]) == (run_id, "notified", "failed")
    assert doc["failed_steps"][0]["step"] == "a" and doc["failed_steps"][0]["exit_code"] == 3
    assert doc["failed_steps"][0]["log_tail"][-1] == "out"


def ended_notified_run(settings):
    """A core whose run of NOTIFIED has failed, its notification pending: (clock, store,
    core, run id)."""
    clock = ManualClock(1000.0)
    store = MemoryStore()
    core, driver = make(settings, store, clock)
    run_id = submitted(core.submit(NOTIFIED))
    driver.run_until_idle()
    return clock, store, core, run_id


def test_a_delivery_is_tried_with_backoff_and_at_most_once_across_restarts(settings):
    clock, store, core, run_id = ended_notified_run(settings)
    [d] = core.outbox.take_due(core.clock())
    assert store.get_deliveries(run_id)[0].state == "sending"  # before the request is made
    assert core.outbox.take_due(core.clock()) == []
    core.delivery_done(d.id, None, "ConnectError: refused")
    assert store.get_deliveries(run_id)[0].state == "pending"
    assert store.get_deliveries(run_id)[0].next_at == 1001.0
    clock.now = 1001.0
    [d] = core.outbox.take_due(core.clock())
    core.delivery_done(d.id, 503, "HTTP 503")
    assert store.get_deliveries(run_id)[0].next_at == 1003.0  # 1 s, then 2 s
    # The master dies during the third try: the new one does not make it again.
    clock.now = 1003.0
    core.outbox.take_due(core.clock())
    again, _ = make(settings, store, clock)
    [d] = store.get_deliveries(run_id)
    assert d.state == "interrupted" and "not tried again" in d.error
    assert again.outbox.take_due(again.clock()) == []


def test_a_pending_delivery_is_made_by_the_next_master_and_gives_up_in_time(settings):
    clock, store, _, run_id = ended_notified_run(settings)
    again, driver = make(settings, store, clock)  # restarted between its end and the try
    [d] = again.outbox.take_due(again.clock())
    again.delivery_done(d.id, 200)
    assert store.get_deliveries(run_id)[0].state == "delivered"
    assert again.outbox.take_due(again.clock()) == []
    other = submitted(again.submit(NOTIFIED))
    driver.run_until_idle()
    tries = 0
    while due := again.outbox.take_due(again.clock()):
        tries += 1
        again.delivery_done(due[0].id, 500, "HTTP 500")
        clock.now = store.get_deliveries(other)[0].next_at
    [d] = store.get_deliveries(other)
    assert d.state == "failed" and d.finished_at - d.created_at <= 900 and tries > 5
    refused = submitted(again.submit(NOTIFIED))
    driver.run_until_idle()
    [d] = again.outbox.take_due(again.clock())
    again.delivery_done(d.id, None, "10.0.0.1 is a private address", final=True)
    assert store.get_deliveries(refused)[0].state == "failed"


def test_the_server_s_default_webhook_hears_of_failed_runs_without_notify(tmp_path):
    settings = Settings(
        home=tmp_path,
        notify_webhook="https://hooks.example.com/all",
        pools={"default": PoolConfig(name="default", workers=1, cpus=2)},
    )
    store = MemoryStore()
    core, driver = make(settings, store)
    failed = submitted(core.submit({"name": "f", "steps": [{"name": "a", "run": "exit 1"}]}))
    ok = submitted(core.submit({"name": "o", "steps": [{"name": "a", "run": "true"}]}))
    own = submitted(core.submit({**NOTIFIED, "name": "own"}))
    driver.run_until_idle()
    assert [d.url for d in store.get_deliveries(failed)] == ["https://hooks.example.com/all"]
    assert store.get_deliveries(ok) == []
    assert [d.url for d in store.get_deliveries(own)] == ["https://hooks.example.com/ci"]
