"""The voting store: one SQLite file in WAL mode.

WAL lets readers go on while one writer commits, and ``busy_timeout`` makes
concurrent writers (threads of one server, or several server processes) wait for the
lock instead of failing. Every rule that must hold under concurrency is a database
constraint, not a check in Python:

- one vote per voter, pair and question: ``UNIQUE(voter_id, pair_id, question)``;
  a second one is ignored by ``ON CONFLICT DO NOTHING`` and reported as a duplicate;
- a vote only for a pair served to that voter, after both of its images were sent to
  that voter, from a voter (not admin) token that is not revoked: the insert selects
  from ``served`` joined with ``voters`` under those conditions, so anything else
  inserts nothing;
- serving the next pair happens in one ``BEGIN IMMEDIATE`` transaction.

Tokens are stored as SHA-256 hashes; the plain token exists only in the invite link.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: The questions each pair is asked, in order: id -> what the voter reads.
QUESTIONS: dict[str, str] = {
    "visual_appeal": "Which image is more visually appealing?",
    "text_faithfulness": "Which image follows the text more faithfully?",
}
CHOICES = ("A", "B", "tie")
#: Largest id SQLite stores (a signed 64-bit integer); ids are 1 .. MAX_ID.
MAX_ID = 2**63 - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS voters (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('voter', 'admin')), created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt_set TEXT NOT NULL, prompt_id TEXT NOT NULL, category TEXT,
    prompt TEXT NOT NULL, seed INTEGER NOT NULL, model_x TEXT NOT NULL, model_y TEXT NOT NULL,
    path_x TEXT NOT NULL, path_y TEXT NOT NULL, n_served INTEGER NOT NULL DEFAULT 0,
    UNIQUE (prompt_set, prompt_id, seed, model_x, model_y));
CREATE TABLE IF NOT EXISTS served (
    voter_id INTEGER NOT NULL REFERENCES voters(id), pair_id INTEGER NOT NULL REFERENCES pairs(id),
    a_model TEXT NOT NULL, b_model TEXT NOT NULL, served_at REAL NOT NULL,
    a_loaded REAL, b_loaded REAL,
    PRIMARY KEY (voter_id, pair_id));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, voter_id INTEGER NOT NULL, pair_id INTEGER NOT NULL, question TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')), winner TEXT, a_model TEXT NOT NULL,
    b_model TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE (voter_id, pair_id, question));
CREATE TABLE IF NOT EXISTS withdrawn (
    pair_id INTEGER PRIMARY KEY REFERENCES pairs(id), reason TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_by_load ON pairs (n_served, id);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _mix(*parts: object) -> int:
    """A stable pseudo-random integer from the parts (order of pairs, side of images)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class Voter:
    id: int
    name: str
    role: str


@dataclass
class VoteResult:
    """What happened to one submitted vote."""

    status: str  # accepted | duplicate | not_served | not_loaded | not_allowed
    done: int = 0
    total: int = 0


