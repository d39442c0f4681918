import pickle

import pytest

from inference import errors


@pytest.mark.parametrize(
    "exc",
    [
        errors.ConfigError("bad"),
        errors.InputError("no JSON", line=7, source="in.jsonl"),
        errors.QueueError("refused"),
        errors.StorageError("disk full"),
        errors.TransientError("oom", code="out_of_memory"),
        errors.PermanentError("too long", code="context_length_exceeded"),
        errors.EngineFatalError("engine dead"),
        errors.OutputError("cannot write"),
        errors.WorkerError("writer thread failed"),
    ],
)
def test_errors_survive_pickling_across_processes(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_item_errors_carry_kind_and_code() -> None:
    assert errors.TransientError("x", "c").kind == "transient"
    err = pickle.loads(pickle.dumps(errors.PermanentError("x", "too_long")))
    assert (err.kind, err.code, err.message) == ("permanent", "too_long", "x")


def test_input_error_names_the_line() -> None:
    assert str(errors.InputError("invalid JSON", line=3, source="a.jsonl")) == (
        "a.jsonl:line 3: invalid JSON"
    )
