"""The master's actor: the Ray shell around the core (`main`), its chores (`chores`), the worker
actors it drives (`workers`) and its side of webhook and cron starts (`starts`). The only part
of `master/` that imports Ray.
"""

from cicd_ray.master.actor.main import Master, master_actor

__all__ = ["Master", "master_actor"]
