"""Denylists and opt-out lists: files named in ``pipelines.yaml``, read once before any work.

A list has a ``kind``:

- ``url``: URLs, matched after :func:`normalise_url` (scheme, ``www.``, default port,
  fragment, case of the host and percent-escapes do not matter);
- ``domain``: a host and all its subdomains (``example.com`` matches ``a.example.com``);
- ``md5`` / ``sha256``: hex digests of the image bytes as downloaded (the forms in which
  hash lists are published, e.g. the Re-LAION cleaning lists);
- ``pdq``: 256-bit PDQ perceptual hashes (64 hex digits), matched within
  ``max_distance`` bits (Hamming); needs the ``pdqhash`` package.

Files: ``.txt`` (one entry a line; blank lines and ``#`` comments skipped), ``.csv``
(header line; the column named ``column``, else one named like the kind, else the
first), ``.parquet`` (same column rule). Local paths or fsspec URLs (``s3://...``). A
line that is not an entry of the list's kind stops the run with ``file:line``; a hash
of another form than the list's kind (a SHA-256 in an MD5 list) is refused naming the
form expected. Nothing read from a list, and no image byte, is ever logged.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from paradiffusion.config import ConfigError

from . import REJECT_DENYLISTED, REJECT_OPTED_OUT

KINDS = ("url", "domain", "md5", "sha256", "pdq")
HASH_HEX = {"md5": 32, "sha256": 64, "pdq": 64}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_FORM_OF_LENGTH = {
    32: "an MD5 digest",
    40: "a SHA-1 digest",
    64: "a SHA-256 digest or PDQ hash",
    128: "a SHA-512 digest",
}
_DEFAULT_PORTS = {"http": "80", "https": "443", "ftp": "21"}
# Percent-escapes of unreserved characters mean the same URL decoded (RFC 3986 6.2.2.2).
_UNRESERVED_ESCAPE = re.compile(r"%(2[DdEe]|5[Ff]|7[Ee]|[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9])")


def normalise_url(url: str) -> str:
    """The form URLs are compared in: ``host[:port]/path?query``, host lower case without
    ``www.`` or a default port, no scheme (http and https name the same image here), no
    fragment, escapes of unreserved characters decoded, other escapes upper case.

    Hand-written with urllib.parse: the normalisation libraries on PyPI keep the scheme
    or ``www.``, which a denylist must not depend on.
    """
    text = (url or "").strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a port that is not a number: compare the text as it is
        return text.lower()
    host = (parts.hostname or "").rstrip(".")
    if host.startswith("www."):
        host = host[4:]
    if port is not None and str(port) != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"

    def fix(s: str) -> str:
        s = _UNRESERVED_ESCAPE.sub(lambda m: unquote(m.group(0)), s)
        return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), s)

    path = fix(parts.path) or "/"
    query = fix(parts.query)
    return host + path + (f"?{query}" if query else "")


def url_host(url: str) -> str:
    """The host of ``url`` (lower case, no ``www.``), or ``""``."""
    return normalise_url(url).split("/", 1)[0].split(":", 1)[0]


@dataclass
class SafetyList:
    """One loaded list: what to match and the name the funnel reports."""

    name: str
    kind: str
    source: str
    entries: frozenset[str] = field(default_factory=frozenset)
    pdq: object = None  # (n, 32) uint8 array of PDQ hashes
    max_distance: int = 31
    digest: str = ""  # sha256 of the sorted entries: changes when the list changes

    def __len__(self) -> int:
        return len(self.entries) if self.pdq is None else int(self.pdq.shape[0])


def _entries_of(source: str, kind: str, column: str | None) -> Iterable[tuple[str, str]]:
    """``(where, value)`` for every entry of the file: ``where`` is ``file:line``."""
    import fsspec

    lower = source.lower().removesuffix(".gz")
    try:
        with fsspec.open(source, "rb", compression="infer") as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001 - missing file, no credentials, bad URL: all stop the run
        raise ConfigError(f"{source}: cannot read this list ({type(exc).__name__}: {exc})") from exc
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_table(io.BytesIO(data))
        col = _column(list(t.column_names), kind, column, source)
        for i, v in enumerate(t[col].to_pylist()):
            yield f"{source}:row {i + 1}", "" if v is None else str(v)
        return
    text = data.decode("utf-8", errors="replace").splitlines()
    if lower.endswith(".csv"):
        import csv

        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        idx = [h.strip() for h in header].index(_column([h.strip() for h in header], kind, column, source))
        for n, rec in enumerate(reader, start=2):
            if not rec or not "".join(rec).strip():
                continue
            yield f"{source}:{n}", rec[idx] if idx < len(rec) else ""
        return
    for n, line in enumerate(text, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        yield f"{source}:{n}", line


def _column(names: list[str], kind: str, column: str | None, source: str) -> str:
    if column is not None:
        if column not in names:
            raise ConfigError(f"{source}: no column {column!r} (columns: {names})")
        return column
    for c in names:
        if c.lower() == kind:
            return c
    if not names:
        raise ConfigError(f"{source}: no columns")
    return names[0]


def _check_hash(where: str, value: str, kind: str) -> str:
    v = value.strip().lower()
    want = HASH_HEX[kind]
    if not _HEX.match(v):
        raise ConfigError(f"{where}: {value[:80]!r} is not a hex {kind} hash ({want} hex digits expected)")
    if len(v) != want:
        form = _FORM_OF_LENGTH.get(len(v), f"a {len(v)}-hex-digit value")
        raise ConfigError(
            f"{where}: {form} in a list of kind {kind!r}: this list must hold {kind} hashes ({want} hex digits). "
            "Set the list's kind to the form it is published in (allowed: md5, sha256, pdq)"
        )
    return v


def load_list(name: str, source: str, kind: str, column: str | None = None, max_distance: int = 31) -> SafetyList:
    """Read and check one list; a bad entry raises :class:`ConfigError` naming ``file:line``."""
    if kind not in KINDS:
        raise ConfigError(f"list {name!r}: kind {kind!r} (allowed: {', '.join(KINDS)})")
    values: set[str] = set()
    for where, raw in _entries_of(source, kind, column):
        v = raw.strip()
        if kind in HASH_HEX:
            values.add(_check_hash(where, v, kind))
        elif kind == "url":
            if not v or " " in v or "." not in v.split("/", 3)[2 if "://" in v else 0]:
                raise ConfigError(f"{where}: {v[:80]!r} is not a URL (a list of kind 'url' holds one URL a line)")
            values.add(normalise_url(v))
        else:  # domain
            d = v.lower().rstrip(".")
            d = d.split("://", 1)[-1].split("/", 1)[0]
            d = d[4:] if d.startswith("www.") else d
            if not d or "." not in d or not re.match(r"^[a-z0-9.-]+$", d):
                raise ConfigError(f"{where}: {v[:80]!r} is not a domain name (a list of kind 'domain')")
            values.add(d)
    digest = hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()[:16]
    out = SafetyList(name, kind, source, frozenset(values), max_distance=max_distance, digest=digest)
    if kind == "pdq":
        import numpy as np

        out.pdq = np.frombuffer(b"".join(bytes.fromhex(h) for h in sorted(values)), dtype=np.uint8).reshape(-1, 32)
        out.entries = frozenset()
    return out


@dataclass
class SafetyLists:
    """Every denylist and opt-out list of a run (picklable: handed to download and filter workers)."""

    denylists: list[SafetyList] = field(default_factory=list)
    opt_outs: list[SafetyList] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.denylists or self.opt_outs)

    @property
    def hashes_needed(self) -> set[str]:
        return {lst.kind for lst in self.denylists if lst.kind in HASH_HEX}

    def check_url(self, url: str | None) -> tuple[str, str] | None:
        """``(reason, detail)`` when the URL is on a denylist or an opt-out list."""
        if not url or not self:
            return None
        norm = normalise_url(url)
        host = norm.split("/", 1)[0].split(":", 1)[0]
        for reason, lists in ((REJECT_DENYLISTED, self.denylists), (REJECT_OPTED_OUT, self.opt_outs)):
            for lst in lists:
                if lst.kind == "url" and norm in lst.entries:
                    return reason, f"{lst.name} (url)"
                if lst.kind == "domain" and _domain_match(host, lst.entries):
                    return reason, f"{lst.name} (domain)"
        return None

    def check_bytes(self, data: bytes) -> tuple[str, str] | None:
        """``(denylisted, detail)`` when the bytes' MD5 / SHA-256 / PDQ hash is on a denylist."""
        need = self.hashes_needed
        if not need:
            return None
        digests = {}
        if "md5" in need:
            digests["md5"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if "sha256" in need:
            digests["sha256"] = hashlib.sha256(data).hexdigest()
        pdq = None
        for lst in self.denylists:
            if lst.kind in ("md5", "sha256") and digests[lst.kind] in lst.entries:
                return REJECT_DENYLISTED, f"{lst.name} ({lst.kind})"
            if lst.kind == "pdq" and len(lst):
                if pdq is None:
                    pdq = pdq_hash(data)
                if pdq is not None:
                    d = _min_hamming(pdq, lst.pdq)
                    if d <= lst.max_distance:
                        return REJECT_DENYLISTED, f"{lst.name} (pdq, distance {d})"
        return None

    def describe(self) -> str:
        parts = [f"denylist {lst.name}: {len(lst)} {lst.kind}" for lst in self.denylists]
        parts += [f"opt-out {lst.name}: {len(lst)} {lst.kind}" for lst in self.opt_outs]
        return "; ".join(parts) or "none"

    def fingerprint(self) -> dict:
        """What a run records: each list's name, kind and the digest of its entries."""
        return {
            "denylists": [f"{lst.name}:{lst.kind}:{lst.digest}" for lst in self.denylists],
            "opt_outs": [f"{lst.name}:{lst.kind}:{lst.digest}" for lst in self.opt_outs],
        }


def _domain_match(host: str, domains: frozenset[str]) -> bool:
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts) - 1))


