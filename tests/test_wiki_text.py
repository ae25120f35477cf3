"""Evaluation/calibration text extraction from a MediaWiki dump (synthetic dump: no download)."""

import bz2

from slimgraph.models.wiki_text import build_split, split_articles, wiki_to_text

LONG = "word " * 14


def test_markup_becomes_plain_prose():
    markup = (
        "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a [[mathematician]] who worked with [[Charles Babbage|Babbage]] on the engine"
        "<ref name=a>Cited work</ref> and wrote notes&mdash;the first program [http://example.org notes]. " + LONG + "\n"
        "== Life ==\n"
        "[[File:Ada.jpg|thumb|A [[portrait]]]]\n"
        "{| class=wikitable\n| a || b\n|}\n"
        "* a list item that is long enough to pass the word threshold of the extractor\n"
        "Too short.\n"
        "[[Category:Mathematicians]]\n"
    )
    text = wiki_to_text(markup)
    assert text.splitlines() == [
        "Ada was a mathematician who worked with Babbage on the engine and wrote notes\u2014the first program notes. "
        + LONG.strip()]


REDIRECT = '<redirect title="x" />'


def _dump(path, articles):
    pages = "".join(
        f"<page><title>{title}</title><ns>{ns}</ns><id>{i}</id>{REDIRECT if redirect else ''}"
        f"<revision><text>{body}</text></revision></page>"
        for i, (title, ns, redirect, body) in enumerate(articles))
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{pages}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode()))
    return path


def test_split_is_disjoint_ordered_and_reproducible(tmp_path):
    articles = [(f"A{i}", "0", False, f"Article {i} says " + LONG) for i in range(6)]
    articles += [("Talk page", "1", False, "talk " + LONG), ("Redirected", "0", True, "moved " + LONG)]
    dump = _dump(tmp_path / "dump.xml.bz2", articles)
    first = build_split(dump, tmp_path / "one", eval_chars=150)
    build_split(dump, tmp_path / "two", eval_chars=150)
    assert (tmp_path / "one" / "split.json").read_text() == (tmp_path / "two" / "split.json").read_text()
    evaluation = first.evaluation.read_text()
    calibration = first.calibration.read_text()
    assert first.eval_articles == 2 and first.calib_articles == 4
    assert "Article 0" in evaluation and "Article 5" in calibration
    assert "talk" not in evaluation + calibration and "moved" not in evaluation + calibration
    assert not set(evaluation.split("\n\n")) & set(calibration.split("\n\n"))


def test_split_articles_respects_budget():
    evaluation, calibration = split_articles([("a", "x" * 10), ("b", "y" * 10), ("c", "z" * 10)], eval_chars=15)
    assert [t for t, _ in evaluation] == ["a", "b"] and [t for t, _ in calibration] == ["c"]
