"""Builds that carry state, each figure against its baseline measured in the same run, on one
embedded local cluster:

    python bench/builds.py [--artifact-mib 200] [--reuse-steps 20] [--cache-mib 100]
                           [--project python-dateutil==4.0.0] [--parts 1,2,3,4]

1. Handover: a step keeps a 200 MiB file as an artifact and the next step gets it, against
   `cp` of the same file on the same disk. The handover is the two attempts' time beyond what
   their scripts did themselves (each script times its own work).
2. Reuse: a 20-step pipeline whose steps all have `reuse: true`, run twice: the second run's
   wall time against the first's.
3. Cache: restoring a 100 MiB cache on a warm worker (the node's copy) against creating its
   content (1,600 files written by Python, as a build would), both timed inside the steps.
4. A real project's test suite: an open-source library's source distribution from the package
   registry, its dependencies installed once (a pip cache, `reuse: true`, handed over as
   artifacts), its tests split into four shards; the second run's wall time against the plain
   sequence a developer would type (venv, install, pytest) run as one step of the same
   cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import local_cluster

from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.pipeline.load import parse_pipeline

SECONDS = re.compile(r"^took ([0-9]+)e-3$", re.M)


class Bench:
    def __init__(self, settings: Settings, master, work: Path) -> None:
        self.settings, self.master, self.work = settings, master, work
        self.runner = RayRunner(master, settings)

    def run(self, doc: dict, source: Path | None = None, ok: bool = True):
        """(wall seconds from submission to the end, the final view)."""
        t0 = time.perf_counter()
        run_id = session.submit(
            self.master, parse_pipeline(doc), self.work, source, None, self.settings
        )
        view = follow_run(self.runner, run_id)
        took = time.perf_counter() - t0
        if ok and view.run.state.value != "succeeded":
            failed = [s for s in view.steps if s.state.value == "failed"]
            for s in failed:
                print(
                    f"--- {s.name}: {s.reason}\n"
                    + "\n".join(self.log(view, s.name).splitlines()[-30:])
                )
            raise SystemExit(f"benchmark run {run_id} ended {view.run.state.value}")
        return took, view

    def log(self, view, step: str) -> str:
        return self.runner.log(view.run.id, step, None, 0).data.decode()

    def timed(self, view, step: str) -> float:
        """What a step's script said it took (`took S` on a line of its own)."""
        return int(SECONDS.findall(self.log(view, step))[-1]) / 1000

    @staticmethod
    def duration(view, step: str) -> float:
        return next(a for a in reversed(view.attempts) if a.step == step).duration_s


def timing(body: str) -> str:
    """A script that says how long its own work took: `took MSe-3`."""
    return f't0=$(date +%s%N)\n{body}\necho "took $(( ($(date +%s%N) - t0) / 1000000 ))e-3"\n'


def handover(bench: Bench, mib: int, repeats: int = 3) -> None:
    doc = {
        "name": "bench-handover",
        "steps": [
            {
                "name": "make",
                "artifacts": ["big"],
                "run": timing(f"head -c {mib}M /dev/urandom > big"),
            },
            {"name": "take", "needs": ["make"], "run": timing("test -s big")},
        ],
    }
    bench.run(doc)  # warm-up: workers up
    src, copy = bench.work / "big", bench.work / "big.copy"
    subprocess.run(["head", "-c", f"{mib}M", "/dev/urandom"], stdout=src.open("wb"), check=True)
    keeps, places, cps = [], [], []
    for _ in range(repeats):  # each side starts with no dirty pages waiting for the disk
        os.sync()
        _, view = bench.run(doc)
        keeps.append(bench.duration(view, "make") - bench.timed(view, "make"))
        places.append(bench.duration(view, "take") - bench.timed(view, "take"))
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(copy)], check=True)
        cps.append(time.perf_counter() - t0)
        copy.unlink()
    src.unlink()
    keep_s, place_s, cp_s = (statistics.median(x) for x in (keeps, places, cps))
    total = keep_s + place_s
    print(
        f"1. handover of a {mib} MiB artifact (medians of {repeats}): kept in {keep_s:.2f} s "
        f"+ placed in {place_s:.2f} s = {total:.2f} s; cp of the same file {cp_s:.2f} s; "
        f"ratio {total / cp_s:.2f}"
    )


def reuse(bench: Bench, steps: int) -> None:
    layers = 4
    per_layer = steps // layers
    doc = {
        "name": "bench-reuse",
        "defaults": {"resources": {"cpu": 0.5, "memory_mb": 0}},
        "steps": [],
    }
    for layer in range(layers):
        for i in range(per_layer):
            needs = [f"l{layer - 1}s{j}" for j in range(per_layer)] if layer else []
            doc["steps"].append(
                {
                    "name": f"l{layer}s{i}",
                    "needs": needs,
                    "reuse": True,
                    "artifacts": ["out"],
                    "run": f"mkdir -p out; python3 -c 'sum(range(3_000_000))'; "
                    f"echo {layer}-{i} > out/l{layer}s{i}",
                }
            )
    first, _ = bench.run(doc)
    second, view = bench.run(doc)
    reused = sum(1 for s in view.steps if s.reused_from)
    print(
        f"2. {len(doc['steps'])} steps with reuse: true: first run {first:.2f} s, second run "
        f"{second:.2f} s ({reused} reused); ratio {second / first:.3f}"
    )


