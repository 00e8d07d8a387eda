"""The read side: what people and scripts read of what was recorded, pure (records in, answers
out): why a step ran (`explain`), what steps used and workers cost (`usage`), a run's artifacts
(`artifacts`).
"""
