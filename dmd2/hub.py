"""The Hugging Face Hub without surprises: look in the local cache first, ask the network once, fail clearly.

A failed download retries for about 25 s per file; a model of several files would make an
offline user wait minutes for an error. So callers ask `cached_file` (no network) and, for
what is missing, `hub_reachable` (one request, a few seconds at most) before downloading;
`hub_file` downloads one file and turns any failure into a ModelLoadError that says what to run.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

_OFF = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when the user switched the Hub off ($HF_HUB_OFFLINE or $TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in _OFF for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the Hub's front page (no retries); False offline or on any error."""
    if offline():
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout):
            return True
    except Exception:  # DNS failure, refused, timeout, proxy error: all mean "not now"
        return False


def cached_file(repo: str, filename: str, cache_dir=None) -> Path | None:
    """The local path of `repo/filename` in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    except Exception:  # a malformed repo id is simply "not cached"
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def is_repo_id(source) -> bool:
    """'owner/name' that is not a local path: something to fetch from the Hub."""
    s = str(source)
    return not Path(s).exists() and s.count("/") == 1 and not s.startswith((".", "/", "~"))


def hub_file(filename: str, repo: str = "tianweiy/DMD2", **kwargs) -> Path:
    """A file of a Hub repo, downloaded once into the Hugging Face cache (kwargs go to hf_hub_download)."""
    from huggingface_hub import hf_hub_download

    from dmd2.families.base import ModelLoadError  # here, not at the top: dmd2.families imports diffusers

    try:
        return Path(hf_hub_download(repo, filename, **kwargs))
    except Exception as e:  # offline, unknown file, gated repo, ...: all end in the same advice
        raise ModelLoadError(
            f"could not get {filename!r} from the Hugging Face Hub repo {repo!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). On a machine with internet run "
            f"`hf download {repo} {filename}` (or download https://huggingface.co/{repo}/blob/main/{filename}) "
            f"and pass the local file path instead.") from None


def hub_kwargs(kwargs: dict) -> dict:
    """The from_pretrained kwargs that also apply to configs, tokenizers and VAEs (all but `variant`)."""
    return {k: v for k, v in kwargs.items() if k != "variant"}
