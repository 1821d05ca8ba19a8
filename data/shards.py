"""One unit of preprocessing work: classify a batch of raw records, tokenize the good ones, write a shard.

Runs in worker processes. A shard is complete when its stats file, .bin and .idx all exist; each is
renamed into place from a temporary name, the .idx last, so a killed worker leaves no shard that
looks complete and the re-run simply redoes it.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mimo.data.indexed import TMP_SUFFIX, is_complete, token_dtype, write_indexed
from mimo.data.sources import REPLACEMENT, Source
from mimo.data.tokenizer import encode_documents, load_hf_tokenizer

STATS_SUFFIX = ".stats.json"
SKIP_REASONS = ("empty", "non_text", "undecodable")


@dataclass
class ShardTask:
    prefix: str
    source: Source
    first_record: int
    """Index of ``records[0]`` within its source, for locating bad records."""
    records: list
    text_field: str
    examples_per_reason: int


@dataclass
class ShardStats:
    records: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {reason: [] for reason in SKIP_REASONS})

    def add(self, other: "ShardStats", examples_per_reason: int) -> None:
        self.records += other.records
        self.documents += other.documents
        self.tokens += other.tokens
        for reason in SKIP_REASONS:
            self.skipped[reason] += other.skipped[reason]
            room = examples_per_reason - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][: max(room, 0)])


def classify(kind: str, raw, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable record, else (None, one of SKIP_REASONS)."""
    if kind in ("jsonl", "text") and isinstance(raw, str) and REPLACEMENT in raw:
        return None, "undecodable"
    if kind == "jsonl":
        if not raw.strip():
            return None, "empty"
        try:
            record = json.loads(raw)
        except ValueError:
            return None, "undecodable"
        raw = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(raw, str):
        return None, "non_text"
    if not raw.strip():
        return None, "empty"
    return raw, None


_worker_tokenizer = None


def init_worker(tokenizer_path: str) -> None:
    """Loads the tokenizer once per worker process; the workers are the parallelism, not Rust threads."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_hf_tokenizer(Path(tokenizer_path))


def shard_complete(prefix: str) -> bool:
    return is_complete(prefix) and os.path.isfile(prefix + STATS_SUFFIX)


def load_stats(prefix: str) -> ShardStats:
    with open(prefix + STATS_SUFFIX) as reader:
        return ShardStats(**json.load(reader))


def write_shard(task: ShardTask) -> ShardStats:
    stats = ShardStats(records=len(task.records))
    texts = []
    for offset, raw in enumerate(task.records):
        text, reason = classify(task.source.kind, raw, task.text_field)
        if reason is None:
            texts.append(text)
            continue
        stats.skipped[reason] += 1
        if len(stats.examples[reason]) < task.examples_per_reason:
            stats.examples[reason].append(task.source.location(task.first_record + offset))
    documents = encode_documents(_worker_tokenizer, texts, token_dtype(len(_worker_tokenizer))) if texts else []
    stats.documents = len(documents)
    stats.tokens = int(sum(doc.size for doc in documents))
    tmp_stats = task.prefix + STATS_SUFFIX + TMP_SUFFIX
    with open(tmp_stats, "w") as writer:
        json.dump(asdict(stats), writer)
    os.replace(tmp_stats, task.prefix + STATS_SUFFIX)
    write_indexed(task.prefix, documents, token_dtype(len(_worker_tokenizer)))
    return stats
