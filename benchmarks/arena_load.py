"""Arena under load: concurrent gradio_client clients start battles and vote; every vote must count once.

    python benchmarks/arena_load.py [--clients 20] [--battles 10] [--port 0]

Starts `app.py` in its own process on a free localhost port (the embedded MNIST models, a fresh
votes database and runs folder in a temp dir), then each client (its own Gradio session) runs
`--battles` rounds of /new_round + /vote. Prints votes sent, votes recorded (rows in SQLite),
duplicates, errors and p50/p95 latencies. Target: every vote recorded exactly once, no errors.
Latencies depend on the machine and its load; they are printed, never asserted.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, folder: Path) -> subprocess.Popen:
    """app.py on 127.0.0.1:port with a fresh votes DB; returns once the server answers."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.pop("DMD2_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                             "--votes", str(folder / "votes.sqlite"), "--runs", str(folder / "runs")],
                            cwd=ROOT, env=env, stdout=open(folder / "app.log", "wb"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with code {proc.returncode}:\n{(folder / 'app.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)


def client_session(url: str, battles: int, seed: int, downloads: str) -> dict:
    """One user: `battles` rounds of new_round + vote; their tokens, latencies and errors."""
    from gradio_client import Client

    rng = np.random.default_rng(seed)
    out = dict(tokens=[], round_s=[], vote_s=[], errors=[], sent=0)
    try:
        client = Client(url, verbose=False, download_files=downloads)
    except Exception as e:
        out["errors"].append(f"connect: {type(e).__name__}: {e}")
        return out
    for _ in range(battles):
        try:
            start = time.perf_counter()
            token = client.predict("random", api_name="/new_round")[0]
            out["round_s"].append(time.perf_counter() - start)
            if not token:
                out["errors"].append("new_round: a battle without a token (a side failed)")
                continue
            outcome = OUTCOMES[int(rng.integers(len(OUTCOMES)))]
            start = time.perf_counter()
            out["sent"] += 1
            verdict = client.predict(token, outcome, api_name="/vote")
            out["vote_s"].append(time.perf_counter() - start)
            if verdict.get("outcome") != outcome:
                out["errors"].append(f"vote: sent {outcome}, the server says {verdict.get('outcome')}")
            out["tokens"].append(token)
        except Exception as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
    return out


def percentiles(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    p50, p95 = np.percentile(xs, [50, 95])
    return f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(xs)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--battles", type=int, default=10, help="battles (and votes) per client")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    a = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dmd2-arena-load-"))
    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}/"
    start = time.perf_counter()
    app = start_app(port, folder)
    print(f"app.py up at {url} in {time.perf_counter() - start:.1f} s (votes: {folder / 'votes.sqlite'})")
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            results = list(pool.map(lambda i: client_session(url, a.battles, i, str(folder / f"dl-{i}")),
                                    range(a.clients)))
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

    print(f"{a.clients} clients x {a.battles} battles in {wall:.1f} s")
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
    target = a.clients * a.battles
    ok = len(ids) == len(counts) == target and not errors and not missing and not strangers
    print(f"target ({target} recorded exactly once, no errors): {'met' if ok else 'NOT met'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
