"""The README and docs/*.md against the code, so that the docs cannot drift from it.

Every `imagenet-trainer VERB --flag` they show is a verb and a flag of the CLI, every config key
they name is a key of the schema (and every `experiment=NAME` a recipe), every relative link
reaches a file (and its #anchor a heading), and every verb of the CLI is shown somewhere. Each
failure names the file, the line and the token. The checkers are plain functions of a file's text,
and the last tests feed them bad snippets, to show that each check can fail.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]

# The config's sections: a dotted name starting with one of these, in code, is a config key.
SECTIONS = ("data", "model", "optim", "loss", "trainer", "aug", "eval", "ema", "guard", "run", "logger", "seed",
            "experiment")
# A dotted name ending in one of these is a file name (`run.py`), not a key.
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "sh", "png", "txt", "csv", "ckpt", "pt",
                 "onnx", "safetensors", "tar", "idx", "sbatch", "lock", "log", "out", "err"}
SHELL_OPERATORS = re.compile(r"^[;&|<>()]+$")


# --- reading markdown ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Snippet:
    """A piece of a markdown file: ``kind`` is "code" (a fenced or indented block that is not
    Python), "python", "inline" (a `code span`) or "prose" (a line with its code spans blanked)."""

    line: int
    kind: str
    text: str


INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def snippets(text: str) -> list[Snippet]:
    """The snippets of a markdown text, in order; a shell line continued with a backslash is joined
    to the next and keeps the first line's number."""
    out: list[Snippet] = []
    fence: str | None = None  # the language of the open fenced block ("" when none is given)
    pending: tuple[int, str] | None = None  # a continued shell line
    previous_blank = True
    in_indented = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip().lower()
            previous_blank = in_indented = False
            continue
        if fence is not None:
            if stripped.startswith("```"):
                fence = None
                continue
            kind = "python" if fence in ("python", "py", "pycon") else "code"
        elif line.startswith(("    ", "\t")) and (previous_blank or in_indented) and stripped:
            kind = "code"
            in_indented = True
        else:
            in_indented = in_indented and not stripped
            previous_blank = not stripped
            for match in INLINE_CODE.finditer(line):
                out.append(Snippet(number, "inline", match.group(2).strip()))
            out.append(Snippet(number, "prose", INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)))
            continue
        previous_blank = False
        if kind == "code":
            if pending:
                number, line = pending[0], pending[1] + " " + line.strip()
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1])
                continue
            pending = None
        out.append(Snippet(number, kind, line))
    return out


def headings(text: str) -> list[str]:
    """The markdown headings of a text (outside code blocks), as written."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#").strip())
    return found


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a text's headings: lower case, code spans unwrapped, punctuation other
    than - and _ dropped, spaces made hyphens; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(text):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


# --- the code the docs describe -----------------------------------------------------------------

@lru_cache(maxsize=None)
def cli() -> argparse.ArgumentParser:
    from trainer.cli import _parser

    return _parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-parsers by name ({} when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


@lru_cache(maxsize=None)
def config_keys() -> frozenset[str]:
    """Every key of the schema, nodes (`data.progressive`) and leaves (`data.progressive.start_size`)."""
    from omegaconf import DictConfig

    from trainer.config import schema

    keys = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            keys.add(prefix + str(key))
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")

    walk(schema(), "")
    return frozenset(keys)


@lru_cache(maxsize=None)
def recipes() -> frozenset[str]:
    from trainer.config import experiments

    return frozenset(experiments())


@lru_cache(maxsize=None)
def trainer_names() -> frozenset[str]:
    """Names under the `trainer` package (its modules and its public attributes): `trainer.cli` and
    `trainer.load_pretrained` are Python, not the config's `trainer.*` section."""
    import trainer

    package = REPO / "trainer"
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if p.is_dir()}
    return frozenset(modules | set(getattr(trainer, "__all__", ())))


# --- the checks -----------------------------------------------------------------------------------

def _tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in an example: read it word by word
        return command.split("#")[0].split()


def _is_placeholder(token: str) -> bool:
    return token in ("...", "…") or bool(re.fullmatch(r"[A-Z][A-Z_]*", token.strip("[]")))


