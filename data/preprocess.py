"""mimo-preprocess: corpora (JSON Lines, Parquet, Arrow, plain-text directories) to megatron-core
indexed datasets, tokenized in parallel, resumable and idempotent.

The main process streams records through HF datasets and cuts them into shards of
``shard_documents`` records; worker processes (one per core) tokenize each shard, append the
end-of-document token and write it as its own .bin/.idx. A re-run skips finished shards (and whole
finished sources without reading them), then merges the shards in input order into ``<output>``, or
lists them as a blend. Bad records are counted per reason with example locations, never dropped silently.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
from tqdm import tqdm

from mimo.data.config import PreprocessConfig
from mimo.data.errors import DataError
from mimo.data.indexed import TMP_SUFFIX, document_lengths, is_complete, merge_indexed, token_dtype
from mimo.data.shards import SKIP_REASONS, ShardStats, ShardTask, init_worker, load_stats, shard_complete, write_shard
from mimo.data.sources import Source, discover, read_records
from mimo.data.tokenizer import MimoTokenizer
from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR
from mimo.recipes.errors import run_command

PROG = "mimo-preprocess"

MANIFEST = "manifest.json"
SOURCE_DONE = ".done.json"
SUMMARY_SUFFIX = ".stats.json"
PERCENTILES = (50, 90, 99)


@dataclass
class Summary:
    records: int
    documents: int
    tokens: int
    skipped: dict[str, int]
    examples: dict[str, list[str]]
    lengths: dict[str, float]
    """Document length distribution in tokens (end-of-document included)."""
    outputs: list[str]
    """The dataset prefixes written: the merged one, or the shards of the blend."""
    seconds: float = 0.0
    shards_reused: int = 0
    up_to_date: bool = False
    """True when an earlier run already wrote this output from the same inputs (nothing was done)."""
    manifest: dict = field(default_factory=dict)


def _manifest(cfg: PreprocessConfig, sources: list[Source], tokenizer: MimoTokenizer) -> dict:
    """What the output depends on; a work directory or output made from anything else is refused."""
    files = [
        {"path": os.path.abspath(f), "size": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
        for source in sources
        for f in source.files
    ]
    return {
        "files": files,
        "kinds": [source.kind for source in sources],
        "tokenizer": tokenizer.fingerprint,
        "text_field": cfg.text_field,
        "shard_documents": cfg.shard_documents,
    }


def _work_dir(cfg: PreprocessConfig) -> Path:
    return Path(cfg.output + ".shards")


def _shard_prefix(work: Path, source_index: int, chunk: int) -> str:
    return str(work / f"{source_index:05d}_{chunk:07d}")


def _prepare_work_dir(work: Path, manifest: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    path = work / MANIFEST
    if path.exists() and json.loads(path.read_text()) != manifest:
        if any(work.glob("*.idx")):
            raise DataError(
                f"{work} holds shards of a different preprocessing run (other inputs, tokenizer or "
                f"options); delete {work} or choose another --output"
            )
        shutil.rmtree(work)  # an earlier run that finished no shard: nothing worth keeping
        work.mkdir(parents=True)
    path.write_text(json.dumps(manifest, indent=1))


def _chunks(records: Iterator[list], size: int) -> Iterator[list]:
    """Re-cuts read batches into shards of exactly ``size`` records (the last may be shorter)."""
    pending: list = []
    for batch in records:
        pending.extend(batch)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


class _ShardRunner:
    """Feeds shards to the worker pool with a bounded queue and tallies their statistics."""

    def __init__(self, cfg: PreprocessConfig, pool: ProcessPoolExecutor, workers: int, bar: tqdm) -> None:
        self.cfg, self.pool, self.bar = cfg, pool, bar
        self.limit = workers * cfg.in_flight_per_worker
        self.pending: dict[Future, str] = {}
        self.total = ShardStats()
        self.tokens_this_run = 0
        self.reused = 0
        self.started = time.perf_counter()

    def submit(self, task: ShardTask) -> None:
        while len(self.pending) >= self.limit:
            self._collect()
        self.pending[self.pool.submit(write_shard, task)] = task.prefix

    def reuse(self, stats: ShardStats) -> None:
        self.total.add(stats, self.cfg.examples_per_reason)
        self.reused += 1

    def drain(self) -> None:
        while self.pending:
            self._collect()

    def _collect(self) -> None:
        done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
        for future in done:
            self.pending.pop(future)
            stats = future.result()
            self.total.add(stats, self.cfg.examples_per_reason)
            self.tokens_this_run += stats.tokens
            self.bar.update(stats.records)
            rate = self.tokens_this_run / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(tokens_per_s=f"{rate:,.0f}", refresh=False)


def _run_source(runner: _ShardRunner, cfg: PreprocessConfig, work: Path, index: int, source: Source) -> int:
    """Submits the unfinished shards of one source; returns its shard count."""
    chunk = -1
    for chunk, records in enumerate(_chunks(read_records(source, cfg.text_field, cfg.read_batch), cfg.shard_documents)):
        prefix = _shard_prefix(work, index, chunk)
        if shard_complete(prefix):
            runner.reuse(load_stats(prefix))
            continue
        runner.submit(
            ShardTask(prefix, source, chunk * cfg.shard_documents, records, cfg.text_field, cfg.examples_per_reason)
        )
    return chunk + 1


def _process_shards(
    cfg: PreprocessConfig, sources: list[Source], work: Path, tokenizer_path: Path, workers: int
) -> tuple[list[str], ShardStats, int]:
    done_marker = [work / f"{index:05d}{SOURCE_DONE}" for index in range(len(sources))]
    counts: dict[int, int] = {}
    # fork: workers inherit the loaded modules instead of re-importing torch and megatron-core.
    context = multiprocessing.get_context("fork")
    bar = tqdm(desc="preprocess", unit="doc", unit_scale=True, dynamic_ncols=True, disable=None)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=init_worker, initargs=(str(tokenizer_path),)
    ) as pool:
        runner = _ShardRunner(cfg, pool, workers, bar)
        for index, source in enumerate(sources):
            if done_marker[index].exists():
                counts[index] = json.loads(done_marker[index].read_text())["shards"]
                for chunk in range(counts[index]):
                    runner.reuse(load_stats(_shard_prefix(work, index, chunk)))
                continue
            counts[index] = _run_source(runner, cfg, work, index, source)
        runner.drain()
    bar.close()
    for index, marker in enumerate(done_marker):
        if not marker.exists():
            marker.write_text(json.dumps({"shards": counts[index]}))
    prefixes = [_shard_prefix(work, index, chunk) for index in range(len(sources)) for chunk in range(counts[index])]
    return prefixes, runner.total, runner.reused


def _length_summary(prefixes: list[str]) -> dict[str, float]:
    lengths = numpy.concatenate([document_lengths(prefix) for prefix in prefixes] or [[]])
    if lengths.size == 0:
        return {}
    summary = {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}
    summary.update({f"p{q}": float(numpy.percentile(lengths, q)) for q in PERCENTILES})
    return summary


def _finish(cfg: PreprocessConfig, shards: list[str], dtype: type) -> list[str]:
    """Merges the shards into <output> or lists the non-empty ones in <output>.blend.txt."""
    if cfg.merge:
        merge_indexed(cfg.output, shards, dtype)
        return [cfg.output]
    tokens = {prefix: int(document_lengths(prefix).sum()) for prefix in shards}
    kept = [prefix for prefix in shards if tokens[prefix] > 0]
    lines = [f"{tokens[prefix]} {prefix}" for prefix in kept]
    Path(cfg.output + ".blend.txt").write_text("\n".join(lines) + "\n")
    return kept


def _stats_path(cfg: PreprocessConfig) -> Path:
    return Path(cfg.output + SUMMARY_SUFFIX)


def _up_to_date(cfg: PreprocessConfig, manifest: dict) -> Summary | None:
    path = _stats_path(cfg)
    if not path.exists():
        return None
    summary = Summary(**json.loads(path.read_text()))
    if summary.manifest != manifest or not all(is_complete(prefix) for prefix in summary.outputs):
        return None
    summary.up_to_date = True
    return summary


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Runs (or resumes, or confirms) the preprocessing that ``cfg`` describes."""
    if not cfg.output:
        raise DataError("--output is required: the prefix of the dataset to write (e.g. /data/web_text_document)")
    if cfg.shard_documents < 1 or cfg.read_batch < 1 or cfg.in_flight_per_worker < 1:
        raise DataError("shard_documents, read_batch and in_flight_per_worker must be >= 1")
    started = time.perf_counter()
    tokenizer_path = Path(cfg.tokenizer) if cfg.tokenizer else SHIPPED_TOKENIZER_DIR
    tokenizer = MimoTokenizer(tokenizer_path)
    sources = discover(cfg.inputs, cfg.format)
    manifest = _manifest(cfg, sources, tokenizer)
    done = _up_to_date(cfg, manifest)
    if done is not None:
        return done
    work = _work_dir(cfg)
    _prepare_work_dir(work, manifest)
    workers = cfg.workers or os.cpu_count() or 1
    shards, totals, reused = _process_shards(cfg, sources, work, tokenizer_path, workers)
    outputs = _finish(cfg, shards, token_dtype(tokenizer.vocab_size))
    summary = Summary(
        records=totals.records,
        documents=totals.documents,
        tokens=totals.tokens,
        skipped=totals.skipped,
        examples=totals.examples,
        lengths=_length_summary(outputs),
        outputs=outputs,
        seconds=time.perf_counter() - started,
        shards_reused=reused,
        manifest=manifest,
    )
    tmp = str(_stats_path(cfg)) + TMP_SUFFIX
    Path(tmp).write_text(json.dumps(asdict(summary), indent=1))
    os.replace(tmp, _stats_path(cfg))
    if cfg.merge and not cfg.keep_shards:
        shutil.rmtree(work)
    return summary


