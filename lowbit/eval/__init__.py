"""The evaluation layer: perplexity, and the speed of kernels and models."""

from lowbit.eval.perplexity import perplexity, token_perplexity

__all__ = ["perplexity", "token_perplexity"]