@dataclass(frozen=True)
class Command:
    line: int
    program: str  # "imagenet-trainer" or "sbatch"
    verb: str  # the verb (sub-verbs joined by a space), or "" for sbatch
    args: list[str]


def commands(text: str) -> list[Command]:
    """Every `imagenet-trainer VERB ...` (or `python -m trainer VERB ...`) and every `sbatch
    ... SCRIPT.sbatch ...` in a text's code blocks and code spans, up to a shell operator."""
    found = []
    for snippet in snippets(text):
        if snippet.kind not in ("code", "inline"):
            continue
        tokens = _tokens(snippet.text)
        for i, token in enumerate(tokens):
            start = None
            if token == "imagenet-trainer":
                start = i + 1
            elif tokens[i:i + 3] == ["python", "-m", "trainer"]:
                start = i + 3
            elif token == "sbatch":
                rest = _until_operator(tokens[i + 1:])
                scripts = [j for j, t in enumerate(rest) if t.endswith(".sbatch")]
                if scripts:
                    found.append(Command(snippet.line, "sbatch", "", rest[scripts[0] + 1:]))
                continue
            if start is None or start >= len(tokens) or _is_placeholder(tokens[start]):
                continue
            if SHELL_OPERATORS.match(tokens[start]) or tokens[start].startswith("-"):
                continue
            rest = _until_operator(tokens[start + 1:])
            found.append(Command(snippet.line, "imagenet-trainer", tokens[start].rstrip(":,."), rest))
    return found


def _until_operator(tokens: list[str]) -> list[str]:
    for i, token in enumerate(tokens):
        if SHELL_OPERATORS.match(token):
            return tokens[:i]
    return tokens


def command_problems(label: str, text: str) -> list[str]:
    """Verbs, sub-verbs and flags shown in ``text`` that the CLI does not have."""
    problems = []
    verbs = subcommands(cli())
    for cmd in commands(text):
        if cmd.program != "imagenet-trainer":
            continue
        where = f"{label}:{cmd.line}"
        if cmd.verb not in verbs:
            problems.append(f"{where}: `imagenet-trainer {cmd.verb}`: no such verb (the CLI has: {', '.join(verbs)})")
            continue
        parser, shown = verbs[cmd.verb], f"imagenet-trainer {cmd.verb}"
        args = list(cmd.args)
        subs = subcommands(parser)
        if subs and args and not args[0].startswith("-") and not _is_placeholder(args[0]):
            if args[0] not in subs:
                problems.append(f"{where}: `{shown} {args[0]}`: `{cmd.verb}` has no `{args[0]}` "
                                f"(it has: {', '.join(subs)})")
                continue
            parser, shown = subs[args[0]], f"{shown} {args[0]}"
            args = args[1:]
        known = flags(parser)
        if parser is verbs[cmd.verb]:  # no sub-verb shown: any sub-verb's flag will do
            known = known.union(*(flags(p) for p in subs.values()))
        for arg in (a.strip("[]") for a in args):  # `[--workers N]`: an optional flag in a usage line
            if arg.startswith("-") and len(arg) > 1 and not re.fullmatch(r"-\d.*", arg):
                flag = arg.split("=", 1)[0]
                if flag not in known:
                    problems.append(f"{where}: `{flag}` is not a flag of `{shown}` "
                                    f"(it has: {', '.join(sorted(known))})")
    return problems


OVERRIDE = re.compile(r"([A-Za-z_][\w.]*)=(.*)", re.S)
DOTTED = re.compile(
    r"(?<![\w./$@:~-])"  # not the middle of a path, a URL, an attribute or an env variable
    rf"((?:{'|'.join(SECTIONS)})(?:\.(?:\w+|\*|\{{\w+(?:,\w+)*\}}))+)"
    r"(?![\w-])(\()?"  # a following "(" makes it a call: Python, not a key
)


def _expand(key: str) -> list[str]:
    """``data.progressive.{start_size,end_size}`` as its keys; ``ema.*`` as ``ema``."""
    if key.endswith(".*"):
        return [key[:-2]]
    match = re.search(r"\{([\w,]+)\}", key)
    if not match:
        return [key]
    return [key[:match.start()] + part + key[match.end():] for part in match.group(1).split(",")]


