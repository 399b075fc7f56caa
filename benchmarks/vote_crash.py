"""Arena votes under kill -9: every vote a client saw acknowledged survives a crash of the app, once.

    OMP_NUM_THREADS=1 python benchmarks/vote_crash.py [--clients 20] [--kills 2] [--votes-per-kill 40]
                                                      [--max-wait 120]

Builds two tiny random pixel UNets (a teacher and a 1-step student, as tests/conftest.py's tiny_pixel_unet)
in a temp dir, then `--kills` times: starts `app.py` on a free localhost port on the same votes file
(DMD2_VOTES_PER_MINUTE=0: no rate limit; SPACE_ID unset), checks it serves (one /new_round + /vote through
gradio_client), lets `--clients` gradio_client clients (threads) loop /new_round + /vote, and once
`--votes-per-kill` votes are acknowledged (a successful /vote reply), or `--max-wait` seconds have passed,
kills the app's whole process group with SIGKILL, at a moment a /vote request is in flight (waiting up to
5 s for one). The clients' requests fail and
they stop; then the file is opened with sqlite3 (which recovers the WAL): `PRAGMA integrity_check` must be
"ok" and every acknowledged battle id (the token's part before the dot) must be in `votes` exactly once.
A last start checks that the app serves after the final kill, and the checks run again.

Prints votes acknowledged, present, missing, duplicates, integrity and whether every restart served; exits
1 if an acknowledged vote is missing or duplicated, integrity fails, or a restart does not serve. Rows for
votes whose reply the kill cut off (committed, never acknowledged) are counted, not an error. Every wait
has a deadline, so the run is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("a", "b", "tie", "both_bad")
START_TIMEOUT_S = 180          # app.py must answer within this
REQUEST_TIMEOUT_S = 60         # one request (a hang guard)
JOIN_TIMEOUT_S = 90            # clients stopping after a kill (a hang guard)
IN_FLIGHT_WAIT_S = 5           # once enough votes are in, wait at most this for one in flight to kill during
# Unset for the app: a Space id (per-address limits behind a proxy), vote sync to the Hub, an admin token.
DROPPED_ENV = ("SPACE_ID", "SPACES_ZERO_GPU", "DMD2_VOTES_REPO", "DMD2_ADMIN_TOKEN", "DMD2_MODELS", "DMD2_FAMILY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(folder: Path) -> list[str]:
    """A tiny random 10-class 32x32 teacher and a 1-step student (timesteps [999]) as model folders."""
    import torch

    from dmd2.families.pixel import PixelFamily, save_pixel_unet

    torch.manual_seed(0)
    unet = PixelFamily().new_unet(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                  attention_head_dim=8)
    save_pixel_unet(unet, folder / "tiny-teacher")
    save_pixel_unet(unet, folder / "tiny-student", timesteps=[999])
    return [str(folder / "tiny-teacher"), str(folder / "tiny-student")]


def app_env() -> dict:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", DMD2_VOTES_PER_MINUTE="0")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in DROPPED_ENV:
        env.pop(key, None)
    return env


def start_app(folder: Path, models: list[str], n: int) -> tuple[subprocess.Popen, str]:
    """app.py in its own process group on a free port, on folder/votes.sqlite; returns (process, url) once it answers."""
    port = free_port()
    log = folder / f"app-{n}.log"
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--votes", str(folder / "votes.sqlite"),
           "--runs", str(folder / "runs")]
    for m in models:
        cmd += ["--model", m]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=app_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.3)
    kill_group(proc)
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to the app's whole process group (it was started with start_new_session), then reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def call(client, *args, api_name: str):
    """One request, bounded by REQUEST_TIMEOUT_S."""
    return client.submit(*args, api_name=api_name).result(timeout=REQUEST_TIMEOUT_S)


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked: list[str] = []       # battle ids whose /vote reply said the vote was recorded
        self.in_flight = 0               # /vote requests sent, not answered yet
        self.errors: list[str] = []      # failures before the kill (after it, failures are expected)
        self.after_kill = 0              # requests that failed once the app was killed

    def ack(self, battle_id: str) -> None:
        with self.lock:
            self.acked.append(battle_id)


def vote_once(client, tally: Tally, outcome: str) -> str | None:
    """/new_round then /vote; the battle id if the vote was acknowledged, else None (exceptions propagate)."""
    token = call(client, "random", api_name="/new_round")[0]
    if not token:
        raise RuntimeError("new_round: a battle without a token (a side failed)")
    with tally.lock:
        tally.in_flight += 1
    try:
        verdict = call(client, token, outcome, api_name="/vote")
    finally:
        with tally.lock:
            tally.in_flight -= 1
    if not (isinstance(verdict, dict) and verdict.get("outcome") == outcome):
        raise RuntimeError(f"vote: sent {outcome}, the server says {verdict!r}")
    battle_id = token.split(".")[0]
    tally.ack(battle_id)               # the reply arrived, so the server committed before answering
    return battle_id


def client_loop(i: int, url: str, tally: Tally, killed: threading.Event, max_rounds: int) -> None:
    """One client (its own Gradio session): rounds of /new_round + /vote until the app is killed."""
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=False)
    except Exception as e:
        with tally.lock:
            (tally.errors.append(f"connect: {type(e).__name__}: {e}") if not killed.is_set()
             else setattr(tally, "after_kill", tally.after_kill + 1))
        return
    try:
        for r in range(max_rounds):
            if killed.is_set():
                return
            try:
                vote_once(client, tally, OUTCOMES[(i + r) % len(OUTCOMES)])
            except Exception as e:
                with tally.lock:
                    if killed.is_set():
                        tally.after_kill += 1
                        return
                    tally.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                    if len(tally.errors) > 50:
                        return
    finally:
        try:
            client.close()
        except Exception:
            pass


def serves(url: str, tally: Tally) -> bool:
    """One vote through a fresh gradio_client Client succeeds (its battle id joins the acknowledged ones)."""
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=False)
        try:
            return vote_once(client, tally, "tie") is not None
        finally:
            client.close()
    except Exception as e:
        print(f"  the app does not serve: {type(e).__name__}: {e}", flush=True)
        return False


def check_db(path: Path, acked: list[str]) -> dict:
    """Integrity and the acknowledged votes' rows, read with plain sqlite3 (which recovers the WAL)."""
    db = sqlite3.connect(path, timeout=30)
    try:
        integrity = "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check").fetchall())
        counts = Counter(r[0] for r in db.execute("SELECT battle_id FROM votes"))
    finally:
        db.close()
    want = set(acked)
    return dict(integrity=integrity, rows=sum(counts.values()),
                present=sum(1 for b in want if counts.get(b, 0) >= 1),
                missing=sorted(b for b in want if b not in counts),
                duplicates=sum(c - 1 for c in counts.values() if c > 1),
                unacknowledged=len(set(counts) - want), acked_twice=len(acked) - len(want))


