"""``mimo-convert``: ``importer`` (import-hf), ``exporter`` (export-hf), ``hf_files`` (safetensors I/O), ``cli``."""
