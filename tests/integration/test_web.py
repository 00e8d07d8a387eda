"""The web page in a real headless Chromium (Debian's, driven by Playwright): sign in, watch a
run's steps succeed and a line of a running step's log appear, list runs and workers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.integration.conftest import API_TOKEN

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: ./dev test (and .ci/run) install it"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_a_run_on_the_page(api, browser, shared_dir):
    go = shared_dir / "go"  # `build` runs until the test creates it: it is seen running
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api}/")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not accepted (401)")
    page.fill("#token", API_TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h2")).to_have_text("Runs")
    expect(page.locator("#live")).to_have_class("live on", timeout=15000)

    r = httpx.post(
        f"{api}/api/v1/runs",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        json={
            "pipeline": {
                "name": "on-the-page",
                "steps": [
                    {"name": "prepare", "run": "echo ready"},
                    {
                        "name": "build",
                        "needs": ["prepare"],
                        "run": f"echo line 1; until [ -e {go} ]; do sleep 0.1; done; "
                        "for i in 2 3 4 5 6; do echo line $i; done",
                    },
                    {"name": "ship", "needs": ["build"], "run": "echo shipped"},
                ],
            }
        },
    )
    run_id = r.json()["run_id"]
    # The runs list updates itself (from the event stream) with the new run.
    expect(page.locator(f"tr[data-run='{run_id}']")).to_be_visible(timeout=15000)
    page.click(f"tr[data-run='{run_id}'] a")
    build = page.locator(".step[data-step='build']")
    expect(build).to_have_attribute("data-state", "running", timeout=30000)
    build.click()
    # A line of the log shows while the step still runs.
    expect(page.locator("#log")).to_contain_text("line 1", timeout=15000)
    assert build.get_attribute("data-state") == "running"
    go.touch()
    expect(page.locator(".step[data-state='succeeded']")).to_have_count(3, timeout=60000)
    expect(page.locator("#log")).to_contain_text("line 6")
    expect(page.locator("h2").nth(1)).to_have_text("Log of build succeeded")
    expect(page.locator("h2").first).to_contain_text("succeeded")
    # Steps laid out as the DAG: one column per depth.
    assert page.locator(".dag .column").count() == 3
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "web-run.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    page.goto(f"{api}/#/workers")
    expect(page.locator("tr[data-worker]").first).to_be_visible(timeout=15000)
    expect(page.locator("h2").first).to_have_text("Workers")
    page.click("#signout")
    expect(page.locator("#token")).to_be_visible()
    page.close()


def test_a_build_s_artifacts_explain_and_rerun_on_the_page(api, browser, shared_dir):
    gate = shared_dir / "gate"
    r = httpx.post(
        f"{api}/api/v1/runs",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        json={
            "pipeline": {
                "name": "page-build",
                "steps": [
                    {
                        "name": "make",
                        "run": "mkdir -p dist; echo made > dist/app",
                        "artifacts": ["dist/**"],
                    },
                    {"name": "check", "needs": ["make"], "run": f"test -e {gate}"},
                ],
            }
        },
    )
    run_id = r.json()["run_id"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api}/")
    page.fill("#token", API_TOKEN)
    page.click("button[type=submit]")
    page.goto(f"{api}/#/runs/{run_id}")
    expect(page.locator("h2").first).to_contain_text("failed", timeout=60000)
    page.locator(".step[data-step='make']").click()
    link = page.locator("a[data-artifact='dist/app']")
    expect(link).to_be_visible(timeout=15000)
    with page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_text() == "made\n"
    assert download.value.suggested_filename == "app"
    page.click("#explain")
    expect(page.locator(".explain")).to_contain_text("no earlier success of step make")
    gate.touch()
    page.click("#rerun-failed")
    expect(page.locator("h2").first).to_contain_text("succeeded", timeout=60000)
    assert run_id not in page.locator("h2").first.inner_text()  # the new run's page
    expect(page.locator(".meta")).to_contain_text(f"re-run of {run_id}")
    expect(page.locator(".step[data-step='make'] .badge")).to_have_text("carried over")
    page.close()


def test_flow_control_on_the_page(api, browser, shared_dir):
    """Skipped by a condition, waiting for a concurrency group, waiting for approval: each
    shown as such, and an approval answered with the page's buttons."""
    gate = shared_dir / "gate"
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    def submit(pipeline: dict) -> str:
        r = httpx.post(f"{api}/api/v1/runs", headers=auth, json={"pipeline": pipeline})
        assert r.status_code == 201, r.text
        return r.json()["run_id"]

    steps = [
        {
            "name": "hold",
            "concurrency": {"group": "page-group"},
            "run": f"until [ -e {gate} ]; do sleep 0.1; done",
        },
        {"name": "on-main", "if": "run.branch == 'main'", "run": "true"},
        {
            "name": "release",
            "needs": ["hold"],
            "approval": {"prompt": "Ship to prod?"},
            "run": "echo shipped",
        },
    ]
    first = submit({"name": "page-flow", "steps": steps})
    second = submit({"name": "page-flow", "steps": steps})
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api}/")
    page.fill("#token", API_TOKEN)
    page.click("button[type=submit]")
    page.goto(f"{api}/#/runs/{second}")
    expect(page.locator(".step[data-step='hold'] [data-flow='group']")).to_contain_text(
        "waiting for concurrency group page-group (1 ahead)", timeout=30000
    )
    expect(page.locator(".step[data-step='on-main'] [data-flow='condition']")).to_have_text(
        "if: run.branch == 'main' was false"
    )
    gate.touch()
    page.goto(f"{api}/#/runs/{first}")
    release = page.locator(".step[data-step='release']")
    expect(release).to_have_attribute("data-state", "waiting_approval", timeout=30000)
    expect(release.locator("[data-flow='approval']")).to_contain_text("Ship to prod?")
    release.locator("input[name=by]").fill("page-user")
    release.locator("input[name=comment]").fill("go")
    release.locator("[data-answer='approve']").click()
    expect(release).to_have_attribute("data-state", "succeeded", timeout=30000)
    expect(release.locator("[data-flow='approved']")).to_have_text(
        re.compile(r"^approved by token [0-9a-f]{12}: \(page-user\) go$")
    )
    page.goto(f"{api}/#/runs/{second}")
    release = page.locator(".step[data-step='release']")
    expect(release).to_have_attribute("data-state", "waiting_approval", timeout=30000)
    release.locator("[data-answer='reject']").click()
    expect(release).to_have_attribute("data-state", "failed", timeout=30000)
    expect(page.locator("h2").first).to_contain_text("failed")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-flow.png"), full_page=True)
    page.close()


