"""The documentation's commands still exist: every shell block of README.md and docs/*.md names
a target of the Makefile, a subcommand (with its options) of ``luffy``'s parser, or an external
tool from a short list; the repository files it names exist; and every relative Markdown link
points at a file. Parsing only, in-process: nothing is run."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from luffy.cli import _parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# The external tools the documentation may tell a reader to type; anything else is a typo or a
# command that went away.
EXTERNAL_TOOLS = {"cat", "cd", "export", "git", "mlflow", "pip", "pytest", "python", "python3", "snakemake", "source"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# An argument under one of these folders is a file of the repository and must exist. Anything
# else is an output (results/...), a placeholder (<...>, $PWD/...), the reader's own (/scratch/...)
# or made by set-up (.venv/...), and is not checked.
REPO_FOLDERS = ("benchmarks", "config", "docs", "envs", "luffy", "slurm", "tests", "workflow")
# Options whose value is a file or folder the command reads (checked wherever it is, as above).
FILE_OPTIONS = {"--configfile", "--profile", "-r", "--requirement"}

PLACEHOLDER = "@placeholder@"
SEPARATORS = set("();|&")  # a token of these characters only ends a command: && || ; | & ( )
VENV_BIN = re.compile(r"^\.venv[\w-]*/bin/(.+)$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


def fenced_blocks(text: str) -> list[tuple[int, int, str, list[str]]]:
    """The fenced code blocks of a Markdown text: (line of the opening fence, line of the
    closing one, language, the lines between)."""
    blocks, lines, fence, language, start = [], text.splitlines(), None, "", 0
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, start = match.group(1), match.group(2).lower(), number
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append((start, number, language, lines[start:number - 1]))
            fence = None
    return blocks


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The shell blocks of a Markdown text: (line number of the block's first line, its lines).
    Console blocks keep only what follows a ``$ `` prompt (and its continuation lines); a block
    without a language counts when it starts like a command."""
    out = []
    for start, _, language, body in fenced_blocks(text):
        first = next((line.strip() for line in body if line.strip() and not line.lstrip().startswith("#")), "")
        if not language and first.startswith("$ "):
            language = "console"
        elif not language and VENV_BIN.sub(r"\1", first.split(" ")[0]) in EXTERNAL_TOOLS | {"make", "luffy"}:
            language = "sh"
        if language in SHELL_LANGUAGES:
            out.append((start + 1, _prompted(body) if language == "console" else body))
    return out


def _prompted(lines: list[str]) -> list[str]:
    out, continued = [], False
    for line in lines:
        if continued:
            out.append(line)
        elif line.startswith("$ "):
            out.append(line[2:])
        else:
            out.append("")  # output: the line numbers stay right
            continue
        continued = line.rstrip().endswith("\\")
    return out


def commands(block: list[str], first_line: int) -> list[tuple[int, list[str]]]:
    """The simple commands of a shell block as (line number, words): continuation lines joined,
    comments dropped, split at && || ; | & ( ), redirections and leading NAME=value dropped."""
    out, pending, pending_line = [], "", 0
    for number, line in enumerate(block, first_line):
        if not pending:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        try:
            out += [(pending_line, words) for words in _split(pending + line)]
        except ValueError as err:  # shlex: an unclosed quote
            raise ValueError(f"line {pending_line}: {err}: {pending + line}") from None
        pending = ""
    return out


def _split(line: str) -> list[list[str]]:
    pieces = re.split(r"(\"[^\"]*\"|'[^']*')", _without_comment(line))  # placeholders: <...> outside quotes
    line = "".join(p if i % 2 else re.sub(r"<[^<>\s][^<>]*>", PLACEHOLDER, p) for i, p in enumerate(pieces))
    line = re.sub(r"(?<!\S)\d*>&\d*(?!\S)|(?<!\S)\d+(?=[<>])", " ", line)  # 2>&1, 2> file
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    out, words, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif set(token) <= SEPARATORS:
            out.append(words)
            words = []
        elif set(token) <= set("<>&"):
            skip_next = True  # a redirection and its file
        else:
            words.append(token)
    out.append(words)
    for words in out:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words.pop(0)
    return [words for words in out if words]


def _without_comment(line: str) -> str:
    """The line up to an unquoted ``#`` that starts a word (where the shell starts a comment)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def make_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([\w.-]+(?:[ \t]+[\w.-]+)*)[ \t]*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def luffy_problem(args: list[str]) -> str | None:
    """What ``luffy``'s own parser says about these arguments, None when it takes them."""
    if args == ["--version"]:  # answered before the parser (luffy.cli.main)
        return None
    if args[:1] == ["rehearse"] and "--" in args:  # what follows `--` goes to Snakemake
        args = args[:args.index("--")]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def _is_checked(path: str, read_by_option: bool) -> bool:
    if PLACEHOLDER in path or "$" in path or path.startswith(("/", "~", "results/")):
        return False
    return read_by_option or (path.split("/")[0] in REPO_FOLDERS and "/" in path)


def _exists(path: str) -> bool:
    if "::" in path:  # a pytest node id: the file, and the test (its last name, parameters aside) in it
        file, *names = path.split("::")
        test = names[-1].split("[")[0]
        return (REPO / file).is_file() and re.search(rf"^\s*def {re.escape(test)}\(", (REPO / file).read_text(),
                                                     flags=re.M) is not None
    return any(REPO.glob(path)) if any(c in path for c in "*?[") else (REPO / path).exists()


