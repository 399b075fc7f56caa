"""Prompts: read them from a file (.txt or .parquet), check one before sampling, the app's examples."""

from __future__ import annotations

from pathlib import Path

MAX_PROMPT_CHARS = 300
PARQUET_COLUMNS = ("prompt", "caption", "text")     # the first one present is used
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "prompts.txt"


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of a .txt file, or the `prompt` / `caption` / `text` column of a .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow), or give the prompts as a "
                             f".txt file, one per line") from None
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ValueError(f"cannot read {path} as parquet: {type(e).__name__}: {e}") from None
        column = next((c for c in PARQUET_COLUMNS if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{path} has no {' / '.join(PARQUET_COLUMNS)} column (columns: {', '.join(table.column_names)})")
        prompts = [str(p).strip() for p in table.column(column).to_pylist() if p is not None and str(p).strip()]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text (one prompt per line)") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}: it is empty")
    return prompts


def example_prompts() -> list[str]:
    """The app's example prompts (assets/prompts.txt)."""
    return read_prompts(EXAMPLES)


def check_prompt(prompt, tokenizer=None, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The prompt without surrounding spaces, or ValueError saying what is wrong with it.

    Refused: not text, empty, longer than `max_chars` characters, or (given the model's CLIP
    `tokenizer`) more tokens than its text encoder reads (77 for SD/SDXL, start and end included),
    since the rest would be cut off silently.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("the prompt is empty: describe the image you want")
    if len(prompt) > max_chars:
        raise ValueError(f"the prompt is {len(prompt)} characters long; at most {max_chars} are allowed")
    if tokenizer is not None:
        limit = int(tokenizer.model_max_length)
        n = len(tokenizer.tokenize(prompt)) + 2          # + start and end tokens
        if n > limit:
            raise ValueError(f"the prompt is {n} CLIP tokens long (start and end included); the text encoder "
                             f"reads at most {limit}, so the end would be cut off: shorten it")
    return prompt
