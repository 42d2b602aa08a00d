"""An evaluation text from another domain than WikiText: English prose of the Python standard library's docstrings.

Every install of kvquant_hf has this text, and it is never used for calibration (``calibrate.py`` reads
WikiText-2). The source files are *parsed* (``ast``), never imported, so no module runs; the walk is sorted, so the
same Python version gives the same text::

    python -m kvquant_hf.evaluation.docstring_text --output docstrings.txt [--max-chars N]

What is taken: the docstrings of public modules of the standard library (top-level names in
``sys.stdlib_module_names``; no private ``_x`` modules, no ``test``/``tests``/``idle_test`` folders, no
``__main__``) and of their classes, functions and methods, in source order. Each docstring is cleaned:
dedented (``inspect.cleandoc``), doctest examples (``>>>`` lines and their output), reST literal blocks (after
``::``) and directives (``.. note::`` and their bodies) dropped, reST roles reduced to their text
(``:func:`open``` becomes ``open``), paragraphs with few letters (code, tables) dropped; docstrings shorter than
:data:`MIN_DOC_CHARS` after cleaning and repeats of an earlier docstring are dropped. Docstrings are joined by one
blank line; the text stops before the docstring that would pass ``max_chars``.

Next to ``FILE`` a ``FILE.json`` records the Python version, the module/docstring/character counts, the
SHA-256 of the text and the settings (:func:`write_corpus`).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import platform
import re
import sys
import sysconfig
from typing import Any, Iterator, Sequence

from ..cli_help import DefaultsHelpFormatter
from ..errors import KVQuantConfigError

#: about 1.2M characters: ~150 windows of 2048 SmolLM2 tokens
DEFAULT_MAX_CHARS = 1_200_000
#: docstrings shorter than this after cleaning are dropped
MIN_DOC_CHARS = 80
#: a kept paragraph has at least this share of letters among its non-space characters
MIN_LETTER_SHARE = 0.7
#: a paragraph with at least this share of code-like lines is code (an indented one with any code line is)
MAX_CODE_SHARE = 0.5
#: the cleaning rules; part of the cache file name, so that a change of the rules rebuilds the text
FORMAT_VERSION = 1
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})

_ROLE = re.compile(r":(?:[A-Za-z]+:)*[A-Za-z]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_DIRECTIVE = re.compile(r"^\s*\.\.\s")
_FIELD = re.compile(r"^\s*:[A-Za-z][^:]*:(\s|$)")
_CODE = re.compile(
    r"^\s*(?:(?:def|class|import|return|raise|yield|elif)\s|from\s+\S+\s+import\s|"
    r"(?:if|for|while|with|try|except|finally|else)\b.*:\s*$|@\w|\.\.\.\s*$|#)"
    r"|==|!=|\+=|->|\bself\.\w+\(|[\w\]\)]\s*=\s*[\w\[\(\{'\"]|[{};]\s*$")


def stdlib_dir() -> str:
    """The folder of the standard library's ``.py`` files."""
    return sysconfig.get_paths()["stdlib"]


def iter_stdlib_modules(root: str | None = None) -> Iterator[tuple[str, str]]:
    """``(module name, file)`` of the public standard-library modules under ``root``, sorted by name."""
    root = root or stdlib_dir()
    top_names = getattr(sys, "stdlib_module_names", None)
    found = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        parts = [] if rel == "." else rel.split(os.sep)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and d.isidentifier() and not d.startswith("_"))
        if parts and not os.path.isfile(os.path.join(folder, "__init__.py")):
            dirs[:] = []  # not a package: nothing below is an importable module
            continue
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext != ".py" or not stem.isidentifier() or stem == "__main__":
                continue
            if stem.startswith("_") and stem != "__init__":
                continue
            mod = parts + ([] if stem == "__init__" else [stem])
            if not mod or (top_names is not None and mod[0] not in top_names):
                continue
            found.append((".".join(mod), os.path.join(folder, name)))
    return iter(sorted(found))


def _module_docstrings(tree: ast.Module) -> Iterator[str]:
    """The raw docstrings of a module, then of its classes, functions and methods (methods of classes, not
    functions nested in functions) in source order."""
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield doc

    def walk(body):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=False)
                if d:
                    yield d
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body)

    yield from walk(tree.body)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_prose(paragraph: str) -> bool:
    """Enough words, mostly letters, and not code (see :data:`MIN_LETTER_SHARE`, :data:`MAX_CODE_SHARE`)."""
    words = paragraph.split()
    if len(words) < 3:
        return False
    chars = "".join(words)
    if sum(c.isalpha() for c in chars) < MIN_LETTER_SHARE * len(chars):
        return False
    lines = paragraph.splitlines()
    code = sum(bool(_CODE.search(line)) for line in lines)
    indented = all(line[:1].isspace() for line in lines)
    return not (code >= MAX_CODE_SHARE * len(lines) or (indented and code))


