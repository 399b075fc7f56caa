"""Votes that survive a restart: an optional sync of the arena's votes to a Hugging Face Hub dataset repo.

A Space's local disk is wiped on restart. With $DMD2_VOTES_REPO set (owner/name; the token is huggingface_hub's:
$HF_TOKEN, a Space secret), `start_sync(store)` first adds the votes of the repo's snapshot that the local DB
lacks (restore), then uploads the whole vote table as one JSON Lines file, `votes.jsonl` (the store's JSONL
export: hashed client ids only), every $DMD2_VOTES_SYNC_MINUTES (default 5) and once more on `stop()`. Votes
are only ever added, so each snapshot holds the one before; the repo's history keeps every version.

Failures (Hub down, bad token) are logged and retried at the next period; votes keep going to SQLite.
Nothing is uploaded before a restore has succeeded, so a fresh DB never overwrites the Hub's votes.
Without $DMD2_VOTES_REPO nothing is synced and nothing touches the network.

Why not huggingface_hub's CommitScheduler: it creates the repo in its constructor (network while the app is
built), pushes as soon as it starts (before a restore could finish), its `stop()` does not push the last votes,
and it uploads changed files of a folder, not rows of a SQLite table. A thread around `HfApi.upload_file` is
as short and keeps those rules.
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Callable

from dmd2 import hub
from dmd2.arena.store import BUSY_TIMEOUT_MS, COLUMNS, VoteStore, read_jsonl

REPO_ENV = "DMD2_VOTES_REPO"
MINUTES_ENV = "DMD2_VOTES_SYNC_MINUTES"
DEFAULT_MINUTES = 5.0
SNAPSHOT = "votes.jsonl"
log = logging.getLogger(__name__)


class VoteSync:
    """Keeps a Hub dataset repo's snapshot of a vote store up to date: restore first, then upload each period."""

    def __init__(self, store: VoteStore | Callable[[], VoteStore], repo_id: str,
                 every_s: float = DEFAULT_MINUTES * 60, token: str | None = None, endpoint: str | None = None):
        """Check the repo id and find the token (ValueError saying what to set); touches no network."""
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id = str(repo_id).strip()
        try:
            validate_repo_id(repo_id)
            if repo_id.count("/") != 1:
                raise HFValidationError("no owner")
        except HFValidationError as e:
            raise ValueError(f"${REPO_ENV} must be a dataset repo id 'owner/name' (e.g. alice/dmd2-votes), "
                             f"got {repo_id!r}: {e}") from None
        token = token or get_token()
        if not token:
            raise ValueError(f"${REPO_ENV}={repo_id} is set but no Hugging Face token was found: set HF_TOKEN (on a "
                             f"Space: as a Space secret, in its Settings) to a token with write access to {repo_id}")
        if not 0 < every_s < 1e8:
            raise ValueError(f"the sync period must be > 0 seconds, got {every_s!r}")
        self._store, self.repo_id, self.every_s = store, repo_id, float(every_s)
        self.api = HfApi(endpoint=endpoint or hub.endpoint(), token=token)
        self._lock = threading.Lock()        # one restore or upload at a time (thread, sync_now, stop)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._restored = False               # no upload before the Hub's votes are in: never overwrite them
        self._repo_ready = False
        self._uploaded: int | None = None    # votes in the snapshot on the Hub, when known

    @property
    def store(self) -> VoteStore:
        """The vote store (opened on first use when given as a function)."""
        return self._store if isinstance(self._store, VoteStore) else self._store()

    def restore(self) -> int:
        """Add the snapshot's votes this DB lacks, battle ids and hashed ids kept (none counts twice); how many."""
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        with self._lock, tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.api.hf_hub_download(self.repo_id, SNAPSHOT, repo_type="dataset", cache_dir=tmp)
                rows = read_jsonl(path)
            except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
                rows = []                     # a new repo (or none yet): nothing to restore
            store = self.store
            added = _insert(store.path, rows)
            self._restored = True
            if len(store) == len(rows):
                self._uploaded = len(rows)    # the Hub has them all already
        log.info("votes: restored %d of %d votes from the Hub dataset %s", added, len(rows), self.repo_id)
        return added

    def sync_now(self) -> bool:
        """Upload the votes if they changed (restoring first if not yet done); False after a logged failure."""
        try:
            if not self._restored:
                self.restore()
            with self._lock:
                self._upload()
            return True
        except Exception as e:    # any failure: log it, keep the votes, try again next time
            log.warning("votes: sync with the Hub dataset %s failed (the votes are safe in SQLite; next try in "
                        "%g s): %s: %s", self.repo_id, self.every_s, type(e).__name__, e)
            return False

    def _upload(self) -> None:
        store = self.store
        if len(store) == self._uploaded:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SNAPSHOT
            count = store.export_jsonl(path)
            if not self._repo_ready:
                self.api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
                self._repo_ready = True
            self.api.upload_file(path_or_fileobj=str(path), path_in_repo=SNAPSHOT, repo_id=self.repo_id,
                                 repo_type="dataset", commit_message=f"Arena votes: {count}")
        self._uploaded = count
        log.info("votes: %d votes synced to the Hub dataset %s", count, self.repo_id)

    def start(self) -> "VoteSync":
        """Restore and sync every `every_s` seconds in a daemon thread, returning at once; `stop()` ends it."""
        if self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._run, name="vote-sync", daemon=True)
            self._thread.start()
            atexit.register(self.stop)
        return self

    def _run(self) -> None:
        self.sync_now()
        while not self._stopped.wait(self.every_s):
            self.sync_now()

    def stop(self, timeout: float = 60.0) -> None:
        """End the thread and upload the last votes (one try, logged if it fails); later calls do nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        atexit.unregister(self.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self.sync_now()


def _insert(db_path: Path, rows: list[dict]) -> int:
    """Insert vote rows as they are; a row whose battle id is here already is skipped. Returns rows added."""
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        before = conn.total_changes
        conn.executemany(f"INSERT OR IGNORE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                         [[r[c] for c in COLUMNS] for r in rows])
        added = conn.total_changes - before
        conn.execute("COMMIT")
        return added
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def sync_minutes() -> float:
    """The sync period in minutes: $DMD2_VOTES_SYNC_MINUTES (a number > 0), else DEFAULT_MINUTES."""
    raw = os.environ.get(MINUTES_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_MINUTES
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < 1e6:
        raise ValueError(f"${MINUTES_ENV} must be a number of minutes > 0, got {raw!r}")
    return minutes


def start_sync(store: VoteStore | Callable[[], VoteStore]) -> VoteSync | None:
    """The started sync of `store` (or a function giving it) to $DMD2_VOTES_REPO; None, and no network, if unset."""
    repo_id = os.environ.get(REPO_ENV, "").strip()
    if not repo_id:
        return None
    return VoteSync(store, repo_id, every_s=sync_minutes() * 60).start()
