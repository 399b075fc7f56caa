"""Arena votes in SQLite (WAL): each battle voted at most once, per-client rate limit, hashed client ids.

A voter may have several ids (its session, its address, its user): each carries the rate limit, so a
client that changes the one it controls (a fresh session) is still refused by the others. The ids of
recent votes, hashed, live in `recent_clients` only as long as the limit's window needs them; a vote
row keeps the hash of the voter's first id.

Concurrency: one connection per thread (sqlite3 connections must not be shared mid-transaction);
every vote is one `BEGIN IMMEDIATE` transaction, which takes SQLite's write lock before reading,
so the duplicate check, the rate-limit count and the insert are atomic across threads *and*
processes. The UNIQUE constraint on `battle_id` is the final guard against a double vote.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

DEFAULT_PATH = Path("data") / "votes.sqlite"
VOTES_ENV = "DMD2_VOTES"
OUTCOMES = ("a", "b", "tie", "both_bad")
COLUMNS = ("battle_id", "model_a", "model_b", "prompt", "seed", "outcome", "created_at", "client_hash")
SALT_ENV = "DMD2_ARENA_SALT"
BUSY_TIMEOUT_MS = 30_000



VOTE_LIMIT_ENV = "DMD2_VOTES_PER_MINUTE"
DAILY_VOTES_ENV = "DMD2_DAILY_VOTES"
DAY_S = 24 * 3600.0


def vote_limit_from_env(default: int = 30) -> int | None:
    """Votes per client id per minute: $DMD2_VOTES_PER_MINUTE (0: no limit, for a closed load test), else `default`."""
    raw = os.environ.get(VOTE_LIMIT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{VOTE_LIMIT_ENV}={raw!r} must be a whole number of votes per minute (0: no limit)") from None
    if value < 0:
        raise ValueError(f"{VOTE_LIMIT_ENV}={raw!r} must be >= 0 (0: no limit)")
    return value or None


def daily_votes_from_env(default: int = 200) -> int | None:
    """Votes per logged-in user per rolling 24 h: $DMD2_DAILY_VOTES (0: no cap), else `default`."""
    raw = os.environ.get(DAILY_VOTES_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{DAILY_VOTES_ENV}={raw!r} must be a whole number of votes per day (0: no cap)") from None
    if value < 0:
        raise ValueError(f"{DAILY_VOTES_ENV}={raw!r} must be >= 0 (0: no cap)")
    return value or None


PERSISTENT = Path("/data")    # a Hugging Face Space's persistent storage, when the Space has it


def default_votes_path(persistent: Path = PERSISTENT) -> Path:
    """Where arena votes go: $DMD2_VOTES; else `persistent`/votes.sqlite when that folder exists and is writable
    (a Space's persistent storage survives restarts, its other disk does not); else data/votes.sqlite
    (relative to the working directory)."""
    if os.environ.get(VOTES_ENV):
        return Path(os.environ[VOTES_ENV])
    if persistent.is_dir() and os.access(persistent, os.W_OK | os.X_OK):
        return persistent / "votes.sqlite"
    return DEFAULT_PATH


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS votes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    battle_id   TEXT    NOT NULL UNIQUE,
    model_a     TEXT    NOT NULL,
    model_b     TEXT    NOT NULL CHECK (model_b <> model_a),
    prompt      TEXT    NOT NULL,
    seed        INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN {OUTCOMES!r}),
    created_at  REAL    NOT NULL,
    client_hash TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_client_time ON votes (client_hash, created_at);
CREATE TABLE IF NOT EXISTS recent_clients (
    battle_id   TEXT    NOT NULL,
    client_hash TEXT    NOT NULL,
    created_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS recent_clients_client_time ON recent_clients (client_hash, created_at);
CREATE INDEX IF NOT EXISTS recent_clients_time ON recent_clients (created_at);
"""


class DuplicateVote(Exception):
    """This battle already has a vote; a battle counts once."""


class RateLimited(Exception):
    """This client (one of its ids) voted too often within the rolling window."""

    def __init__(self, max_votes: int, window_s: float, retry_after_s: float):
        self.max_votes, self.window_s, self.retry_after_s = max_votes, window_s, retry_after_s
        super().__init__(f"rate limit: at most {max_votes} votes per {window_s:g} s per client; "
                         f"try again in {max(retry_after_s, 0.0):.0f} s")


class DailyCapReached(Exception):
    """This voter (a logged-in user: the vote row's id) already cast `cap` votes in the last 24 hours."""

    def __init__(self, cap: int, retry_after_s: float):
        self.cap, self.retry_after_s = cap, retry_after_s
        super().__init__(f"daily cap: at most {cap} votes per 24 h per user; "
                         f"try again in {max(retry_after_s, 0.0) / 3600:.1f} h")


def _load_or_create_salt(db_path: Path) -> bytes:
    """The salt from $DMD2_ARENA_SALT, else a random one stored in `<db>.salt` (created once, atomically)."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode()
    salt_path = db_path.with_name(db_path.name + ".salt")
    if not salt_path.exists():
        tmp = salt_path.with_name(f"{salt_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, salt_path)      # atomic; fails if another process won the race
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    salt = salt_path.read_text().strip()
    if not salt:
        raise RuntimeError(f"empty salt file {salt_path}; delete it or set ${SALT_ENV}")
    return salt.encode()


class VoteStore:
    """Votes table in a SQLite file (WAL mode); safe to use from many threads and processes."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, max_votes: int | None = 30,
                 window_s: float = 60.0):
        """Open (or create) the DB; `max_votes` per client per rolling `window_s` seconds (None: no limit)."""
        self.path = Path(path)
        if str(path) == ":memory:":
            raise ValueError("VoteStore needs a file path (WAL and per-thread connections need a file)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_votes, self.window_s = max_votes, float(window_s)
        self._salt = _load_or_create_salt(self.path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"could not enable WAL on {self.path} (journal_mode={mode})")
        conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (created on first use, autocommit; transactions are explicit)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")   # durable enough in WAL mode, much faster
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def hash_client(self, client_id: str) -> str:
        """HMAC-SHA256 of the client id keyed by the salt (hex); the raw id is never stored."""
        return hmac.new(self._salt, str(client_id).encode(), hashlib.sha256).hexdigest()

    def record(self, battle_id: str, model_a: str, model_b: str, prompt: str, seed: int,
               outcome: str, client_id: str | Sequence[str], now: float | None = None,
               daily_limit: int | None = None) -> dict:
        """Store one vote; raises DuplicateVote, RateLimited, DailyCapReached, or ValueError for a malformed vote.

        `client_id`: who votes, one id or several of the same voter (e.g. session, address, user). Each
        id is rate-limited on its own and the vote is refused if any of them is over the limit; the row
        keeps the first, hashed. `daily_limit`: at most that many votes in a rolling 24 h whose row keeps
        the same first id (the arena passes it for a logged-in user, whose id then comes first).
        """
        ids = [client_id] if isinstance(client_id, str) else list(dict.fromkeys(map(str, client_id)))
        if not ids:
            raise ValueError("a vote needs a client id")
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if model_a == model_b:
            raise ValueError(f"a battle needs two different models, got {model_a!r} twice")
        if not battle_id:
            raise ValueError("empty battle id")
        now = time.time() if now is None else float(now)
        row = dict(battle_id=str(battle_id), model_a=str(model_a), model_b=str(model_b),
                   prompt=str(prompt), seed=int(seed), outcome=outcome, created_at=now,
                   client_hash=self.hash_client(ids[0]))
        hashes = [self.hash_client(i) for i in ids]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")     # write lock first: check + insert are one atomic step
        try:
            if conn.execute("SELECT 1 FROM votes WHERE battle_id = ?", (row["battle_id"],)).fetchone():
                raise DuplicateVote(f"battle {battle_id!r} already has a vote")
            # Rows that have left the window count for no limit: no need to keep who voted then.
            conn.execute("DELETE FROM recent_clients WHERE created_at <= ?", (now - self.window_s,))
            self._check_rate(conn, hashes, now)
            if daily_limit is not None:
                self._check_daily(conn, row["client_hash"], daily_limit, now)
            try:
                conn.execute(f"INSERT INTO votes ({', '.join(COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(COLUMNS))})", [row[c] for c in COLUMNS])
            except sqlite3.IntegrityError as e:
                if "battle_id" in str(e):
                    raise DuplicateVote(f"battle {battle_id!r} already has a vote") from e
                raise ValueError(f"invalid vote: {e}") from e
            conn.executemany("INSERT INTO recent_clients (battle_id, client_hash, created_at) VALUES (?, ?, ?)",
                             [(row["battle_id"], h, now) for h in hashes])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return row

    def _check_rate(self, conn: sqlite3.Connection, client_hashes: list[str], now: float) -> None:
        """Raise RateLimited if any of these client ids already has `max_votes` votes in the last `window_s`
        seconds; its retry time is when enough of them have left the window for all ids to be under it."""
        if self.max_votes is None:
            return
        retry = None
        for client_hash in client_hashes:
            times = [t for (t,) in conn.execute(
                "SELECT created_at FROM recent_clients WHERE client_hash = ? AND created_at > ? ORDER BY created_at",
                (client_hash, now - self.window_s))]
            if len(times) >= self.max_votes:
                wait = times[len(times) - self.max_votes] + self.window_s - now
                retry = wait if retry is None else max(retry, wait)
        if retry is not None:
            raise RateLimited(self.max_votes, self.window_s, retry)

    @staticmethod
    def _check_daily(conn: sqlite3.Connection, client_hash: str, cap: int, now: float) -> None:
        """Raise DailyCapReached if the votes kept under `client_hash` in the last 24 h number `cap` or more."""
        times = [t for (t,) in conn.execute(
            "SELECT created_at FROM votes WHERE client_hash = ? AND created_at > ? ORDER BY created_at",
            (client_hash, now - DAY_S))]
        if len(times) >= cap:
            raise DailyCapReached(cap, times[len(times) - cap] + DAY_S - now)

    def votes(self) -> list[dict]:
        """All votes, oldest first, as dicts with the keys in COLUMNS."""
        rows = self._conn().execute(f"SELECT {', '.join(COLUMNS)} FROM votes ORDER BY id").fetchall()
        return [dict(r) for r in rows]

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def export_csv(self, path: str | os.PathLike) -> int:
        """Write all votes to a CSV file (header = COLUMNS); returns the number of rows."""
        rows = self.votes()
        with _atomic_write(path) as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)

    def export_jsonl(self, path: str | os.PathLike) -> int:
        """Write all votes as JSON Lines (one object per vote); returns the number of rows."""
        rows = self.votes()
        with _atomic_write(path) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return len(rows)

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
        self._local = threading.local()

    def __enter__(self) -> "VoteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _atomic_write:
    """Write a text file via a temporary file and rename, so readers never see half an export."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "w", newline="", encoding="utf-8")
        return self.f

    def __exit__(self, exc_type, *rest):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Votes back from `export_csv`, with seed as int and created_at as float."""
    with open(path, newline="", encoding="utf-8") as f:
        return [_typed(r) for r in csv.DictReader(f)]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Votes back from `export_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [_typed(json.loads(line)) for line in f if line.strip()]


def _typed(row: dict) -> dict:
    """A vote row with the column types of the DB (CSV gives strings)."""
    row = {c: row[c] for c in COLUMNS}
    row["seed"], row["created_at"] = int(row["seed"]), float(row["created_at"])
    return row
