"""Secret redaction for every record that leaves a caller: log messages, fields, span attributes.

Two rules: a field whose key looks secret (api_key, token, password, authorization, secret, cookie,
credential...) has its value replaced; a string value shaped like a bearer token, a well-known key format
(`sk-…`, `hf_…`, `ghp_…`, AWS and Google keys) or a `key=value` secret inside free text has that part
replaced. A third, for values with no secret shape: the exact values a process registers
(`set_secret_values`: a worker's credential settings and env) are replaced wherever they appear. Redaction
runs on the hot path, so the common case (nothing secret) is a few substring tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(
    r"(?i)(api[_-]?key|apikey|access[_-]?key|secret|token|passw(or)?d|passwd|pwd|authorization|auth[_-]?header"
    r"|cookie|credential|private[_-]?key|signature)"
)
# The same words less "token": a key that matches _SECRET_KEY only through "token" may name a count or a
# structure (OpenAI's usage: prompt_tokens, token_usage: {...}); see _key_kind.
_SECRET_KEY_NOT_TOKEN = re.compile(
    r"(?i)(api[_-]?key|apikey|access[_-]?key|secret|passw(or)?d|passwd|pwd|authorization|auth[_-]?header"
    r"|cookie|credential|private[_-]?key|signature|session|refresh|bearer|access|id_token)"
)
# Token counts of LLM services, whatever their value's type.
_TOKEN_COUNT_KEY = re.compile(
    r"(?i)^(prompt|completion|total|max|num|input|output|cached|reasoning|audio|text|image|max_completion"
    r"|max_new|max_output)_tokens$|^tokens$|^token_count$|^num_tokens$"
)

# Secret-shaped values inside text. Each shape is a case-sensitive pattern run on the lowercased text, and
# only when a substring it needs is there: one IGNORECASE alternation of them all cost 20-40 us on a line
# holding a URL, against ~1-4 us this way (these run on every log message). Group 1 is what is replaced.
_SEP = r"""["']?\s*[:=]\s*["']?"""  # between a key and its value: `key=v`, `"key": "v"`, `key: v`
_VALUE = r"""(?!\[redacted)([^\s"',;&]{3,})"""
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern], ...] = (
    # URL userinfo: the password, with or without a user name (redis://:password@host is Redis's usual form)
    (("://",), re.compile(r"://[^/\s:@]*:([^/\s@]+)@")),
    (("bearer", "basic"), re.compile(r"\b(?:bearer|basic)\s+([a-z0-9._~+/=-]{8,})")),
    # well-known key formats: OpenAI/Anthropic sk-, Hugging Face hf_, GitHub, Replicate r8_, Slack xox?-
    (("sk-", "hf_", "gh", "r8_", "xox"),
     re.compile(r"\b(?:sk-|hf_|gh[pousr]_|github_pat_|r8_|xox[abprs]-)([a-z0-9_-]{8,})")),
    # an Authorization value keeps its scheme word (Bearer, Token, Digest...) and loses what follows it
    (("auth",), re.compile(r"(?:authorization|auth[_-]?header)[\w-]*" + _SEP
                           + r"""(?:[a-z][\w-]*\s+(?=[^\s"',;&]{8,}))?""" + _VALUE)),
    # a token pair, unless its value is a number (max_tokens: 4096 is a count)
    (("token",), re.compile(r"token[\w-]*" + _SEP + r"(?:(?:bearer|basic)\s+)?(?!\d+\b)" + _VALUE)),
    (("key", "secret", "pass", "pwd", "credential"),
     re.compile(r"(?:api[_-]?key|apikey|access[_-]?key|private[_-]?key|secret|passw(?:or)?d|pwd|credential)[\w-]*"
                + _SEP + r"(?:(?:bearer|basic)\s+)?" + _VALUE)),
)
# Shapes whose case matters, run on the text itself: Google API keys, AWS access key ids.
_CASED = re.compile(r"\b(AIza[0-9A-Za-z_-]{35}|(?:AKIA|ASIA)[A-Z0-9]{16})\b")


def _secret_spans(text: str, low: str) -> list[tuple[int, int]]:
    if len(low) == len(text):
        subject, flags = low, 0
    else:  # a character whose lowercase is longer: match the text itself, ignoring case
        subject, flags = text, re.IGNORECASE
    spans = []
    for needles, pattern in _SHAPES:
        for needle in needles:
            if needle in low:
                if flags:
                    pattern = re.compile(pattern.pattern, flags)
                spans.extend(m.span(1) for m in pattern.finditer(subject))
                break
    if "AIza" in text or "AKIA" in text or "ASIA" in text:
        spans.extend(m.span(1) for m in _CASED.finditer(text))
    return spans


