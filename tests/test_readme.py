"""Every command of the README and of each docs/ page, run as written, at a reduced size.

A page's ``sh`` (or ``bash``, ``shell``) and ``python`` blocks are read in order and run one after
another in a fresh folder, the way a newcomer would type them: the README's in a folder with the
repository's ``.venv`` and ``tests/`` linked in, each docs/ page's in a folder of its own that links
the whole checkout (as a clone after ``make install``). ``export`` lines hold for the commands after
them, a command ending in ``&`` keeps running in the background (the tracking server) until the end.
Every other block (``text``, ``console``, ``mermaid``, ``yaml``, ...) is illustration and is not run; a
block must name its language. A shell block that cannot run here (a cloud account, a remote cluster)
opens with the line ``# not run by the tests: <why>`` (:data:`NOT_RUN`): at most :data:`MAX_NOT_RUN` on a
page, and only with the commands of :data:`NOT_RUN_COMMANDS`. What changes, and only this:

- **size**: ``-n`` at most 30 showers per energy; ``train``/``fleet``/``tune`` at 20 iterations with a
  checkpoint every 10 (added where the page leaves the defaults), FastCaloGAN's incremental step at
  5, ASHA at 2 samples, one fleet worker; ``validate`` and ``validate-fleet``'s classifiers at 2 epochs and
  one seed (added where the page leaves the defaults); the 300-region ``simulate --detector atlas-like`` keeps the
  regions ``photon_eta_02*`` (two), so that the fleets, sweeps and fleet validation on them stay small;
- **a port**: the tracking server's 5000 becomes a free port (in every command that names it);
- **a gate's verdict**: ``validate-fleet`` exits with 1 when a region fails its thresholds (what CI
  gates on), as every region does after 20 iterations; it must still have written its table;
- **what this machine lacks**: a command that needs a GPU (``--device cuda``, ``--gpus``, ``--gpu``) where there is
  none, or a Ray cluster (``--address auto``) where none runs, must stop at once with one line saying
  so (exit status not 0, no traceback) instead of hanging;
- **covered elsewhere**, each named in :data:`ELSEWHERE` and checked to exist: ``make demo``
  (``tests/test_demo.py`` runs the same ``calozoo demo`` at its test scale), ``make test`` (this suite),
  ``ray job submit`` (``tests/test_jobs.py`` submits the same fleet to a Ray head), and ``pip install``:
  of ``calozoo[inference]`` (``tests/test_packaging.py`` installs it into a fresh venv), or of packages
  by name (they must import here; ``tests/test_layering.py`` pulls and generates without torch or Ray).

A command that is not covered by these rules fails the test, so a new one cannot slip in untried.

How they run: the first ``calozoo`` command through the console script (``.venv/bin/calozoo``), the
others through the same click entry point in this test's process (``calozoo.cli.main``: torch, Ray and
MLflow imported once instead of once per command, and the local Ray the first command starts kept by
those after it, as it is within a fleet or a sweep), with the folder as working directory and the
``export``-ed variables in the environment; in their own process: the tracking server, the commands that
must be refused (a Ray this process already runs would otherwise be joined), and everything that is not
``calozoo``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
from click.testing import CliRunner

from calozoo.cli import main

from .test_registry_server import free_port

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
ELSEWHERE = {
    "make demo": "tests/test_demo.py",
    "make test": "tests/conftest.py",
    "ray job submit": "tests/test_jobs.py",
    "pip install": "tests/test_layering.py",
}
SIZE = {"-n": 30, "--iterations": 20, "--checkpoint-every": 10, "--incremental-every": 5, "--num-samples": 2,
        "--workers": 1, "--epochs": 2, "--seeds": 1}
TRAINING = ("train", "fleet", "tune")
VALIDATING = ("validate", "validate-fleet")


#: languages of the blocks that run (the shell ones as ``sh``); every other block is illustration
RUNNABLE = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python"}
#: the first line of a shell block that cannot run here (docs/contributing.md, "Docs run as tests")
NOT_RUN = "# not run by the tests:"
#: the commands a not-run block may hold: a cloud, a remote cluster or hardware that CI does not have
NOT_RUN_COMMANDS = ("ray up", "ray down", "ray attach", "ray dashboard", "ray exec", "ray submit", "ray rsync-up",
                    "ray rsync-down", "ray get-head-ip", "ray job", "ray status", "ssh", "scp", "rsync", "kubectl",
                    "aws", "gcloud", "az", "sbatch", "srun", "nvidia-smi", "export")
#: at most this many not-run blocks on one page
MAX_NOT_RUN = 4
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.M | re.S)


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a Markdown page, in order (language "" if none; a
    block indented in a list is dedented)."""
    return [((m.group(2).split() or [""])[0].lower(), textwrap.dedent(m.group(3)))
            for m in FENCE.finditer(path.read_text())]


