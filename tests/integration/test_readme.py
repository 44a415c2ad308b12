"""Every fenced code block of README.md runs as written, so that the README cannot drift from the code.

The convention (the README's "Tests" section states it too; blocks added later follow it and are run the same way):

- The blocks of one ``## `` section (its ``###`` subsections included) run in document order, one section per test,
  in one fresh working directory that looks like the checkout (a symlink to each of its top-level entries:
  ``.venv``, ``examples/``, ``scripts/`` ...): a file one block writes (``model.pt``) is there for the next, and
  nothing lands in the checkout. Every block of a section gets the same private ``NEURON_BROKER_DIR``: the
  section's own where one of its blocks runs ``neuron-broker start``, else one that all such sections share (its
  broker, started by the first client's autostart, is found running by the next sections' clients, as on a host).
  A section's own broker is stopped when the section ends, the shared one when the module does.
- A ```` ```bash ```` block runs with ``bash -e -o pipefail``, after ``source .venv/bin/activate`` (which the README
  asks for once, at the top). A ```` ```python ```` block runs as a file with that environment's ``python``.
  ``PYTHONPATH`` names this checkout, so that its code runs whichever checkout the environment was installed from.
- An HTML comment on the line before a fence, ``<!-- readme-test: KIND -->``, says what else to do with the block:

  ``output``            an output sample or the shape of a document (not code): not run
  ``diagram``           a picture: not run
  ``excerpt of PATH``   a verbatim excerpt of the file PATH (checked); a block that runs must name PATH, so the file
                        runs in its place
  ``heavy``             runs, under a longer time limit for its section (Ray)
  ``not run (REASON)``  cannot run here, saying why (the reason is required)

- Any other block (``json``, ``yaml``, no language ...) that carries no marker fails the test: mark it, or make it
  a block that runs.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

README = os.path.join(ROOT, "README.md")
BLOCK_TIMEOUT_S = 100.0
HEAVY_TIMEOUT_S = 240.0
RUNNABLE = {"bash": "bash", "sh": "bash", "python": "python"}
NOT_RUN = ("output", "diagram", "not run")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str  # "" when the block has none
    section: str

    @property
    def kind(self) -> str:
        """What the test does with the block: "run", "heavy", "excerpt", "skip", or "unknown" (a failure)."""
        m = self.marker
        if m.startswith("excerpt of "):
            return "excerpt"
        if m in ("output", "diagram") or re.fullmatch(r"not run \(.+\)", m):
            return "skip"
        if m == "heavy" and self.lang in RUNNABLE:
            return "heavy"
        if not m and self.lang in RUNNABLE:
            return "run"
        return "unknown"

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'no language'}{', ' + self.marker if self.marker else ''})"


def blocks(path: str = README) -> list[Block]:
    lines = open(path, encoding="utf-8").read().splitlines()
    found, section, i = [], "(top)", 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        i += 1
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: a fence that is never closed"
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        found.append(Block(start + 1, lang, textwrap.dedent("\n".join(lines[start + 1:i])) + "\n",
                           marker.group(1) if marker else "", section))
        i += 1
    return found


def sections() -> list[str]:
    """The sections that have a block to run, in document order."""
    return list(dict.fromkeys(b.section for b in blocks() if b.kind in ("run", "heavy")))


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def test_every_block_is_classified_and_every_excerpt_is_in_its_file():
    found = blocks()
    assert len(found) >= 10, f"only {len(found)} blocks found in README.md: is the parser broken?"
    unknown = [str(b) for b in found if b.kind == "unknown"]
    assert not unknown, ("blocks that the test can neither run nor skip: give each a runnable language (bash, "
                         "python) or a <!-- readme-test: ... --> marker (see tests/integration/test_readme.py): "
                         + "; ".join(unknown))
    ran = "".join(b.text for b in found if b.kind in ("run", "heavy"))
    for b in (b for b in found if b.kind == "excerpt"):
        path = b.marker[len("excerpt of "):].strip()
        assert os.path.isfile(os.path.join(ROOT, path)), f"{b}: no file {path}"
        assert b.text in open(os.path.join(ROOT, path), encoding="utf-8").read(), \
            f"{b}: the block is not a verbatim excerpt of {path} (update one or the other)"
        assert path in ran, f"{b}: no block of the README that runs names {path}, so the file would never run"


def workdir(tmp_path) -> str:
    """A directory that looks like the checkout: a symlink to each top-level entry (but .git)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in os.listdir(ROOT):
        if name != ".git":
            os.symlink(os.path.join(ROOT, name), work / name)
    return str(work)


def stop_broker(directory: str, env: dict) -> None:
    from neuron_client.runtime import autostart

    if not os.path.isdir(directory) or not autostart.running_pid(directory):
        return
    subprocess.run([sys.executable, "-m", "broker", "--dir", directory, "stop"], env=env, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = autostart.running_pid(directory)
    if pid:
        os.kill(pid, signal.SIGKILL)


def run_block(b: Block, work: str, env: dict, timeout_s: float) -> None:
    if RUNNABLE[b.lang] == "python":
        name = f"readme_{b.line}.py"
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(b.text)
        script = f"source .venv/bin/activate\npython {name}\n"
    else:
        script = "source .venv/bin/activate\n" + b.text
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{b} did not finish within {timeout_s:.0f}s; its output:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what the block left behind in its session (a detached broker is not)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{b} exited {proc.returncode}; its output:\n{out[-4000:]}"


def section_params():
    params = []
    for s in sections():
        heavy = any(b.kind == "heavy" for b in blocks() if b.section == s)
        # a heavy section starts a local Ray (about 45 s on a loaded 2-CPU host): longer than the default limit
        marks = [pytest.mark.timeout(int(HEAVY_TIMEOUT_S) + 60)] if heavy else []
        params.append(pytest.param(s, id=slug(s), marks=marks))
    return params


def block_env(broker_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON_", "RAY_"))}
    env.update(NEURON_BROKER_DIR=broker_dir, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def shared_broker_dir(tmp_path_factory):
    """The broker directory of the sections that start no broker themselves; its broker is stopped at the end."""
    directory = str(tmp_path_factory.mktemp("readme") / "broker")
    yield directory
    stop_broker(directory, block_env(directory))


@pytest.mark.parametrize("section", section_params())
def test_section_blocks_run(section, tmp_path, shared_broker_dir):
    work = workdir(tmp_path)
    mine = [b for b in blocks() if b.section == section and b.kind in ("run", "heavy")]
    own = any(re.search(r"neuron-broker\s+start", b.text) for b in mine)
    broker_dir = str(tmp_path / "broker") if own else shared_broker_dir
    env = block_env(broker_dir)
    try:
        for b in mine:
            run_block(b, work, env, HEAVY_TIMEOUT_S if b.kind == "heavy" else BLOCK_TIMEOUT_S)
    finally:
        if own:
            stop_broker(broker_dir, env)
