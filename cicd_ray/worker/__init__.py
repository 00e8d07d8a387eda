"""A worker: its Ray actor (`actor`) and what it does for a step: the execution of one attempt
(`execution`), the step's user, limits and clean-up (`isolation`), reading what a step touched
without following a link (`beneath`), the node's caches (`caches`) and the step's artifacts
(`artifacts`). Only `actor` imports Ray.
"""
