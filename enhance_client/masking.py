"""URL secrets masked in any text: a query string (webhook tokens live there) and a URL's
user:password part. The worker's log and header masking (tasks/redact.py) adds the API key."""

from __future__ import annotations

import re

_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s'\"<>?#]*)\?[^\s'\"<>#]*", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^\s/'\"<>@]*@", re.IGNORECASE)


def mask_urls(text: str) -> str:
    """`text` with every URL's query string and credentials replaced by <redacted>."""
    if "://" not in text:  # both patterns need it; most log lines and argument reprs have none
        return text
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    return _URL_USERINFO.sub(r"\1<redacted>@", text)
