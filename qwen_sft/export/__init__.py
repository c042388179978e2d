"""Exports for serving: the adapter in vLLM's per-expert layout, and merged models as GGUF for llama.cpp / Ollama.

    qwen-sft export-adapter ADAPTER_DIR OUT_DIR --format vllm
    qwen-sft export-gguf MERGED_DIR OUT.gguf --type bf16

Parts: ``vllm_adapter`` rewrites peft's fused expert LoRA into one uniform-rank pair per expert,
``gguf_export`` writes a merged qwen3_moe checkpoint with llama.cpp's ``gguf`` writer (``gguf_next``: the
qwen3_next mapping), ``safetensors_stream`` writes a safetensors file one tensor at a time, ``cli`` holds both verbs.
"""
