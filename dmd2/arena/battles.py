"""Arena battles: random anonymous pairs, and signed tokens that let a client vote on exactly what it saw.

Token design: the battle (model names, prompt, seed, issue time) stays on the server, in a
`BattleBook` keyed by battle id; the client only gets `"<battle_id>.<signature>"`, where the
signature is HMAC-SHA256 over the canonical JSON of the whole battle. So the model names
never reach the browser (not even encrypted: no home-made crypto, no extra dependency), a
forged id or a tampered signature fails `hmac.compare_digest`, and the vote is recorded
with the server's copy of the battle, never with fields the client sent. The price: pending
battles are lost on restart (a vote for one then fails with InvalidToken and the user
starts a new battle); the app runs one process, so this is the simplest correct choice.
Replays of a valid token are stopped by the vote store (UNIQUE battle id), not here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

SECRET_ENV = "DMD2_ARENA_SECRET"
PAYLOAD_KEYS = ("battle_id", "model_a", "model_b", "prompt", "seed", "issued_at")
_PROCESS_SECRET = secrets.token_bytes(32)


class InvalidToken(Exception):
    """A battle token that is malformed, forged, tampered with, unknown or expired."""


class NotVotable(Exception):
    """A battle where a side failed to generate (or has not finished): no token, no vote."""


def default_secret() -> bytes:
    """The signing key: $DMD2_ARENA_SECRET if set, else a random key made once per process."""
    env = os.environ.get(SECRET_ENV)
    return env.encode() if env else _PROCESS_SECRET


def pick_pair(models: Sequence[str], rng: np.random.Generator) -> tuple[str, str]:
    """Two distinct models drawn uniformly at random, in random order (which is side A is random too)."""
    names = list(dict.fromkeys(models))          # drop duplicates, keep order
    if len(names) < 2:
        raise ValueError(f"a battle needs at least two different models, got {names}")
    i, j = rng.choice(len(names), size=2, replace=False)   # ordered draw: sides already shuffled
    return names[int(i)], names[int(j)]


@dataclass
class Battle:
    """One anonymous A/B battle; fill in images (or errors) as each side finishes generating."""

    battle_id: str
    model_a: str
    model_b: str
    prompt: str
    seed: int
    image_a: Any = None
    image_b: Any = None
    error_a: str | None = None
    error_b: str | None = None

    @property
    def votable(self) -> bool:
        """True only when both sides produced an image and neither failed."""
        return (self.image_a is not None and self.image_b is not None
                and self.error_a is None and self.error_b is None)


def new_battle(models: Sequence[str], prompt: str, rng: np.random.Generator,
               seed: int | None = None) -> Battle:
    """A fresh battle: a random pair, an unguessable id, and a random seed unless one is given."""
    model_a, model_b = pick_pair(models, rng)
    seed = int(rng.integers(0, 2**32)) if seed is None else int(seed)
    return Battle(secrets.token_urlsafe(16), model_a, model_b, str(prompt), seed)


def _canonical(payload: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces, exactly PAYLOAD_KEYS) -- the bytes that get signed."""
    return json.dumps({k: payload[k] for k in PAYLOAD_KEYS}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False).encode()


def _sign(payload: Mapping[str, Any], secret: bytes) -> str:
    """base64url (unpadded) HMAC-SHA256 of the canonical payload."""
    mac = hmac.new(secret, _canonical(payload), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue_token(battle: Mapping[str, Any], secret: bytes) -> str:
    """`"<battle_id>.<signature>"` for a battle payload (a dict with PAYLOAD_KEYS); opaque to the client."""
    if "." in str(battle["battle_id"]):
        raise ValueError("battle ids must not contain '.'")
    return f"{battle['battle_id']}.{_sign(battle, secret)}"


def verify_token(token: str, secret: bytes, battles: Mapping[str, Mapping[str, Any]],
                 max_age_s: float | None = None, now: float | None = None) -> dict:
    """The server-side battle payload for a genuine, unexpired token; raises InvalidToken otherwise."""
    if not isinstance(token, str) or token.count(".") != 1:
        raise InvalidToken("malformed battle token")
    battle_id, signature = token.split(".")
    payload = battles.get(battle_id)
    if payload is None:
        raise InvalidToken("unknown battle (expired, or the server restarted): start a new battle")
    if not hmac.compare_digest(signature, _sign(payload, secret)):
        raise InvalidToken("battle token signature does not match")
    now = time.time() if now is None else now
    if max_age_s is not None and now - float(payload["issued_at"]) > max_age_s:
        raise InvalidToken(f"battle token expired (older than {max_age_s:g} s): start a new battle")
    return dict(payload)


class BattleBook:
    """The server-side record of battles awaiting a vote; issues and verifies their tokens (thread-safe)."""

    def __init__(self, secret: bytes | None = None, max_age_s: float | None = 3600.0,
                 max_pending: int = 10_000):
        """Sign with `secret` (default: `default_secret()`); forget battles older than `max_age_s`."""
        self.secret = default_secret() if secret is None else secret
        self.max_age_s, self.max_pending = max_age_s, max_pending
        self._pending: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, battle: Battle, now: float | None = None) -> str:
        """Remember a finished battle and return its token; raises NotVotable if a side failed."""
        if not battle.votable:
            errors = "; ".join(e for e in (battle.error_a, battle.error_b) if e) or "missing image"
            raise NotVotable(f"battle {battle.battle_id} cannot be voted on: {errors}")
        now = time.time() if now is None else now
        payload = dict(battle_id=battle.battle_id, model_a=battle.model_a, model_b=battle.model_b,
                       prompt=battle.prompt, seed=int(battle.seed), issued_at=float(now))
        token = issue_token(payload, self.secret)
        with self._lock:
            self._pending[battle.battle_id] = payload
            self._prune(now)
        return token

    def verify(self, token: str, now: float | None = None) -> dict:
        """The battle payload (ids, names, prompt, seed, issued_at) for a valid token; else InvalidToken."""
        with self._lock:
            return verify_token(token, self.secret, self._pending, self.max_age_s, now)

    def forget(self, battle_id: str) -> None:
        """Drop a battle once its vote is stored (or abandoned)."""
        with self._lock:
            self._pending.pop(battle_id, None)

    def __len__(self) -> int:
        return len(self._pending)

    def _prune(self, now: float) -> None:
        """Drop expired battles, then the oldest ones beyond `max_pending` (insertion order = issue order)."""
        while self._pending:
            oldest = next(iter(self._pending.values()))
            too_old = self.max_age_s is not None and now - oldest["issued_at"] > self.max_age_s
            if not (too_old or len(self._pending) > self.max_pending):
                break
            self._pending.popitem(last=False)