def format_summary(summary: Summary) -> str:
    seconds = max(summary.seconds, 1e-9)
    if summary.up_to_date:
        return (
            f"{', '.join(summary.outputs)}: already up to date with these inputs ({summary.documents:,} documents, "
            f"{summary.tokens:,} tokens); nothing to do"
        )
    lines = [
        f"records read: {summary.records:,}   documents written: {summary.documents:,}   tokens: {summary.tokens:,}",
        (
            f"time: {summary.seconds:.1f}s ({summary.documents / seconds:,.0f} documents/s, "
            f"{summary.tokens / seconds:,.0f} tokens/s; {summary.shards_reused} shards reused)"
        ),
    ]
    for reason in SKIP_REASONS:
        count = summary.skipped.get(reason, 0)
        if count:
            lines.append(f"skipped {reason}: {count:,} (e.g. {'; '.join(summary.examples[reason])})")
    if summary.lengths:
        lengths = summary.lengths
        lines.append("document tokens: " + ", ".join(f"{key} {value:,.0f}" for key, value in lengths.items()))
    lines.append("output: " + (summary.outputs[0] if len(summary.outputs) == 1 else f"{len(summary.outputs)} shards"))
    return "\n".join(lines)


def _parse_args(argv: list[str]) -> PreprocessConfig:
    defaults = PreprocessConfig()
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--tokenizer", default=None, help="local HF tokenizer directory (default: shipped)")
    parser.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin/.idx)")
    parser.add_argument("--text-field", default=defaults.text_field)
    parser.add_argument("--format", default=defaults.format, choices=["auto", "jsonl", "parquet", "arrow", "text"])
    parser.add_argument("--workers", type=int, default=defaults.workers, help="0: one per core")
    parser.add_argument("--shard-documents", type=int, default=defaults.shard_documents)
    parser.add_argument("--read-batch", type=int, default=defaults.read_batch)
    parser.add_argument("--no-merge", action="store_true", help="keep shards and list them as a blend")
    parser.add_argument("--keep-shards", action="store_true")
    args = parser.parse_args(argv)
    return PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output=args.output,
        text_field=args.text_field,
        format=args.format,
        workers=args.workers,
        shard_documents=args.shard_documents,
        read_batch=args.read_batch,
        merge=not args.no_merge,
        keep_shards=args.keep_shards,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = _parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, lambda: print(format_summary(preprocess(cfg))))


if __name__ == "__main__":
    sys.exit(main())
