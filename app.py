"""Launch the dmd2-studio Gradio app:
`python app.py [--host H] [--port P] [--share] [--family pixel|sdxl|sd15|sd3|flux] [--model NAME_OR_PATH ...] [--votes PATH] [--runs DIR]
[--concurrency N] [--queue-size N]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys

FAMILIES = ("pixel", "sdxl", "sd15", "sd3", "flux")  # dmd2.families.FAMILIES, without importing torch first
FAMILY_ENV, MODELS_ENV = "DMD2_FAMILY", "DMD2_MODELS"   # a Space picks its family and models with variables


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the app, serve it until interrupted."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="open a public gradio.live link")
    p.add_argument("--family", default=os.environ.get(FAMILY_ENV) or "pixel", choices=FAMILIES,
                   help="model family to serve: pixel (class-conditional MNIST) or a text-to-image family "
                   f"(default: ${FAMILY_ENV}, else pixel)")
    p.add_argument("--model", action="append", metavar="NAME_OR_PATH",
                   help="a registry name or model folder to show (repeatable; default: the comma-separated "
                   f"${MODELS_ENV}, else every available model the demo serves)")
    p.add_argument("--votes", metavar="PATH", help="SQLite file for arena votes "
                   "(default: $DMD2_VOTES, else /data/votes.sqlite on a Space with persistent storage, else data/votes.sqlite)")
    p.add_argument("--runs", metavar="DIR", help="folder of training runs for the Train tab "
                   "(default: $DMD2_RUNS or runs/)")
    p.add_argument("--concurrency", type=int, metavar="N", help="generations (Compare, Arena rounds) running at "
                   "once (default: $DMD2_CONCURRENCY, else 1 on a GPU, on CPU cores / torch threads)")
    p.add_argument("--queue-size", type=int, metavar="N", help="requests waiting at most; more are told the app "
                   "is busy (default: $DMD2_QUEUE_SIZE, else 32 per generation slot)")
    args = p.parse_args(argv)
    if args.family not in FAMILIES:                    # a bad $DMD2_FAMILY (argparse checks only the flag)
        p.error(f"{FAMILY_ENV}={args.family!r}: choose one of {', '.join(FAMILIES)}")
    if args.model is None and os.environ.get(MODELS_ENV, "").strip():
        args.model = [m.strip() for m in os.environ[MODELS_ENV].split(",") if m.strip()]
    for flag, value in (("--concurrency", args.concurrency), ("--queue-size", args.queue_size)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")

    from dmd2.ui.gpu import on_zero_gpu   # imports nothing heavy

    if on_zero_gpu():
        import spaces  # noqa: F401  (ZeroGPU: before torch, which must not initialise CUDA first)

    from dmd2 import registry
    from dmd2.arena import VoteStore, default_votes_path
    from dmd2.arena.sync import start_sync
    from dmd2.families.base import ModelLoadError
    from dmd2.ui.app import build_app, describe_queue  # imported late: gradio is slow to import
    from dmd2.ui.auth import is_public

    votes = args.votes or default_votes_path()
    try:
        VoteStore(votes).close()           # fail now, not at the first vote
    except Exception as e:
        print(f"error: cannot open the votes database {votes}: {e}", file=sys.stderr)
        return 2
    for name in args.model or []:
        try:
            family = registry.spec_for(name).family
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if family != args.family:
            print(f"error: --model {name} is a {family} model; this app serves --family {args.family}",
                  file=sys.stderr)
            return 2
    if args.model is None and not registry.available(args.family):
        print(f"warning: no {args.family} model is available here" + (
            ": the SDXL names load from the Hugging Face cache, filled on first use on a GPU machine with "
            "internet; pass local pipeline or student folders with --model" if args.family != "pixel" else ""),
            file=sys.stderr)

    try:
        demo = build_app(args.model, votes, family=args.family, runs_root=args.runs,
                         public=is_public(args.share, args.host), concurrency=args.concurrency,
                         queue_size=args.queue_size)
        sync = start_sync(VoteStore(votes))            # $DMD2_VOTES_REPO: votes survive a Space's restart
    except ValueError as e:  # a bad $DMD2_CONCURRENCY, $DMD2_QUEUE_SIZE, $DMD2_DELETE_CACHE or vote-sync setting
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_queue(demo.queue_settings), flush=True)
    # A Space stops the app with SIGTERM: as an interrupt, Gradio shuts down and the last votes are synced.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    finally:
        if sync is not None:
            sync.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