def _key_problem(where: str, key: str) -> str | None:
    """Why ``key`` named in the docs is not a config key (None when it is, or is not a key at all)."""
    parts = key.split(".")
    if parts[-1] in FILE_SUFFIXES or (parts[0] == "trainer" and parts[1] in trainer_names()):
        return None  # a file name (`run.py`), or a Python name (`trainer.cli`, `trainer.load_pretrained`)
    missing = [k for k in _expand(key) if k not in config_keys()]
    if not missing:
        return None
    section = missing[0].rsplit(".", 1)[0]
    near = sorted(k for k in config_keys() if k.startswith(section + "."))
    return (f"{where}: `{missing[0]}` is not a config key (trainer/config.py's schema); "
            f"under `{section}` there are: {', '.join(near) or 'none'}")


def _flags_taking_a_value(cmd) -> set[str]:
    """The flags of ``cmd``'s verb that take a value (``--set NAME=PATH``), from its parser."""
    parser = subcommands(cli()).get(cmd.verb) if cmd.program == "imagenet-trainer" else None
    if parser is None:
        return set()
    return {opt for action in parser._actions if action.nargs != 0 for opt in action.option_strings}


def key_problems(label: str, text: str) -> list[str]:
    """Config keys and recipes named in ``text`` that the schema and conf/experiment/ lack: the
    `key=value` overrides of every command, and every dotted name with a section's prefix in code."""
    problems = []
    reported = set()  # (line, key): an override is also a dotted name of its line; report it once
    for cmd in commands(text):
        if cmd.program == "imagenet-trainer" and cmd.verb not in subcommands(cli()):
            continue  # command_problems reports it
        takes_value = _flags_taking_a_value(cmd)
        previous = ""
        for arg in (a.strip("[]") for a in cmd.args):
            match = OVERRIDE.fullmatch(arg)
            # `--set val=PATH`: a flag's value, not an override
            is_value, previous = previous in takes_value, arg
            if not match or arg.startswith("-") or is_value:
                continue
            key = match.group(1)
            if key not in config_keys():
                problems.append(f"{label}:{cmd.line}: `{arg}`: `{key}` is not a config key "
                                f"(trainer/config.py's schema)")
                reported.add((cmd.line, key))
    for snippet in snippets(text):
        if snippet.kind not in ("code", "inline"):
            continue
        for match in DOTTED.finditer(snippet.text):
            if match.group(2) or (snippet.line, match.group(1)) in reported:  # a call: Python, not a key
                continue
            problem = _key_problem(f"{label}:{snippet.line}", match.group(1))
            if problem:
                problems.append(problem)
        for match in re.finditer(r"(?<![\w.])experiment=([\w.-]+)", snippet.text):
            name = match.group(1)
            if not _is_placeholder(name) and name not in recipes():
                problems.append(f"{label}:{snippet.line}: `experiment={name}`: no such recipe in "
                                f"conf/experiment/ (there are: {', '.join(sorted(recipes()))})")
    return problems


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(path: Path, text: str, label: str | None = None) -> list[str]:
    """Relative links of ``text`` (the file ``path``) whose file, or whose #anchor, is missing."""
    label = label or str(path)
    problems = []
    for snippet in snippets(text):
        if snippet.kind != "prose":
            continue
        for match in LINK.finditer(snippet.text):
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else None
            where = f"{label}:{snippet.line}"
            if dest is not None and not dest.exists():
                problems.append(f"{where}: link `{target}`: {file_part} does not exist "
                                f"(relative to {_shown(path.parent)}/)")
            elif anchor and (dest is None or dest.suffix == ".md"):
                have = anchors(text if dest is None else dest.read_text())
                name = path.name if dest is None else dest.name
                if anchor not in have:
                    problems.append(f"{where}: link `{target}`: {name} has no heading with "
                                    f"anchor #{anchor} (it has: {', '.join(sorted(have))})")
    return problems


