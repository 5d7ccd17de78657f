"""Kept inputs: a task whose payload names kept results of other tasks of its job (see
``protocol.KEPT_INPUTS_MAGIC``; dask graphs' intermediate values) gets them from the
server just before it runs, so they never pass through the session."""

from __future__ import annotations

import asyncio

import msgspec

from coffea_hq import messages as m
from coffea_hq import protocol
from coffea_hq.api import API
from coffea_hq.protocol import Outcome

from .slots import HeldTask, Result

MISSING_TYPE = "coffea_hq.errors.KeptInputMissing"


async def take_kept_inputs(api: API, batch: list[HeldTask]) -> tuple[list[HeldTask], list[Result]]:
    """The tasks of ``batch`` ready to run (a kept-inputs payload replaced by the one the
    task's function takes: ``protocol.with_kept_inputs``), and the failures of those whose
    inputs could not be fetched (gone with the job, or never kept), each naming the input."""
    ready: list[HeldTask] = []
    failed: list[Result] = []
    for item in batch:
        try:
            split = protocol.split_kept_inputs(item.payload)
            if split is None:
                ready.append(item)
                continue
            refs = msgspec.json.decode(split[0], type=m.KeptInputs)
        except (ValueError, msgspec.DecodeError) as e:
            failed.append(_failure(item, f"task {item.task}'s payload is malformed: {e}"))
            continue
        fetched = await asyncio.gather(
            *(api.kept_result(item.job, task) for task in refs.tasks), return_exceptions=True
        )
        for k, got in enumerate(fetched):
            if isinstance(got, BaseException):
                label = refs.labels[k] if k < len(refs.labels) else refs.tasks[k]
                why = getattr(got, "message", None) or str(got) or type(got).__name__
                failed.append(
                    _failure(
                        item,
                        f"input {label} of task {item.task} (the kept result of task "
                        f"{refs.tasks[k]} of job {item.job}) could not be fetched: {why}",
                    )
                )
                break
        else:
            results = dict(zip(refs.tasks, fetched, strict=True))
            item.payload = protocol.with_kept_inputs(split[1], results)  # type: ignore[arg-type]
            ready.append(item)
    return ready, failed


def _failure(item: HeldTask, message: str) -> Result:
    error = {"type": MISSING_TYPE, "message": message, "traceback": ""}
    return Result(item, Outcome.ERROR, error, b"", 0.0)
