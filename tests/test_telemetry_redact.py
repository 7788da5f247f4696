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
    assert redact_fields(clean) == clean and "job.completed" in redact._state[2]  # remembered as clean
    secret = {"note": "retry with sk-abcdefgh12345678"}
    for _ in range(2):  # a secret-shaped value is redacted every time: it is never remembered
        assert "abcdefgh12345678" not in redact_fields(secret)["note"]
    assert secret["note"] not in redact._state[2]
    for i in range(5000):  # unique values (job ids) do not grow the memory without bound
        redact_fields({"job_id": f"job-{i:08d}"})
    assert 0 < len(redact._state[2]) <= 4096


def test_the_pre_check_lets_every_shape_through():
    # redact_text skips the shapes when its pre-check finds none of their substrings: a shape added without
    # its needle there would never run.
    from emp_machine.telemetry import redact

    for needles, _ in redact._SHAPES:
        for needle in needles:
            assert redact._may_hold_secret(f"x {needle}_y"), needle
    for prefix in ("aiza", "akia", "asia"):  # _CASED's, lowercased as the pre-check sees them
        assert redact._may_hold_secret(prefix), prefix


@pytest.mark.parametrize("text, secret", [
    ("redis://:s3cretPassw0rd@redis.example:6379/0", "s3cretPassw0rd"),  # Redis's usual form: no user name
    ("Error 111 connecting to redis://:s3cretPassw0rd@10.0.0.5:6379. Connection refused.", "s3cretPassw0rd"),
    ("rediss://default:s3cretPassw0rd@redis.example:6380", "s3cretPassw0rd"),
])
def test_a_url_password_is_replaced_with_or_without_a_user_name(text, secret):
    redacted = redact_text(text)
    assert secret not in redacted and "@" in redacted and REDACTED in redacted
    assert redact_text("http://127.0.0.1:8188/history/abc") == "http://127.0.0.1:8188/history/abc"  # a port stays


class _Textual:
    """What yarl.URL, httpx.URL and the like are to a log line: an object whose str() is its text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def test_values_that_are_not_text_are_redacted_as_their_text():
    import enum

    from emp_machine.telemetry.redact import redact_value

    class Level(enum.IntEnum):
        HIGH = 3

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    class NoEquality:  # numpy arrays compare element-wise; a secret key's value must not be compared
        def __eq__(self, other):
            raise ValueError("ambiguous")

        __hash__ = object.__hash__

    assert redact_value(b"Authorization: Bearer abcdefghijkl0123456789") == f"Authorization: Bearer {REDACTED}"
    assert redact_value(bytearray(b"password=hunter2hunter2 \xff")) == f"password={REDACTED} \ufffd"
    assert redact_value(ValueError("api_key=sk-abcdef0123456789abcdef")) == f"api_key={REDACTED}"
    assert redact_value(_Textual("https://user:hunter2pass@api.example.com/v1")) == \
        f"https://user:{REDACTED}@api.example.com/v1"
    assert redact_value(("ok", b"token=abcdef0123")) == ["ok", f"token={REDACTED}"]  # a tuple as a list
    for kept in (0, 7, 2.5, True, False, None, Level.HIGH):  # numbers and the like stay what they are
        assert redact_value(kept) is kept
    assert "Unprintable" in redact_value(Unprintable())  # a broken __str__: a placeholder, not an exception
    assert redact_value(_Textual("job 12 done")) == "job 12 done"
    fields = redact_fields({"error": ValueError("password=hunter2hunter2"), "raw": b"Bearer abcdefghijkl0123",
                            "count": 3, "api_key": NoEquality(), "note": None,
                            "url": _Textual("redis://:pw12345@h")})
    assert fields == {"error": f"password={REDACTED}", "raw": f"Bearer {REDACTED}", "count": 3,
                      "api_key": REDACTED, "note": None, "url": f"redis://:{REDACTED}@h"}


def test_a_list_of_name_value_pairs_loses_the_values_of_secret_names():
    fields = redact_fields({"headers": [("X-Api-Key", "abcd1234efgh5678ijkl"), ("Accept", "application/json"),
                                        ["Authorization", b"Token abcd"], ("prompt_tokens", 12)]})
    assert fields["headers"] == [["X-Api-Key", REDACTED], ["Accept", "application/json"],
                                 ["Authorization", REDACTED], ["prompt_tokens", 12]]


_SECRETS = ("abcdefghijkl0123456789", "hunter2pass", "sk-abcdef0123456789abcdef", "abcdef0123456789abcdef",
            "hunter2hunter2", "s3cretPassw0rd", "abcd1234efgh5678ijkl")


def test_no_secret_in_a_value_of_any_type_reaches_a_json_line(tmp_path):
    import io
    import json

    from emp_machine.telemetry import TelemetryConfig, setup

    out = io.StringIO()
    telemetry = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="sim",
                      buffer_path=tmp_path / "w.db", stream=out, start_shipper=False)
    try:
        telemetry.logger("emp.worker").info("calling service", extra={"fields": {
            "raw_header": b"Authorization: Bearer abcdefghijkl0123456789",
            "url": _Textual("https://user:hunter2pass@api.example.com/v1"),
            "error": ValueError("api_key=sk-abcdef0123456789abcdef"),
            "redis": "redis://:s3cretPassw0rd@10.0.0.5:6379/0",
            "headers_list": [("X-Api-Key", "abcd1234efgh5678ijkl")],
        }})
        telemetry.events.emit("job.failed", reason=ValueError("password=hunter2hunter2"))
        telemetry.flush()
    finally:
        telemetry.shutdown(2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["calling service", "job.failed"]
    assert lines[0]["error"] == f"api_key={REDACTED}" and lines[1]["reason"] == f"password={REDACTED}"
    assert [k for k in _SECRETS if k in out.getvalue()] == []


def test_no_secret_in_a_span_attribute_of_any_type_reaches_the_wire():
    from emp_machine.telemetry.encode import encode_span
    from emp_machine.telemetry.sampling import AdaptiveSampler
    from emp_machine.telemetry.tracing import Tracer

    kept: list = []
    tracer = Tracer(AdaptiveSampler(1e9), kept.append)
    with tracer.start_as_current_span("service.call") as span:
        span.set_attribute("body", b'{"password": "hunter2hunter2"}')
        span.set_attribute("url", _Textual("https://user:hunter2pass@api.example.com/v1"))
        span.add_event("retry", {"cause": _Textual("token=sk-abcdef0123456789abcdef"),
                                 "error": ValueError("redis://:s3cretPassw0rd@h:6379")})
    (record,) = [r for _kind, _value, r in kept]
    assert record[7]["body"] == f'{{"password": "{REDACTED}"}}'
    wire = encode_span(record)
    assert [k for k in _SECRETS if k.encode() in wire] == []


@pytest.fixture
def registered():
    """set_secret_values for one test; the process's registry emptied after it."""
    from emp_machine.telemetry.redact import set_secret_values

    yield set_secret_values
    set_secret_values(())


