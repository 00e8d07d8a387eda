"""What a run's steps carry from one to the next and from run to run: the artifacts a step
is given, a success carried over into a re-run, a stored success reused. Pure: records in,
records out.
"""

from __future__ import annotations

from cicd_ray.records import ArtifactInput, AttemptRecord, Origin, ResultRecord, StepRecord
from cicd_ray.states import StepState, move


def carry(done: StepRecord, run_id: str, now: float) -> StepRecord:
    """A success of an earlier run, as a step of `run_id` that does not run again."""
    origin = done.carried_from or Origin(run_id=done.run_id, step=done.name, attempt=done.attempts)
    return StepRecord(
        run_id=run_id,
        spec=done.spec,
        project=done.project,
        state=StepState.SUCCEEDED,
        queued_at=now,
        started_at=now,
        finished_at=now,
        exit_code=done.exit_code,
        artifacts=done.artifacts,
        key=done.key,
        key_parts=done.key_parts,
        carried_from=origin,
        reason=f"carried over from run {origin.run_id}",
    )


def inputs_of(step: StepRecord, run_steps: dict[str, StepRecord]) -> list[ArtifactInput]:
    """The artifacts a step is given: those of each step it needs, in the order of its needs."""
    return [
        ArtifactInput(step=need, files=run_steps[need].artifacts)
        for need in step.spec.needs
        if run_steps[need].artifacts
    ]


def reused(step: StepRecord, found: ResultRecord, now: float) -> tuple[AttemptRecord, str]:
    """A running step's attempt that ran nothing, ended as the success it reuses (its
    artifacts linked), and the line its log gets."""
    origin = found.origin
    step.attempts += 1
    attempt = AttemptRecord(
        id=f"{step.run_id}/{step.name}/{step.attempts}",
        run_id=step.run_id,
        step=step.name,
        number=step.attempts,
        worker_id="",
        queued_at=step.queued_at,
        started_at=now,
        finished_at=now,
        exit_code=0,
        duration_s=0.0,
        artifacts=found.artifacts,
        reused_from=origin,
    )
    move(attempt, StepState.SUCCEEDED)
    step.current_attempt, step.started_at, step.exit_code = attempt.id, now, 0
    step.artifacts, step.reused_from = found.artifacts, origin
    note = (
        f"[cicd-ray] not run: reused the success of run {origin.run_id}, step "
        f"{origin.step}, attempt {origin.attempt} (same key {step.key[:16]})\n"
    )
    return attempt, note
