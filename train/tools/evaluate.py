"""``mimo-eval``: loss and perplexity of a checkpoint on a dataset, and how good its MTP blocks are as drafts.

The data is one token stream (documents in file order, each text followed by the end-of-document token as in
training; ``input_ids`` records taken as they are), cut into sequences of ``train.seq_length`` tokens whose labels
are the next tokens: sequence i holds tokens [i*S, (i+1)*S) and predicts [i*S+1, (i+1)*S+1), so every token but
the first is predicted exactly once (``tokens`` = stream length - 1). The last sequence is padded and its padding
masked. Positions run 0..S-1 in every sequence and attention is causal across documents, as in training.

With ``data.reset_attention_mask=true`` each record (or the text file) is a document of its own, evaluated as if
alone: cut into pieces of at most S predicted tokens as a file holding only that record would be, the pieces
packed in order into sequences without splitting one, each piece attending only to itself with positions from 0.
So no record sees another, the token after a record's last is never a target, and the loss is the token-weighted
mean of the records' losses evaluated one by one.

Metrics (token-weighted over the whole dataset; their definitions are ``mimo.train.evaluation``'s, which
validation during training shares): ``loss``, ``perplexity``, ``mtp_loss`` (mean over MTP depths;
``mtp_loss_per_depth`` has each, ``mtp_tokens`` counts the depth-1 positions) and ``mtp_acceptance``, the draft
acceptance rate of greedy self-speculative decoding, teacher-forced (``mtp_acceptance_per_depth`` per depth).

The forward passes go through megatron's pipeline schedules (``forward_only``) under any layout the command line
asks for (``parallel.*``; launch with torchrun); the figures do not depend on it beyond float rounding.
"""

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf
from tqdm import tqdm

from mimo.data import build_tokenizer, check_vocab
from mimo.data.documents import DOCUMENTS
from mimo.data.tokenizer import MimoTokenizer, encode_documents
from mimo.model.builder import build_model
from mimo.parallel.runtime import Runtime, shutdown
from mimo.recipes.compose import load_config
from mimo.recipes.errors import MimoError, run_command
from mimo.recipes.schema import MimoConfig
from mimo.train.build import chunk_iterators, start_runtime
from mimo.train.checkpoint.lookup import checkpoint_model, checkpoint_precision, resolve_checkpoint, run_config_file
from mimo.train.checkpoint.manager import load_checkpoint, read_meta
from mimo.train.commands import quiet_expected_warnings, setup_logging
from mimo.train.evaluation import EvalMetrics, evaluation_mode, forward_only_sums, num_sums, sum_over_ranks, summarize
from mimo.train.step import MicroBatching

PROG = "mimo-eval"
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_FIELD, IDS_FIELD = "text", "input_ids"
RUN_DEFAULT_KEYS = ("data.tokenizer", "train.seq_length")
"""Settings taken from the evaluated run's config.yaml unless the command line gives them: the text is then
tokenized and cut as in training."""
PAD_ID = 0
"""Token id filling the masked tail of the last sequence (any valid id: nothing attends to it or predicts it)."""


class EvalError(MimoError, ValueError):
    """Data or arguments mimo-eval cannot use; the message names the file, line or key."""


@dataclass
class EvalResult(EvalMetrics):
    sequences: int = 0
    checkpoint: str = ""
    step: int = 0


@dataclass
class Sequences:
    tokens: np.ndarray
    """[n, S] int64 input tokens."""
    labels: np.ndarray
    """[n, S] int64 next tokens."""
    loss_mask: np.ndarray
    """[n, S] float32: 1 where the label is a real token of the stream."""
    position_ids: np.ndarray | None = None
    """[n, S] int64 RoPE positions; None: 0..S-1 in every sequence."""
    document_ids: np.ndarray | None = None
    """[n, S] int64 document of each token (attention stays inside one); None: no document masking."""


