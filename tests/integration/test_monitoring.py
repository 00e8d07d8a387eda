"""What people watch: the event stream, the metrics on Prometheus endpoints, the page's files."""

from __future__ import annotations

import json
import queue
import re
import threading
import time

import httpx
import ray

from cicd_ray.master.metrics import NAMES
from cicd_ray.names import NAMESPACE, worker_actor_name
from tests.integration.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


class EventReader(threading.Thread):
    """Reads an event stream into a queue of (id, event, data)."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, {**AUTH, **(headers or {})}
        self.events: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.stop = False

    def run(self) -> None:
        with httpx.stream("GET", self.url, headers=self.headers, timeout=60) as response:
            self.status = response.status_code
            self.content_type = response.headers["content-type"]
            self.connected.set()
            block: dict[str, str] = {}
            for line in response.iter_lines():
                if self.stop:
                    return
                if not line:
                    if "event" in block:
                        self.events.put(
                            (block.get("id"), block["event"], json.loads(block["data"]))
                        )
                    block = {}
                elif not line.startswith(":"):
                    key, _, value = line.partition(": ")
                    block[key] = value

    def until(self, check, timeout_s: float = 60) -> list[tuple]:
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(item)
            if check(item):
                return seen
        raise AssertionError(f"never saw it; saw {seen}")


def submit(api: str, pipeline: dict) -> str:
    r = httpx.post(f"{api}/api/v1/runs", json={"pipeline": pipeline}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def test_events_stream_run_and_step_changes_and_resume(api):
    reader = EventReader(f"{api}/api/v1/events")
    reader.start()
    assert reader.connected.wait(30)
    assert (reader.status, reader.content_type.split(";")[0]) == (200, "text/event-stream")
    run_id = submit(
        api,
        {
            "name": "watched",
            "steps": [
                {"name": "a", "run": "echo a"},
                {"name": "b", "needs": ["a"], "run": "exit 3"},
            ],
        },
    )
    seen = reader.until(
        lambda e: e[1] == "run" and e[2]["run_id"] == run_id and e[2]["state"] == "failed"
    )
    mine = [
        (kind, data.get("step"), data["state"])
        for _, kind, data in seen
        if data["run_id"] == run_id
    ]
    assert ("step", "a", "running") in mine and ("step", "a", "succeeded") in mine
    assert mine.index(("step", "b", "failed")) > mine.index(("step", "a", "succeeded"))
    assert mine[-1] == ("run", None, "failed")
    ids = [event_id for event_id, _, _ in seen]
    epochs, seqs = zip(*(i.split(":") for i in ids), strict=True)
    assert len(set(epochs)) == 1 and [int(s) for s in seqs] == sorted(int(s) for s in seqs)
    reader.stop = True
    # A client that reconnects with Last-Event-ID gets what came after it, for one run only.
    first = next(i for i, kind, data in seen if data["run_id"] == run_id)
    again = EventReader(f"{api}/api/v1/events?run_id={run_id}", {"Last-Event-ID": first})
    again.start()
    replay = again.until(lambda e: e[1] == "run" and e[2]["state"] == "failed", 30)
    assert {data["run_id"] for _, _, data in replay} == {run_id}
    assert [i for i, _, _ in replay] == [i for i, _, d in seen if d["run_id"] == run_id][1:]
    again.stop = True
    # On the wire: a reconnection hint first; a client from another master's epoch is told
    # to reload (`reset`) before anything else.
    with httpx.stream(
        "GET", f"{api}/api/v1/events", timeout=30, headers={**AUTH, "Last-Event-ID": "1.0:5"}
    ) as response:
        lines = response.iter_lines()
        head = [next(lines) for _ in range(5)]
    assert head == ["retry: 2000", "", "event: reset", "data: {}", ""], head
    bad = httpx.get(f"{api}/api/v1/events", params={"run_id": "../x"}, headers=AUTH)
    assert bad.status_code == 422
    assert httpx.get(f"{api}/api/v1/events").status_code == 401


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        found = re.match(r"^(ray_cicd_\w+)(?:\{(.*)\})? (\S+)$", line)
        if found:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            out[(found.group(1), labels)] = float(found.group(3))
    return out


def total(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, tags), v in metrics.items() if n == name and want <= tags)


def test_metrics_reach_the_prometheus_endpoint_with_the_run_s_counts(harness):
    """Counted on the `solo` pool, once the counts of earlier tests have landed (a node
    exports every few seconds)."""
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    harness.steady()
    before = scrape(port)
    deadline = time.monotonic() + 120
    while True:  # settled: two scrapes an export period apart agree
        time.sleep(6)
        settled = scrape(port)
        if all(settled.get(k) == v for k, v in before.items() if "_outcomes_" in k[0]):
            break
        assert time.monotonic() < deadline, "the outcome counters never settled"
        before = settled
    harness.run(
        {
            "name": "counted",
            "defaults": {"pool": "solo"},
            "steps": [
                {"name": "ok1", "run": "true"},
                {"name": "ok2", "run": "sleep 0.2"},
                {"name": "bad", "run": "exit 1"},
            ],
        }
    )
    outcomes = {"succeeded": 2, "failed": 1}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = scrape(port)
        grown = {
            s: total(after, "ray_cicd_step_outcomes_total", state=s, pool="solo")
            - total(before, "ray_cicd_step_outcomes_total", state=s, pool="solo")
            for s in outcomes
        }
        if grown == outcomes:
            break
        time.sleep(1)
    assert grown == outcomes
    assert total(after, "ray_cicd_runs_finished_total", state="failed") >= 1
    assert (
        total(after, "ray_cicd_step_run_seconds_count", pool="solo")
        - total(before, "ray_cicd_step_run_seconds_count", pool="solo")
        == 3
    )
    assert total(after, "ray_cicd_workers", pool="default", state="ready") == 2
    assert total(after, "ray_cicd_store_write_seconds_count") > 0
    assert total(after, "ray_cicd_pool_max_workers", pool="solo") == 1
    assert total(after, "ray_cicd_master_started_at_seconds") > 0
    assert any(
        name == "ray_cicd_worker_network_bytes_per_second" and ("direction", "in") in labels
        for name, labels in after
    )
    # A worker lost is counted (what the CicdWorkersLost alert watches).
    solo = next(
        w for w in harness.master_workers() if w["pool"] == "solo" and w["state"] == "ready"
    )
    lost = total(after, "ray_cicd_workers_lost_total", pool="solo")
    ray.kill(ray.get_actor(worker_actor_name(solo["id"]), namespace=NAMESPACE))
    deadline = time.monotonic() + 60
    while total(after, "ray_cicd_workers_lost_total", pool="solo") <= lost:
        assert time.monotonic() < deadline, "the lost worker was never counted"
        time.sleep(1)
        after = scrape(port)
    harness.steady()
    exported = {name.removeprefix("ray_") for name, _ in after}
    for name in NAMES:
        assert any(e == name or e.startswith(name + "_") for e in exported), name


def test_the_page_and_its_files_are_served_without_a_token(api):
    page = httpx.get(f"{api}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/app.js">' in page.text
    script = httpx.get(f"{api}/ui/app.js")
    assert script.status_code == 200 and "api/v1/events" in script.text
    assert httpx.get(f"{api}/ui/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{api}/ui/secrets.txt").status_code == 404
