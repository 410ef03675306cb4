"""The README's Python examples run as written, and its commands match CI."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(lang):
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```" + lang + r"\n(.*?)```", text, flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    """The Python blocks run in order, in one namespace (later ones continue earlier ones)."""
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")


def test_ci_runs_the_readme_test_command():
    cmds = [line.strip() for b in _blocks("bash") for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    test_cmd = [c for c in cmds if "pytest" in c]
    assert len(test_cmd) == 1
    assert test_cmd[0] in (ROOT / ".ci" / "run").read_text()


def test_every_package_is_shipped():
    """pyproject lists packages explicitly: each package directory must be in it."""
    import pytest
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"semitriton." + ".".join(p.parent.relative_to(ROOT / "semitriton").parts)
             if p.parent != ROOT / "semitriton" else "semitriton"
             for p in (ROOT / "semitriton").rglob("__init__.py")}
    assert found <= listed, f"not shipped: {sorted(found - listed)}"
    assert "semitriton.kernels" in listed and cfg["package-dir"]["semitriton.kernels"] == "kernels"
