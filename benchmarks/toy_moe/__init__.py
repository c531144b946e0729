"""Toy MoE benchmark: a tiny Qwen3-MoE trained here on a 5-domain offline corpus (see README.md)."""
