"""Git hosts' webhooks, pure: the signature check (GitHub's `X-Hub-Signature-256`, an
HMAC-SHA256 of the raw body; GitLab's `X-Gitlab-Token`, the secret itself; both compared in
constant time), the names an event gives its repository, and what a push or a pull (merge)
request asks for: a run of which commit, on which branch. Other events start nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

ZERO = "0" * 40  # the commit a deleted branch's push points to


@dataclass(frozen=True)
class Trigger:
    event: str  # push, pull_request
    branch: str
    commit: str
    delivery: str  # the host's id of this delivery (a redelivery has the same)
    pr: int | None = None
    # A pull request from another repository (a fork): its run takes the pipeline file of
    # the base branch (`base_commit`, or else `base_branch`'s head), no secrets, saves no cache.
    fork: bool = False
    base_branch: str = ""
    base_commit: str = ""


def verified(provider: str, secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """Whether the delivery carries the repository's secret (GitHub: signs the body with it)."""
    if not secret:
        return False
    if provider == "github":
        given = headers.get("x-hub-signature-256", "")
        wanted = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given.encode(), wanted.encode())
    return hmac.compare_digest(headers.get("x-gitlab-token", "").encode(), secret.encode())


def repository_names(provider: str, payload: dict) -> list[str]:
    """The names the event gives its repository: the full name and the clone URLs."""
    repo = payload.get("repository") if provider == "github" else payload.get("project")
    if not isinstance(repo, dict):
        return []
    keys = (
        ("full_name", "clone_url", "ssh_url", "html_url")
        if provider == "github"
        else ("path_with_namespace", "git_http_url", "git_ssh_url", "web_url")
    )
    return [repo[k] for k in keys if isinstance(repo.get(k), str)]


def delivery_id(provider: str, headers: dict[str, str]) -> str:
    if provider == "github":
        return headers.get("x-github-delivery", "")
    return headers.get("x-gitlab-event-uuid", "") or headers.get("idempotency-key", "")


def trigger(provider: str, headers: dict[str, str], payload: dict) -> Trigger | str:
    """The run an event asks for, or why it asks for none."""
    kind = headers.get("x-github-event" if provider == "github" else "x-gitlab-event", "")
    delivery = delivery_id(provider, headers)
    if kind in ("push", "Push Hook"):
        ref = payload.get("ref") or ""
        commit = payload.get("after") or ""
        if not isinstance(ref, str) or not ref.startswith("refs/heads/"):
            return f"a push of {ref!r}, not of a branch"
        if not _sha(commit) or commit == ZERO:
            return "a push that deleted the branch"
        return Trigger("push", ref.removeprefix("refs/heads/"), commit, delivery)
    if kind == "pull_request":
        pr = payload.get("pull_request") or {}
        if payload.get("action") not in ("opened", "synchronize", "reopened"):
            return f"pull request action {payload.get('action')!r}"
        head, base = pr.get("head") or {}, pr.get("base") or {}
        head_repo = (head.get("repo") or {}).get("full_name")
        fork = head_repo is None or head_repo != (base.get("repo") or {}).get("full_name")
        return _request(
            head.get("sha"),
            head.get("ref"),
            payload.get("number"),
            delivery,
            fork,
            base.get("ref"),
            base.get("sha"),
        )
    if kind == "Merge Request Hook":
        attrs = payload.get("object_attributes") or {}
        if attrs.get("action") not in ("open", "update", "reopen"):
            return f"merge request action {attrs.get('action')!r}"
        last = attrs.get("last_commit") or {}
        fork = attrs.get("source_project_id") != attrs.get("target_project_id")
        return _request(
            last.get("id"),
            attrs.get("source_branch"),
            attrs.get("iid"),
            delivery,
            fork,
            attrs.get("target_branch"),
            None,
        )
    return f"event {kind or '(none)'!r}"


def _request(
    commit: object,
    branch: object,
    number: object,
    delivery: str,
    fork: bool,
    base_branch: object,
    base_commit: object,
) -> Trigger | str:
    if not _sha(commit) or not isinstance(branch, str) or not isinstance(number, int):
        return "a pull request event without its head commit, branch and number"
    if fork and not (_sha(base_commit) or (isinstance(base_branch, str) and base_branch)):
        return "a fork's pull request event without its base branch"
    return Trigger(
        "pull_request",
        branch,
        commit,
        delivery,
        number,
        fork,
        base_branch if isinstance(base_branch, str) else "",
        base_commit if _sha(base_commit) else "",
    )


def _sha(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value)
    )
