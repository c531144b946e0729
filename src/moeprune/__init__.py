"""moeprune: one-shot expert and expert-neuron pruning for Mixture-of-Experts LLMs."""
__version__ = "0.1.0"
