"""``CallerInputs``: when a caller hears that its inputs in its arena are free again."""

from __future__ import annotations

from shoal.server.callerinputs import CallerInputs


def _inputs() -> tuple[CallerInputs, list[str]]:
    said: list[str] = []
    return CallerInputs(lambda: said.append("inputs_free")), said


def test_answer_after_the_reader_is_done_needs_no_second_word() -> None:
    inputs, said = _inputs()
    lease = inputs.lease()
    lease.hold()  # a worker reads
    lease.drop()  # ... and is done
    assert inputs.answered() is False
    inputs.never_ran()
    assert said == []


def test_answer_while_a_reader_is_left_then_inputs_free() -> None:
    inputs, said = _inputs()
    lease = inputs.lease()
    lease.hold()
    assert inputs.answered() is True  # the final reply says inputs_held
    assert said == []
    lease.drop()
    assert said == ["inputs_free"]
    inputs.never_ran()
    assert said == ["inputs_free"]


def test_cancelled_call_frees_once_no_worker_reads() -> None:
    inputs, said = _inputs()
    lease = inputs.lease()
    lease.hold()
    inputs.cancelled()
    assert said == []
    lease.drop()
    assert said == ["inputs_free"]
    inputs.never_ran()
    assert said == ["inputs_free"]


def test_cancelled_before_it_started() -> None:
    inputs, said = _inputs()
    inputs.never_ran()
    assert said == ["inputs_free"]


def test_call_without_arena_inputs_says_nothing() -> None:
    inputs, said = _inputs()
    assert inputs.answered() is False
    inputs.cancelled()
    inputs.never_ran()
    assert said == []
