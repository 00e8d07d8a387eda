"""How runs start without a person, pure: git hosts' webhooks (`githosts`), the repositories
allowed to send them (`repositories`), cron specs and their slots (`cron`).
"""
