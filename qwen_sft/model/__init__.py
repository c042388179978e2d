"""Model construction helpers (tiny Qwen3-MoE models for tests, demo and CPU trials)."""
