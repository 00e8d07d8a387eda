"""The master: the pure core (`core`: store, clock, scheduler, commit), its Ray actor
(`actor`), the admission of a submission (`admission`), the runs started by webhooks and cron
slots (`starts`, `crontable`), the events clients follow (`events`), the metrics (`metrics`),
the outbox of notifications (`outbox`) and the log budget (`logbudget`). Only `actor` imports
Ray.
"""
