"""The README's front matter makes the repository a Hugging Face Space; it must match what we pin."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_readme_front_matter_matches_requirements_and_keeps_the_setup_commands_first():
    text = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with YAML front matter between --- lines"
    meta = yaml.safe_load(match.group(1))
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pinned
    assert (ROOT / meta["app_file"]).is_file() and meta["title"]
    body = text[match.end():].lstrip().splitlines()
    assert body[0].startswith("# ")                        # the title, then the two set-up commands
    code = [line for line in body[1:] if line.strip()][:3]
    assert code[0] == "```bash" and code[1].startswith("make demo") and code[2].startswith("make test")


def test_readme_front_matter_enables_hugging_face_login():
    """hf_oauth: true makes the Hub set OAUTH_CLIENT_ID and the rest on the Space, so the Arena offers login."""
    text = (ROOT / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.S).group(1))
    assert meta["hf_oauth"] is True
