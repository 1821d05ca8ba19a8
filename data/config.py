"""Where training samples come from."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer directory; None means the tokenizer shipped with mimo."""
    blend: List[str] = field(default_factory=list)
    """Alternating weight and indexed-dataset prefix ("0.7 /data/web 0.3 /data/code"); empty: the shipped corpus."""
    split: str = "98,2,0"
    """Train/validation/test split of each dataset, in parts."""
    cache_dir: Optional[str] = None
    """Where built index caches go; None means <run.dir>/data_cache."""
