"""A step's log on its way out of the worker: masked (the secrets it was given never leave),
capped (CICD_RAY_LOG_CAP_BYTES, then one line saying so), and handed out in numbered chunks.
"""

from __future__ import annotations

from collections.abc import Callable

from cicd_ray.secrets import Masker


def truncation_marker(cap: int) -> bytes:
    return (
        f"\n[cicd-ray] log truncated: the step printed more than {cap} bytes; "
        "the rest was discarded\n"
    ).encode()


class LogBuffer:
    """Collects output up to the cap and hands it out in numbered chunks (one thread uses it)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self._pending = bytearray()
        self._seq = 0

    def add(self, data: bytes) -> None:
        if self.truncated:
            return
        room = self.cap - self.size
        if len(data) > room:
            data = data[:room] + truncation_marker(self.cap)
            self.truncated = True
        self._pending += data
        self.size += len(data)

    def take(self) -> tuple[int, bytes] | None:
        if not self._pending:
            return None
        self._seq += 1
        chunk, self._pending = bytes(self._pending), bytearray()
        return self._seq, chunk


class StepLog:
    """What a step printed and what cicd-ray says about it, one stream, masked then capped."""

    def __init__(self, cap: int, on_log: Callable[[int, bytes], None]) -> None:
        self._buffer = LogBuffer(cap)
        self._masker = Masker([])  # the step's secrets, once read
        self.on_log = on_log

    def learn(self, secrets: list[str]) -> None:
        """The values to mask from now on (before anything is logged)."""
        self._masker = Masker(secrets)

    def output(self, data: bytes) -> None:
        """Bytes the step printed (a secret split across two reads is still masked)."""
        self._buffer.add(self._masker.feed(data))

    def note(self, text: str) -> None:
        """A line of cicd-ray's own, after what the step printed so far (held back by the
        masker or not), and masked too (an error may quote what the step was given)."""
        m = self._masker
        self._buffer.add(m.flush() + m.feed(text.encode()) + m.flush())

    def flush(self) -> None:
        """Hand out what is collected, as the next chunk."""
        chunk = self._buffer.take()
        if chunk is not None:
            self.on_log(*chunk)

    def tail(self) -> tuple[int, bytes] | None:
        """The last chunk, which goes with the outcome (nothing is held back any more)."""
        self._buffer.add(self._masker.flush())
        return self._buffer.take()

    def masked(self, text: str) -> str:
        """`text` (a reason, a file's name) with the step's secrets masked."""
        return self._masker.text(text)
