"""Arena votes survive kill -9 (issue 15): benchmarks/vote_crash.py with small numbers, once.

app.py runs in its own process group with tiny models; 20 gradio_client clients vote, the group gets SIGKILL
with a vote in flight, the app restarts on the same votes file: every acknowledged vote is in SQLite exactly
once, `PRAGMA integrity_check` says ok, and the restarted app serves a vote. About 70 s on 2 CPU cores
(two app starts).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "vote_crash.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("vote_crash", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_acknowledged_votes_survive_kill_9(tmp_path):
    vote_crash = load_benchmark()
    r = vote_crash.run(clients=20, kills=1, votes_per_kill=20, max_wait_s=60, folder=tmp_path)
    print(vote_crash.report(r))
    assert r["acknowledged"] >= 5 + 2            # clients voted before the kill (20 aimed for), + the two serving checks
    assert r["in_flight_at_kill"] and min(r["in_flight_at_kill"]) >= 1   # the kill cut a vote in flight
    assert r["missing_any"] == 0, r["missing_ids"]
    assert r["duplicates"] == 0 and r["acked_twice"] == 0
    assert r["integrity_all"] and r["integrity"] == "ok"
    assert r["served"] == [True, True]           # the first start and the restart after the kill
    assert r["errors"] == []                     # no client failed before the kill
    assert vote_crash.passed(r)