def _shown(folder: Path) -> str:
    try:
        return str(folder.relative_to(REPO)) if folder != REPO else "."
    except ValueError:
        return str(folder)


def verbs_shown(texts: list[str]) -> set[str]:
    return {cmd.verb for text in texts for cmd in commands(text) if cmd.program == "imagenet-trainer"}


# --- the docs as they are -------------------------------------------------------------------------

def _label(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(params=DOC_FILES, ids=_label)
def doc(request) -> tuple[Path, str]:
    return request.param, request.param.read_text()


def test_docs_exist():
    names = {p.name for p in (REPO / "docs").glob("*.md")}
    assert {"data.md", "training.md", "recipes.md", "clusters.md", "reuse.md", "gpu.md", "tests.md",
            "design.md"} <= names


def test_commands_exist_in_the_cli(doc):
    path, text = doc
    problems = command_problems(_label(path), text)
    assert not problems, "docs show CLI verbs or flags that do not exist:\n" + "\n".join(problems)


def test_config_keys_exist_in_the_schema(doc):
    path, text = doc
    problems = key_problems(_label(path), text)
    assert not problems, "docs name config keys or recipes that do not exist:\n" + "\n".join(problems)


def test_relative_links_resolve(doc):
    path, text = doc
    problems = link_problems(path, text, _label(path))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_verb_is_shown_in_the_docs():
    """A verb added to the CLI must be shown (`imagenet-trainer VERB ...`) in the README or a doc."""
    missing = set(subcommands(cli())) - verbs_shown([p.read_text() for p in DOC_FILES])
    assert not missing, (f"verbs of trainer/cli.py never shown as `imagenet-trainer VERB` in README.md, "
                         f"docs/*.md or slurm/README.md: {', '.join(sorted(missing))}")


def test_readme_fits_on_a_screen_and_links_every_doc():
    readme = (REPO / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= 100, f"README.md has {lines} lines: move the detail to docs/*.md and link it"
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md: docs/{page.name} is not in its table of links"


def test_readme_test_command_is_what_ci_runs():
    """The README's `make test` is CI's command (.ci/run), so a newcomer runs what CI runs."""
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "make test"
    shown = [s.text.split("#")[0].strip() for s in snippets((REPO / "README.md").read_text()) if s.kind == "code"]
    assert "make test" in shown and "make demo" in shown


def test_data_pipelines_never_import_trainer():
    """docs/design.md: imports go bench/ -> trainer/ -> data_pipelines/, never back."""
    problems = []
    for path in sorted((REPO / "data_pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            problems += [f"{_label(path)}:{node.lineno}: imports {n}" for n in names
                         if n == "trainer" or n.startswith("trainer.")]
    assert not problems, "data_pipelines/ must not import trainer/:\n" + "\n".join(problems)


# --- each check can fail --------------------------------------------------------------------------

BAD = """\
# Title

## A section

```bash
imagenet-trainer fitt experiment=smoke
imagenet-trainer fit --no-such-flag experiment=smoke data.roots=/x
imagenet-trainer study degradatio data.root=/x
imagenet-trainer study degradation --archs plain20 --nodes 1 --bogus \\
    optim.lrr=0.1
sbatch --nodes=2 slurm/train.sbatch model.archh=resnet50
imagenet-trainer fit experiment=rn51_90ep
imagenet-trainer validate m.ckpt --weights raw optim.lrr=1
```

Set `data.progressive.start_sise`, `ema.*`, `logger.wandb.modes`, and `data.progressive.{start_size,end_sizes}`;
see `imagenet-trainer predict MODEL PATH --top-k 3`, [a page](no_such_page.md) and [a heading](#no-such-heading).
"""

GOOD = """\
# Title

## A section: `--weights ema|raw`

```bash
imagenet-trainer fit experiment=smoke data.root=data/sample 'data.stage_to=${oc.env:TMPDIR}' seed=3
imagenet-trainer study degradation --plot-only runs/x --nodes 2 --dry-run  # comment: --not-a-flag
imagenet-trainer submit --nodes 4 ... && imagenet-trainer plot runs/x --out /tmp/x.png
sbatch --nodes=4 slurm/train.sbatch experiment=rn50_90ep data.root=/datasets/imagenet \\
    logger.wandb.tags=[a,b]
imagenet-trainer VERB --whatever
imagenet-trainer evaluate m.ckpt --set val=data/val --set c=data/c --json
```

```python
model.load_state_dict(state)  # a variable named model, not the model.* section
```

    run.dir/checkpoints     trainer.log_every_n_steps

`trainer.load_pretrained(path)`, `trainer.module.Classifier`, `trainer.cli`, `run.py`, `data_pipelines.sharding`,
`ema.*`, `data.progressive.{start_size,end_size}`, `experiment=NAME`, [itself](#a-section---weights-emaraw),
[slurm](../slurm/README.md), [web](https://example.com/x.md).
"""


def test_the_checks_pass_good_snippets():
    path = REPO / "docs" / "example.md"
    assert command_problems("good.md", GOOD) == []
    assert key_problems("good.md", GOOD) == []
    assert link_problems(path, GOOD, "good.md") == []
    assert verbs_shown([GOOD]) == {"fit", "study", "submit", "plot", "evaluate"}


def _assert_exactly(problems: list[str], expected: list[tuple[str, str]]) -> None:
    """Each (file:line prefix, text) of ``expected`` is among ``problems``, and nothing else is."""
    for where, what in expected:
        assert any(p.startswith(where) and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected), problems


def test_command_check_fails_on_unknown_verbs_and_flags():
    problems = command_problems("bad.md", BAD)
    expected = [
        ("bad.md:6:", "`imagenet-trainer fitt`: no such verb"),
        ("bad.md:7:", "`--no-such-flag` is not a flag of `imagenet-trainer fit`"),
        ("bad.md:8:", "`study` has no `degradatio`"),
        ("bad.md:9:", "`--bogus` is not a flag of `imagenet-trainer study degradation`"),
        ("bad.md:17:", "`--top-k` is not a flag of `imagenet-trainer predict`"),
    ]
    _assert_exactly(problems, expected)


def test_key_check_fails_on_unknown_keys_and_recipes():
    problems = key_problems("bad.md", BAD)
    expected = [
        ("bad.md:7:", "`data.roots=/x`: `data.roots` is not a config key"),
        ("bad.md:9:", "`optim.lrr=0.1`: `optim.lrr` is not a config key"),  # a continued line
        ("bad.md:11:", "`model.archh` is not a config key"),  # an sbatch override
        ("bad.md:12:", "`experiment=rn51_90ep`: no such recipe"),
        ("bad.md:13:", "`optim.lrr=1`: `optim.lrr` is not a config key"),  # after a flag's value
        ("bad.md:16:", "`data.progressive.start_sise` is not a config key"),
        ("bad.md:16:", "`logger.wandb.modes` is not a config key"),
        ("bad.md:16:", "`data.progressive.end_sizes` is not a config key"),
    ]
    _assert_exactly(problems, expected)  # an override is reported once, not again as a name
    assert any("under `data.progressive` there are: " in p and "data.progressive.start_size" in p for p in problems)


def test_link_check_fails_on_missing_files_and_anchors():
    problems = link_problems(REPO / "docs" / "example.md", BAD, "bad.md")
    assert len(problems) == 2, problems
    assert problems[0].startswith("bad.md:17:") and "no_such_page.md does not exist" in problems[0]
    assert problems[1].startswith("bad.md:17:") and "no heading with anchor #no-such-heading" in problems[1]


def test_verb_coverage_fails_when_a_verb_is_never_shown():
    shown = verbs_shown(["```bash\nimagenet-trainer fit experiment=smoke\n```\n"])
    missing = set(subcommands(cli())) - shown
    assert shown == {"fit"} and "validate" in missing and "pack" in missing


def test_anchors_follow_github():
    text = "# A: `--weights ema|raw`\n## Fine-tuning (`model.init_from`, `experiment=finetune`)\n## Fast\n## Fast\n"
    assert anchors(text) == {"a---weights-emaraw", "fine-tuning-modelinit_from-experimentfinetune", "fast", "fast-1"}
