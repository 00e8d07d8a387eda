"""The shell blocks of README.md, docs/ and kuberay/README.md, and what becomes of each: run by
a test as written, or an example for another machine (or for hours this suite cannot spend),
with the reason. tests/unit/test_docs_examples.py checks that every block is one or the other,
so a new block in the docs needs a decision here."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kuberay/README.md"]
SHELL = re.compile(r"^([ \t]*)```(?:bash|sh|shell)\n(.*?)^[ \t]*```", re.S | re.M)

# (file, the block's first line) -> the test that runs it as written.
RUN_HERE = {
    (
        "docs/api.md",
        'H="Authorization: Bearer $CICD_RAY_TOKEN"',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        "curl -s $CICD_RAY_URL/healthz",
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        "curl -s -X POST $CICD_RAY_URL/api/v1/runs -H \"$H\" -H 'Idempotency-Key: build-4711' \\",
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -s "$CICD_RAY_URL/api/v1/runs?state=failed&pipeline=hello&limit=20&offset=0" -H "$H"',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -sN "$CICD_RAY_URL/api/v1/runs/$RUN/steps/test%5Bpy%3D3.11%5D/log?'
        'follow=true" -H "$H"',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -s $CICD_RAY_URL/api/v1/workers -H "$H"',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -s $CICD_RAY_URL/api/v1/runs/$RUN/artifacts -H "$H"      # ?step=build '
        "for one step's",
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -s -X POST $CICD_RAY_URL/api/v1/runs/$RUN/steps/production/approve -H "$H" \\',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/api.md",
        'curl -s "$CICD_RAY_URL/api/v1/audit?limit=20" -H "$H"',
    ): "tests/integration/test_server.py::test_the_api_guide_s_commands_run_as_written",
    (
        "docs/operations.md",
        "cicd-ray gc --older-than 7d --dry-run   # would delete 12 run(s) "
        "with their logs, 3 source archive(s), ...",
    ): "tests/integration/test_cli.py::test_gc_deletes_finished_runs_and_their_logs",
}

# (file, the block's first line) -> why no test runs it as written, and what covers it.
EXAMPLES = {
    (
        "README.md",
        "./dev demo    # sets everything up, runs pipelines/hello.yaml on an embedded local Ray",
    ): "`./dev test` is what CI runs; `./dev demo` is set-up plus `cicd-ray run "
    "pipelines/hello.yaml` (test_cli)",
    (
        "README.md",
        "source .venv/bin/activate",
    ): "a synopsis: FILE, RUN_ID, STEP and [options] stand for a user's values; each command "
    "runs in test_cli or test_server",
    (
        "README.md",
        "cicd-ray up --port 8000            # a local Ray head, the master and the HTTP "
        "API; prints the",
    ): "port 8000 and a token shown once stand for a user's; test_server runs up, submit "
    "--follow, recommend, cost, gc and down on free ports",
    (
        "docs/api.md",
        "cicd-ray up --port 8000",
    ): "port 8000 stands for a user's; test_server runs up and down on free ports",
    (
        "docs/api.md",
        'curl -s -X POST $CICD_RAY_URL/api/v1/schedules -H "$H" -H \'Content-Type: '
        "application/json' \\",
    ): "a 2 a.m. schedule would wait for the night; test_schedules makes one of every 5 s "
    "through the same route, lists it (API and `cicd-ray schedules`) and deletes it",
    (
        "docs/api.md",
        'curl -N $CICD_RAY_URL/api/v1/events -H "$H"',
    ): "streams until interrupted; test_monitoring reads the stream, test_event_stream its format",
    (
        "docs/api.md",
        "export RAY_AUTH_MODE=token    # Ray 2.60 heads have token authentication "
        "on; the job CLI sends",
    ): "port 8265 stands for the dashboard's; test_server submits the same job to its own",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/dispatch.py        # --steps 500 --chain 50 "
        "--queued 10000 --slots 4 --repeats 3",
    ): "a benchmark: minutes of full load, run by hand for the figures it prints",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/http_api.py --runs 500 --clients 20   # and "
        "--clients 5; --runs 60 --clients 1",
    ): "a benchmark: minutes of full load, run by hand for the figures it prints",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/builds.py          # --artifact-mib 200 "
        "--reuse-steps 20 --cache-mib 100 --parts 1,2,3,4",
    ): "a benchmark: minutes of full load and downloads from PyPI, run by hand for the "
    "figures it prints",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/flow.py            # --runs 20 --repeats 3",
    ): "a benchmark on a cluster of its own, run by hand for the figures it prints; the "
    "behaviour it times is tested in test_flow",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/share.py           # --steps 1000 --step-s 0.2",
    ): "a benchmark on clusters of its own (a minute), run by hand for the figures it "
    "prints; fair share's order is tested in test_projects (unit)",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/autoscale.py --rounds 2",
    ): "a benchmark: minutes of full load, run by hand for the figures it prints",
    (
        "docs/benchmarks.md",
        ".venv/bin/python bench/source.py --mib 100 --runs 5",
    ): "a benchmark on a cluster of its own (half a minute of full load), run by hand for the "
    "figures it prints; a source's way to its steps is tested in test_api and test_runs",
    (
        "docs/operations.md",
        "cicd-ray up --local-autoscaling pools.yaml --node-idle-timeout 30",
    ): "pools.yaml stands for a user's; test_autoscaling runs `up --local-autoscaling`",
    (
        "docs/operations.md",
        "# on the head machine (Redis with AOF on, reachable from every node)",
    ): "another machine: a head and worker machines and a Redis named redis.internal; "
    "test_ha runs the same commands on one machine",
    (
        "docs/operations.md",
        "cicd-ray artifacts RUN_ID                      # step, path, bytes, sha256",
    ): "RUN_ID stands for a user's; test_cli runs `artifacts --step --download`, `explain` "
    "and `rerun --failed` on its own runs",
    (
        "docs/reliability.md",
        ".venv/bin/python bench/recovery.py --kills 5",
    ): "a benchmark: minutes of kills, run by hand for the figures it prints",
    (
        "docs/reliability.md",
        ".venv/bin/python bench/ha.py --rounds 3",
    ): "a benchmark: minutes of kills, run by hand for the figures it prints",
    (
        "docs/reliability.md",
        "./dev test -m chaos -s        # CHAOS_SEED=N picks another sequence of faults",
    ): "the chaos test is part of `./dev test`, which CI runs",
    (
        "kuberay/README.md",
        "helm repo add kuberay https://ray-project.github.io/kuberay-helm/",
    ): "another machine: a Kubernetes cluster (none here)",
    (
        "kuberay/README.md",
        "docker build -f kuberay/Dockerfile -t registry.example.com/cicd-ray:0.1.0 .",
    ): "another machine: a container engine and a registry (none here)",
    (
        "kuberay/README.md",
        "kubectl create secret generic cicd-ray-secrets \\",
    ): "another machine: a Kubernetes cluster (none here)",
    (
        "kuberay/README.md",
        "cicd-ray kuberay kuberay/pools.yaml --image registry.example.com/cicd-ray:0.1.0 \\",
    ): "kubectl needs a Kubernetes cluster; the generation half runs in test_kuberay (drift "
    "and --image)",
    (
        "kuberay/README.md",
        "kubectl port-forward svc/cicd-ray-serve-svc 8000:8000 &",
    ): "another machine: a Kubernetes cluster (none here)",
}


def shell_blocks() -> list[tuple[str, str, str]]:
    """(file, first line, text) of every shell block, the text dedented as a user copies it."""
    out = []
    for path in DOCS:
        for match in SHELL.finditer(path.read_text(encoding="utf-8")):
            text = textwrap.dedent(match.group(2))
            out.append((str(path.relative_to(ROOT)), text.splitlines()[0], text))
    return out


def block(file: str, first_line: str) -> str:
    """The text of one block, for the test that runs it."""
    [text] = [t for f, line, t in shell_blocks() if (f, line) == (file, first_line)]
    return text