class VoteStore:
    """Thread-safe access to the voting database (one connection per thread)."""

    def __init__(self, path: str | Path, quota: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quota = quota
        self._local = threading.local()
        c = self._conn()
        c.executescript(SCHEMA)
        served_cols = {r[1] for r in c.execute("PRAGMA table_info(served)")}
        for col in ("a_loaded", "b_loaded"):  # databases written before images had to load first
            if col not in served_cols:
                c.execute(f"ALTER TABLE served ADD COLUMN {col} REAL")
        if c.execute("SELECT value FROM meta WHERE key='salt'").fetchone() is None:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
        self.salt = c.execute("SELECT value FROM meta WHERE key='salt'").fetchone()[0]

    # -- connections
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- meta
    def set_meta(self, key: str, value: str) -> None:
        self._conn().execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value)
        )

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # -- voters
    def add_voter(self, name: str, role: str = "voter") -> str:
        """Create a voter (or admin) and return its plain invite token (shown once)."""
        token = secrets.token_urlsafe(24)
        self._conn().execute(
            "INSERT INTO voters (name, token_hash, role, created_at) VALUES (?, ?, ?, ?)",
            (name, hash_token(token), role, time.time()),
        )
        return token

    def revoke(self, name: str) -> int:
        return self._conn().execute("UPDATE voters SET revoked=1 WHERE name=?", (name,)).rowcount

    def voter_for(self, token: str | None) -> Voter | None:
        """The voter a token belongs to; None for a missing, unknown or revoked token."""
        if not token or len(token) > 200:
            return None
        row = (
            self._conn()
            .execute("SELECT id, name, role FROM voters WHERE token_hash=? AND revoked=0", (hash_token(token),))
            .fetchone()
        )
        return Voter(*row) if row else None

    # -- pairs
    def add_pairs(self, rows: list[dict]) -> int:
        """Insert pairs (keys as in the ``pairs`` table); existing ones are kept. Returns how many were new."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            before = c.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            c.executemany(
                "INSERT OR IGNORE INTO pairs (prompt_set, prompt_id, category, prompt, seed, model_x, model_y, path_x, path_y)"
                " VALUES (:prompt_set, :prompt_id, :category, :prompt, :seed, :model_x, :model_y, :path_x, :path_y)",
                rows,
            )
            after = c.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return after - before

    def n_pairs(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def n_servable(self) -> int:
        """Pairs that can still be served (every pair less the withdrawn ones)."""
        return (
            self._conn()
            .execute("SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM withdrawn w WHERE w.pair_id=p.id)")
            .fetchone()[0]
        )

    def withdraw(self, pair_id: int, reason: str) -> bool:
        """Take a pair out of serving (an image of it cannot be shown); True if it was not
        withdrawn before. Its votes so far stay; nobody is served it again."""
        cur = self._conn().execute(
            "INSERT INTO withdrawn (pair_id, reason, at) SELECT id, ?, ? FROM pairs WHERE id=? "
            "ON CONFLICT (pair_id) DO NOTHING",
            (reason[:300], time.time(), pair_id),
        )
        return cur.rowcount == 1

    def is_withdrawn(self, pair_id: int) -> bool:
        return self._conn().execute("SELECT 1 FROM withdrawn WHERE pair_id=?", (pair_id,)).fetchone() is not None

    def withdrawn(self) -> list[dict]:
        """Withdrawn pairs with their models and the reason (admin only)."""
        cur = self._conn().execute(
            "SELECT w.pair_id, p.model_x, p.model_y, w.reason, w.at FROM withdrawn w JOIN pairs p ON p.id=w.pair_id "
            "ORDER BY w.pair_id"
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]

    def total_for(self) -> int:
        """Votes each voter is asked for: (quota or every pair) x questions."""
        n = self.n_servable()
        return (min(n, self.quota) if self.quota else n) * len(QUESTIONS)

    def pair(self, pair_id: int) -> dict | None:
        if not 1 <= pair_id <= MAX_ID:
            return None
        c = self._conn()
        cur = c.execute("SELECT * FROM pairs WHERE id=?", (pair_id,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    # -- serving and voting
    def _progress(self, c: sqlite3.Connection, voter_id: int) -> tuple[int, int]:
        done = c.execute("SELECT COUNT(*) FROM votes WHERE voter_id=?", (voter_id,)).fetchone()[0]
        return done, self.total_for()

    def next_task(self, voter: Voter) -> dict:
        """The pair this voter should judge now, with the questions still open.

        A pair served earlier and not fully answered comes back first (a reload shows
        the same pair, same sides). Otherwise the least-served pair is assigned (ties
        broken in a per-voter random order), its sides drawn at random, and recorded
        in ``served``. ``{"done": True}`` when the voter's quota is complete.
        """
        if voter.role != "voter":
            raise ValueError(f"{voter.name!r} holds an admin token: admins see the models and do not vote")
        c = self._conn()
        nq = len(QUESTIONS)
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute(
                "SELECT s.pair_id, s.a_model FROM served s WHERE s.voter_id=? AND "
                "NOT EXISTS (SELECT 1 FROM withdrawn w WHERE w.pair_id=s.pair_id) AND "
                "(SELECT COUNT(*) FROM votes v WHERE v.voter_id=s.voter_id AND v.pair_id=s.pair_id) < ? "
                "ORDER BY s.served_at, s.pair_id LIMIT 1",
                (voter.id, nq),
            ).fetchone()
            if row is None:
                n_served = c.execute("SELECT COUNT(*) FROM served WHERE voter_id=?", (voter.id,)).fetchone()[0]
                if self.quota is None or n_served < self.quota:
                    cand = c.execute(
                        "SELECT p.id, p.model_x, p.model_y FROM pairs p WHERE NOT EXISTS "
                        "(SELECT 1 FROM served s WHERE s.voter_id=? AND s.pair_id=p.id) "
                        "AND NOT EXISTS (SELECT 1 FROM withdrawn w WHERE w.pair_id=p.id) "
                        "AND p.n_served=(SELECT MIN(q.n_served) FROM pairs q WHERE NOT EXISTS "
                        "(SELECT 1 FROM served s2 WHERE s2.voter_id=? AND s2.pair_id=q.id) "
                        "AND NOT EXISTS (SELECT 1 FROM withdrawn w2 WHERE w2.pair_id=q.id))",
                        (voter.id, voter.id),
                    ).fetchall()
                    if cand:
                        pid, mx, my = min(cand, key=lambda r: _mix(self.salt, voter.id, r[0]))
                        a, b = (mx, my) if _mix(self.salt, "side", voter.id, pid) % 2 == 0 else (my, mx)
                        c.execute(
                            "INSERT INTO served (voter_id, pair_id, a_model, b_model, served_at) VALUES (?, ?, ?, ?, ?)",
                            (voter.id, pid, a, b, time.time()),
                        )
                        c.execute("UPDATE pairs SET n_served=n_served+1 WHERE id=?", (pid,))
                        row = (pid, a)
            done, total = self._progress(c, voter.id)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if row is None:
            return {"done": True, "progress": {"done": done, "total": total}}
        pair_id = row[0]
        answered = {
            q for (q,) in c.execute("SELECT question FROM votes WHERE voter_id=? AND pair_id=?", (voter.id, pair_id))
        }
        p = self.pair(pair_id)
        return {
            "done": False,
            "pair_id": pair_id,
            "prompt": p["prompt"],
            "questions": [{"id": q, "text": t} for q, t in QUESTIONS.items() if q not in answered],
            "progress": {"done": done, "total": total},
        }

    def served_sides(self, voter_id: int, pair_id: int) -> tuple[str, str] | None:
        if not 1 <= pair_id <= MAX_ID:
            return None
        row = (
            self._conn()
            .execute("SELECT a_model, b_model FROM served WHERE voter_id=? AND pair_id=?", (voter_id, pair_id))
            .fetchone()
        )
        return (row[0], row[1]) if row else None

    def mark_loaded(self, voter_id: int, pair_id: int, side: str) -> None:
        """Record that image ``side`` (A or B) of a served pair was sent to this voter."""
        col = {"A": "a_loaded", "B": "b_loaded"}[side]
        self._conn().execute(
            f"UPDATE served SET {col}=COALESCE({col}, ?) WHERE voter_id=? AND pair_id=?",
            (time.time(), voter_id, pair_id),
        )

    def cast(self, voter: Voter, pair_id: int, question: str, choice: str) -> VoteResult:
        """Record one vote. The insert itself enforces "served to this voter", "both images
        sent first", "a voter token, not revoked" and "once"."""
        if question not in QUESTIONS:
            raise ValueError(f"unknown question {question!r}; known: {list(QUESTIONS)}")
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if not 1 <= pair_id <= MAX_ID:
            return VoteResult("not_served")
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            cur = c.execute(
                "INSERT INTO votes (voter_id, pair_id, question, choice, winner, a_model, b_model, created_at) "
                "SELECT s.voter_id, s.pair_id, ?, ?, CASE ? WHEN 'A' THEN s.a_model WHEN 'B' THEN s.b_model END, "
                "s.a_model, s.b_model, ? FROM served s JOIN voters w ON w.id=s.voter_id "
                "WHERE s.voter_id=? AND s.pair_id=? AND w.role='voter' AND w.revoked=0 "
                "AND s.a_loaded IS NOT NULL AND s.b_loaded IS NOT NULL "
                "ON CONFLICT (voter_id, pair_id, question) DO NOTHING",
                (question, choice, choice, time.time(), voter.id, pair_id),
            )
            inserted = cur.rowcount
            status = "accepted"
            if inserted != 1:
                row = c.execute(
                    "SELECT s.a_loaded IS NOT NULL AND s.b_loaded IS NOT NULL, w.role='voter' AND w.revoked=0 "
                    "FROM served s JOIN voters w ON w.id=s.voter_id WHERE s.voter_id=? AND s.pair_id=?",
                    (voter.id, pair_id),
                ).fetchone()
                if row is None:
                    status = "not_served"
                elif not row[1]:
                    status = "not_allowed"
                elif not row[0]:
                    status = "not_loaded"
                else:
                    status = "duplicate"
            done, total = self._progress(c, voter.id)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return VoteResult(status, done, total)

    # -- reading
    def progress(self) -> dict:
        """Everything the admin page shows: per voter and per comparison."""
        c = self._conn()
        total = self.total_for()
        voters = [
            {
                "name": n,
                "role": r,
                "revoked": bool(rv),
                "votes": int(v),
                "served": int(s),
                "total": total,
                "last_vote": lv,
            }
            for n, r, rv, v, s, lv in c.execute(
                "SELECT w.name, w.role, w.revoked, "
                "(SELECT COUNT(*) FROM votes v WHERE v.voter_id=w.id), "
                "(SELECT COUNT(*) FROM served s WHERE s.voter_id=w.id), "
                "(SELECT MAX(created_at) FROM votes v WHERE v.voter_id=w.id) FROM voters w ORDER BY w.id"
            )
        ]
        comparisons = [
            {"models": f"{mx} vs {my}", "pairs": int(n), "votes": int(v)}
            for mx, my, n, v in c.execute(
                "SELECT p.model_x, p.model_y, COUNT(*), "
                "(SELECT COUNT(*) FROM votes v JOIN pairs q ON q.id=v.pair_id WHERE q.model_x=p.model_x AND q.model_y=p.model_y) "
                "FROM pairs p GROUP BY p.model_x, p.model_y ORDER BY 1, 2"
            )
        ]
        n_votes = c.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        withdrawn = self.withdrawn()
        return {
            "pairs": self.n_pairs(),
            "withdrawn": len(withdrawn),
            "withdrawn_pairs": withdrawn,
            "votes": n_votes,
            "questions": list(QUESTIONS),
            "voters": voters,
            "comparisons": comparisons,
        }

    def votes_rows(self) -> list[dict]:
        """Every vote joined with its pair, one dict per vote (for export)."""
        cur = self._conn().execute(
            "SELECT v.id AS vote_id, w.name AS voter, w.role AS voter_role, w.revoked <> 0 AS voter_revoked, "
            "v.pair_id, p.prompt_set, p.prompt_id, p.category, p.seed, "
            "p.model_x, p.model_y, v.question, v.choice, v.a_model, v.b_model, v.winner, v.created_at "
            "FROM votes v JOIN pairs p ON p.id=v.pair_id JOIN voters w ON w.id=v.voter_id ORDER BY v.id"
        )
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur]
        for r in rows:
            r["voter_revoked"] = bool(r["voter_revoked"])
        return rows

    def pairs_overview(self) -> list[dict]:
        """Every pair with its models, how often it was served and its votes (admin page only)."""
        cur = self._conn().execute(
            "SELECT p.id, p.prompt_set, p.prompt_id, p.category, p.seed, p.model_x, p.model_y, p.n_served, "
            "(SELECT COUNT(*) FROM votes v WHERE v.pair_id=p.id) AS votes FROM pairs p ORDER BY p.id"
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]
