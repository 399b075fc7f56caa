"""`python -m dmd2 push`: a finished run's exported student to a Hugging Face Hub model repo, in one commit.

It reads the run folder through `training.runs` (its one owner), the one module of `training` that
`dmd2` may use besides the app's `training.jobs`.
"""

from __future__ import annotations

import json
import re

from dmd2.cli import UsageError
from dmd2.hub import endpoint, is_repo_id
from training.runs import Run

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _front_matter(meta: dict) -> str:
    """The Hub's model-card metadata: library, tags and (when it is a Hub repo) the teacher as base_model."""
    family = meta.get("family", "pixel")
    lines = ["---", "library_name: diffusers", "tags:", "- dmd2", "- distillation",
             f"- {'text-to-image' if family != 'pixel' else 'class-conditional'}"]
    teacher = str(meta.get("teacher", ""))
    if teacher and is_repo_id(teacher):
        lines.append(f"base_model: {teacher}")
    return "\n".join(lines + ["---", "", ""])


def push_run(run, repo: str, private: bool = False) -> str:
    """Upload `run`/student (and its MODEL_CARD.md as the repo's README.md) to `repo`; returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    run = Run(run)
    if not run.path.is_dir():
        raise UsageError(f"run folder not found: {run.path}")
    state, student = run.state(), run.student
    if state != "finished":
        raise UsageError(f"{run.path} is not a finished run (state: {state or 'unknown'}): only a finished run has "
                         f"an exported student; finish it first (python -m training distill --resume --out {run.path})")
    if not run.has_student():
        raise UsageError(f"{student} has no complete student (dmd2.json and its weights): the run's export is "
                         f"incomplete")
    if not (student / "MODEL_CARD.md").is_file():
        raise UsageError(f"{student / 'MODEL_CARD.md'} is missing: the run's export is incomplete")
    if not REPO_ID.match(repo or ""):
        raise UsageError(f"--repo must look like owner/name, got {repo!r}")
    token = get_token()
    if not token:
        raise UsageError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN) with a "
                         "token that can write, then push again")
    meta = json.loads((student / "dmd2.json").read_text())
    card = _front_matter(meta) + (student / "MODEL_CARD.md").read_text()
    files = sorted(p for p in student.rglob("*") if p.is_file())
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(student).as_posix(), path_or_fileobj=str(p)) for p in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo, operations=ops, commit_message=f"DMD2 student from run {run.name}",
                          repo_type="model")
    except Exception as e:  # network, permissions, name taken by someone else: one line, not a traceback
        raise UsageError(f"could not push to {repo}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return f"{endpoint()}/{repo}"
