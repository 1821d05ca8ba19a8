"""The MiMo-V2-Flash model on megatron-core.

config (ModelConfig, PrecisionConfig), builder (transformer_config, build_model), specs (layer specs, the one
place choosing local or Transformer Engine modules), attention / core_attention / norm / gpt (the modules),
accounting (parameter and FLOP counts), hf_mapping (transformers checkpoints and configs).
"""
