"""A cron schedule on the session's cluster, made through the API: each slot starts exactly
one run, through a master SIGKILLed just before a slot; another project neither sees nor
deletes it; `cicd-ray schedules` lists it with its next and last runs."""

from __future__ import annotations

import time

import httpx

from tests.integration.conftest import project_token
from tests.integration.test_faults import sigkill_master

EVERY = 5.0  # seconds between slots: `* * * * * */5`


def client(api: str, name: str) -> httpx.Client:
    return httpx.Client(
        base_url=api, timeout=30, headers={"Authorization": f"Bearer {project_token(name)}"}
    )


def scheduled_runs(http: httpx.Client) -> list[dict]:
    runs = http.get("/api/v1/runs", params={"pipeline": "every-5s", "limit": 500}).json()
    return sorted(runs["runs"], key=lambda r: r["scheduled_for"])


def test_a_schedule_fires_once_per_slot_across_a_master_sigkill(harness, api, cli):
    spec = {
        "name": "every-5s",
        "cron": "* * * * * */5",
        "pipeline": {
            "name": "every-5s",
            "steps": [{"name": "tick", "run": "echo event=$CICD_EVENT"}],
        },
    }
    with client(api, "web-submit") as web, client(api, "ops-submit") as ops:
        made = web.post("/api/v1/schedules", json=spec)
        assert made.status_code == 201, made.text
        assert made.json()["project"] == "web" and made.json()["next_at"] % EVERY == 0
        again = web.post("/api/v1/schedules", json=spec)
        assert again.status_code == 422 and "has a schedule every-5s already" in again.text
        try:
            deadline = time.monotonic() + 30
            while not scheduled_runs(web):
                assert time.monotonic() < deadline, "no slot fired"
                time.sleep(0.2)
            first = scheduled_runs(web)[0]
            # Kill the master half a second before a slot.
            upcoming = first["scheduled_for"] + 2 * EVERY
            time.sleep(max(0.0, upcoming - 0.5 - time.time()))
            killed_at = time.time()
            sigkill_master(harness)
            deadline = time.monotonic() + 60
            while max(r["scheduled_for"] for r in scheduled_runs(web)) < killed_at + 2 * EVERY:
                assert time.monotonic() < deadline, scheduled_runs(web)
                time.sleep(0.3)
            listed = cli("schedules", "--url", api, CICD_RAY_TOKEN=project_token("web-submit"))
            assert listed.returncode == 0, listed.stderr
            assert "every-5s" in listed.stdout and "* * * * * */5" in listed.stdout
            assert ops.get("/api/v1/schedules").json()["schedules"] == [] or all(
                s["project"] != "web" for s in ops.get("/api/v1/schedules").json()["schedules"]
            )
            assert ops.delete("/api/v1/schedules/every-5s").status_code == 404
        finally:
            assert web.delete("/api/v1/schedules/every-5s").status_code == 200
        runs = scheduled_runs(web)
        log = web.get(f"/api/v1/runs/{runs[0]['id']}/steps/tick/log")
    slots = [r["scheduled_for"] for r in runs]
    assert len(slots) == len(set(slots)), slots  # no slot started twice
    assert all(s % EVERY == 0 for s in slots)
    assert {r["event"] for r in runs} == {"schedule"} and {r["project"] for r in runs} == {"web"}
    assert "event=schedule" in log.text
    # Every slot from the first to the last started its run: the one the master was down for
    # too (missed: latest), once.
    assert slots == [slots[0] + i * EVERY for i in range(len(slots))], slots


def test_a_never_firing_cron_is_refused_and_the_master_still_answers(api):
    """Issue 24, item 4: `0 0 30 2 *` crash-looped every master once stored."""
    spec = {
        "name": "never",
        "cron": "0 0 30 2 *",
        "pipeline": {"name": "never", "steps": [{"name": "a", "run": "true"}]},
    }
    with client(api, "web-submit") as web:
        refused = web.post("/api/v1/schedules", json=spec)
        assert refused.status_code == 422 and "never fires" in refused.text, refused.text
        assert web.get("/api/v1/schedules").status_code == 200
        assert web.get("/healthz").status_code == 200
