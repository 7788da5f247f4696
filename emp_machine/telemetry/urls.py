"""URL checks shared by the manifest's validation and the shipper's own, without pydantic (the machine process,
which ships telemetry, never imports it). No message quotes the URL: it may carry credentials
(https://user:password@collector)."""

from __future__ import annotations

from urllib.parse import urlsplit


def url_problem(url: str) -> str | None:
    """Why a URL with a host cannot be used (no host, a port that is not a number, a broken address), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number or out of range)
    except ValueError as exc:
        return "has a port that is not a number from 0 to 65535" if "port" in str(exc).lower() else \
            "is not a valid URL"
    return None if parts.hostname else "has no host"


def http_url_problem(url: str) -> str | None:
    """Why `url` cannot be an http(s) URL to call (an OTLP endpoint, a health check, a public address), or
    None."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return "has no scheme: it must start with http:// or https://"
    if scheme.lower() not in ("http", "https"):
        return f"must start with http:// or https://, not {scheme}://"
    return url_problem(url)
