"""Secrets never reach a record: keys that look secret, and values shaped like secrets."""

from __future__ import annotations

import pytest

from emp_machine.telemetry.redact import REDACTED, redact_fields, redact_text


@pytest.mark.parametrize("text, secret", [
    ("calling with Authorization: Bearer abcdef1234567890", "abcdef1234567890"),
    ('curl -H "Authorization: Basic dXNlcjpwYXNzd29yZA=="', "dXNlcjpwYXNzd29yZA=="),
    ("openai key sk-proj-AbCdEf0123456789 rejected", "AbCdEf0123456789"),
    ("connect password=hunter2! to db", "hunter2!"),
    ('{"api_key": "k-12345678"}', "k-12345678"),
    ("redis://user:s3cretpw@host:6379/0", "s3cretpw"),
    ("token: abcdef0123", "abcdef0123"),
    # any scheme after an Authorization key: the scheme word stays, the credential goes
    ("Authorization: Token abcdef123456", "abcdef123456"),
    ("authorization=Digest username_and_response_0123", "username_and_response_0123"),
    # well-known key formats, wherever they stand
    ("HF said 401 for hf_AbCdEfGhIjKlMnOpQrStUv", "AbCdEfGhIjKlMnOpQrStUv"),
    ("clone with ghp_0123456789abcdefABCDEF0123", "0123456789abcdefABCDEF0123"),
    ("replicate r8_AbCdEf0123456789 refused", "AbCdEf0123456789"),
    ("aws key AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
    ("maps key AIzaSyA-1234567890abcdefghijklmnopqrstu invalid", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    # a secret word inside a longer key name
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("X-Api-Key: abcdef12345", "abcdef12345"),
    ("DB_PASSWORD=Hunter2XY", "Hunter2XY"),
    # a character whose lowercase is longer than itself (the shapes then run on the text, ignoring case)
    ("\u0130stanbul Bearer ABCDEFGHIJKL", "ABCDEFGHIJKL"),
])
def test_secret_values_in_text_are_replaced(text, secret):
    redacted = redact_text(text)
    assert secret not in redacted
    assert REDACTED in redacted


def test_ordinary_text_is_left_alone():
    for text in ["job 12 finished in 3.2 s", "used 1500 tokens", "KSampler 45% 9/20", "tokens=5 total",
                 "max_tokens: 4096 exceeds the limit", "sampling through the night", "Asia region",
                 "GET http://127.0.0.1:8188/history/abc 200", "token_count=12", "the key frames"]:
        assert redact_text(text) == text


def test_secret_keys_are_redacted_at_any_depth_but_token_counts_are_not():
    fields = redact_fields({
        "api_key": "abc", "OPENAI_API_KEY": "sk-x", "password": "p", "Authorization": "Bearer x",
        "headers": {"X-Api-Token": "t", "accept": "json"},
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "model": "gpt-4o",
        "message": "retry with sk-abcdefgh12345678",
    })
    assert fields["api_key"] == fields["OPENAI_API_KEY"] == fields["password"] == REDACTED
    assert fields["Authorization"] == REDACTED
    assert fields["headers"] == {"X-Api-Token": REDACTED, "accept": "json"}
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["total_tokens"]) == (10, 5, 15)
    assert fields["model"] == "gpt-4o"
    assert "abcdefgh12345678" not in fields["message"]


def test_a_key_naming_tokens_is_secret_unless_it_holds_a_count_or_a_structure():
    fields = redact_fields({
        "access_tokens": "at-123", "secret_tokens": "st-123", "session_tokens": ["s1", "s2"], "token": "zzz",
        "refresh_token": "rrr", "id_token": 12345,  # id_token holds a JWT whatever its type: always secret
        "token_usage": {"prompt_tokens": 3, "total_tokens": 5, "api_key": "k"},  # OpenAI's usage, kept
        "tokens_per_second": 12.5, "max_tokens": "1024",
    })
    assert all(fields[k] == REDACTED for k in ("access_tokens", "secret_tokens", "session_tokens", "token",
                                               "refresh_token", "id_token"))
    assert fields["token_usage"] == {"prompt_tokens": 3, "total_tokens": 5, "api_key": REDACTED}
    assert (fields["tokens_per_second"], fields["max_tokens"]) == (12.5, "1024")


def test_json_lines_encode_as_the_stdlib_encoder_does():
    # logs.py calls the C encoder directly; its output must be what json.JSONEncoder(...).encode gives.
    import json
    import math

    from emp_machine.telemetry.logs import _dumps

    class Odd:
        def __str__(self) -> str:
            return "odd\u00e9"

    stdlib = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode
    samples = [{}, {"a": 1, "b": 2.5, "c": None, "d": True, "e": "caf\u00e9 \"q\" \n\t\u2603"},
               {"nested": {"list": [1, "x", {"y": [math.inf, -math.inf]}]}, "obj": Odd(), "nan": math.nan},
               {"big": 10**30, "neg": -0.0, "tuple": (1, 2)}]
    for sample in samples:
        assert _dumps(sample) == stdlib(sample)
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        _dumps(loop)  # a cycle is reported, as the stdlib does, rather than recursing


def test_remembered_clean_values_never_let_a_secret_through():
    from emp_machine.telemetry import redact

    clean = {"event_type": "job.completed", "status": "completed"}
    assert redact_fields(clean) == clean and "job.completed" in redact._clean  # remembered as clean
    secret = {"note": "retry with sk-abcdefgh12345678"}
    for _ in range(2):  # a secret-shaped value is redacted every time: it is never remembered
        assert "abcdefgh12345678" not in redact_fields(secret)["note"]
    assert secret["note"] not in redact._clean
    for i in range(5000):  # unique values (job ids) do not grow the memory without bound
        redact_fields({"job_id": f"job-{i:08d}"})
    assert 0 < len(redact._clean) <= 4096


def test_the_pre_check_lets_every_shape_through():
    # redact_text skips the shapes when its pre-check finds none of their substrings: a shape added without
    # its needle there would never run.
    from emp_machine.telemetry import redact

    for needles, _ in redact._SHAPES:
        for needle in needles:
            assert redact._may_hold_secret(f"x {needle}_y"), needle
    for prefix in ("aiza", "akia", "asia"):  # _CASED's, lowercased as the pre-check sees them
        assert redact._may_hold_secret(prefix), prefix
