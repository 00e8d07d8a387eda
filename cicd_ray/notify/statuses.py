"""Commit statuses on the git host, pure: where a run's status goes (GitHub's and GitLab's
status APIs), the word each host uses for a run's state, the document and the headers. The
request is made by the outbox like a notification (recorded with the change it reports,
retried, at most once per try across restarts); a failure to report never fails the run.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from cicd_ray.triggers.repositories import RepoConfig

# A run's state as each host names it; None: the run was accepted (pending).
WORDS = {
    "github": {
        None: "pending",
        "succeeded": "success",
        "failed": "failure",
        "timed_out": "failure",
        "cancelled": "error",
    },
    "gitlab": {
        None: "pending",
        "succeeded": "success",
        "failed": "failed",
        "timed_out": "failed",
        "cancelled": "canceled",
    },
}


def target(repo: RepoConfig, commit: str) -> str:
    base = (repo.status_url or "").rstrip("/")
    if repo.provider == "github":
        return f"{base}/repos/{repo.name}/statuses/{commit}"
    return f"{base}/projects/{quote(repo.name, safe='')}/statuses/{commit}"


def word(provider: str, run_state: str | None) -> str:
    return WORDS[provider].get(run_state, "error" if provider == "github" else "failed")


def document(provider: str, state: str, run_id: str, pipeline: str, page_url: str) -> bytes:
    body = {
        "state": state,
        "target_url": page_url or None,
        "description": f"cicd-ray run {run_id}: {state}"[:140],
    }
    body["context" if provider == "github" else "name"] = f"cicd-ray/{pipeline}"
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def headers(provider: str, token: str) -> dict[str, str]:
    if provider == "github":
        return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"}
    return {"PRIVATE-TOKEN": token}
