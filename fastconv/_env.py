"""Environment variables that every op call reads, read without ``os.environ``'s overhead.

``os.environ.get`` costs ~2.3 us here (the Mapping machinery, encoding the key, decoding the
value), and a convolution's dispatch read five of them on every call: ~25 reads a step of a
small network. On POSIX ``os.environ`` keeps the bytes of the process environment in a dict
(``_data``), which every change through ``os.environ`` (``monkeypatch.setenv`` included)
updates; reading that dict with a pre-encoded key gives the same answer, decoded the way
``os.environ`` decodes it. Anywhere else (or if that dict is missing) this is ``os.environ.get``.
"""

from __future__ import annotations

import os

_data = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_data, dict)
_keys: dict[str, bytes] = {}
_decoded: dict[bytes, str] = {}  # a value's bytes -> its str (bytes keep their hash)


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if not _FAST:
        return os.environ.get(name, default)
    k = _keys.get(name)
    if k is None:
        k = _keys[name] = os.fsencode(name)
    v = _data.get(k)
    if v is None:
        return default
    s = _decoded.get(v)
    if s is None:  # decoded once per value (fsdecode ~0.5 us; an op reads several a call)
        if len(_decoded) > 256:
            _decoded.clear()
        s = _decoded[v] = os.fsdecode(v)
    return s