def command_problems(words: list[str], targets: set[str]) -> list[str]:
    name, args = VENV_BIN.sub(r"\1", words[0]), words[1:]
    problems = []
    if name == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t
                   and t not in targets]
        problems += [f"no Makefile target '{t}'" for t in missing]
    elif name == "luffy":
        problem = luffy_problem(args)
        problems += [f"luffy's parser refuses it: {problem}"] if problem else []
    elif "/" in name:
        problems += [] if not _is_checked(name, True) or _exists(name) else [f"no such file '{name}'"]
    elif name not in EXTERNAL_TOOLS:
        problems.append(f"'{name}' is not a make target, a luffy subcommand or an allowed tool "
                        f"(tests/test_docs.py: EXTERNAL_TOOLS)")
    for before, arg in zip(words, args):
        option, _, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if option and not value:
            continue
        if _is_checked(value, before in FILE_OPTIONS or option in FILE_OPTIONS) and not _exists(value):
            problems.append(f"no such {'test' if '::' in value else 'file'} in the repository: '{value}'")
    return problems


def doc_problems(text: str, where: str) -> list[str]:
    """Every problem of a Markdown text's shell blocks, as 'FILE:LINE: `command`: problem'."""
    targets = make_targets()
    return [f"{where}:{number}: `{' '.join(words)}`: {problem}"
            for first_line, block in shell_blocks(text)
            for number, words in commands(block, first_line)
            for problem in command_problems(words, targets)]


def link_problems(text: str, doc: Path) -> list[str]:
    """Relative Markdown links (and images) of a text that point at no file (anchors stripped);
    links inside code are not links."""
    in_code = {n for start, end, _, _ in fenced_blocks(text) for n in range(start, end + 1)}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if number in in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", re.sub(r"`[^`]*`", "", line)):
            path = target.split("#")[0].split("?")[0]
            if not path or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an anchor on this page, or a URL
            resolved = (doc.parent / path).resolve()
            if not resolved.exists():
                problems.append(f"{_name(doc)}:{number}: link to '{target}': no such file ({resolved})")
    return problems


def _name(doc: Path) -> str:
    return str(doc.relative_to(REPO))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_documented_command_exists(doc):
    problems = doc_problems(doc.read_text(), _name(doc))
    assert not problems, "commands in the docs that no longer exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_relative_link_points_at_a_file(doc):
    problems = link_problems(doc.read_text(), doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_docs_commands_are_found():
    """The checks above pass vacuously if no block is found: the commands a reader starts with are."""
    found = {" ".join(words) for doc in DOCS for first, block in shell_blocks(doc.read_text())
             for _, words in commands(block, first)}
    for command in ("make demo", "make test", "luffy rehearse config/verl_toy.yaml",
                    "snakemake --profile slurm --configfile config/experiments/paper_qwen2.5_math_7b.yaml -n"):
        assert command in found, f"'{command}' not among the documented commands found: {sorted(found)}"


def test_commands_are_split_as_the_shell_splits_them():
    block = ["FOO=1 BAR=2 snakemake --cores 2 \\",
             "  --configfile config/config.yaml -n   # the plan",
             "python -m venv .venv && .venv/bin/pip install -r envs/cpu.txt; source .venv/bin/activate",
             "mlflow server --port 5000 2>&1 > server.log &   # in the background",
             "cat results/report/results.md | grep luffy",
             "git clone <this repository> luffy",
             'luffy generate --system "inside <think></think>" "What is 7+5-3?"']
    assert commands(block, 10) == [
        (10, ["snakemake", "--cores", "2", "--configfile", "config/config.yaml", "-n"]),
        (12, ["python", "-m", "venv", ".venv"]),
        (12, [".venv/bin/pip", "install", "-r", "envs/cpu.txt"]),
        (12, ["source", ".venv/bin/activate"]),
        (13, ["mlflow", "server", "--port", "5000"]),
        (14, ["cat", "results/report/results.md"]),
        (14, ["grep", "luffy"]),
        (15, ["git", "clone", PLACEHOLDER, "luffy"]),
        (16, ["luffy", "generate", "--system", "inside <think></think>", "What is 7+5-3?"]),
    ]
    assert shell_blocks("text\n\n```console\n$ make demo\nsome output\n```\n") == [(4, ["make demo", ""])]


def test_the_checker_reports_what_no_longer_exists():
    made_up = "\n".join([
        "A [page that went away](no_such_page.md).",
        "",
        "```bash",
        "luffy no-such-command",
        "luffy compare config/config.yaml --no-such-option",
        "make no-such-target",
        "snakemake --cores 2 --configfile config/no_such.yaml",
        "frobnicate --all",
        "pytest tests/test_algo.py::test_that_was_renamed",
        "```",
    ])
    problems = "\n".join(doc_problems(made_up, "made-up.md") + link_problems(made_up, REPO / "docs" / "made-up.md"))
    for expected in ("made-up.md:4: `luffy no-such-command`: luffy's parser refuses it: "
                     "luffy: error: argument stage: invalid choice: 'no-such-command'",
                     "made-up.md:5: `luffy compare config/config.yaml --no-such-option`: luffy's parser refuses it: "
                     "luffy: error: unrecognized arguments: --no-such-option",
                     "made-up.md:6: `make no-such-target`: no Makefile target 'no-such-target'",
                     "made-up.md:7: `snakemake --cores 2 --configfile config/no_such.yaml`: "
                     "no such file in the repository: 'config/no_such.yaml'",
                     "made-up.md:8: `frobnicate --all`: 'frobnicate' is not a make target",
                     "made-up.md:9: `pytest tests/test_algo.py::test_that_was_renamed`: "
                     "no such test in the repository: 'tests/test_algo.py::test_that_was_renamed'",
                     "made-up.md:1: link to 'no_such_page.md': no such file"):
        assert expected in problems, f"not reported: {expected}\nreported:\n{problems}"