def _may_hold_secret(low: str) -> bool:
    """False when lowercased text holds no needle of _SHAPES or _CASED: the common case (nothing secret) ends
    here, ~0.4 us. Tested inline rather than looped over the shapes (about half the cost); a test checks that
    every needle of the shapes is here."""
    return ("://" in low or "key" in low or "token" in low or "auth" in low or "pass" in low or "secret" in low
            or "bearer" in low or "basic" in low or "sk-" in low or "pwd" in low or "credential" in low
            or ("_" in low and ("hf_" in low or "gh" in low or "r8_" in low)) or "xox" in low
            or "akia" in low or "asia" in low or "aiza" in low)


def redact_text(text: str) -> str:
    """`text` with this process's secret values (set_secret_values) and secret-shaped parts replaced (returns
    `text` itself when there is nothing to replace)."""
    for value in _state[0]:
        if value in text:
            text = text.replace(value, REDACTED)
    low = text.lower()
    if not _may_hold_secret(low):
        return text
    spans = _secret_spans(text, low)
    if not spans:
        return text
    spans.sort()
    out, at = [], 0
    for start, end in spans:
        if end <= at:  # inside a part already replaced
            continue
        out.append(text[at:max(start, at)])
        out.append(REDACTED)
        at = end
    out.append(text[at:])
    return "".join(out)


# What a field's key says of its value: not secret, secret, or "token" alone (see _key_kind).
_PLAIN, _SECRET, _TOKEN_WORD = 0, 1, 2


def _key_kind(key: str) -> int:
    if _SECRET_KEY.search(key) is None or _TOKEN_COUNT_KEY.search(key) is not None:
        return _PLAIN
    if _SECRET_KEY_NOT_TOKEN.search(key) is not None:
        return _SECRET
    # Only "token": a number is a count (usage.total_tokens, tokens_per_second) and a mapping is a
    # structure whose own keys are checked (token_usage: {...}); anything else (access_tokens: "...") is
    # treated as secret.
    return _TOKEN_WORD


_key_cache: dict[str, int] = {}


def _key_kind_cached(key: str) -> int:
    hit = _key_cache.get(key)
    if hit is None:
        hit = _key_kind(key)
        if len(_key_cache) < 4096:  # keys are a small, fixed vocabulary; bound it anyway
            _key_cache[key] = hit
    return hit


def secret_key(key: str) -> bool:
    """Whether a field, setting or variable of this name holds a secret when its value is text (api_key,
    token, password, authorization, ...; not a token count such as max_tokens): the rule redact_fields
    applies, for callers that mask values by name."""
    return _key_kind_cached(key) != _PLAIN


def redact_value(value: object) -> object:
    """`value` redacted: text, and the items of mappings, lists and tuples; numbers, booleans and None as
    they are; anything else (bytes, an exception, a URL object...) becomes its text, redacted: the JSON line
    and the OTLP encoder would write its str() anyway, secret and all."""
    if type(value) is str:
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_fields(value)
    if isinstance(value, (list, tuple)):
        return [_redact_item(v) for v in value]
    if type(value) in (int, float, bool) or value is None:
        return value
    return _redacted_text_of(value)


def _redact_item(item: object) -> object:
    """An item of a list: a (name, value) pair whose name looks secret, such as a header in a list of
    headers [("X-Api-Key", "...")], has its value redacted as a field of that name would."""
    if (isinstance(item, (tuple, list)) and len(item) == 2 and type(item[0]) is str
            and _key_kind_cached(item[0])):
        name = item[0]
        return [name, redact_fields({name: item[1]})[name]]
    return redact_value(item)


def _redacted_text_of(value: object) -> object:
    if isinstance(value, (int, float)):  # a number of a subclass (IntEnum, numpy's float64): no text to hide
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "replace")
    else:
        try:
            text = str(value)
        except Exception:  # a broken __str__ must not break the caller's log line
            text = f"<{type(value).__name__} that could not be shown>"
    return redact_text(text)


def _key_text(key: object) -> str:
    """A mapping's non-str key as text (the JSON line and OTLP carry only text keys); a str subclass stays."""
    if isinstance(key, str):
        return key
    try:
        return str(key)
    except Exception:  # a broken __str__ must not lose the caller's record
        return f"<{type(key).__name__}>"


