"""The app's admin gate: the token, the lockout after wrong tokens, and which apps count as public."""

from __future__ import annotations

import pytest

from dmd2.ui.auth import LOCKOUT_S, MAX_WRONG_TOKENS, AdminGate, NotAllowed, is_public

TOKEN = "correct horse battery staple"


def test_admin_token_and_public_apps():
    open_app = AdminGate()
    open_app.authorize(None)                                                   # local, no token: allowed
    guarded = AdminGate(TOKEN)
    with pytest.raises(NotAllowed, match="needs the admin token"):
        guarded.authorize("")
    with pytest.raises(NotAllowed, match="Wrong admin token"):
        guarded.authorize(TOKEN + "x")
    guarded.authorize(TOKEN)
    public = AdminGate(public=True)
    assert "Training is disabled: this app is public" in public.refusal()
    with pytest.raises(NotAllowed, match="DMD2_ADMIN_TOKEN"):
        public.authorize("anything")
    AdminGate(TOKEN, public=True).authorize(TOKEN)
    assert AdminGate("").token_required is False       # empty = not configured


def test_wrong_tokens_lock_the_admin_actions_for_a_while():
    now = [1000.0]
    guarded = AdminGate(TOKEN, clock=lambda: now[0])
    for _ in range(MAX_WRONG_TOKENS):
        with pytest.raises(NotAllowed, match="Wrong admin token"):
            guarded.authorize("guess")
    with pytest.raises(NotAllowed, match="Too many wrong admin tokens.*try again in 60 s"):
        guarded.authorize(TOKEN)                                   # even the right one, during the lockout
    now[0] += LOCKOUT_S / 2
    with pytest.raises(NotAllowed, match="try again in 30 s"):
        guarded.authorize(TOKEN)
    now[0] += LOCKOUT_S / 2
    guarded.authorize(TOKEN)                                       # the window has passed
    with pytest.raises(NotAllowed, match="Wrong admin token"):     # and a new window starts from zero
        guarded.authorize("guess")


@pytest.mark.parametrize("share, host, space, public", [
    (False, None, None, False), (False, "127.0.0.1", None, False), (False, "localhost", None, False),
    (False, "::1", None, False), (False, "[::1]", None, False), (False, "0.0.0.0", None, True),
    (False, "192.168.1.5", None, True), (False, "::", None, True), (True, "127.0.0.1", None, True),
    (False, "127.0.0.1", "user/space", True),
])
def test_is_public_counts_network_hosts_shares_and_spaces(monkeypatch, share, host, space, public):
    monkeypatch.delenv("SPACE_ID", raising=False)
    if space:
        monkeypatch.setenv("SPACE_ID", space)
    assert is_public(share, host) is public


def test_one_clients_wrong_tokens_do_not_lock_out_another():
    """The lockout is per client address: a guesser locks out itself, not the admin."""
    now = [1000.0]
    guarded = AdminGate(TOKEN, clock=lambda: now[0])
    for _ in range(MAX_WRONG_TOKENS):
        with pytest.raises(NotAllowed, match="Wrong admin token"):
            guarded.authorize("guess", client="203.0.113.66")
    with pytest.raises(NotAllowed, match="Too many wrong admin tokens"):
        guarded.authorize(TOKEN, client="203.0.113.66")
    guarded.authorize(TOKEN, client="198.51.100.20")                 # the admin, elsewhere
    guarded.authorize(TOKEN)                                         # callers without an address: their own key
    with pytest.raises(NotAllowed, match="Wrong admin token"):      # another guesser starts from zero
        guarded.authorize("guess", client="192.0.2.1")
    now[0] += LOCKOUT_S
    guarded.authorize(TOKEN, client="203.0.113.66")


def test_the_lockout_table_forgets_stale_clients_and_stays_bounded(monkeypatch):
    from dmd2.ui import auth

    now = [1000.0]
    guarded = AdminGate(TOKEN, clock=lambda: now[0])
    for k in range(50):
        with pytest.raises(NotAllowed, match="Wrong admin token"):
            guarded.authorize("guess", client=f"192.0.2.{k}")
    assert len(guarded._failures) == 50
    now[0] += LOCKOUT_S                                              # their wrong tokens are all stale now
    with pytest.raises(NotAllowed, match="Wrong admin token"):
        guarded.authorize("guess", client="203.0.113.1")
    assert list(guarded._failures) == ["203.0.113.1"]

    monkeypatch.setattr(auth, "MAX_TRACKED_CLIENTS", 10)             # many addresses within one window
    for k in range(30):
        with pytest.raises(NotAllowed, match="Wrong admin token"):
            guarded.authorize("guess", client=f"198.51.100.{k}")
    assert list(guarded._failures) == [f"198.51.100.{k}" for k in range(20, 30)]   # the most recent kept
