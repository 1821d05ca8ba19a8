"""Where training samples come from."""

from dataclasses import dataclass, field


@dataclass
class LongDocConfig:
    """Upsampling of long documents, which the long-context stages need more of than the web has."""

    min_tokens: int = 0
    """Documents at least this many tokens long (EOD included) form the long-document subset; 0: off."""
    weight: float = 0.0
    """Share of the stage's samples drawn from the long-document subset of its blend (0 to 1)."""


@dataclass
class DataStageConfig:
    """The data mixture of one training stage; fields left empty inherit the top-level DataConfig."""

    name: str = ""
    """The stage name the schedule refers to (e.g. "pretrain", "long_context")."""
    blend: list[str] = field(default_factory=list)
    """Same format as DataConfig.blend; empty: the top-level blend."""
    long_docs: LongDocConfig | None = None
    """None: the top-level long_docs setting."""


@dataclass
class DataConfig:
    tokenizer: str | None = None
    """A Hugging Face tokenizer directory; None means the tokenizer shipped with mimo."""
    blend: list[str] = field(default_factory=list)
    """Alternating weight and indexed-dataset prefix ("0.7 /data/web 0.3 /data/code"); empty: the shipped corpus."""
    split: str = "98,2,0"
    """Train/validation/test split of each dataset, in parts."""
    cache_dir: str | None = None
    """Where built index caches go; None means <run.dir>/data_cache."""
    valid_samples: int = 256
    """Validation samples built (over all data-parallel ranks); the validation iterator cycles over them."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token inside a packed sample."""
    reset_attention_mask: bool = False
    """Stop attention across document boundaries (document masking): each micro-batch carries its tokens'
    ``document_ids`` and every attention layer sees only keys of the query's own document."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document token."""
    long_docs: LongDocConfig = field(default_factory=LongDocConfig)
    stages: list[DataStageConfig] = field(default_factory=list)
    """Per-stage mixtures; select one with mimo.data.stage_config(cfg, name)."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 reads samples in the training process."""


@dataclass
class TokenizerTrainingConfig:
    """How the shipped byte-level BPE tokenizer is trained (mimo.data.train_tokenizer)."""

    vocab_size: int = 4096
    """Total vocabulary, special tokens included."""
    min_frequency: int = 2
    """A pair seen fewer times is never merged."""
    eod_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    """A pad id distinct from EOD, so megatron never mistakes real end-of-document tokens for padding."""


@dataclass
class PreprocessConfig:
    """Options of ``mimo-preprocess`` (mimo.data.preprocess)."""

    inputs: list[str] = field(default_factory=list)
    """Files or directories: JSON Lines (.jsonl/.json, optionally .gz), Parquet, Arrow, plain text."""
    tokenizer: str | None = None
    """A local Hugging Face tokenizer directory; None: the tokenizer shipped with mimo."""
    output: str = ""
    """Output prefix: writes <output>.bin/.idx (or a blend of shards) and <output>.stats.json."""
    text_field: str = "text"
    """The field/column holding the text (JSON Lines, Parquet, Arrow)."""
    format: str = "auto"
    """auto (by file extension) | jsonl | parquet | arrow | text (one document per file)."""
    workers: int = 0
    """Tokenizing processes; 0: one per CPU core."""
    shard_documents: int = 5000
    """Input records per shard: the unit of parallel work, of resumption and of the written files."""
    read_batch: int = 1000
    """Records pulled from a Hugging Face dataset per read."""
    in_flight_per_worker: int = 2
    """Shards queued per worker; bounds memory to about workers * this * shard_documents records."""
    merge: bool = True
    """Merge the shards into one dataset; False lists them as a blend in <output>.blend.txt."""
    keep_shards: bool = False
    """Keep the shard files after merging (they make an identical re-run instant)."""
    examples_per_reason: int = 3
    """Locations reported for each kind of skipped record."""
