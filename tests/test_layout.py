"""The house's plan, checked: one `musicrfm` namespace, one-way imports between packages, a torch-free
protocol, and a wheel that installs nothing but `musicrfm` (docs/architecture.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the project packages its modules may import (itself included). The arrows of
# docs/architecture.md: protocol (formats, torch-free) is the ground floor, the engine stands on it, and
# clients never reach the engine or the server.
ALLOWED = {
    "protocol": {"protocol"},
    "engine": {"protocol", "engine"},
    "probes": {"protocol", "engine", "probes"},
    "evaluation": {"protocol", "engine", "probes", "evaluation"},
    "mini": {"protocol", "engine", "probes", "evaluation", "mini"},
    "server": {"protocol", "engine", "server"},
    "clients": {"protocol", "clients"},
}
FOLDERS = {"musicrfm": "cli", **{name: name for name in ALLOWED}}
OLD_TOP_LEVEL = {"engine", "probes", "evaluation", "mini", "server", "clients", "protocol", "cli"}


def imported_packages(path: Path, package: str) -> set[str]:
    """The project packages a module imports: `musicrfm.X...` -> X; relative imports stay in `package`;
    a bare top-level `engine` (the old layout) is reported as "<bare engine>"."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(package if node.level == 1 else "<beyond the package>")
                continue
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "musicrfm":
                found.add(parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "musicrfm")
            elif parts[0] in OLD_TOP_LEVEL:
                found.add(f"<bare {parts[0]}>")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    problems = []
    for path in sorted((REPO / FOLDERS[package]).rglob("*.py")):
        bad = imported_packages(path, package) - ALLOWED[package]
        if bad:
            problems.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert not problems, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(problems)


def test_tests_and_benches_import_the_installed_names():
    problems = [f"{p.relative_to(REPO)}: {sorted(b)}" for folder in ("tests", "bench") for p in (REPO / folder).rglob("*.py")
                if (b := {x for x in imported_packages(p, "tests") if x.startswith("<bare")})]
    assert not problems, "\n".join(problems)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_installed_namespace_only(tmp_path):
    """From outside the checkout: every package imports as musicrfm.X, and no top-level `engine` or
    `server` was installed for other projects to collide with."""
    code = ("import importlib, importlib.util\n"
            f"for name in {sorted(ALLOWED)!r}: importlib.import_module('musicrfm.' + name)\n"
            f"print([n for n in {sorted(OLD_TOP_LEVEL)!r} if importlib.util.find_spec(n) is not None])")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"top-level packages outside the namespace: {r.stdout}"


def test_protocol_and_client_commands_need_no_torch(tmp_path):
    code = ("import sys, musicrfm.protocol.wire, musicrfm.protocol.score, musicrfm.protocol.connection\n"
            "import musicrfm.protocol.wav, musicrfm.clients.listen, musicrfm.clients.perform, musicrfm.main\n"
            "from musicrfm.main import build_parser; build_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy.fft') if m in sys.modules))")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch" not in r.stdout and "transformers" not in r.stdout, r.stdout


def test_version(tmp_path):
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "musicrfm", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"musicrfm {version('musicrfm')}"


def test_expected_errors_cover_every_package_error():
    """musicrfm.main turns EXPECTED_ERRORS into one line without a traceback; every error class the
    packages define for bad input must be one of them."""
    from musicrfm.main import EXPECTED_ERRORS

    missing = []
    for folder in ALLOWED:
        for path in (REPO / folder).rglob("*.py"):
            module = "musicrfm." + ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.replace(f"musicrfm.{folder}", f"musicrfm.{folder}", 1)
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Unavailable")):
                    mod = __import__(module.removesuffix(".__init__"), fromlist=["_"])
                    cls = getattr(mod, node.name)
                    if not issubclass(cls, EXPECTED_ERRORS):
                        missing.append(f"{module}.{node.name}")
    assert not missing, missing


def test_regular_wheel_layout(tmp_path):
    """A regular (non-editable) install: the wheel holds musicrfm/... only, with the page, the example
    scores and the bundled model as package data."""
    # Built from a copy: setuptools builds in the source tree (build/), and a build/ left there by an
    # earlier run would put modules deleted since into the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                               ".pytest_cache", ".venv", "tests", "docs", "bench"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("musicrfm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"musicrfm"}, tops
    for needed in ("musicrfm/main.py", "musicrfm/__main__.py", "musicrfm/protocol/wire.py", "musicrfm/engine/loop.py",
                   "musicrfm/clients/web/index.html", "musicrfm/clients/scores/example.toml",
                   "musicrfm/engine/weights/musicgen-mini/model.safetensors",
                   "musicrfm/engine/weights/musicgen-mini/banks/notes.safetensors"):
        assert needed in names, needed
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "musicrfm = musicrfm.main:main" in entry
    # ... and it runs from where it is installed, not from this checkout
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import musicrfm.engine.model as m, musicrfm.main\n"
            "print(m.bundled_model_folder('musicgen-mini'))\n"
            "musicrfm.main.build_parser()")
    r = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(target)), r.stdout
