"""The README's commands, read from the README and run as written.

Every fenced ```bash or ```python block of the README that a reader is meant to run follows
a marker `<!-- run: NAME -->` (invisible on GitHub). `walk_commands(NAME)` reads those blocks:
a bash block gives one command per logical line (comments dropped, backslash continuations
joined, `a && b` split into its parts), a python block one `PythonBlock`. `run_walk` runs them
in order in a folder: `minigpt` lines as `python -m minigpt` with this checkout first on
PYTHONPATH (or in this process), python blocks in one namespace per walk, other lines in bash.
So what the README prints, what tests/test_readme_walk.py runs and what
scripts/first_hour.py times are one list.

    python scripts/readme_walk.py              # the sections and their commands
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scripts.checkout import child_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DATA = Path(os.environ.get("MINIGPT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
MARKED_BLOCK = re.compile(r"<!-- run: ([\w-]+) -->\n```(bash|python)\n(.*?)```", re.S)
FENCE = re.compile(r"^```(bash|python|sh|shell|console)\s*$", re.M)


@dataclass(frozen=True)
class PythonBlock:
    """A README ```python block, run as one program."""

    code: str


Command = str | PythonBlock


def sections(readme: Path = README) -> list[str]:
    """The names of the README's marked blocks, in the order they first appear."""
    return list(dict.fromkeys(m.group(1) for m in MARKED_BLOCK.finditer(readme.read_text(encoding="utf-8"))))


def unmarked_blocks(readme: Path = README) -> list[int]:
    """Line numbers of ```bash/```python fences that no `<!-- run: NAME -->` marker precedes."""
    text = readme.read_text(encoding="utf-8")
    marked = {m.start(2) - 3 for m in MARKED_BLOCK.finditer(text)}
    return [text.count("\n", 0, m.start()) + 1 for m in FENCE.finditer(text) if m.start() not in marked]


def walk_commands(name: str, readme: Path = README) -> list[Command]:
    """The commands of the README's blocks marked `<!-- run: NAME -->`, in order.

    Raises ValueError when the README has no such marker."""
    blocks = [m for m in MARKED_BLOCK.finditer(readme.read_text(encoding="utf-8")) if m.group(1) == name]
    if not blocks:
        raise ValueError(f"{readme} has no `<!-- run: {name} -->` marker before a ```bash or ```python block; "
                         f"its sections: {', '.join(sections(readme))}")
    commands: list[Command] = []
    for block in blocks:
        if block.group(2) == "python":
            commands.append(PythonBlock(block.group(3)))
        else:
            commands += [part for line in _logical_lines(block.group(3)) for part in _and_parts(line)]
    return commands


def _logical_lines(block: str) -> list[str]:
    lines, pending = [], ""
    for line in block.splitlines():
        line = pending + line.lstrip() if pending else line
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        line = _strip_comment(line).strip()
        if line:
            lines.append(line)
    return lines


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def _and_parts(line: str) -> list[str]:
    """`a && b` as [a, b] (an && inside quotes stays): bash runs b only when a succeeded, and so
    does run_walk, which stops at the first failure."""
    parts, quote, start = [], None, 0
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith(" && ", i):
            parts.append(line[start:i].strip())
            start = i + 4
    return parts + [line[start:].strip()]


def split_env(command: str) -> tuple[dict[str, str], str]:
    """Leading `NAME=value` assignments of a command (`OMP_NUM_THREADS=1 minigpt eval ...`) and the rest."""
    env = {}
    while (m := re.match(r"([A-Za-z_]\w*)=(\S*)\s+", command)) and not command.startswith("export "):
        env[m.group(1)] = m.group(2)
        command = command[m.end():]
    return env, command


def minigpt_argv(command: Command) -> list[str] | None:
    """The arguments after `minigpt` for a minigpt command line (leading VAR=value assignments
    aside), else None. Bash's $'...' strings (a prompt with newlines) are decoded as bash does."""
    if not isinstance(command, str):
        return None
    command = split_env(command)[1]
    if not command.startswith("minigpt "):
        return None
    command = re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                     lambda m: shlex.quote(ast.literal_eval("'" + m.group(1) + "'")), command)
    return shlex.split(command)[1:]


def words(command: Command) -> list[str]:
    """The words of a command as `extra` sees them: a minigpt line's arguments after `minigpt`,
    any other line's words from its program on (a python block: none)."""
    argv = minigpt_argv(command)
    if argv is not None or isinstance(command, PythonBlock):
        return argv or []
    try:
        return shlex.split(split_env(command)[1])
    except ValueError:
        return command.split()


def prepare_workdir(work: Path, data: Path = DATA) -> Path:
    """WORK/repo to run in, with WORK/shared/data pointing at `data`; returns WORK/repo."""
    repo = work / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    shared = work / "shared"
    shared.mkdir(exist_ok=True)
    link = shared / "data"
    if not link.exists():
        link.symlink_to(data, target_is_directory=True)
    return repo


def run_walk(commands: Sequence[Command], cwd: Path, extra: Callable[[list[str]], list[str]] = lambda argv: [],
             in_process: bool = False, log: Callable[[str], None] = print,
             namespace: dict | None = None) -> list[dict]:
    """Run the commands in order in `cwd`; `export` lines set the environment of the rest.

    extra(words(command)) gives arguments appended to a command (the test's tiny overrides).
    in_process runs minigpt lines as `python -m minigpt` does, but in this process (no start-up
    per command). Python blocks run in this process, in `namespace` (shared by the walk's
    blocks, as in one interpreter session). A line ending in `&` runs in the background, as in
    a shell, until the walk ends (a `minigpt serve` one is waited for until it answers).
    Raises RuntimeError naming the command that failed.
    """
    env = child_env()
    namespace = {} if namespace is None else namespace
    steps: list[dict] = []
    background: list[subprocess.Popen] = []
    try:
        _walk(commands, cwd, extra, in_process, log, namespace, env, steps, background)
    finally:
        for proc in background:
            proc.terminate()
            proc.wait(60)
    return steps


def _walk(commands, cwd, extra, in_process, log, namespace, env, steps, background) -> None:
    for command in commands:
        if isinstance(command, str) and command.rstrip().endswith("&"):
            began = time.perf_counter()
            _start_background(command.rstrip()[:-1].rstrip(), cwd, extra, log, env, background)
            steps.append({"command": command, "wall_s": round(time.perf_counter() - began, 1)})
            continue
        began = time.perf_counter()
        more = extra(words(command))
        argv = minigpt_argv(command)
        if isinstance(command, PythonBlock):
            log(f">>> {command.code.splitlines()[0]} ...")
            with _inside(cwd, {}):
                exec(compile(command.code, "README.md python block", "exec"), namespace)
        elif command.startswith("export "):
            for item in shlex.split(command)[1:]:
                key, _, value = item.partition("=")
                env[key] = os.environ[key] = os.path.expandvars(value.replace("$PWD", str(cwd)))
        elif argv is not None:
            argv = argv + more
            assignments = split_env(command)[0]
            log(f"$ minigpt {shlex.join(argv)}")
            if in_process:
                with _inside(cwd, assignments):
                    _python_m_minigpt(argv)
            else:
                done = subprocess.run([sys.executable, "-m", "minigpt", *argv], cwd=cwd, env={**env, **assignments})
                if done.returncode != 0:
                    raise RuntimeError(f"`{command}` exited with {done.returncode}")
        else:
            line = " ".join([command, *map(shlex.quote, more)])
            log(f"$ {line}")
            done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"`{line}` exited with {done.returncode}")
        steps.append({"command": command if isinstance(command, str) else "python block",
                      "wall_s": round(time.perf_counter() - began, 1)})


def _start_background(command: str, cwd: Path, extra, log, env: dict, background: list) -> None:
    """Start `command` (without its `&`); for `minigpt serve`, wait until its /health answers."""
    import urllib.request

    argv = minigpt_argv(command)
    more = extra(words(command))
    log(f"$ {command} {shlex.join(more)} &")
    if argv is None:
        background.append(subprocess.Popen(["bash", "-c", " ".join([command, *map(shlex.quote, more)])], cwd=cwd,
                                           env=env))
        return
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", *argv, *more], cwd=cwd, env=env)
    background.append(proc)
    if argv[:1] != ["serve"]:
        return
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`{command}` exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"`{command}` did not answer on port {port} within 120 s")


@contextmanager
def _inside(cwd: Path, assignments: dict[str, str]):
    """Work in `cwd` with `assignments` in the environment, as a command line would."""
    before, saved = Path.cwd(), {k: os.environ.get(k) for k in assignments}
    os.chdir(cwd)
    os.environ.update(assignments)
    try:
        yield
    finally:
        os.chdir(before)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _python_m_minigpt(argv: list[str]) -> None:
    """`python -m minigpt ARGV`, in this process."""
    saved = sys.argv
    sys.argv = ["minigpt", *argv]
    try:
        runpy.run_module("minigpt", run_name="__main__", alter_sys=False)
    except SystemExit as err:
        if err.code not in (None, 0):
            raise RuntimeError(f"`minigpt {shlex.join(argv)}` exited: {err.code}") from None
    finally:
        sys.argv = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="*", help="sections to list (default: all)")
    args = p.parse_args()
    for name in args.section or sections():
        print(f"[{name}]")
        for command in walk_commands(name):
            print("  " + (command if isinstance(command, str) else "python block: "
                          + command.code.strip().splitlines()[0] + " ..."))


if __name__ == "__main__":
    main()
