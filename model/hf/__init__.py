"""Hugging Face MiMo-V2-Flash checkpoints: ``mapping`` (tensor names, shapes, fused splits, sharding) and
``configs`` (config.json in either spelling to and from ModelConfig)."""
