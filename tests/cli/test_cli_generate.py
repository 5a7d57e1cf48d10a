"""`lowbit generate`: greedy and seeded sampled continuations, the speed line, refusals."""

import io
import re
import shutil

import pytest
import torch
from cli_tools import assert_one_line_error, run
from transformers import GenerationConfig

import lowbit
from lowbit.nn.decoding import Decoding


@pytest.mark.parametrize("path", ["lean", "transformers"])
def test_generate_greedy_prints_the_models_continuation_and_its_speed(tiny_hf, tiny_checkpoint, capsys, path):
    prompt = "the river of"
    code, out, err = run(["generate", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "12",
                          "--decode-path", path, "--lm-head", "model"], capsys)
    assert code == 0, err
    model = lowbit.load_quantized(tiny_checkpoint)
    tokenizer = lowbit.load_tokenizer(tiny_checkpoint)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert out == prompt + continuation + "\n"
    n = generated.shape[1] - ids.shape[1]
    speed = re.search(rf"\[{n} new tokens in \S+ s: (\S+) tokens/s decoding", err)
    assert speed and float(speed.group(1)) > 0, err
    expected_path = "lean path (4 fused projections" if path == "lean" else "transformers' generate ("
    assert expected_path in err, err


def test_generate_decodes_with_a_q4t_lm_head_by_default(tiny_checkpoint, capsys):
    code, out, err = run(["generate", str(tiny_checkpoint), "-p", "the old", "-n", "10"], capsys)
    assert code == 0, err
    assert "lean path (4 fused projections, 4-bit g32 lm_head, 4+4-bit for its top 64)" in err, err
    model = lowbit.load_quantized(tiny_checkpoint)
    tokenizer = lowbit.load_tokenizer(tiny_checkpoint)
    ids = tokenizer("the old", return_tensors="pt").input_ids
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.eos_token_id)
    generated = Decoding(model, "transformers", "q4t").generate(ids, config)
    assert out == "the old" + tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_generate_falls_back_to_transformers_for_other_architectures(tiny_hf, tmp_path, capsys):
    from tiny import tiny_opt

    tiny_opt().save_pretrained(tmp_path / "opt")
    code, out, err = run(["generate", str(tmp_path / "opt"), "--tokenizer", tiny_hf["model"], "-p", "the old",
                          "-n", "4"], capsys)
    assert code == 0, err
    assert "lean decoding path does not cover this model (opt models are not covered" in err, err
    assert "[4 new tokens" in err and "transformers' generate: opt models" in err, err


def test_generate_sampling_is_seeded(tiny_checkpoint, capsys):
    outputs = []
    for seed in ("1", "1", "2"):
        code, out, err = run(["generate", str(tiny_checkpoint), "--sample", "--seed", seed, "--temperature", "1.5",
                              "--max-new-tokens", "24"], capsys)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_generate_refusals(tiny_checkpoint, capsys):
    code, _, err = run(["generate", str(tiny_checkpoint), "--chat"], capsys)
    assert_one_line_error(code, err, match="no chat template")
    code, _, err = run(["generate", str(tiny_checkpoint), "--max-new-tokens", "0"], capsys)
    assert_one_line_error(code, err, match="--max-new-tokens must be at least 1")
    for flag, value in (("--temperature", "0"), ("--top-p", "1.5"), ("--top-k", "-1")):
        code, _, err = run(["generate", str(tiny_checkpoint), "--sample", flag, value], capsys)
        assert_one_line_error(code, err, match="--sample needs --temperature > 0")


def test_generate_interactive_keeps_the_conversation(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Each stdin line is a user message answered in the whole conversation so far (chat
    template); /exit ends it. -n and --dtype are the short and dtype flags."""
    chat = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, chat)
    tokenizer = lowbit.load_tokenizer(chat)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\n\nold city\n/exit\nnever read\n"))
    code, out, err = run(["generate", str(chat), "--interactive", "-n", "6", "--dtype", "float32",
                          "--lm-head", "model"], capsys)
    assert code == 0, err

    model = lowbit.load_quantized(chat)
    messages, replies = [], []
    for message in ("the river", "old city"):
        messages.append({"role": "user", "content": message})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        replies.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert out == "\n".join(replies) + "\n"
    assert len(re.findall(r"new tokens in", err)) == 2


def test_generate_dtype_and_short_flags(tiny_checkpoint, capsys):
    code, out, err = run(["generate", str(tiny_checkpoint), "-p", "the old", "-n", "3", "--dtype", "bfloat16"],
                         capsys)
    assert code == 0 and out.startswith("the old") and "[3 new tokens" in err, err
    code, _, err = run(["generate", str(tiny_checkpoint), "--dtype", "int8"], capsys)
    assert_one_line_error(code, err, expected_code=2, match="invalid choice: 'int8'")
