"""`lowbit generate`: text from a model, streamed, with its decoding speed."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lowbit.cli.common import FORMATTER, add_model_source, dtype_arg, info_line, load_any, resolve_device
from lowbit.errors import UsageError
from lowbit.kernels import backends
from lowbit.nn.decoding import DECODE_PATHS, DEFAULT_LM_HEAD, Decoding
from lowbit.nn.lm_head import LM_HEAD_CHOICES

SPEED_PROMPT = "The capital of France is"


def add_parser(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], formatter_class=FORMATTER,
                       help="generate text from a checkpoint, or chat with it, and report tokens per second",
                       description="Generates text (greedy, or sampled with --sample), streaming it to "
                                   "stdout; the speed goes to stderr. --interactive reads one message per "
                                   "line from stdin and answers each in a conversation (the tokenizer's chat "
                                   "template) until end of input or /exit.",
                       epilog="examples:\n  lowbit generate ./smollm2-135m-w3g64\n"
                              "  lowbit generate ./smollm2-135m-w3g64 --chat -p 'Name three rivers.' -n 100 "
                              "--sample --seed 1\n"
                              "  lowbit generate ./smollm2-135m-w3g64 --interactive --dtype bfloat16")
    add_model_source(p, "the model")
    p.add_argument("-p", "--prompt", default=SPEED_PROMPT, help="default: %(default)r")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="chat: read messages from stdin, one per line, and answer each (keeps the conversation)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (default: %(default)s)")
    add_decoding_flags(p)
    p.set_defaults(run=run)


def add_decoding_flags(p) -> None:
    p.add_argument("--decode-path", choices=DECODE_PATHS, default="lean",
                   help="lean: lowbit's decoding loop (static KV cache, fused q/k/v and gate/up) for Llama-family "
                        "models, transformers' generate for others; transformers: always transformers' generate "
                        "(default: %(default)s)")
    p.add_argument("--lm-head", choices=list(LM_HEAD_CHOICES), default=DEFAULT_LM_HEAD,
                   help="the output layer to decode with, built at load time (checkpoints are unchanged): "
                        + "; ".join(f"{k}: {v}" for k, v in LM_HEAD_CHOICES.items())
                        + " (default: %(default)s; a quantized lm_head is kept as it is)")


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat and --interactive: this tokenizer has no chat template")


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    check_chat_template(tokenizer)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}])


def run(args: argparse.Namespace) -> int:
    from transformers import GenerationConfig

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise UsageError(f"--sample needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0 (0: no limit); "
                         f"got {args.temperature:g}, {args.top_p:g}, {args.top_k}")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_any(args.model, device, args.tokenizer, dtype=dtype_arg(args))
    if args.interactive:
        check_chat_template(tokenizer)  # before reading any input
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **(dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.sample else {}),
    )
    decoding = Decoding(model, args.decode_path, args.lm_head)
    if decoding.fallback_reason:
        info_line(f"the lean decoding path does not cover this model ({decoding.fallback_reason}); "
                  "using transformers' generate")
    torch.manual_seed(args.seed)
    if args.interactive:
        return chat_loop(decoding, tokenizer, config, device)
    ids = prompt_ids(tokenizer, args.prompt, args.chat).to(device)
    if ids.shape[-1] == 0:
        raise UsageError(f"--prompt {args.prompt!r} gives no tokens; give some text to continue")
    print(args.prompt if not args.chat else "", end="", flush=True)
    generate(decoding, tokenizer, ids, config, device)
    return 0


def chat_loop(decoding: Decoding, tokenizer, config, device: str) -> int:
    """A conversation on stdin and stdout: each line a user message, each answer streamed
    and kept in the history that the next message is answered in."""
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        ids = chat_ids(tokenizer, messages).to(device)
        reply = generate(decoding, tokenizer, ids, config, device)
        messages.append({"role": "assistant", "content": reply})


def generate(decoding: Decoding, tokenizer, ids: torch.Tensor, config, device: str) -> str:
    """Streams the continuation of `ids` to stdout and the speed to stderr; returns the new text."""
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """Prints the new text as it comes and notes when the first new token arrived."""

        first_token_at: float | None = None
        new_tokens = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.new_tokens += value.numel()
                self.first_token_at = self.first_token_at or time.perf_counter()
            super().put(value)

    streamer = TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = decoding.generate(ids, config, streamer)
    end = time.perf_counter()
    n = streamer.new_tokens
    prefill = (streamer.first_token_at or end) - start
    rate = (n - 1) / (end - streamer.first_token_at) if n > 1 and end > streamer.first_token_at else float("nan")
    print(f"[{n} new tokens in {end - start:.2f} s: {rate:.1f} tokens/s decoding, "
          f"{ids.shape[1]}-token prompt and first token in {prefill * 1e3:.0f} ms; "
          f"{'sampled' if config.do_sample else 'greedy'}, {decoding.describe()}, {kernels_on(device)}]",
          file=sys.stderr)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def kernels_on(device: str) -> str:
    if device != "cpu":
        return device
    return f"cpu, {backends.describe_cpu_kernels()}"