def read_documents(path: Path, tokenizer: Callable[[], MimoTokenizer]) -> list[np.ndarray]:
    """The int64 tokens of each record of ``path`` (a text file is one record; see the module docstring for the
    formats). ``tokenizer`` is called only when there is text to encode: ``input_ids`` records need none."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path} does not exist; give a text file or a JSONL file with 'text' or 'input_ids'")
    if path.suffix not in JSONL_SUFFIXES:
        return encode_documents(tokenizer().hf, [path.read_text()], np.int64)
    documents: list[np.ndarray | None] = []
    texts: dict[int, str] = {}
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number}: not JSON ({err})") from err
            if isinstance(record, dict) and IDS_FIELD in record:
                documents.append(np.asarray(record[IDS_FIELD], dtype=np.int64))
            elif isinstance(record, dict) and isinstance(record.get(TEXT_FIELD), str):
                texts[len(documents)] = record[TEXT_FIELD]
                documents.append(None)
            else:
                raise EvalError(f"{path}:{number}: a record needs a '{TEXT_FIELD}' string or an '{IDS_FIELD}' list")
    encoded = dict(zip(texts, encode_documents(tokenizer().hf, list(texts.values()), np.int64))) if texts else {}
    return [encoded[i] if document is None else document for i, document in enumerate(documents)]


def to_sequences(stream: np.ndarray, seq_length: int) -> Sequences:
    """Cut the stream into sequences of ``seq_length`` inputs and their next-token labels."""
    predicted = len(stream) - 1
    if predicted < 1:
        raise EvalError(f"the data has {len(stream)} tokens; at least 2 are needed to predict one")
    count = math.ceil(predicted / seq_length)
    padded = np.full(count * seq_length + 1, PAD_ID, dtype=np.int64)
    padded[: len(stream)] = stream
    starts = np.arange(count)[:, None] * seq_length + np.arange(seq_length)[None, :]
    return Sequences(
        tokens=padded[starts], labels=padded[starts + 1], loss_mask=(starts < predicted).astype(np.float32)
    )


def to_document_sequences(documents: Sequence[np.ndarray], seq_length: int) -> Sequences:
    """Each document evaluated as if alone (see the module docstring): its predicted tokens cut into pieces of at
    most ``seq_length`` as ``to_sequences`` would cut it, the pieces packed in order into sequences, a piece
    moving to a new sequence when it does not fit; a piece is one attention document with positions from 0, and
    a sequence's unused tail one more, masked."""
    pieces = [
        (document, start, min(start + seq_length, len(document) - 1))
        for document in documents
        for start in range(0, len(document) - 1, seq_length)
    ]
    if not pieces:
        raise EvalError("no record has 2 tokens; at least 2 are needed to predict one")
    rows, fill = [], seq_length
    for piece in pieces:
        length = piece[2] - piece[1]
        if fill + length > seq_length:
            rows.append([])
            fill = 0
        rows[-1].append(piece)
        fill += length
    shape = (len(rows), seq_length)
    tokens, labels = np.full(shape, PAD_ID, np.int64), np.full(shape, PAD_ID, np.int64)
    loss_mask, positions, ids = np.zeros(shape, np.float32), np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for row, row_pieces in enumerate(rows):
        at = 0
        for number, (document, start, end) in enumerate(row_pieces):
            span = slice(at, at + end - start)
            tokens[row, span], labels[row, span] = document[start:end], document[start + 1 : end + 1]
            loss_mask[row, span], positions[row, span], ids[row, span] = 1.0, np.arange(end - start), number
            at = span.stop
        ids[row, at:] = len(row_pieces)
    return Sequences(tokens, labels, loss_mask, positions, ids)


def _pad_to(sequences: Sequences, multiple: int) -> Sequences:
    """Append fully masked sequences so every rank runs the same number of whole micro-batches."""
    extra = -len(sequences.tokens) % multiple

    def grow(array: np.ndarray | None, value) -> np.ndarray | None:
        if array is None:
            return None
        return np.concatenate([array, np.full((extra, array.shape[1]), value, array.dtype)])

    return Sequences(
        grow(sequences.tokens, PAD_ID),
        grow(sequences.labels, PAD_ID),
        grow(sequences.loss_mask, 0.0),
        grow(sequences.position_ids, 0),
        grow(sequences.document_ids, 0),
    )