def _min_hamming(h: bytes, table) -> int:
    import numpy as np

    x = np.frombuffer(h, dtype=np.uint8)[None, :] ^ table
    return int(np.unpackbits(x, axis=1).sum(axis=1).min())


def pdq_hash(data: bytes) -> bytes | None:
    """The 256-bit PDQ hash of an image (the ``pdqhash`` package, Meta's reference C++),
    or None when the bytes do not decode. Decoded in memory only."""
    import numpy as np
    from PIL import Image

    from paradiffusion.deps import require

    pdqhash = require("pdqhash", "pdqhash", extra="curation")
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - undecodable bytes have no perceptual hash; the decode step reports them
        return None
    bits, _quality = pdqhash.compute(rgb)
    # Packed most-significant bit first, in the order pdqhash returns the 256 bits: the hex form
    # Meta's reference tool prints and hash-sharing programmes publish (checked against the tool's
    # output in tests/curation/test_safety_lists.py).
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()


def load_lists(denylists: Sequence, opt_outs: Sequence = ()) -> SafetyLists:
    """Load every list of the config (``ListConfig`` items); any error stops before work."""
    names = [c.name for c in list(denylists) + list(opt_outs)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"list names {dup} are used twice: each denylist / opt-out list needs its own name")
    return SafetyLists(
        [load_list(c.name, c.path, c.kind, c.column, c.max_distance) for c in denylists],
        [load_list(c.name, c.path, c.kind, c.column) for c in opt_outs],
    )
