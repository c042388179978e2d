"""Data stage: raw SFT records of any common shape → validated ChatML JSONL (see docs/convert.md)."""