def _micro_batches(
    sequences: Sequences, rows: range, micro_batch_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(rows.start, rows.stop, micro_batch_size):
        block = slice(start, start + micro_batch_size)
        tokens = torch.from_numpy(sequences.tokens[block])
        batch = {
            "tokens": tokens.to(device),
            "labels": torch.from_numpy(sequences.labels[block]).to(device),
            "loss_mask": torch.from_numpy(sequences.loss_mask[block]).to(device),
            "position_ids": torch.arange(tokens.shape[1], device=device).expand_as(tokens),
        }
        if sequences.position_ids is not None:
            batch["position_ids"] = torch.from_numpy(sequences.position_ids[block]).to(device)
        if sequences.document_ids is not None:
            batch[DOCUMENTS] = torch.from_numpy(sequences.document_ids[block]).to(device)
        yield batch


def _result(sums: torch.Tensor, depths: int, sequences: int, checkpoint: Path, step: int) -> EvalResult:
    return EvalResult(**asdict(summarize(sums, depths)), sequences=sequences, checkpoint=str(checkpoint), step=step)


def eval_overrides(checkpoint: Path, overrides: Sequence[str]) -> list[str]:
    """The command line's overrides, preceded by the run's tokenizer and sequence length when it does not set them."""
    run_config = run_config_file(checkpoint)
    if run_config is None:
        return list(overrides)
    saved = OmegaConf.load(run_config)
    given = {override.lstrip("+").split("=", 1)[0] for override in overrides}
    defaults = []
    for key in RUN_DEFAULT_KEYS:
        value = OmegaConf.select(saved, key)
        if key not in given and value is not None:
            defaults.append(f"{key}={value}")
    return defaults + list(overrides)


def _file_sequences(data: Path, cfg: MimoConfig) -> Sequences:
    documents = read_documents(data, partial(_text_tokenizer, cfg))
    stream = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
    if len(stream) and (stream.min() < 0 or stream.max() >= cfg.model.vocab_size):
        raise EvalError(f"{data}: token ids must lie in 0..{cfg.model.vocab_size - 1} (model.vocab_size)")
    if cfg.data.reset_attention_mask:
        return to_document_sequences(documents, cfg.train.seq_length)
    return to_sequences(stream, cfg.train.seq_length)


def evaluate(
    ckpt_dir: Path, data: Path | Sequences, overrides: Sequence[str] = (), config_name: str = "config"
) -> EvalResult:
    """Evaluate the checkpoint ``ckpt_dir`` resolves to on ``data`` (a file, see the module docstring, or sequences
    already cut) under the layout of the overrides."""
    checkpoint = resolve_checkpoint(ckpt_dir)
    cfg = load_config(eval_overrides(checkpoint, overrides), config_name=config_name)
    cfg.model = checkpoint_model(checkpoint)
    cfg.precision.dtype = checkpoint_precision(checkpoint)
    runtime = start_runtime(cfg)
    try:
        sequences = data if isinstance(data, Sequences) else _file_sequences(data, cfg)
        chunks = build_model(cfg.model, cfg.parallel, cfg.precision, seq_length=cfg.train.seq_length, seed=cfg.run.seed)
        load_checkpoint(checkpoint, chunks, None, cfg.model)
        sums = _sums(chunks, _pad_to(sequences, cfg.train.global_batch_size), cfg, runtime)
        step = read_meta(checkpoint).state.step
        return _result(sums, cfg.model.mtp_num_layers, len(sequences.tokens), checkpoint, step)
    finally:
        shutdown()


def _text_tokenizer(cfg: MimoConfig) -> MimoTokenizer:
    """The tokenizer text is encoded with, refused when its ids could pass the model's vocabulary."""
    tokenizer = build_tokenizer(cfg.data)
    check_vocab(tokenizer, cfg.model.vocab_size)
    return tokenizer


def _sums(chunks, sequences: Sequences, cfg: MimoConfig, runtime: Runtime) -> torch.Tensor:
    """``statistics`` summed over all sequences and ranks. Each call of megatron's schedule runs one global batch;
    data-parallel rank r takes the r-th slice of it, every pipeline stage of that rank the same slice."""
    depths = cfg.model.mtp_num_layers
    per_call, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = per_call // runtime.layout.dp
    dp_rank = parallel_state.get_data_parallel_rank()
    batching = MicroBatching(per_rank // micro, micro, cfg.train.seq_length)
    totals = torch.zeros(num_sums(depths), dtype=torch.float64)
    calls = range(0, len(sequences.tokens), per_call)
    with evaluation_mode(chunks):
        for start in tqdm(calls, desc="evaluating", unit="batch", disable=not runtime.is_main):
            rows = range(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank)
            iterators = chunk_iterators(_micro_batches(sequences, rows, micro, runtime.device), len(chunks))
            totals += forward_only_sums(chunks, iterators, batching, depths, runtime.device)
    return sum_over_ranks(totals, runtime.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Loss, perplexity, MTP loss and MTP draft acceptance of a mimo checkpoint on a dataset, printed"
        " as one JSON line. DATA: a text file (one document), or JSONL with a 'text' (tokenized with data.tokenizer,"
        " by default the run's) or an 'input_ids' field per line. Sequences of train.seq_length (by default the"
        " run's), batches of train.global_batch_size, micro-batches of train.micro_batch_size; parallel.* sets the"
        " layout (launch with torchrun for more than one rank). data.reset_attention_mask=true evaluates each record"
        " as a document of its own.",
        epilog="example: mimo-eval runs/tiny held_out.jsonl train.seq_length=256",
    )
    parser.add_argument(
        "ckpt_dir", type=Path, help="run directory, its checkpoints/ directory, or one step_N directory"
    )
    parser.add_argument("data", type=Path)
    parser.add_argument("--config-name", "-c", default="config", help="recipe the settings not in the run come from")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_expected_warnings()
    args = build_parser().parse_args(argv)
    setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    results: list[EvalResult] = []
    stdout = sys.stdout

    def run() -> None:
        # Only the result goes to stdout: anything the libraries print goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            results.append(evaluate(args.ckpt_dir, args.data, args.overrides, args.config_name))

    code = run_command(PROG, run)
    if not code and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(asdict(results[0])), file=stdout, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
