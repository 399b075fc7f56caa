"""The one-way import rule (docs/architecture.md): `training` imports `dmd2`, never the reverse, except the
front ends that act on run folders (the app's tabs in dmd2/ui/ and `dmd2 push`), and those only through
`training.runs` (the run folder) and `training.jobs` (the trainer subprocess)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_MODULES = ("training.runs", "training.jobs")


def imports_of(path: Path) -> list[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def is_front_end(relative: str) -> bool:
    return relative.startswith("dmd2/ui/") or relative == "dmd2/push.py"


def test_dmd2_reaches_training_only_through_runs_and_jobs_from_its_front_ends():
    used = {}
    for path in sorted((ROOT / "dmd2").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for module in imports_of(path):
            if module == "training" or module.startswith("training."):
                used.setdefault(relative, set()).add(module)
    assert "dmd2/ui/app.py" in used and "dmd2/push.py" in used        # the rule is exercised, not vacuous
    bad = {f: sorted(m) for f, m in used.items() if not is_front_end(f) or not m <= set(ALLOWED_MODULES)}
    assert bad == {}


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from training.distill import distill\n    import training.config as c\n")
    assert imports_of(probe) == ["training.distill", "training.config"]


def test_scripts_use_library_modules_not_the_cli():
    """scripts/ and benchmarks/ import what they need from library modules, not from `dmd2.__main__`."""
    bad = [p.relative_to(ROOT).as_posix() for folder in ("scripts", "benchmarks", "training")
           for p in sorted((ROOT / folder).rglob("*.py")) if "dmd2.__main__" in imports_of(p)]
    assert bad == []
