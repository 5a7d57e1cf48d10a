"""The evaluation layer: perplexity and divergence from a reference, and the speed of kernels and models."""

from lowbit.eval.perplexity import Evaluation, evaluate, evaluate_tokens, perplexity, token_perplexity

__all__ = ["Evaluation", "evaluate", "evaluate_tokens", "perplexity", "token_perplexity"]