def test_registered_secret_values_are_masked_wherever_they_appear(registered):
    plain, short = "plainPLUGINKEY1234", "q7Zx"
    assert redact_text(f"running with {plain}") == f"running with {plain}"  # no secret shape: not before
    assert redact_fields({"note": f"used {plain} today"}) == {"note": f"used {plain} today"}  # judged clean
    registered([plain, short, "abc", ""])
    assert redact_text(f"running with {plain} and {short}") == f"running with {REDACTED} and {REDACTED}"
    # a value judged clean before the registration is judged again, and a 4-character one is checked too
    assert redact_fields({"note": f"used {plain} today", "id": short, "x": "abc"}) == {
        "note": f"used {REDACTED} today", "id": REDACTED, "x": "abc"}  # under 4 characters: ignored
    registered(())
    assert redact_text(f"running with {plain}") == f"running with {plain}"


def test_a_registered_value_inside_another_is_masked_whole(registered):
    registered(["abcd1234", "xxabcd1234yy"])
    assert redact_text("k=xxabcd1234yy!").count(REDACTED) == 1 and "xx" not in redact_text("v xxabcd1234yy")


def test_a_log_line_of_six_characters_that_is_a_registered_secret_is_masked(registered, tmp_path):
    import io
    import json

    from emp_machine.telemetry import TelemetryConfig, setup

    out = io.StringIO()
    telemetry = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="t",
                      buffer_path=tmp_path / "b.db", stream=out, start_shipper=False)
    try:
        registered(["Zq81xT"])
        telemetry.logger("t").warning("Zq81xT")
        telemetry.logger("t").warning("pw Zq81xT", extra={"fields": {"v": "Zq81xT"}})
    finally:
        telemetry.shutdown()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [REDACTED, f"pw {REDACTED}"] and lines[1]["v"] == REDACTED


def test_mask_values_masks_text_before_encoding_and_leaves_keys_and_short_values():
    import json

    from emp_machine.telemetry.redact import mask_values

    odd = 'pa"ss\\wörd12'  # escaped in JSON text, where a search after encoding missed it
    value = {"a": [f"x {odd} y", {"b": odd}], f"{odd}": 1, "n": 3, "short": "test here"}
    masked = mask_values(value, [odd, "test"])  # "test": under 8 characters, an ordinary word in a result
    assert masked == {"a": [f"x {REDACTED} y", {"b": REDACTED}], odd: 1, "n": 3, "short": "test here"}
    assert odd not in json.dumps(masked["a"]) and masked is not value
    same = {"a": ["nothing here"]}
    assert mask_values(same, [odd]) is same and mask_values(value, []) is value


# -- edges mutation audit M8 found unpinned ------------------------------------------------------------------

@pytest.mark.parametrize("text, secret", [("retrying with Bearer abcd1234 now", "abcd1234"),
                                          ("openai rejected sk-abcd1234 today", "abcd1234")])
def test_the_shortest_bearer_and_sk_values_are_redacted(text, secret):
    # eight characters is the documented floor of both shapes: one more in the pattern leaked these
    out = redact_text(text)
    assert secret not in out and REDACTED in out


def test_masked_values_are_found_in_tuples_too():
    import json

    from emp_machine.telemetry.redact import mask_values

    assert "hunter2secret" not in json.dumps(mask_values({"images": ("saved with hunter2secret",)}, ["hunter2secret"]))


def test_a_setting_naming_its_variable_in_upper_case_masks_the_variables_value():
    # `API_KEY_ENV: PROBE_KEY` names the variable holding the secret: its value is masked, not its name
    from emp_machine.telemetry.redact import secret_values

    found = secret_values({"API_KEY_ENV": "PROBE_KEY"}, {}, {"PROBE_KEY": "s3cr3t-value-xyz"})
    assert "s3cr3t-value-xyz" in found and "PROBE_KEY" not in found
