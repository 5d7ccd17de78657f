"""The docs and the command lines agree, flag by flag.

Every ``--flag`` the docs show for ``hq-server``, ``hq-worker``, ``coffea-hq``,
``coffea-hq local`` or ``coffea-hq condor`` (in a code block, or in an option table
captioned by, or naming, the command) must exist in that command's argparse parser, and
every flag of those parsers must be documented that way somewhere in ``docs/``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from coffea_hq.server import cli as server_cli
from coffea_hq.worker import cli as worker_cli

from coffea_hq import cli as coffea_hq_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"

COMMANDS = (
    "hq-server",
    "hq-worker",
    "coffea-hq",
    "coffea-hq local",
    "coffea-hq condor",
    "coffea-hq token",
)
SUBCOMMANDS = ("local", "condor", "token", "shares")
# The image's entrypoint roles (docker/entrypoint.sh): `docker run IMAGE server ...`.
IMAGE_ROLES = {"server": "hq-server", "worker": "hq-worker", "local": "coffea-hq local"}

# Parser flags that need no documentation of their own.
UNDOCUMENTED_OK = {
    "--help",  # argparse's own, on every parser
}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# A command named in backticks: `hq-worker [URL]`, `coffea-hq condor`.
NAMED = re.compile(
    r"`(hq-server|hq-worker|coffea-hq(?: local| condor| token| status| shares)?)\b[^`]*`"
)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each documented command's parser, built the way its ``main`` builds it."""
    top = coffea_hq_cli.parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {
        "hq-server": server_cli.parser(),
        "hq-worker": worker_cli.parser(),
        "coffea-hq": top,
        "coffea-hq local": subs.choices["local"],
        "coffea-hq condor": subs.choices["condor"],
        "coffea-hq token": subs.choices["token"],
        "coffea-hq status": subs.choices["status"],
        "coffea-hq shares": subs.choices["shares"],
    }


def parser_flags(p: argparse.ArgumentParser) -> set[str]:
    """The parser's flags; those of ``coffea-hq token``'s actions (create, list, revoke)
    count as the token command's."""
    flags = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    if p.prog.endswith(" token"):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags |= parser_flags(sub)
    return flags


def _command_of(words: list[str]) -> tuple[str, list[str]] | None:
    """The command a shell segment runs and the words after it, if it is one of ours."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return None
    name = words[0].rsplit("/", 1)[-1]  # .venv/bin/hq-worker
    if name == "coffea-hq" and len(words) > 1 and words[1] in SUBCOMMANDS:
        return f"coffea-hq {words[1]}", words[2:]
    if name in COMMANDS:
        return name, words[1:]
    if name == "docker" and "run" in words:
        for i, word in enumerate(words[:-1]):
            if word.startswith("coffea-hq:") and words[i + 1] in IMAGE_ROLES:
                return IMAGE_ROLES[words[i + 1]], words[i + 2 :]
    return None


def _shell_commands(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(command, flag) for every flag given to one of our commands in a code block."""
    logical = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical, text = "", logical + line
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # not shell (a submit file, YAML, Python)
            continue
        segment: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|"):
                found = _command_of(segment)
                if found:
                    command, rest = found
                    for arg in rest:
                        for flag in FLAG.findall(arg.split("=", 1)[0]):
                            yield command, flag
                segment = []
            else:
                segment.append(word)


def documented(files: Iterable[Path]) -> set[tuple[str, str, str]]:
    """(command, flag, where) for every flag the files document for one of our commands."""
    out: set[tuple[str, str, str]] = set()
    for path in files:
        lines = path.read_text().splitlines()
        in_code, start = False, 0
        block: list[str] = []
        paragraph: set[str] = set()  # the commands the current paragraph names
        caption: str | None = None  # the one command the paragraph before a table names
        for number, line in enumerate(lines, 1):
            where = f"{path.name}:{number}"
            if line.lstrip().startswith("```"):
                if in_code:
                    out |= {(c, f, f"{path.name}:{start}") for c, f in _shell_commands(block)}
                in_code, block, start = not in_code, [], number
                continue
            if in_code:
                block.append(line)
                continue
            if line.startswith("#"):  # a heading captions nothing after it
                paragraph, caption = set(), None
                continue
            if not line.startswith("|"):
                if line.strip():
                    paragraph |= set(NAMED.findall(line))
                else:
                    caption = paragraph.pop() if len(paragraph) == 1 else None
                    paragraph = set()
                continue
            flags = FLAG.findall(line)
            if not flags:
                continue
            named_in_row = set(NAMED.findall(line))
            command = caption or (named_in_row.pop() if len(named_in_row) == 1 else None)
            # A table row with flags but no command to give them to is a doc bug too.
            assert command is not None, f"{where}: flags {flags} for which command?"
            out |= {(command, f, where) for f in flags}
    return out


