"""The worker's boundary verdicts (worker.guarded_request.inspect_message), without a broker:
what a walletq task message may look like before it reaches the pool."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.boundary import check_object
from services.errors import InvalidCommandError
from services.message_policy import KEYS_TASK_NAME, TASK_NAME
from services.settings import load_settings
from worker.guarded_request import BODY_BYTES_MAX, inspect_message

SETTINGS = load_settings({})
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
COMMAND = {"type": "credit_wallet", "idempotency_key": "k-1", "user": "alice", "amount": "1.00",
           "producer": "p", "signature": "A" * 86}


def verdict(args: Any = None, *, body: bytes | None = None, task: str = TASK_NAME,
            content_type: str = "application/json", **headers: Any) -> str | None:
    raw = json.dumps([[COMMAND] if args is None else args, {}, EMBED]).encode() \
        if body is None else body
    return inspect_message(raw, {"task": task, "id": "i-1", "retries": 0, "eta": None,
                                 "timelimit": [None, None], **headers},
                           content_type, task, SETTINGS, NOW).reason


def test_a_plain_command_message_and_a_chunk_of_keys_go_on() -> None:
    assert verdict() is None
    assert verdict([["k-1", "k-2"]], task=KEYS_TASK_NAME) is None


def test_an_eta_is_refused_unless_it_is_a_retry_within_the_backoff() -> None:
    soon = (NOW + timedelta(seconds=SETTINGS.task_backoff_s_max)).isoformat()
    far = (NOW + timedelta(hours=1)).isoformat()
    assert "eta or countdown" in verdict(eta=soon)
    assert verdict(eta=soon, retries=1) is None  # Celery's own autoretry
    assert "WALLETQ_TASK_BACKOFF_S_MAX" in verdict(eta=far, retries=1)
    assert "ISO 8601" in verdict(eta="tomorrow", retries=1)


@pytest.mark.parametrize(("change", "reason"), [
    ({"body": b"[[{\"a\": 1, \"a\": 2}], {}, {}]"}, "appears twice"),
    ({"body": b"[" * 20 + b"]" * 20}, "more than 8 deep"),
    ({"body": b"x" * (BODY_BYTES_MAX + 1)}, f"at most {BODY_BYTES_MAX}"),
    ({"body": b"[[1.5], {}, {}]"}, "JSON object"),
    ({"args": [COMMAND, COMMAND]}, "one argument"),
    ({"args": ["{\"a\": 1, \"a\": 2}"]}, "appears twice"),
    ({"content_type": "application/x-python-serialize"}, "JSON only"),
    ({"compression": "application/x-gzip"}, "compressed"),
    ({"timelimit": [3600, None]}, "time limit"),
    ({"timelimit": "300"}, "time limit"),
    ({"stamps": json.loads("[" * 12 + "]" * 12)}, "headers"),
])
def test_what_is_not_a_plausible_command_message_is_refused_naming_why(
        change: dict[str, Any], reason: str) -> None:
    got = verdict(**change)
    assert got is not None and reason in got, got


def test_a_chunk_of_keys_must_be_one_list_of_keys() -> None:
    assert "list of 1 to" in verdict([["k" * 201]], task=KEYS_TASK_NAME)
    assert "list of 1 to" in verdict([[]], task=KEYS_TASK_NAME)


def test_the_deployments_own_time_limits_go_on_a_longer_one_does_not() -> None:
    # A message a worker publishes (the sweep) carries the task's configured limits.
    own = SETTINGS.task_time_limit_s
    assert verdict(timelimit=[own, own - 30]) is None
    assert verdict(timelimit=[None, None]) is None
    assert "WALLETQ_TASK_TIME_LIMIT_S" in verdict(timelimit=[own + 1, None])


def test_depth_is_read_from_the_text_without_being_fooled_by_strings_or_encodings() -> None:
    from services.boundary import decode_strict, text_depth_over
    from services.errors import InvalidCommandError

    assert not text_depth_over(b'{"a": "[[[[[[[[[[[[[[[[[[[[[["}', 2)
    assert not text_depth_over(b'["\\"[[[[\\\\"]', 1)
    assert text_depth_over(b'[{"a": [1, {"b": []}]}]', 4)
    assert not text_depth_over(b'[{"a": [1, {"b": []}]}]', 5)
    hidden = ("[" * 20 + "]" * 20).encode("utf-16")  # json.loads would take UTF-16 bytes
    with pytest.raises(InvalidCommandError, match="malformed JSON"):
        decode_strict(hidden)


_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=5), max_leaves=30)


def _compact_size(value: Any) -> int:
    """The compact JSON text's length, escapes not counted: what check_object bounds."""
    if isinstance(value, dict):
        return 1 + sum(len(k) + 4 + _compact_size(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + len(value) + sum(_compact_size(v) for v in value)
    return len(value) + 2 if isinstance(value, str) else 1


def _depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) \
        else None
    return 0 if children is None else 1 + max((_depth(c) for c in children), default=0)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.integers(1, 200), st.integers(1, 6))
def test_a_decoded_object_is_refused_exactly_when_too_big_or_too_deep(
        value: Any, bytes_max: int, depth_max: int) -> None:
    over = _compact_size(value) > bytes_max or _depth(value) > depth_max
    try:
        check_object(value, bytes_max=bytes_max, depth_max=depth_max)
    except InvalidCommandError:
        assert over
    else:
        assert not over