def test_the_page_shows_only_the_token_s_project(api, browser):
    from tests.integration.conftest import project_token

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api}/")
    page.fill("#token", project_token("web-read"))
    page.click("button[type=submit]")
    expect(page.locator("#live")).to_have_class("live on", timeout=15000)

    def submit(token_name: str, name: str) -> str:
        answer = httpx.post(
            f"{api}/api/v1/runs",
            json={"pipeline": {"name": name, "steps": [{"name": "s", "run": "echo hi"}]}},
            headers={"Authorization": f"Bearer {project_token(token_name)}"},
        )
        assert answer.status_code == 201, answer.text
        return answer.json()["run_id"]

    theirs = submit("ops-submit", "ops-on-the-page")
    ours = submit("web-submit", "web-on-the-page")
    # Told by the event stream: its own project's run comes, the other project's never does.
    expect(page.locator(f"tr[data-run='{ours}']")).to_be_visible(timeout=15000)
    expect(page.locator(f"tr[data-run='{ours}']")).to_contain_text("succeeded", timeout=30000)
    assert page.locator(f"tr[data-run='{theirs}']").count() == 0
    page.reload()  # and the list as loaded holds it neither
    expect(page.locator(f"tr[data-run='{ours}']")).to_be_visible(timeout=15000)
    assert page.locator(f"tr[data-run='{theirs}']").count() == 0
    page.close()
