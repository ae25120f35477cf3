"""Evaluation and calibration text: the Wikipedia sample shipped inside the gensim wheel (CC BY-SA).

    python -m slimgraph.models.wiki_text          # prints the split and where it is cached

The wheel is fetched with ``pip download --no-deps gensim==4.4.0`` (no install), the bz2 XML member is
read from it, and each main-namespace article is turned into plain prose by :func:`wiki_to_text`:
templates, tables, references, tags, comments, files/categories and headings are dropped, links keep
their shown text, and only paragraphs of at least ``MIN_WORDS`` words remain. Redirects are skipped.

Split: articles in dump order; the first articles up to ``EVAL_CHARS`` characters form the fixed
evaluation slice, every later article is calibration text, so the two never share an article. The
result is cached under ``$SLIMGRAPH_CACHE/wiki-text/`` with the sha256 of both files.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimgraph.compiler.errors import ModelLoadError

GENSIM = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_WORDS = 12
EVAL_CHARS = 120_000   # ~25k SmolLM2 tokens: above the 16k-token minimum
_NESTED = [(re.compile(r"\{\{[^{}]*\}\}"), ""), (re.compile(r"\{\|[^{}]*?\|\}", re.S), "")]
_FLAT = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
]


def wiki_to_text(markup: str) -> str:
    """Plain prose paragraphs from MediaWiki markup (deterministic, regex based)."""
    text = markup
    for pattern, repl in _NESTED:
        previous = None
        while previous != text:  # innermost first, until nested templates/tables are gone
            previous, text = text, pattern.sub(repl, text)
    for pattern, repl in _FLAT:
        text = pattern.sub(repl, text)
    text = html.unescape(text)
    paragraphs = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if not line or line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            continue
        if len(line.split()) >= MIN_WORDS:
            paragraphs.append(line)
    return "\n".join(paragraphs)


def iter_articles(xml_stream):
    """(title, plain text) for each non-redirect article of namespace 0."""
    for _, elem in ET.iterparse(xml_stream):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.findtext("{*}ns")
        title = elem.findtext("{*}title") or ""
        redirect = elem.find("{*}redirect") is not None
        markup = elem.findtext("{*}revision/{*}text") or ""
        elem.clear()
        if ns == "0" and not redirect:
            text = wiki_to_text(markup)
            if text:
                yield title, text


@dataclass(frozen=True)
class TextSplit:
    evaluation: Path
    calibration: Path
    eval_articles: int
    calib_articles: int


def split_articles(articles, eval_chars: int = EVAL_CHARS) -> tuple[list, list]:
    """First articles (in order) up to ``eval_chars`` for evaluation, the rest for calibration."""
    evaluation, calibration, size = [], [], 0
    for title, text in articles:
        if size < eval_chars:
            evaluation.append((title, text))
            size += len(text)
        else:
            calibration.append((title, text))
    return evaluation, calibration


def _download_dump(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", GENSIM, "-d", str(folder)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not download {GENSIM} for its Wikipedia sample: {str(exc)[:300]}") from None
    wheel = next(folder.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        target = folder / Path(MEMBER).name
        target.write_bytes(zf.read(MEMBER))
    return target


def _write(path: Path, articles) -> str:
    text = "\n\n".join(text for _, text in articles) + "\n"
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def build_split(dump: Path, out: Path, eval_chars: int = EVAL_CHARS) -> TextSplit:
    with bz2.open(dump, "rb") as stream:
        evaluation, calibration = split_articles(iter_articles(stream), eval_chars)
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": f"{GENSIM}:{MEMBER}", "license": "CC BY-SA", "eval_chars": eval_chars,
            "eval_titles": [t for t, _ in evaluation], "calib_titles": [t for t, _ in calibration],
            "sha256": {"eval.txt": _write(out / "eval.txt", evaluation),
                       "calib.txt": _write(out / "calib.txt", calibration)}}
    (out / "split.json").write_text(json.dumps(info, indent=1) + "\n")
    return TextSplit(out / "eval.txt", out / "calib.txt", len(evaluation), len(calibration))


def wiki_split() -> TextSplit:
    """The cached split, built on first use (download + extraction take a few seconds)."""
    cache = Path(os.environ.get("SLIMGRAPH_CACHE", Path.home() / ".cache" / "slimgraph")) / "wiki-text"
    if (cache / "split.json").is_file():
        info = json.loads((cache / "split.json").read_text())
        return TextSplit(cache / "eval.txt", cache / "calib.txt", len(info["eval_titles"]), len(info["calib_titles"]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        build_split(_download_dump(Path(tmp)), Path(tmp) / "split")
        os.replace(Path(tmp) / "split", cache)
    return wiki_split()


if __name__ == "__main__":
    split = wiki_split()
    for name, path, n in (("evaluation", split.evaluation, split.eval_articles),
                          ("calibration", split.calibration, split.calib_articles)):
        print(f"{name:12s} {n:4d} articles {path.stat().st_size:9,d} bytes  {path}")