def page_blocks(path: Path) -> list[tuple[str, str]]:
    """(``sh`` or ``python``, text) of the blocks of a page that run, in order: its shell and python
    blocks, less the shell blocks that open with :data:`NOT_RUN`."""
    return [(RUNNABLE[lang], text) for lang, text in fenced_blocks(path)
            if lang in RUNNABLE and not (RUNNABLE[lang] == "sh" and text.startswith(NOT_RUN))]


def commands(block: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, as argv lists."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def runs_ray(path: Path) -> bool:
    """Whether a page's commands start a Ray: a fleet, a sweep, the demo, or a campaign simulated on Ray."""
    for lang, block in page_blocks(path):
        for argv in commands(block) if lang == "sh" else []:
            if argv[0].endswith("calozoo") and len(argv) > 1 and (
                    argv[1] in ("fleet", "tune", "demo") or (argv[1] == "simulate" and "--no-ray" not in argv)):
                return True
    return False


def page_param(path: Path):
    """A page as a test parameter named after it, marked ``ray`` if its commands start one (tests/conftest.py)."""
    return pytest.param(path, marks=[pytest.mark.ray] if runs_ray(path) else [], id=path.name)


def _flag(argv: list[str], name: str) -> int | None:
    return argv.index(name) if name in argv else None


def scaled(argv: list[str], port: int) -> list[str]:
    """The command at the test's size (module docstring)."""
    argv = [a.replace("5000", str(port)) if "127.0.0.1:5000" in a else a for a in argv]
    if not argv[0].endswith("/calozoo"):
        return argv
    argv = list(argv)
    for name, most in SIZE.items():
        i = _flag(argv, name)
        if i is not None:
            argv[i + 1] = str(min(int(argv[i + 1]), most))
    sub = argv[1]
    if sub in TRAINING and "--resume" not in argv:
        for name in ("--iterations", "--checkpoint-every"):
            if _flag(argv, name) is None:
                argv += [name, str(SIZE[name])]
    if sub in VALIDATING:
        for name, value in (("--epochs", "2"), ("--seeds", "1")):
            if _flag(argv, name) is None:
                argv += [name, value]
    if sub == "simulate" and "atlas-like" in argv and _flag(argv, "--regions") is None:
        argv += ["--regions", "photon_eta_02*"]
    if sub == "mlflow":
        argv += ["--port", str(port)]
    return argv


def lacks(argv: list[str]) -> str | None:
    """What this machine lacks for the command: "GPU", "cluster", or None."""
    import torch

    if ("--gpu" in argv or "--gpus" in argv or ("--device" in argv and argv[argv.index("--device") + 1].startswith("cuda"))) \
            and not torch.cuda.is_available():
        return "GPU"
    if _flag(argv, "--address") is not None and not os.environ.get("RAY_ADDRESS"):
        return "cluster"
    return None


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the background command ended with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def _run(argv: list[str], home: Path, env: dict, in_process: bool) -> tuple[int, str]:
    """(exit status, output) of a command: in a process of its own, or through ``calozoo.cli.main``."""
    if not in_process:
        proc = subprocess.run(argv, cwd=home, env=env, capture_output=True, text=True, timeout=600)
        return proc.returncode, (proc.stdout + proc.stderr).strip()
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    changed.update({k: None for k in os.environ if k not in env})
    res = CliRunner().invoke(main, argv[1:], env=changed, catch_exceptions=True)
    out = res.output.strip()
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        out += "\nTraceback (in process):\n" + "".join(traceback.format_exception(res.exception))
    return res.exit_code, out


@dataclass
class Record:
    """What a page's run did: commands run, covered elsewhere, refused for what this machine lacks,
    and the time each took."""

    ran: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    timings: list[str] = field(default_factory=list)


def fresh_folder(tmp_path: Path, links: list[str]) -> tuple[Path, dict, int]:
    """(folder, environment, port) for a page's run: a new folder holding ``links`` to the repository
    (``.venv`` to this test's environment), the environment without a tracking URI or Ray address
    of the shell's, and a free port for the tracking server."""
    home = tmp_path / "clone"
    home.mkdir()
    (home / ".venv").symlink_to(VENV)
    for name in links:
        (home / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(CALOZOO_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    return home, env, free_port()


def run_blocks(blocks: list[tuple[str, str]], home: Path, env: dict, port: int, record: Record,
               page: str = "README") -> None:
    """Run a page's blocks in order in ``home`` (the working directory), by the rules of the module
    docstring; each command is added to ``record``; a command that fails, or that no rule covers,
    fails the test."""
    console_script_ran = False
    background: list[subprocess.Popen] = []
    try:
        for lang, block in blocks:
            if lang == "python":
                proc = subprocess.run([sys.executable, "-c", block], cwd=home, env=env, capture_output=True,
                                      text=True, timeout=600)
                assert proc.returncode == 0, f"{page} python block failed:\n{block}\n{proc.stderr[-3000:]}"
                record.ran.append(block.splitlines()[0])
                continue
            for argv in commands(block):
                line = shlex.join(argv)
                covered = next((k for k in ELSEWHERE if line.startswith(k)), None)
                if covered is not None:
                    assert (REPO / ELSEWHERE[covered]).exists()
                    if covered == "pip install":
                        named = [p for p in argv[2:] if not p.startswith("-")]
                        extra = [p for p in named if re.fullmatch(r"(calozoo|\.)\[inference\]", p)]
                        assert not extra or (REPO / "tests" / "test_packaging.py").exists()
                        mods = [p.replace("-", "_") for p in named if p not in extra]
                        if mods:  # the inference-only packages are the ones this suite runs on
                            subprocess.run([sys.executable, "-c", "import " + ", ".join(mods)], check=True, env=env)
                    record.elsewhere.append(line)
                    continue
                if argv[0] == "export":
                    key, _, value = argv[1].partition("=")
                    env[key] = value.replace("5000", str(port))
                    continue
                if argv[-1] == "&":
                    argv = scaled(argv[:-1], port)
                    proc = subprocess.Popen(argv, cwd=home, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
                    background.append(proc)
                    _wait_for(f"http://127.0.0.1:{port}/health", proc)
                    record.ran.append(line)
                    continue
                argv = scaled(argv, port)
                missing = lacks(argv)
                t0 = time.monotonic()
                calozoo = argv[0].endswith("/calozoo")
                returncode, out = _run(argv, home, env, in_process=calozoo and console_script_ran and not missing)
                console_script_ran |= calozoo
                if missing:
                    assert returncode != 0, f"{line}: ran without a {missing}?\n{out[-2000:]}"
                    assert "Traceback" not in out, f"{line}: a traceback instead of one line:\n{out[-3000:]}"
                    last = out.splitlines()[-1]
                    word = {"GPU": ("GPU", "CUDA"), "cluster": ("cluster", "Ray")}[missing]
                    assert any(w in last for w in word), f"{line}: the error does not say the {missing} is missing: {last}"
                    record.refused.append(line)
                    continue
                if argv[1:2] == ["validate-fleet"] and returncode == 1:
                    # a gate: its exit status says whether every region passed (at 20 iterations, none does)
                    assert re.search(r"\d+ regions, \d+ failing; summary: ", out), out[-3000:]
                else:
                    assert returncode == 0, f"{page} command failed: {shlex.join(argv)}\n{out[-4000:]}"
                record.ran.append(line)
                record.timings.append(f"{time.monotonic() - t0:6.1f} s  {shlex.join(argv)}")
    finally:
        ray.shutdown()  # the local Ray the in-process commands started
        for proc in background:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("readme", [page_param(REPO / "README.md")])
def test_every_readme_command_runs_as_written(readme, tmp_path, monkeypatch):
    home, env, port = fresh_folder(tmp_path, ["tests"])
    monkeypatch.chdir(home)
    record = Record()
    try:
        run_blocks(page_blocks(readme), home, env, port, record)
    finally:
        (tmp_path / "timings.txt").write_text("\n".join(record.timings) + "\n")
    ran, elsewhere = record.ran, record.elsewhere
    # the README's path ran whole: its two set-up commands (covered elsewhere) and every command after them
    assert len(ran) >= 8 and {"make demo", "make test"} <= {next(k for k in ELSEWHERE if e.startswith(k))
                                                           for e in elsewhere}
    # what the path made is there: the champion's showers, their report and the exported contract
    assert (home / "out" / "gen.h5").stat().st_size > 0 and (home / "out" / "report" / "report.md").exists()
    assert {p.name for p in (home / "out" / "export" / "pbwo4").iterdir()} >= {"model.onnx", "contract.json",
                                                                              "README.txt"}


def doc_pages() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def checkout_entries() -> list[str]:
    """The top-level files and folders of the checkout that a clone has: tracked, or new and not
    ignored (``.venv`` and build outputs are ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return sorted({line.split("/")[0] for line in listed.splitlines() if line} - {".venv"})


@pytest.mark.parametrize("page", [REPO / "README.md", *doc_pages()], ids=lambda p: p.name)
def test_blocks_name_their_language_and_mark_what_does_not_run(page):
    blocks = fenced_blocks(page)
    assert all(lang for lang, _ in blocks), f"{page.name}: a block without a language (sh, python, text, ...)"
    not_run = [(lang, text) for lang, text in blocks if lang in RUNNABLE and text.startswith(NOT_RUN)]
    assert len(not_run) <= MAX_NOT_RUN, f"{page.name}: {len(not_run)} blocks not run, at most {MAX_NOT_RUN}"
    for lang, text in not_run:
        assert RUNNABLE[lang] == "sh", f"{page.name}: a python block always runs; {NOT_RUN!r} is for shell blocks"
        why = text.splitlines()[0][len(NOT_RUN):].strip()
        assert why, f"{page.name}: {NOT_RUN!r} without a reason"
        for argv in commands(text):
            line = shlex.join(argv)
            assert any(line == c or line.startswith(c + " ") for c in NOT_RUN_COMMANDS), \
                f"{page.name}: {line!r} in a block that is not run; only {', '.join(NOT_RUN_COMMANDS)} may be"


def test_contributing_page_exists():
    assert (REPO / "docs" / "contributing.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("page", [page_param(p) for p in doc_pages()])
def test_every_docs_page_runs_as_written(page, tmp_path, monkeypatch):
    home, env, port = fresh_folder(tmp_path, checkout_entries())
    monkeypatch.chdir(home)
    record = Record()
    try:
        run_blocks(page_blocks(page), home, env, port, record, page=f"docs/{page.name}")
    finally:
        (tmp_path / "timings.txt").write_text("\n".join(record.timings) + "\n")
