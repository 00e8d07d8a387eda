"""What the benchmarks of builds and flow control share: one embedded local cluster with a
pool of 2 workers x 2 CPUs, its home a fresh folder under /var/tmp (steps run as users of
their own, who may enter it), removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.pools import PoolConfig


@contextmanager
def local_cluster(**settings_of: object) -> Iterator[tuple[Settings, object, Path]]:
    """(settings, the master, a folder for the pipelines' files) of a cluster started here;
    `settings_of`: settings other than the defaults."""
    home = Path(tempfile.mkdtemp(prefix="cicd-bench-", dir="/var/tmp"))
    home.chmod(0o755)
    settings = Settings(
        home=home,
        pools={"default": PoolConfig(name="default", workers=2, cpus=2, memory_mb=4096)},
        **settings_of,
    )
    session.connect(settings=settings, num_cpus=4)
    master = session.ensure_master(settings)
    work = home / "bench"
    work.mkdir()
    try:
        yield settings, master, work
    finally:
        session.shutdown_embedded(master)
        shutil.rmtree(home, ignore_errors=True)
