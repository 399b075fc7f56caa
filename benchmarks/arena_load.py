"""Arena under load: concurrent gradio_client clients start battles, vote and look at the leaderboard;
every vote must count once.

    OMP_NUM_THREADS=1 python benchmarks/arena_load.py [--clients 20] [--battles 10] [--leaderboard-every 2]
                                                      [--think 0] [--port 0] [--app-arg=--concurrency=2 ...]

Starts `app.py` in its own process on a free localhost port (the embedded MNIST models, the teacher at
its default 50 steps, a fresh votes database and runs folder in a temp dir), then each client (its own
Gradio session) runs `--battles` rounds of /new_round + /vote, waiting `--think` seconds between seeing
a round and voting (0: a closed loop of bots, the worst case), and views /leaderboard after every
`--leaderboard-every` votes. The clients are distinct users behind a proxy, as on a Hugging Face Space:
the app runs with SPACE_ID set and each client sends its own x-forwarded-for address (all of them come
from 127.0.0.1, and the arena's vote limit counts per address). Prints votes sent, votes recorded (rows
in SQLite), duplicates, errors and p50/p95 latencies of the three requests. Targets: every vote recorded
exactly once, no errors; new round p50 under 15 s, leaderboard p95 under 1 s. Every request has a
timeout, so the run is bounded. Latencies depend on the machine and its load; they are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("a", "b", "tie", "both_bad")
START_TIMEOUT_S = 300          # app.py must answer within this
REQUEST_TIMEOUT_S = 600        # one request
TARGET_ROUND_P50_S = 15.0
TARGET_LEADERBOARD_P95_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, folder: Path, app_args: list[str]) -> subprocess.Popen:
    """app.py on 127.0.0.1:port with a fresh votes DB, as if behind a Space's proxy; returns once it answers."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", SPACE_ID="benchmark/arena-load")
    env.pop("DMD2_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                             "--votes", str(folder / "votes.sqlite"), "--runs", str(folder / "runs"), *app_args],
                            cwd=ROOT, env=env, stdout=open(folder / "app.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with code {proc.returncode}:\n{(folder / 'app.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"app.py did not answer within {START_TIMEOUT_S} s:\n{(folder / 'app.log').read_text()}")


def call(client, *args, api_name: str):
    """One request, bounded by REQUEST_TIMEOUT_S."""
    return client.submit(*args, api_name=api_name).result(timeout=REQUEST_TIMEOUT_S)


def client_session(url: str, battles: int, seed: int, downloads: str, think_s: float,
                   leaderboard_every: int) -> dict:
    """One user: `battles` rounds of new_round + vote (and a leaderboard view every `leaderboard_every`
    votes); their tokens, latencies and errors."""
    from gradio_client import Client

    rng = np.random.default_rng(seed)
    out = dict(tokens=[], round_s=[], vote_s=[], board_s=[], board_state=Counter(), errors=[], sent=0)
    try:
        # A user of its own behind the proxy: the address the arena's vote limit counts.
        client = Client(url, verbose=False, download_files=downloads,
                        headers={"x-forwarded-for": f"198.51.100.{seed + 1}"})
    except Exception as e:
        out["errors"].append(f"connect: {type(e).__name__}: {e}")
        return out
    for battle in range(battles):
        try:
            start = time.perf_counter()
            token = call(client, "random", api_name="/new_round")[0]
            out["round_s"].append(time.perf_counter() - start)
            if not token:
                out["errors"].append("new_round: a battle without a token (a side failed)")
                continue
            time.sleep(think_s)
            outcome = OUTCOMES[int(rng.integers(len(OUTCOMES)))]
            start = time.perf_counter()
            out["sent"] += 1
            verdict = call(client, token, outcome, api_name="/vote")
            out["vote_s"].append(time.perf_counter() - start)
            if verdict.get("outcome") != outcome:
                out["errors"].append(f"vote: sent {outcome}, the server says {verdict.get('outcome')}")
            out["tokens"].append(token)
            if leaderboard_every and (battle + 1) % leaderboard_every == 0:
                start = time.perf_counter()
                table, _plot = call(client, api_name="/leaderboard")
                out["board_s"].append(time.perf_counter() - start)
                out["board_state"][interval_state(table)] += 1
        except Exception as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
    return out


def interval_state(table: dict) -> str:
    """What a /leaderboard table shows in its interval column: "current" (the intervals of its votes),
    "updating" (of fewer votes, being recomputed) or "computing" (none yet)."""
    from dmd2.ui.leaderboard import COMPUTING, UPDATING     # imported in main(), before the clients start

    cells = [str(row[3]) for row in table["data"] if row[2] is not None]
    if any(c == COMPUTING for c in cells):
        return "computing"
    return "updating" if any(c.endswith(UPDATING) for c in cells) else "current"


def percentiles(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    p50, p95 = np.percentile(xs, [50, 95])
    return f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(xs)})"


def app_settings(folder: Path) -> str:
    """The queue line app.py prints at start (its generation slots, queue size, cache cleaning), if any."""
    return next((line.strip() for line in (folder / "app.log").read_text(errors="replace").splitlines()
                 if line.startswith("queue:")), "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--battles", type=int, default=10, help="battles (and votes) per client")
    p.add_argument("--leaderboard-every", type=int, default=2, metavar="N",
                   help="each client views /leaderboard after every N votes (0: never)")
    p.add_argument("--think", type=float, default=0.0, metavar="S",
                   help="seconds a client looks at a round before voting (0: a closed loop, the worst case)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--app-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for app.py, e.g. --app-arg=--concurrency=1 (repeatable)")
    a = p.parse_args()
    if a.clients < 1 or a.battles < 1 or a.leaderboard_every < 0 or a.think < 0:
        p.error("--clients and --battles must be >= 1, --leaderboard-every and --think >= 0")

    import dmd2.ui.leaderboard  # noqa: F401  (slow to import: not inside the clients' timed loops)

    folder = Path(tempfile.mkdtemp(prefix="dmd2-arena-load-"))
    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}/"
    start = time.perf_counter()
    app = start_app(port, folder, a.app_arg)
    print(f"app.py up at {url} in {time.perf_counter() - start:.1f} s (votes: {folder / 'votes.sqlite'}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs"
          f"{', app.py ' + ' '.join(a.app_arg) if a.app_arg else ''})")
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            results = list(pool.map(lambda i: client_session(url, a.battles, i, str(folder / f"dl-{i}"), a.think,
                                                             a.leaderboard_every), range(a.clients)))
        wall = time.perf_counter() - start
    finally:
        app.terminate()
        app.wait()

    sent = sum(r["sent"] for r in results)
    tokens = [t for r in results for t in r["tokens"]]
    errors = [e for r in results for e in r["errors"]]
    with sqlite3.connect(folder / "votes.sqlite") as db:
        ids = [row[0] for row in db.execute("SELECT battle_id FROM votes")]
    counts = Counter(ids)
    sent_ids = {t.split(".")[0] for t in tokens}
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    missing = len(sent_ids - set(counts))
    strangers = len(set(counts) - sent_ids)

    settings = app_settings(folder)
    if settings:
        print(f"app {settings}")
    print(f"{a.clients} clients x {a.battles} battles in {wall:.1f} s (think time {a.think:g} s, "
          f"a leaderboard view every {a.leaderboard_every} votes)")
    print(f"votes sent: {sent}")
    print(f"votes recorded (rows in SQLite): {len(ids)}")
    print(f"acknowledged votes missing from SQLite: {missing}")
    print(f"duplicates (extra rows for one battle): {duplicates}")
    print(f"rows for battles no client voted on: {strangers}")
    print(f"errors: {len(errors)}")
    for e, n in Counter(errors).most_common(5):
        print(f"  {n} x {e[:200]}")
    print(f"new_round latency: {percentiles([x for r in results for x in r['round_s']])}")
    print(f"vote latency: {percentiles([x for r in results for x in r['vote_s']])}")
    boards = [x for r in results for x in r["board_s"]]
    states = sum((r["board_state"] for r in results), Counter())
    print(f"leaderboard latency: {percentiles(boards)}; its intervals: of the votes shown {states['current']}, "
          f"of fewer votes (updating) {states['updating']}, none yet {states['computing']}")
    target = a.clients * a.battles
    ok = len(ids) == len(counts) == target and not errors and not missing and not strangers
    print(f"target ({target} recorded exactly once, no errors): {'met' if ok else 'NOT met'}")
    rounds = [x for r in results for x in r["round_s"]]
    round_p50 = float(np.percentile(rounds, 50)) if rounds else float("inf")
    board_p95 = float(np.percentile(boards, 95)) if boards else float("nan")
    print(f"target (new round p50 < {TARGET_ROUND_P50_S:g} s): {'met' if round_p50 < TARGET_ROUND_P50_S else 'NOT met'}")
    if boards:
        print(f"target (leaderboard p95 < {TARGET_LEADERBOARD_P95_S:g} s): "
              f"{'met' if board_p95 < TARGET_LEADERBOARD_P95_S else 'NOT met'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
