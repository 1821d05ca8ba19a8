"""Finding the input files of a preprocessing run and reading their records through HF datasets.

Every source is read in streaming mode, so memory stays bounded whatever the input size. JSON Lines
files are read as lines and parsed by the tokenizing workers: a malformed line, a non-string field or
undecodable bytes then count as one bad record instead of failing the whole file inside Arrow's JSON
reader. Undecodable bytes are decoded as U+FFFD, and a record containing U+FFFD counts as undecodable.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import load_dataset

from mimo.data.errors import DataError

KINDS = ("jsonl", "parquet", "arrow", "text")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Source:
    """Files read as one record stream: a single file, or all plain-text files of one directory."""

    kind: str
    files: list[str]

    def location(self, record: int) -> str:
        """Where record ``record`` (0-based within this source) lives, for reports."""
        if self.kind == "text":
            return self.files[record]
        unit = "line" if self.kind == "jsonl" else "row"
        return f"{self.files[0]} {unit} {record + 1}"


def _kind_of(path: Path, forced: str) -> str:
    if forced != "auto":
        return forced
    name = path.name.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return _SUFFIXES.get(Path(name).suffix, "")


def discover(inputs: list[str], forced_format: str = "auto") -> list[Source]:
    """Sources in a fixed order (inputs as given, directories walked in sorted order)."""
    if forced_format not in KINDS + ("auto",):
        raise DataError(f"--format {forced_format!r} is not one of auto, {', '.join(KINDS)}")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            kind = _kind_of(path, forced_format)
            if not kind:
                raise DataError(f"cannot tell the format of {path} from its name; pass --format ({', '.join(KINDS)})")
            sources.append(Source(kind, [str(path)]))
        elif path.is_dir():
            sources.extend(_discover_dir(path, forced_format))
        else:
            raise DataError(f"input {path} does not exist")
    if not sources:
        raise DataError(f"no readable input files in {inputs} (known extensions: {', '.join(sorted(_SUFFIXES))})")
    return sources


def _discover_dir(directory: Path, forced_format: str) -> list[Source]:
    files = sorted(
        Path(root) / name for root, dirs, names in os.walk(directory) for name in names if not name.startswith(".")
    )
    sources, texts = [], []
    for file in files:
        kind = _kind_of(file, forced_format)
        if kind == "text":
            texts.append(str(file))
        elif kind:
            sources.append(Source(kind, [str(file)]))
    if texts:
        sources.append(Source("text", texts))
    return sources


def read_records(source: Source, text_field: str, batch_size: int) -> Iterator[list]:
    """Batches of raw records: JSON lines (str), column values (any type) or whole text files (str)."""
    try:
        if source.kind in ("jsonl", "text"):
            sample_by = "document" if source.kind == "text" else "line"
            dataset = load_dataset(
                "text",
                data_files=source.files,
                split="train",
                streaming=True,
                sample_by=sample_by,
                encoding_errors="replace",
            )
            column = "text"
        else:
            # Parquet reads only the wanted column from disk; Arrow IPC files are read whole anyway.
            options = {"columns": [text_field]} if source.kind == "parquet" else {}
            dataset = load_dataset(source.kind, data_files=source.files, split="train", streaming=True, **options)
            dataset = dataset.select_columns([text_field])
            column = text_field
        for batch in dataset.iter(batch_size=batch_size):
            yield batch[column]
    except DataError:
        raise
    except Exception as error:
        raise DataError(
            f"cannot read {source.files[0] if len(source.files) == 1 else source.files} as "
            f"{source.kind}: {error}; fix or remove the file (or pass --format / --text-field)"
        ) from error