def run(clients: int = 20, kills: int = 2, votes_per_kill: int = 40, max_wait_s: float = 120.0,
        folder: Path | None = None, log=print) -> dict:
    """The crash test; returns its numbers (see `report`). `folder`: where the models, DB and logs go."""
    folder = Path(folder or tempfile.mkdtemp(prefix="dmd2-vote-crash-"))
    folder.mkdir(parents=True, exist_ok=True)
    models = tiny_models(folder / "models")
    votes = folder / "votes.sqlite"
    tally = Tally()
    served, checks, in_flight_at_kill = [], [], []
    start = time.perf_counter()
    for k in range(kills + 1):
        t0 = time.perf_counter()
        proc, url = start_app(folder, models, k)
        try:
            ok = serves(url, tally)
            served.append(ok)
            log(f"start {k + 1}: app.py up at {url} in {time.perf_counter() - t0:.1f} s, "
                f"{'serves' if ok else 'does NOT serve'}", flush=True)
            if k == kills:                  # the last start only has to serve
                break
            killed = threading.Event()
            before = len(tally.acked)
            threads = [threading.Thread(target=client_loop, args=(i, url, tally, killed, 10_000), daemon=True)
                       for i in range(clients)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + max_wait_s
            while time.monotonic() < deadline and len(tally.acked) - before < votes_per_kill \
                    and any(t.is_alive() for t in threads):
                time.sleep(0.02)
            # Kill mid-vote: wait (briefly, bounded) for a /vote request to be on its way.
            aim_by = time.monotonic() + IN_FLIGHT_WAIT_S
            while time.monotonic() < aim_by and tally.in_flight == 0 and any(t.is_alive() for t in threads):
                time.sleep(0.002)
            with tally.lock:
                in_flight_at_kill.append(tally.in_flight)
                killed.set()
            kill_group(proc)
            join_by = time.monotonic() + JOIN_TIMEOUT_S
            for t in threads:
                t.join(timeout=max(0.0, join_by - time.monotonic()))
            stuck = sum(t.is_alive() for t in threads)
            log(f"kill {k + 1}: SIGKILL after {len(tally.acked) - before} acknowledged votes this round, "
                f"{in_flight_at_kill[-1]} /vote requests in flight; "
                f"clients stopped{f' ({stuck} still stuck)' if stuck else ''}", flush=True)
            c = check_db(votes, tally.acked)
            checks.append(c)
            log(f"  after kill {k + 1}: integrity {c['integrity']}, {c['present']} of {len(set(tally.acked))} "
                f"acknowledged present, {len(c['missing'])} missing, {c['duplicates']} duplicates", flush=True)
        finally:
            if proc.poll() is None:
                kill_group(proc, signal.SIGTERM if k == kills else signal.SIGKILL)
    final = check_db(votes, tally.acked)
    checks.append(final)
    return dict(clients=clients, kills=kills, wall_s=time.perf_counter() - start, folder=str(folder),
                acknowledged=len(set(tally.acked)), in_flight_at_kill=in_flight_at_kill,
                present=final["present"], missing=len(final["missing"]), missing_ids=final["missing"][:10],
                duplicates=final["duplicates"], rows=final["rows"], unacknowledged=final["unacknowledged"],
                acked_twice=final["acked_twice"], integrity=final["integrity"],
                integrity_all=all(c["integrity"] == "ok" for c in checks),
                missing_any=max(len(c["missing"]) for c in checks),
                served=served, errors=list(tally.errors), failed_after_kill=tally.after_kill)


def passed(r: dict) -> bool:
    return (r["missing_any"] == 0 and r["duplicates"] == 0 and r["acked_twice"] == 0 and r["integrity_all"]
            and all(r["served"]) and r["acknowledged"] > 0)


def report(r: dict) -> str:
    lines = [
        f"{r['clients']} clients, {r['kills']} x kill -9, {r['wall_s']:.1f} s",
        f"votes acknowledged: {r['acknowledged']} (/vote requests in flight at each kill: "
        f"{', '.join(map(str, r['in_flight_at_kill'])) or '-'})",
        f"present after the restarts: {r['present']}",
        f"missing: {r['missing']}" + (f" ({', '.join(r['missing_ids'])})" if r["missing_ids"] else ""),
        f"duplicates: {r['duplicates']}",
        f"rows in SQLite: {r['rows']} ({r['unacknowledged']} committed but never acknowledged: the kill cut the reply)",
        f"PRAGMA integrity_check: {r['integrity']} (after every kill: {'ok' if r['integrity_all'] else 'NOT ok'})",
        f"restarts that serve a vote: {sum(r['served'])} of {len(r['served'])}",
        f"client errors before a kill: {len(r['errors'])}; requests cut off by a kill: {r['failed_after_kill']}",
    ]
    for e, n in Counter(r["errors"]).most_common(3):
        lines.append(f"  {n} x {e}")
    lines.append(f"result: {'PASS' if passed(r) else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--kills", type=int, default=2, help="kill -9 / restart cycles")
    p.add_argument("--votes-per-kill", type=int, default=40, metavar="N",
                   help="kill once N votes are acknowledged since the last start")
    p.add_argument("--max-wait", type=float, default=120.0, metavar="S",
                   help="kill after S seconds of voting even if fewer votes were acknowledged")
    p.add_argument("--folder", type=Path, help="where the models, votes DB and app logs go (default: a temp dir)")
    a = p.parse_args(argv)
    if a.clients < 1 or a.kills < 1 or a.votes_per_kill < 1 or a.max_wait <= 0:
        p.error("--clients, --kills and --votes-per-kill must be >= 1, --max-wait > 0")
    r = run(a.clients, a.kills, a.votes_per_kill, a.max_wait, a.folder)
    print(report(r), flush=True)
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
