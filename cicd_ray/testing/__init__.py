"""What tests and benchmarks share: the inline driver, which runs the master's core and the
executor in one process until idle (`inline`).
"""
