"""Shared UI pieces: the public one-line error text."""

from __future__ import annotations

import logging

from dmd2.ui.widgets import public_message


def test_public_message_is_one_line_without_server_paths(caplog):
    error = ValueError("cannot read '/srv/app/runs/x/student/dmd2.json': Expecting value\nTraceback (most recent...)")
    with caplog.at_level(logging.WARNING, logger="dmd2.ui"):
        assert public_message(error) == "cannot read 'dmd2.json': Expecting value"
    assert "/srv/app/runs/x/student/dmd2.json" in caplog.text              # the whole error stays in the log
    assert public_message("see https://huggingface.co/tianweiy/DMD2 and rel/path") == \
        "see https://huggingface.co/tianweiy/DMD2 and rel/path"           # URLs and relative paths stay
    assert public_message(KeyError()) == "KeyError"                        # an empty message still says something
    assert public_message("folder /tmp/ then") == "folder / then"
