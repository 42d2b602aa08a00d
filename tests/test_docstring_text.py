"""kvquant_hf.evaluation.docstring_text: the evaluation text of standard-library docstrings (walk, cleaning,
determinism, the record next to the text, the command line)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys

import pytest

from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.evaluation import docstring_text as dt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC = '''Return the frobnicated value of an object, as :func:`frob` would.

    The value is computed lazily and cached on the instance, see
    :class:`Cache` and :meth:`Cache.clear <pkg.Cache.clear>` for how to drop it.

    >>> frob(3)
    9
    >>> frob('a')
    Traceback (most recent call last):
    TypeError: bad

    A typical use looks like this::

        value = frob(obj)
        cache[key] = value

    .. versionadded:: 3.2
    .. note::
       This note body is dropped with its directive.

    :param obj: the object
    :returns: its value

    In a loop:

        for item in items:
            print(frob(item))

    Raises ValueError when the object cannot be frobnicated at all.
    '''

CLEAN = ("Return the frobnicated value of an object, as frob would.\n\n"
         "The value is computed lazily and cached on the instance, see\n"
         "Cache and Cache.clear for how to drop it.\n\n"
         "A typical use looks like this:\n\n"
         "In a loop:\n\n"
         "Raises ValueError when the object cannot be frobnicated at all.")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default-size text built by the command line, with its record."""
    out = tmp_path_factory.mktemp("docstrings") / "docstrings.txt"
    assert dt.main(["--output", str(out)]) == 0
    return out.read_text(encoding="utf-8"), json.loads((out.parent / "docstrings.txt.json").read_text())


def test_clean_docstring_keeps_prose_only():
    assert dt.clean_docstring(DOC) == CLEAN
    assert dt.clean_docstring("Too short to keep.") == ""
    assert dt.clean_docstring(">>> frob(3)\n9\n>>> frob(4)\n16\n" * 4) == ""  # a doctest only: nothing left


def _write(root, rel, body=""):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")


def test_walk_sorted_public_stdlib_modules_only(tmp_path):
    for rel in ("json/decoder.py", "json/__init__.py", "json/_private.py", "json/__main__.py", "json/tests/__init__.py",
                "json/tests/test_x.py", "email/mime/text.py", "email/mime/__init__.py", "email/__init__.py",
                "abc.py", "_abc.py", "not_a_stdlib_module.py", "site-packages/six.py", "notpkg/abc.py",
                "ast.txt", "json/bad-name.py"):
        _write(tmp_path, rel)
    assert [name for name, _ in dt.iter_stdlib_modules(str(tmp_path))] == [
        "abc", "email", "email.mime", "email.mime.text", "json", "json.decoder"]
    assert dict(dt.iter_stdlib_modules(str(tmp_path)))["json.decoder"] == str(tmp_path / "json" / "decoder.py")


def test_build_from_a_tree_cleans_dedups_and_stops_at_max_chars(tmp_path):
    long_a = "The first module explains what it is for in enough words to pass the shortest kept length."
    long_b = "A function that does something useful, described in a sentence long enough to be kept here."
    _write(tmp_path, "abc.py", f'"""{long_a}"""\n\ndef f():\n    """{DOC}"""\n\n\nclass C:\n    """Short."""\n\n'
                               f'    def _g(self):\n        """{long_b}"""\n\n        def inner():\n'
                               f'            """{long_a} Nested functions are not walked."""\n')
    _write(tmp_path, "ast.py", f'"""{long_b}"""\n\ndef h():\n    """{long_a}"""\n')  # both repeats: dropped
    _write(tmp_path, "json/__init__.py", "def broken(:\n")  # does not parse: skipped
    text, record = dt.build_corpus(None, root=str(tmp_path))
    assert text == "\n\n".join([long_a, CLEAN, long_b]) + "\n"
    assert record["modules"] == 1 and record["docstrings"] == 3 and record["chars"] == len(text)
    assert record["first_module"] == record["last_module"] == "abc" and record["truncated"] is False
    cut, rec = dt.build_corpus(len(long_a) + 2 + len(CLEAN) + 1, root=str(tmp_path))
    assert cut == long_a + "\n\n" + CLEAN + "\n" and rec["truncated"] is True and rec["docstrings"] == 2
    with pytest.raises(KVQuantConfigError, match="no docstrings found"):
        dt.build_corpus(None, root=str(tmp_path / "json"))
    with pytest.raises(KVQuantConfigError, match="max_chars=10 is too small"):
        dt.build_corpus(10)


def test_two_builds_same_text_and_prefix_of_the_larger(full):
    text, _ = full
    a, rec_a = dt.build_corpus(150_000)
    b, rec_b = dt.build_corpus(150_000)
    assert a == b and rec_a == rec_b and 140_000 < len(a) <= 150_000
    assert text.startswith(a[:-1] + "\n\n")  # the same docstrings in the same order


def test_full_text_is_clean_prose(full):
    text, _ = full
    docs = text.rstrip("\n").split("\n\n")
    lines = text.splitlines()
    assert not [line for line in lines if line.lstrip().startswith(">>>")]
    assert not [line for line in lines if line.lstrip().startswith(".. ") or line.rstrip().endswith("::")]
    assert all(doc.strip() for doc in docs) and "\n\n\n" not in text
    assert "Requires that the metaclass is ABCMeta or derived from it." in text  # abc.abstractmethod, the first
    letters = sum(c.isalpha() for c in text) / sum(not c.isspace() for c in text)
    assert letters > 0.85, letters


def test_record_of_the_full_text(full):
    text, record = full
    assert record["chars"] == len(text) <= dt.DEFAULT_MAX_CHARS and len(text) > 1_000_000
    assert record["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert record["python"] == platform.python_version() and record["max_chars"] == dt.DEFAULT_MAX_CHARS
    assert record["modules"] > 300 and record["docstrings"] > 3000 and record["first_module"] == "abc"
    assert record["format_version"] == dt.FORMAT_VERSION


def test_ensure_corpus_builds_once_into_the_cache(tmp_path):
    path = dt.ensure_corpus(str(tmp_path / "cache"), 20_000)
    assert path == dt.cache_path(str(tmp_path / "cache"), 20_000) and f"py{platform.python_version()}" in path
    first = os.stat(path).st_mtime_ns
    assert dt.ensure_corpus(str(tmp_path / "cache"), 20_000) == path and os.stat(path).st_mtime_ns == first
    with open(path + ".json") as fh:
        assert json.load(fh)["chars"] == len(open(path, encoding="utf-8").read())


def test_cli_help_and_bad_output(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "kvquant_hf.evaluation.docstring_text", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--output FILE" in out.stdout and "--max-chars" in out.stdout
    assert "(default: 1200000)" in out.stdout.replace("\n", " ").replace("  ", " ")
    assert dt.main(["--output", str(tmp_path / "missing" / "x.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert dt.main(["--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert dt.main(["--output", str(tmp_path / "x.txt"), "--max-chars", "5"]) == 2
    assert "too small" in capsys.readouterr().err and not os.path.exists(tmp_path / "x.txt")
    with pytest.raises(SystemExit):
        dt.main([])  # --output is required