# Exact values this process masks wherever they appear (set_secret_values): a plain password a plugin logs or
# echoes has no secret shape, the shortest text that can hold a secret (7 for the shapes), and the field
# values seen to hold nothing secret (event names, job types, statuses...). One tuple, replaced whole: a thread
# judging a value by the old values adds it to the old set, never to the one that goes with the new values.
_state: tuple[tuple[str, ...], int, set[str]] = ((), 7, set())


def redact_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """A copy of `fields` with secret keys and secret-shaped values redacted (nested mappings too). A key that
    is not a str becomes its str() (a record with one raised TypeError into the caller and was lost)."""
    out: dict[str, object] = {}
    _, shortest, clean = _state  # one state for the whole call (set_secret_values replaces it whole)
    for key, value in fields.items():
        kind = _key_cache.get(key)
        if kind is None:
            if type(key) is not str:  # {200: 3} (counts by HTTP status): judged, written and encoded as "200"
                key = _key_text(key)
            kind = _key_kind_cached(key)
        if kind and value is not None and (type(value) is not str or value):  # not ==: numpy arrays
            if kind == _TOKEN_WORD and (type(value) in (int, float) or isinstance(value, Mapping)):
                out[key] = redact_value(value)
            else:
                out[key] = REDACTED
        elif type(value) is str:
            if len(value) < shortest or value in clean:  # nothing shorter can match
                out[key] = value
            else:
                out[key] = redacted = redact_text(value)
                if redacted is value and len(value) <= 256:  # only values that hold no secret are remembered
                    if len(clean) >= 4096:  # bounded; unique values (job ids) would otherwise fill it
                        clean.clear()
                    clean.add(value)
        elif type(value) in (int, float, bool) or value is None:
            out[key] = value
        else:
            out[key] = redact_value(value)
    return out


def set_secret_values(values: Iterable[str]) -> None:
    """Make `values` (a worker's secret_values) masked in every record this process writes: log lines, events,
    span attributes, on stdout, in the buffer and at the collector. Values under 4 characters are ignored (they
    would mask ordinary words); longest first, so a value inside another is masked whole."""
    global _state
    exact = tuple(sorted({value for value in values if isinstance(value, str) and len(value) >= 4},
                         key=len, reverse=True))
    _state = (exact, min([7, *map(len, exact)]), set())  # values judged clean before may hold one of them


def secret_values(settings: Any, env: Mapping[str, str], environ: Mapping[str, str]) -> tuple[str, ...]:
    """The exact values a worker masks in what it writes (job errors, health reasons, progress, results, its
    records through set_secret_values): settings
    whose key looks like a credential (telemetry.redact's key rule: api_key, token, password...), the values
    of the variables that `*_env` settings name (api_key_env: OPENAI_API_KEY), and the group's `env` values
    whose name looks like a credential. Pattern-based redaction misses a plain password a plugin echoes.
    The worker cannot tell which settings came from `${VAR}` (run/manifest.json holds them resolved), so the
    key decides. Longest first, so one value inside another is masked whole."""
    found: set[str] = set()

    def named_secret(key: Any) -> bool:
        return isinstance(key, str) and secret_key(key)

    def walk(value: Any, secret: bool, names: bool) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                is_names = names or (isinstance(key, str) and key.lower().endswith("_env"))
                walk(item, secret or (not is_names and named_secret(key)), is_names)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, secret, names)
        elif isinstance(value, str):
            if names:
                value = environ.get(value) or ""
                secret = True
            if secret and value:
                found.add(value)

    walk(settings, False, False)
    walk({key: value for key, value in env.items() if named_secret(key)}, True, False)
    return tuple(sorted(found, key=len, reverse=True))


def mask_values(value: Any, secrets: Iterable[str], min_length: int = 8) -> Any:
    """`value` (a JSON-like result: mappings, lists, text) with each of `secrets` of `min_length` characters or
    more replaced by [REDACTED] in its text, before it is encoded (a secret holding a quote or a non-ASCII
    character is escaped in JSON text, where a search for it misses). Keys are left alone (two could become
    one). The same object when nothing changed. A result is a service's answer: shorter values (a password
    of "test") would mangle ordinary words in it, so the floor is higher than for log records."""
    secrets = tuple(secret for secret in secrets if isinstance(secret, str) and len(secret) >= min_length)
    if not secrets:
        return value

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            for secret in secrets:
                if secret in item:
                    item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, Mapping):
            new = {key: walk(sub) for key, sub in item.items()}
            return item if all(new[key] is sub for key, sub in item.items()) else new
        if isinstance(item, (list, tuple)):
            new_items = [walk(sub) for sub in item]
            return item if all(a is b for a, b in zip(new_items, item)) else new_items
        return item

    return walk(value)