def cache(bench: Bench, mib: int) -> None:
    files = 1600
    size = mib * 2**20 // files
    make = (
        f"python3 -c \"import os, random\nos.makedirs('content', exist_ok=True)\n"
        f"for i in range({files}):\n"
        f"    open(f'content/f{{i}}', 'wb').write(random.randbytes({size}))\""
    )
    doc = {
        "name": "bench-cache",
        "steps": [
            {
                "name": "build",
                "cache": [{"key": "content-v1", "paths": ["content"]}],
                "run": timing(f"[ -d content ] || {make}"),
            }
        ],
    }
    _, cold = bench.run(doc)
    create_s = bench.timed(cold, "build")
    _, warm = bench.run(doc)
    use = next(a for a in reversed(warm.attempts) if a.step == "build").caches[0]
    assert use.result == "hit" and use.from_node, use
    restore_s = bench.duration(warm, "build") - bench.timed(warm, "build")
    save_s = bench.duration(cold, "build") - create_s
    print(
        f"3. a {mib} MiB cache ({files} files): created in {create_s:.2f} s (saved after in "
        f"{save_s:.2f} s), restored on a warm worker in {restore_s:.2f} s from its node's "
        f"copy; ratio {restore_s / create_s:.2f}"
    )


# The tests of the project that depend on this machine's time zone data, left out on both sides.
DESELECT = (
    "tests/test_tzfile.py::test_gettz_local_abbreviation_without_time_zone_data "
    "tests/test_tzpath_data.py::test_dst_matches_tzdata_zi "
    "tests/test_tz.py::test_gettz_link"
)
TEST_DEPS = "pytest pytest-cov hypothesis freezegun attrs"
SHARD_PLUGIN = """import os, zlib


def pytest_collection_modifyitems(config, items):
    n = int(os.environ["MATRIX_N"])
    keep = [zlib.crc32(i.nodeid.encode()) % 4 == n for i in items]
    config.hook.pytest_deselected(items=[i for i, k in zip(items, keep) if not k])
    items[:] = [i for i, k in zip(items, keep) if k]
"""


def project(bench: Bench, spec: str) -> None:
    src = bench.work / "project"
    download = bench.work / "sdist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(download),
            spec,
        ],
        check=True,
    )
    [archive] = list(download.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(download, filter="data")
    [unpacked] = [p for p in download.iterdir() if p.is_dir()]
    shutil.move(str(unpacked), src)
    deselect = " ".join(f"--deselect {t}" for t in DESELECT.split())
    pytest = f"python -m pytest -q -p no:cacheprovider {deselect}"
    plain = {
        "name": "bench-plain",
        "steps": [
            {
                "name": "plain",
                "resources": {"cpu": 2, "memory_mb": 0},
                "run": f"python3 -m venv .venv\n. .venv/bin/activate\npip install -q . "
                "{TEST_DEPS}\n"
                f"{pytest} tests",
            }
        ],
    }
    sharded = {
        "name": "bench-sharded",
        "steps": [
            {
                "name": "deps",
                "reuse": True,
                "artifacts": ["deps/**"],
                "cache": [
                    {
                        "key": "pip-${{ hashFiles('pyproject.toml', 'requirements-dev.txt') }}",
                        "paths": ["~/.cache/pip"],
                        "restore_keys": ["pip-"],
                    }
                ],
                "run": f"python3 -m pip install -q --target deps . {TEST_DEPS}",
            },
            {
                "name": "shard",
                "needs": ["deps"],
                "matrix": {"n": ["0", "1", "2", "3"]},
                "resources": {"cpu": 1, "memory_mb": 0},
                # Every fourth test by a digest of its id: shards of equal size whatever the files.
                "run": f"cat > shard.py <<'EOF'\n{SHARD_PLUGIN}EOF\n"
                f"PYTHONPATH=deps:. {pytest.replace('python -m', 'python3 -m')} -p shard "
                "tests",
            },
        ],
    }
    plain_s, plain_view = bench.run(plain, source=src)
    first_s, _ = bench.run(sharded, source=src)
    second_s, view = bench.run(sharded, source=src)
    counts = [
        re.findall(r"(\d+) passed", bench.log(view, s.name))
        for s in view.steps
        if s.name.startswith("shard")
    ]
    passed = sum(int(c[-1]) for c in counts if c)
    plain_passed = int(re.findall(r"(\d+) passed", bench.log(plain_view, "plain"))[-1])
    shards = ", ".join(
        f"{bench.duration(view, s.name):.1f}" for s in view.steps if s.name.startswith("shard")
    )
    print(
        f"4. {spec}: {plain_passed} tests passed in the plain sequence (venv, install, "
        f"pytest) in {plain_s:.1f} s; four shards ({passed} passed) with the dependencies "
        f"built once: first run {first_s:.1f} s, second run {second_s:.1f} s "
        f"(deps {'reused' if view.steps[0].reused_from else 'ran'}; shards {shards} s); "
        f"ratio second/plain {second_s / plain_s:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact-mib", type=int, default=200)
    parser.add_argument("--reuse-steps", type=int, default=20)
    parser.add_argument("--cache-mib", type=int, default=100)
    parser.add_argument("--project", default="python-dateutil==4.0.0")
    parser.add_argument("--parts", default="1,2,3,4", help="which of the four to run")
    args = parser.parse_args()

    with local_cluster() as (settings, master, work):
        bench = Bench(settings, master, work)
        parts = {
            "1": lambda: handover(bench, args.artifact_mib),
            "2": lambda: reuse(bench, args.reuse_steps),
            "3": lambda: cache(bench, args.cache_mib),
            "4": lambda: project(bench, args.project),
        }
        for part in args.parts.split(","):
            parts[part.strip()]()


if __name__ == "__main__":
    main()
