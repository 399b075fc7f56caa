"""Who may train from the app: the admin token (with a lockout after wrong guesses) and public detection;
and who a client is, by the address its requests come from (for limits a script cannot reset cheaply)."""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
from collections import OrderedDict

TOKEN_ENV = "DMD2_ADMIN_TOKEN"
MAX_WRONG_TOKENS = 5   # wrong admin tokens allowed per client per LOCKOUT_S window; then its attempts are refused
LOCKOUT_S = 60.0
MAX_TRACKED_CLIENTS = 10_000   # clients whose wrong tokens are remembered at once (the least recent are forgotten)
UNKNOWN_CLIENT = "unknown"     # the key of callers without an address (direct Python calls)
LOOPBACK_HOSTS = ("localhost", "::1")
PROXY_HEADER = "x-forwarded-for"


def behind_proxy() -> bool:
    """Whether the app runs behind a proxy that puts the client's address first in x-forwarded-for:
    on a Hugging Face Space ($SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def address_key(host: str) -> str:
    """An address as a client key: IPv4 as is, IPv4-mapped IPv6 as its IPv4, other IPv6 as its /64 network
    (one subscriber usually gets a whole /64, so rotating addresses inside it costs nothing); a name as given."""
    host = host.strip()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower()
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(request) -> str | None:
    """The address a request (a gr.Request) came from, as `address_key` gives it; None if it has none.

    Behind Hugging Face Spaces' proxy every request arrives from the proxy, and the client's own address
    is the first entry of x-forwarded-for. That header is trusted only when the app knows it runs behind
    such a proxy (behind_proxy()): a client that reaches the app directly can send any x-forwarded-for it
    likes, and trusting it there would give a script a fresh address per request and so a way around
    every per-address limit. Elsewhere the address is the connection's, request.client.host.
    """
    if request is None:
        return None
    host = None
    if behind_proxy():
        headers = getattr(request, "headers", None)
        forwarded = headers.get(PROXY_HEADER) if headers is not None else None
        if forwarded:
            host = str(forwarded).split(",")[0].strip()
    if not host:
        client = getattr(request, "client", None)
        host = getattr(client, "host", None) if client is not None else None
    return address_key(str(host)) if host else None


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
    app without a token refuses them all. After MAX_WRONG_TOKENS wrong tokens from one client (its
    `client_address`) within LOCKOUT_S, that client's attempts are refused until the window has passed;
    other clients are not: one guesser cannot lock the real admin out."""

    def __init__(self, admin_token: str | None = None, public: bool = False, clock=time.monotonic,
                 disabled: str | None = None):
        self.admin_token = admin_token or None            # an empty token would be no protection
        self.public = public
        self.disabled = disabled                          # why this app never trains (e.g. ZeroGPU), or None
        self._clock = clock
        # client -> times of its recent wrong tokens; the client that failed least recently first
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def token_required(self) -> bool:
        return self.admin_token is not None

    def refusal(self) -> str | None:
        """Why training is disabled on this app, or None."""
        if self.disabled:
            return self.disabled
        if self.public and self.admin_token is None:
            return (f"Training is disabled: this app is public (--share, a Hugging Face Space or a network "
                    f"--host such as 0.0.0.0) and no "
                    f"admin token is configured. Set {TOKEN_ENV} on the server to enable it.")
        return None

    def authorize(self, token: str | None, client: str | None = None) -> None:
        """NotAllowed unless this caller may launch, stop or resume runs. `client`: who asks (its
        `client_address`); callers without one share the UNKNOWN_CLIENT lockout."""
        refusal = self.refusal()
        if refusal:
            raise NotAllowed(refusal)
        if self.admin_token is None:
            return
        if not token:
            raise NotAllowed("This app needs the admin token to launch, stop or resume runs: "
                             "enter it in the Admin token box.")
        client = client or UNKNOWN_CLIENT
        with self._lock:
            now = self._clock()
            self._forget_stale(now)
            failures = [f for f in self._failures.get(client, ()) if now - f < LOCKOUT_S]
            if len(failures) >= MAX_WRONG_TOKENS:
                wait = LOCKOUT_S - (now - failures[-MAX_WRONG_TOKENS])
                raise NotAllowed(f"Too many wrong admin tokens ({MAX_WRONG_TOKENS} in {LOCKOUT_S:.0f} s): "
                                 f"try again in {wait:.0f} s.")
            if not hmac.compare_digest(str(token).encode(), self.admin_token.encode()):
                self._failures[client] = failures + [now]
                self._failures.move_to_end(client)
                # Bounded memory: a guesser with many addresses cannot grow the table past this; the
                # clients it forgets are the ones whose last wrong token is the oldest.
                while len(self._failures) > MAX_TRACKED_CLIENTS:
                    self._failures.popitem(last=False)
                raise NotAllowed("Wrong admin token.")

    def _forget_stale(self, now: float) -> None:
        """Drop the clients whose last wrong token is older than LOCKOUT_S (they lead the ordered table)."""
        while self._failures:
            client, failures = next(iter(self._failures.items()))
            if now - failures[-1] < LOCKOUT_S:
                return
            del self._failures[client]
