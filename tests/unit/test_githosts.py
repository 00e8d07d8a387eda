"""Git hosts' webhooks, the pure parts: signatures (good, bad, missing, replayed), the events
that start a run and those that do not, the repositories file, commit statuses' words."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cicd_ray.errors import SpecError
from cicd_ray.master.admission import hook_key
from cicd_ray.notify import statuses
from cicd_ray.triggers.githosts import Trigger, repository_names, trigger, verified
from cicd_ray.triggers.repositories import RepoConfig, find, load_repos

SECRET = "hook-secret-value"
SHA = "a" * 40
REPO = RepoConfig(
    name="acme/web-app",
    url="https://github.com/acme/web-app.git",
    provider="github",
    project="web",
    webhook_secret="HOOK",
    branches=["main", "release/*"],
    status_url="https://api.github.com",
    status_token="TOKEN",
)


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "x-hub-signature-256": "sha256="
        + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    }


def test_github_signatures_good_bad_and_missing():
    body = b'{"ref": "refs/heads/main"}'
    assert verified("github", SECRET, body, signed(body))
    assert not verified("github", SECRET, body, signed(body, "another-secret"))
    assert not verified("github", SECRET, body + b" ", signed(body))  # the body changed
    assert not verified("github", SECRET, body, {})
    assert not verified("github", SECRET, body, {"x-hub-signature-256": "sha256="})
    assert not verified("github", "", body, signed(body, ""))  # no secret: nothing verifies


def test_gitlab_tokens_good_bad_and_missing():
    assert verified("gitlab", SECRET, b"{}", {"x-gitlab-token": SECRET})
    assert not verified("gitlab", SECRET, b"{}", {"x-gitlab-token": SECRET + "x"})
    assert not verified("gitlab", SECRET, b"{}", {})


def test_a_replayed_delivery_has_the_key_of_the_first():
    """Issue 24, item 14: a replay carries a valid signature; what it asks for (repository,
    event, branch, commit), not its delivery id, makes it start nothing new."""
    first = Trigger("push", "main", SHA, "delivery-1")
    assert hook_key(REPO, first) == hook_key(REPO, Trigger("push", "main", SHA, "delivery-1"))
    assert hook_key(REPO, first) == hook_key(REPO, Trigger("push", "main", SHA, "delivery-2"))
    assert hook_key(REPO, first) == hook_key(REPO, Trigger("push", "main", SHA, ""))
    other = REPO.model_copy(update={"name": "acme/api"})
    assert hook_key(other, first) != hook_key(REPO, first)
    assert hook_key(REPO, first) != hook_key(REPO, Trigger("push", "main", "b" * 40, "d"))
    assert hook_key(REPO, first) != hook_key(REPO, Trigger("push", "dev", SHA, "d"))


@pytest.mark.parametrize(
    "provider, headers, payload, wanted",
    [
        (
            "github",
            {"x-github-event": "push", "x-github-delivery": "d1"},
            {"ref": "refs/heads/main", "after": SHA},
            Trigger("push", "main", SHA, "d1"),
        ),
        (
            "github",
            {"x-github-event": "push"},
            {"ref": "refs/tags/v1", "after": SHA},
            "a push of 'refs/tags/v1', not of a branch",
        ),
        (
            "github",
            {"x-github-event": "push"},
            {"ref": "refs/heads/main", "after": "0" * 40},
            "a push that deleted the branch",
        ),
        (
            "github",
            {"x-github-event": "pull_request", "x-github-delivery": "d2"},
            {
                "action": "synchronize",
                "number": 7,
                "pull_request": {
                    "head": {"sha": SHA, "ref": "feature", "repo": {"full_name": "a/b"}},
                    "base": {"sha": "b" * 40, "ref": "main", "repo": {"full_name": "a/b"}},
                },
            },
            Trigger("pull_request", "feature", SHA, "d2", 7, False, "main", "b" * 40),
        ),
        # Issue 24, item 11: a pull request from a fork is marked, with its base.
        (
            "github",
            {"x-github-event": "pull_request", "x-github-delivery": "d3"},
            {
                "action": "opened",
                "number": 8,
                "pull_request": {
                    "head": {"sha": SHA, "ref": "main", "repo": {"full_name": "evil/b"}},
                    "base": {"sha": "b" * 40, "ref": "main", "repo": {"full_name": "a/b"}},
                },
            },
            Trigger("pull_request", "main", SHA, "d3", 8, True, "main", "b" * 40),
        ),
        (
            "gitlab",
            {"x-gitlab-event": "Merge Request Hook", "x-gitlab-event-uuid": "g3"},
            {
                "object_attributes": {
                    "action": "open",
                    "iid": 4,
                    "source_branch": "fix",
                    "target_branch": "main",
                    "source_project_id": 9,
                    "target_project_id": 1,
                    "last_commit": {"id": SHA},
                }
            },
            Trigger("pull_request", "fix", SHA, "g3", 4, True, "main", ""),
        ),
        (
            "github",
            {"x-github-event": "pull_request"},
            {"action": "closed", "number": 7},
            "pull request action 'closed'",
        ),
        ("github", {"x-github-event": "ping"}, {}, "event 'ping'"),
        (
            "gitlab",
            {"x-gitlab-event": "Push Hook", "x-gitlab-event-uuid": "g1"},
            {"ref": "refs/heads/main", "after": SHA},
            Trigger("push", "main", SHA, "g1"),
        ),
        (
            "gitlab",
            {"x-gitlab-event": "Merge Request Hook", "x-gitlab-event-uuid": "g2"},
            {
                "object_attributes": {
                    "action": "open",
                    "iid": 3,
                    "source_branch": "fix",
                    "last_commit": {"id": SHA},
                }
            },
            Trigger("pull_request", "fix", SHA, "g2", 3, False, "", ""),
        ),
        (
            "gitlab",
            {"x-gitlab-event": "Merge Request Hook"},
            {"object_attributes": {"action": "open", "iid": 3}},
            "a pull request event without its head commit, branch and number",
        ),
        ("gitlab", {"x-gitlab-event": "Issue Hook"}, {}, "event 'Issue Hook'"),
    ],
)
def test_which_events_start_a_run(provider, headers, payload, wanted):
    assert trigger(provider, headers, payload) == wanted


def test_an_event_finds_its_repository_by_full_name_or_clone_url():
    repos = {REPO.name: REPO}
    names = repository_names(
        "github",
        {
            "repository": {
                "full_name": "Acme/Web-App",
                "clone_url": "https://github.com/acme/web-app.git",
            }
        },
    )
    assert find(repos, "github", names) is REPO
    assert find(repos, "github", ["https://github.com/acme/web-app"]) is REPO
    assert find(repos, "gitlab", names) is None  # another provider's
    assert find(repos, "github", ["acme/other"]) is None
    assert repository_names("gitlab", {"project": {"path_with_namespace": "g/p"}}) == ["g/p"]
    assert REPO.builds("main") and REPO.builds("release/1.2") and not REPO.builds("feature")


def test_the_repositories_file_loads_and_bad_ones_are_named(tmp_path):
    f = tmp_path / "repos.yaml"
    f.write_text(
        "repositories:\n  - {name: acme/x, url: 'https://h/acme/x.git', "
        "provider: github, webhook_secret: HOOK}\n"
    )
    repo = load_repos(f)["acme/x"]
    assert (repo.project, repo.pipeline, repo.branches) == ("default", ".cicd-ray.yaml", ["*"])
    for bad, message in [
        ("{name: a, url: u, provider: bitbucket, webhook_secret: H}", "provider"),
        (
            "{name: a, url: u, provider: github, webhook_secret: H, pipeline: ../x.yaml}",
            "without . or ..",
        ),
        (
            "{name: a, url: u, provider: github, webhook_secret: H, status_url: 'https://api'}",
            "status_url and status_token go together",
        ),
        ("{name: a, url: u, provider: github}", "webhook_secret"),
    ]:
        f.write_text(f"repositories:\n  - {bad}\n")
        with pytest.raises(SpecError, match=message):
            load_repos(f)


def test_commit_statuses_in_each_host_s_words():
    assert statuses.target(REPO, SHA) == f"https://api.github.com/repos/acme/web-app/statuses/{SHA}"
    lab = REPO.model_copy(update={"provider": "gitlab", "status_url": "https://gl/api/v4"})
    assert statuses.target(lab, SHA) == f"https://gl/api/v4/projects/acme%2Fweb-app/statuses/{SHA}"
    assert [statuses.word("github", s) for s in (None, "succeeded", "failed", "cancelled")] == [
        "pending",
        "success",
        "failure",
        "error",
    ]
    assert [statuses.word("gitlab", s) for s in (None, "succeeded", "failed", "cancelled")] == [
        "pending",
        "success",
        "failed",
        "canceled",
    ]
    assert statuses.headers("gitlab", "tok") == {"PRIVATE-TOKEN": "tok"}


def test_a_webhook_run_s_statuses_are_recorded_with_its_start_and_its_end(tmp_path):
    from cicd_ray.config import Settings
    from cicd_ray.master.core import MasterCore
    from cicd_ray.records import Caller
    from cicd_ray.store.memory import MemoryStore

    core = MasterCore(
        Settings(home=tmp_path, repos={REPO.name: REPO}), MemoryStore(), clock=lambda: 1000.0
    )
    hook = Trigger("pull_request", "feature", SHA, "d1", 7)
    planned = core.starts.plan_trigger(
        REPO, hook, "name: p\nsteps:\n  - {name: a, run: 'true'}\n", "k1"
    )
    run_id = core.submissions.accept(
        planned, None, "k1", None, Caller(project="web", admin=False)
    ).run_id
    run = core.store.get_run(run_id)
    assert (run.commit, run.branch, run.event, run.pr, run.project, run.repo) == (
        SHA,
        "feature",
        "pull_request",
        7,
        "web",
        "acme/web-app",
    )
    assert run.source_git.ref == SHA and run.source_git.git == REPO.url
    [start] = core.store.get_deliveries(run_id)
    assert (start.kind, start.status, start.state) == ("status", "pending", "pending")
    assert start.url == f"https://api.github.com/repos/acme/web-app/statuses/{SHA}"
    core.cancel(run_id)  # ended before the pending status went: its end is reported instead
    by_id = {d.id: d for d in core.store.get_deliveries(run_id)}
    assert by_id[f"{run_id}/status-start"].state == "failed"
    assert (by_id[f"{run_id}/status-end"].status, by_id[f"{run_id}/status-end"].state) == (
        "error",
        "pending",
    )
    bad = core.starts.plan_trigger(REPO, hook, "name: p\nsteps: [{name: a, tiemout: 3}]\n", "k2")
    assert bad.problems[0].startswith(".cicd-ray.yaml: steps[0] (a)")


def test_the_webhook_route_refuses_bad_and_hostile_bodies_at_once():
    import json
    import time

    from tests.builders import call

    hook = "/api/v1/hooks/github/acme/web-app"
    t0 = time.monotonic()
    for body in (b"[" * 1020, b"not json", b"[1, 2]"):  # unsigned: refused before parsing
        assert call(hook, "POST", body=body)[0] == 401
    assert time.monotonic() - t0 < 1
    assert call(hook, "POST", body=b"{" + b" " * 2000 + b"}")[0] == 413  # over the body limit
    status, _, body, _ = call(
        "/api/v1/hooks/github/acme/unknown",
        "POST",
        body=json.dumps({"repository": {"full_name": "acme/unknown"}}).encode(),
    )
    assert status == 401 and "acme/unknown" not in json.loads(body)["detail"]  # not told
    status, _, body, _ = call("/api/v1/hooks/github", "POST", body=b"{}")
    assert status == 410 and "/api/v1/hooks/github/OWNER/REPO" in json.loads(body)["detail"]


def test_open_paths_stay_open_behind_a_route_prefix():
    """Issue 24, item 26: behind Serve's `route_prefix` the paths arrive with the prefix
    (`root_path`); the health probe and the webhooks stay open, the rest still needs a token."""
    import asyncio

    from cicd_ray import tokens
    from cicd_ray.api.application import create_app

    app = create_app(grants=[tokens.Grant(digest=tokens.digest("t" * 40))], max_body_bytes=1024)

    def status(path: str) -> tuple[int, bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST" if "hooks" in path else "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "/cicd",
            "query_string": b"",
            "headers": [(b"content-length", b"2")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        asyncio.run(app(scope, receive, send))
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return next(m for m in sent if m["type"] == "http.response.start")["status"], body

    code, body = status("/cicd/api/v1/hooks/github/acme/web-app")
    assert code == 401 and b"signature" in body  # the route's own answer, not the door's
    code, body = status("/cicd/api/v1/runs")
    assert code == 401 and b"token" in body
    assert status("/cicd/healthz")[0] != 401


def test_an_unsigned_20_mb_body_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """Issue 24, item 10: the repository is in the URL, so its secret is known first; the
    body is verified as raw bytes and never parsed unsigned (it was, at 27x its size)."""
    import asyncio
    import json
    import time

    from cicd_ray import tokens
    from cicd_ray.api import hooks
    from cicd_ray.api.application import create_app

    (tmp_path / "secrets" / "web").mkdir(parents=True)
    (tmp_path / "secrets" / "web" / "HOOK").write_text(SECRET)
    (tmp_path / "repos.yaml").write_text(
        "repositories:\n  - {name: acme/web-app, url: 'https://github.com/acme/web-app.git', "
        "provider: github, project: web, webhook_secret: HOOK}\n"
    )
    for name, value in {
        "CICD_RAY_HOME": tmp_path / "home",
        "CICD_RAY_REPOS": tmp_path / "repos.yaml",
        "CICD_RAY_SECRETS_DIR": tmp_path / "secrets",
    }.items():
        monkeypatch.setenv(name, str(value))
    parsed, real_loads = [], json.loads
    monkeypatch.setattr(hooks.json, "loads", lambda b: parsed.append(len(b)) or real_loads(b))
    app = create_app(
        grants=[tokens.Grant(digest=tokens.digest("t" * 40))], max_body_bytes=64 * 2**20
    )

    def post(path: str, body: bytes, headers: dict[str, str]) -> int:
        sent: list[dict] = []
        chunks = [body[i : i + 2**20] for i in range(0, len(body), 2**20)] or [b""]

        async def receive():
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": [*raw, (b"content-length", str(len(body)).encode())],
        }
        asyncio.run(app(scope, receive, send))
        return next(m for m in sent if m["type"] == "http.response.start")["status"]

    hook = "/api/v1/hooks/github/acme/web-app"
    huge = b'{"a": [' + b"[1]," * (5 * 2**20) + b"1]}"  # 20 MiB
    t0 = time.monotonic()
    assert post(hook, huge, {"x-github-event": "push"}) == 401
    assert time.monotonic() - t0 < 1 and parsed == []
    assert post(hook, b" " * (hooks.HOOK_MAX_BYTES + 1), {}) == 413
    small = json.dumps({"zen": "hi", "repository": {"full_name": "acme/web-app"}}).encode()
    assert post(hook, small, {"x-github-event": "ping", **signed(small)}) == 202
    assert parsed == [len(small)]  # the signed one, and only it, was parsed


def test_a_fork_s_pull_request_follows_the_base_pipeline_with_no_secrets(tmp_path):
    """Issue 24, item 11: the fork's own pipeline file is never read (the base branch's is),
    its run is marked `fork`, and its steps get none of the project's secrets."""
    import subprocess

    from cicd_ray.config import Settings
    from cicd_ray.master.starts import pipeline_file
    from cicd_ray.pools import PoolConfig
    from cicd_ray.reads.runs import run_view
    from cicd_ray.records import Caller
    from tests.builders import make

    def git(*args, cwd):
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()

    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / ".cicd-ray.yaml").write_text(
        "name: base\nsteps:\n  - {name: a, run: 'echo key=$KEY', secrets: [KEY]}\n"
    )
    git("add", ".", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base", cwd=work)
    base = git("rev-parse", "HEAD", cwd=work)
    (work / ".cicd-ray.yaml").write_text("name: evil\nsteps:\n  - {name: a, run: 'env'}\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "fork", cwd=work)
    head = git("rev-parse", "HEAD", cwd=work)
    (tmp_path / "secrets" / "web").mkdir(parents=True)
    (tmp_path / "secrets" / "web" / "KEY").write_text("the-project-key")
    repo = REPO.model_copy(update={"url": f"file://{work}", "pipeline": ".cicd-ray.yaml"})
    settings = Settings(
        home=tmp_path / "home",
        repos={repo.name: repo},
        secrets_dir=tmp_path / "secrets",
        pools={"default": PoolConfig(name="default", workers=1, cpus=2)},
    )
    hook = Trigger("pull_request", "main", head, "d9", 8, True, "main", base)
    text = pipeline_file(repo, hook, settings.max_pipeline_bytes)
    assert "name: base" in text  # the base branch's file, not the fork's
    core, driver = make(settings)
    planned = core.starts.plan_trigger(repo, hook, text, "k9")
    answer = core.submissions.accept(planned, None, "k9", None, Caller(project="web", admin=False))
    assert not planned.problems, planned.problems
    assert core.store.get_run(answer.run_id).fork
    driver.run_until_idle()
    view = run_view(core.store, answer.run_id)
    assert view.run.state == "succeeded"
    attempt = view.attempts[-1]
    log = core.store.read_log(attempt.id).decode()
    assert "the-project-key" not in log and "key=\n" in log
    assert "a pull request from a fork gets no secrets: KEY not set" in log


def test_a_step_cannot_list_the_control_plane_s_secrets(tmp_path):
    """Issue 24, item 19: a repository's webhook secret and status token were ordinary
    project secrets: any step of the project could list them (and forge deliveries)."""
    from cicd_ray.config import Settings
    from cicd_ray.master.core import MasterCore
    from cicd_ray.protocol import Rejected
    from cicd_ray.store.memory import MemoryStore

    (tmp_path / "secrets" / "web").mkdir(parents=True)
    for name in ("HOOK", "TOKEN", "DEPLOY_KEY"):
        (tmp_path / "secrets" / "web" / name).write_text(f"{name.lower()}-value-123")
    core = MasterCore(
        Settings(home=tmp_path, repos={REPO.name: REPO}, secrets_dir=tmp_path / "secrets"),
        MemoryStore(),
        clock=lambda: 1000.0,
    )
    answer = core.submit(
        {
            "name": "p",
            "steps": [
                {"name": "leak", "run": "echo $HOOK $TOKEN", "secrets": ["HOOK", "TOKEN"]},
                {"name": "fine", "run": "true", "secrets": ["DEPLOY_KEY"]},
            ],
        },
        project="web",
    )
    assert isinstance(answer, Rejected)
    assert answer.problems == [
        "steps[leak].secrets: HOOK is the webhook secret of repository acme/web-app: the "
        "control plane's, never a step's",
        "steps[leak].secrets: TOKEN is the status token of repository acme/web-app: the "
        "control plane's, never a step's",
    ]
    assert core.store.list_runs() == []
    fine = core.submit(
        {"name": "p", "steps": [{"name": "fine", "run": "true", "secrets": ["DEPLOY_KEY"]}]},
        project="web",
    )
    assert not isinstance(fine, Rejected)
