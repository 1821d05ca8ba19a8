"""The small real-text corpus shipped with mimo, so a run needs no download.

The text is the Jargon File 4.4.7 (public domain), as packaged by Debian in ``jargon-text``
(version 4.4.7-4.1, ``/usr/share/doc/jargon-text/jargon.txt.gz``). ``main`` regenerates the shipped
JSONL from that file; ``shipped_corpus_path`` is where the training data code finds it.
"""

import argparse
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_FILE = ASSETS / "corpus" / "jargon.jsonl.gz"
DEBIAN_SOURCE = "/usr/share/doc/jargon-text/jargon.txt.gz"

# Section headings start in column 0; body text is indented.  The glossary holds one document per
# ":headword:" entry; everything between entries there (letter headings, the index of headwords) is
# navigation, not prose.
_HEADING = re.compile(r"^\S")
_FIRST_SECTION = re.compile(r"^Chapter 1\.")
_GLOSSARY = "Glossary"
_ENTRY = re.compile(r"^ {3}:(?P<word>[^:]+):(?P<rest>.*)$")
_CROSS_REF = re.compile(r"\{([^{}]*)\}")
_BODY_INDENT = "   "


def shipped_corpus_path() -> Path:
    """The gzipped JSONL corpus (one ``{"text": ...}`` object per document) inside the package."""
    return CORPUS_FILE


def _reflow(lines: list[str]) -> str:
    """Joins wrapped prose lines into paragraphs but keeps tables, lists and verse as laid out."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
            continue
        if current:
            is_prose = all(line.startswith(_BODY_INDENT) and not line[len(_BODY_INDENT)].isspace() for line in current)
            if is_prose:
                paragraphs.append(" ".join(line.strip() for line in current))
            else:
                paragraphs.append("\n".join(line.removeprefix(_BODY_INDENT) for line in current))
            current = []
    return _CROSS_REF.sub(r"\1", "\n\n".join(paragraphs)).strip()


def split_documents(text: str) -> Iterator[str]:
    """Cuts the Jargon File into documents: one per essay section and one per lexicon entry."""
    # The DocBook rendering uses no-break spaces in headings ("Chapter\xa01."); prose wants plain ones.
    lines = text.replace("\xa0", " ").split("\n")
    start = next(i for i, line in enumerate(lines) if _FIRST_SECTION.match(line))
    title, body, in_glossary = None, [], False

    def flush() -> Iterator[str]:
        if title is not None:
            doc = _reflow(body)
            if doc:
                yield f"{title}\n\n{doc}"

    for line in lines[start:]:
        if _HEADING.match(line):
            yield from flush()
            in_glossary = line.strip() == _GLOSSARY
            title, body = (None if in_glossary else line.strip()), []
            continue
        entry = _ENTRY.match(line) if in_glossary else None
        if entry:
            yield from flush()
            title, body = f"{entry['word']}:{entry['rest']}".strip(), []
        elif title is not None:
            body.append(line)
    yield from flush()


def write_corpus(source: Path, output: Path) -> int:
    """Writes the documents of ``source`` (jargon.txt.gz) to ``output`` (JSONL.gz); returns the count."""
    with gzip.open(source, "rt", encoding="utf-8") as reader:
        documents = list(split_documents(reader.read()))
    output.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible, so regenerating does not dirty the repository.
    with open(output, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
        for doc in documents:
            zipped.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=DEBIAN_SOURCE, help="jargon.txt.gz from the Debian package jargon-text")
    parser.add_argument("--output", default=str(CORPUS_FILE))
    args = parser.parse_args()
    count = write_corpus(Path(args.source), Path(args.output))
    print(f"wrote {count} documents to {args.output}")


if __name__ == "__main__":
    main()