def clean_docstring(doc: str) -> str:
    """One docstring as prose ("" if nothing is left): see the module docstring for the rules."""
    lines = inspect.cleandoc(doc.expandtabs()).splitlines()
    kept: list[str] = []
    skip_indent = None  # drop the lines indented deeper than this (a literal block or a directive body)
    in_doctest = False
    for line in lines:
        stripped = line.strip()
        if not stripped:
            in_doctest = False
            kept.append("")
            continue
        if skip_indent is not None:
            if _indent(line) > skip_indent:
                continue
            skip_indent = None
        if in_doctest or stripped.startswith(">>>"):
            in_doctest = True  # a doctest's output runs to the next blank line
            continue
        if _DIRECTIVE.match(line):
            skip_indent = _indent(line)
            continue
        if _FIELD.match(line):  # ":param x:", ":returns:" field lists
            continue
        if stripped.endswith("::"):
            skip_indent = _indent(line)
            line = line.rstrip()[:-2].rstrip()
            if not line.strip():
                continue
            line += ":"
        kept.append(line.rstrip())
    paragraphs = "\n".join(kept).split("\n\n")
    out = []
    for par in paragraphs:
        par = _ROLE.sub(r"\1", par.strip("\n"))
        if par.strip() and _is_prose(par):
            out.append(par.rstrip())
    text = "\n\n".join(out).strip("\n")
    return text if len(text) >= MIN_DOC_CHARS else ""


def build_corpus(max_chars: int | None = DEFAULT_MAX_CHARS, root: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(text, record)``: the cleaned docstrings of the standard library joined by blank lines, at most
    ``max_chars`` characters (None: all of them), and the record of what it holds."""
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < MIN_DOC_CHARS):
        raise KVQuantConfigError(f"max_chars={max_chars!r} is too small; pass an int >= {MIN_DOC_CHARS} or None for "
                                 "the whole text.")
    root = root or stdlib_dir()
    docs: list[str] = []
    seen: set[str] = set()
    modules: list[str] = []
    total = 0
    full = False
    for name, path in iter_stdlib_modules(root):
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # templates and files of another Python version
        used = False
        for raw in _module_docstrings(tree):
            doc = clean_docstring(raw)
            if not doc or doc in seen:
                continue
            add = len(doc) + (2 if docs else 0)
            if max_chars is not None and total + add > max_chars:
                full = True
                break
            seen.add(doc)
            docs.append(doc)
            total += add
            used = True
        if used:
            modules.append(name)
        if full:
            break
    if not docs:
        raise KVQuantConfigError(f"no docstrings found under {root!r}; the standard library's .py sources are needed "
                                 "(some distributions ship only .pyc files: install the Python source package).")
    text = "\n\n".join(docs) + "\n"
    record = {
        "source": "Python standard library docstrings",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "format_version": FORMAT_VERSION,
        "max_chars": max_chars,
        "modules": len(modules),
        "first_module": modules[0],
        "last_module": modules[-1],
        "docstrings": len(docs),
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "truncated": full,
    }
    return text, record


def write_corpus(output: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> dict[str, Any]:
    """Build the text into ``output`` and its record into ``output + ".json"``; returns the record."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise KVQuantConfigError(f"--output {output!r} is a folder; pass a file path such as {output}/docstrings.txt.")
    if not os.path.isdir(folder):
        raise KVQuantConfigError(f"the folder of --output {output!r} does not exist; create {folder!r} first or pick "
                                 "another path.")
    text, record = build_corpus(max_chars)
    for path, body in ((output, text), (output + ".json", json.dumps(record, indent=1) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(body)
        os.replace(tmp, path)
    return record


def cache_path(cache_dir: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """The file name of the text built by this Python with these settings, inside ``cache_dir``."""
    size = "all" if max_chars is None else str(max_chars)
    return os.path.join(cache_dir, f"docstrings-py{platform.python_version()}-v{FORMAT_VERSION}-{size}.txt")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/kvquant_hf`` (``~/.cache/kvquant_hf``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvquant_hf")


def ensure_corpus(cache_dir: str | None = None, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """The path of the text in ``cache_dir`` (default :func:`default_cache_dir`), built there if missing."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = cache_path(cache_dir, max_chars)
    if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
        write_corpus(path, max_chars)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvquant_hf.evaluation.docstring_text",
        description="Write an evaluation text of English prose from the Python standard library's docstrings "
                    "(parsed, not imported; same text for the same Python version) and FILE.json with its record.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, metavar="FILE", help="the text file to write (its folder must exist)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help="stop before the docstring that would pass this many characters (0: the whole text)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = write_corpus(args.output, args.max_chars or None)
    except KVQuantConfigError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {record['chars']} characters, {record['docstrings']} docstrings of "
          f"{record['modules']} modules (Python {record['python']}); record in {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