def test_documented_flags_exist() -> None:
    known = {name: parser_flags(p) for name, p in parsers().items()}
    wrong = sorted(
        f"{where}: {command} {flag}"
        for command, flag, where in documented([*DOCS, README])
        if flag not in known[command]
    )
    assert not wrong, "documented flags the commands do not have:\n" + "\n".join(wrong)


def test_every_flag_is_documented() -> None:
    docs = {(command, flag) for command, flag, _ in documented(DOCS)}
    missing = sorted(
        f"{name} {flag}"
        for name, p in parsers().items()
        for flag in parser_flags(p) - UNDOCUMENTED_OK
        if (name, flag) not in docs
    )
    assert not missing, "flags no doc in docs/ documents:\n" + "\n".join(missing)


def test_the_check_sees_the_docs() -> None:
    """The parsing above finds what it must (so an empty result cannot pass)."""
    docs = {(command, flag) for command, flag, _ in documented([*DOCS, README])}
    for expected in [
        ("hq-server", "--redis"),  # a table captioned `hq-server`
        ("hq-worker", "--drain-timeout"),  # a table captioned `hq-worker [URL]`
        ("coffea-hq condor", "--submit-key"),  # a code block with continuation lines
        ("coffea-hq local", "--min"),  # a table row naming the command
        ("coffea-hq", "--version"),
    ]:
        assert expected in docs


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("hq-worker http://s:8786 --slots 4   # --name in a comment", {("hq-worker", "--slots")}),
        (
            "HQ_URL=x .venv/bin/hq-server --redis r && hq-worker --bogus",
            {
                ("hq-server", "--redis"),
                ("hq-worker", "--bogus"),
            },
        ),
        (
            "coffea-hq condor --min 0 \\\n  --max 5",
            {
                ("coffea-hq condor", "--min"),
                ("coffea-hq condor", "--max"),
            },
        ),
        ("docker run --rm coffea-hq:0.1.0 server --redis r", {("hq-server", "--redis")}),
        ("pip install coffea-hq --upgrade", set()),
    ],
)
def test_shell_parsing(text: str, found: set[tuple[str, str]]) -> None:
    assert set(_shell_commands(text.splitlines())) == found


def _code_blocks(path: Path) -> list[str]:
    return re.findall(r"(?ms)^```[a-z]*\n(.*?)^```$", path.read_text())


def test_deploy_condor_dry_run_is_what_the_command_prints(
    server_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/deploy.md's submit description is the dry run of the command it shows."""
    from coffea_hq.factory import condor

    blocks = _code_blocks(ROOT / "docs" / "deploy.md")
    command = next(b for b in blocks if "\ncoffea-hq condor " in b)
    shown = next(b for b in blocks if b.startswith("# submit description"))
    url = re.search(r"^export HQ_URL=(\S+)", command, re.M)
    assert url, "the condor example sets HQ_URL"
    command = command.replace("\\\n", " ")  # continuation lines
    words = shlex.split(command[command.index("coffea-hq condor") :], comments=True)
    # The one cycle reads the queue of a real (idle) server; the doc names its own URL.
    monkeypatch.setenv("HQ_URL", server_url)
    args = coffea_hq_cli.parser().parse_args([*words[1:], "--dry-run", "--once"])
    assert condor.run_condor(args) == 0
    printed = capsys.readouterr().out.replace(server_url, url.group(1))
    assert printed.startswith(shown), f"docs/deploy.md should show:\n{printed}"


@pytest.mark.parametrize("command", ["hq-server", "hq-worker", "coffea-hq"])
def test_version(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        parsers()[command].parse_args(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"{command} {importlib.metadata.version('coffea-hq')}\n"
