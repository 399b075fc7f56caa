"""Who may train from the app: the admin token (with a lockout after wrong guesses) and public detection."""

from __future__ import annotations

import hmac
import os
import threading
import time

TOKEN_ENV = "DMD2_ADMIN_TOKEN"
MAX_WRONG_TOKENS = 5   # wrong admin tokens allowed per LOCKOUT_S window; then every attempt is refused
LOCKOUT_S = 60.0
LOOPBACK_HOSTS = ("localhost", "::1")


class NotAllowed(ValueError):
    """The admin token is missing or wrong, or training is disabled on a public app."""


def is_public(share: bool = False, host: str | None = None) -> bool:
    """Whether others may reach the app: --share, a Hugging Face Space ($SPACE_ID), or a --host that is
    not a loopback address (0.0.0.0 serves every network the machine is on)."""
    if share or os.environ.get("SPACE_ID"):
        return True
    if host is None:
        return False
    host = host.strip().strip("[]").lower()
    return not (host in LOOPBACK_HOSTS or host.startswith("127."))


class AdminGate:
    """Launch, stop and resume need `admin_token` when one is set (constant-time compare); a `public`
    app without a token refuses them all. After MAX_WRONG_TOKENS wrong tokens within LOCKOUT_S, every
    attempt is refused until the window has passed."""

    def __init__(self, admin_token: str | None = None, public: bool = False, clock=time.monotonic):
        self.admin_token = admin_token or None            # an empty token would be no protection
        self.public = public
        self._clock = clock
        self._failures: list[float] = []                  # times of recent wrong tokens
        self._lock = threading.Lock()

    @property
    def token_required(self) -> bool:
        return self.admin_token is not None

    def refusal(self) -> str | None:
        """Why training is disabled on this app, or None."""
        if self.public and self.admin_token is None:
            return (f"Training is disabled: this app is public (--share, a Hugging Face Space or a network "
                    f"--host such as 0.0.0.0) and no "
                    f"admin token is configured. Set {TOKEN_ENV} on the server to enable it.")
        return None

    def authorize(self, token: str | None) -> None:
        """NotAllowed unless this caller may launch, stop or resume runs."""
        refusal = self.refusal()
        if refusal:
            raise NotAllowed(refusal)
        if self.admin_token is None:
            return
        if not token:
            raise NotAllowed("This app needs the admin token to launch, stop or resume runs: "
                             "enter it in the Admin token box.")
        with self._lock:
            now = self._clock()
            self._failures = [f for f in self._failures if now - f < LOCKOUT_S]
            if len(self._failures) >= MAX_WRONG_TOKENS:
                wait = LOCKOUT_S - (now - self._failures[0])
                raise NotAllowed(f"Too many wrong admin tokens ({MAX_WRONG_TOKENS} in {LOCKOUT_S:.0f} s): "
                                 f"try again in {wait:.0f} s.")
            if not hmac.compare_digest(str(token).encode(), self.admin_token.encode()):
                self._failures.append(now)
                raise NotAllowed("Wrong admin token.")
