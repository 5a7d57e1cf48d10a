"""`lowbit eval`: the perplexity of a checkpoint or a full-precision model, and refusals."""

import json
import random
import re
import shutil

import pytest
import torch
import transformers
from cli_tools import assert_one_line_error, ppl, run

import lowbit


def test_eval_of_checkpoint_and_full_precision_model(tiny_hf, tiny_checkpoint, capsys):
    for source, model in [(str(tiny_checkpoint), lowbit.load_quantized(tiny_checkpoint)),
                          (tiny_hf["model"], transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"]))]:
        code, out, err = run(["eval", source, "--data", tiny_hf["text"], "--seqlen", "48", "--max-windows", "3"],
                             capsys)
        assert code == 0, err
        printed = float(re.search(r"perplexity (\S+)", out).group(1))
        assert printed == pytest.approx(ppl(model, tiny_hf, 48, 3), abs=0.0006)
        assert "3 windows x 48 tokens (141 predicted tokens)" in out


def test_eval_refusals(tiny_hf, tiny_checkpoint, tmp_path, capsys):
    code, _, err = run(["eval", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, match="no such model directory")
    code, _, err = run(["eval", str(tiny_checkpoint), "--data", str(tmp_path / "missing.txt")], capsys)
    assert_one_line_error(code, err, match="unknown text source")
    code, _, err = run(["eval", str(tiny_checkpoint), "--data", tiny_hf["text"], "--seqlen", "100000"], capsys)
    assert_one_line_error(code, err, match="fewer than one window")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["eval", str(truncated), "--data", tiny_hf["text"]], capsys)
    assert_one_line_error(code, err, match="corrupt or truncated")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    code, _, err = run(["eval", str(no_tokenizer), "--data", tiny_hf["text"]], capsys)
    assert_one_line_error(code, err, match="no tokenizer files; name one with --tokenizer")
    code, out, err = run(["eval", str(no_tokenizer), "--data", tiny_hf["text"], "--tokenizer", tiny_hf["model"],
                          "--seqlen", "32", "--max-windows", "2"], capsys)
    assert code == 0 and "perplexity" in out, err


def test_eval_against_a_reference(tiny_hf, tiny_checkpoint, capsys):
    """KL divergence, top-1 agreement and perplexity ratio of the checkpoint against the
    model it was made from, as lowbit.evaluate computes them; --json carries the versions."""
    args = ["eval", str(tiny_checkpoint), "--reference", tiny_hf["model"], "--data", tiny_hf["text"],
            "--seqlen", "32", "--max-windows", "3"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf["model"])
    expected = lowbit.evaluate(lowbit.load_quantized(tiny_checkpoint), tokenizer,
                               [open(tiny_hf["text"]).read()], 32, 3, progress=False,
                               reference=transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"]))
    assert expected.kl_mean > 0
    assert (f"(ratio {expected.perplexity_ratio:.3f}); KL divergence {expected.kl_mean:.4f} nats (median "
            f"{expected.kl_median:.4f}, p99 {expected.kl_p99:.3f}); top-1 agreement "
            f"{100 * expected.top1_agreement:.2f} %") in out

    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kl_mean"] == pytest.approx(expected.kl_mean) and result["windows"] == 3
    assert result["top1_agreement"] == pytest.approx(expected.top1_agreement)
    assert result["versions"]["transformers"] == transformers.__version__
    assert result["versions"]["lowbit"] == lowbit.__version__


def test_eval_refuses_bad_data_before_loading_and_a_mismatched_reference(tiny_hf, tiny_checkpoint, tmp_path,
                                                                           capsys, monkeypatch):
    from lowbit.cli import evaluate

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "load_any", never)
        code, _, err = run(["eval", str(tiny_checkpoint), "--data", str(tmp_path / "missing.txt")], capsys)
    assert_one_line_error(code, err, match="unknown text source")

    other = tmp_path / "other"
    transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=128)).save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tiny_hf["model"]).save_pretrained(other)
    code, _, err = run(["eval", str(tiny_checkpoint), "--reference", str(other), "--data", tiny_hf["text"]],
                       capsys)
    assert_one_line_error(code, err, match="predicts 200 tokens, the model 320")


def local_choice_task(directory, tokenizer_words=("river", "city", "north", "old", "new", "water")):
    """A two-choice lm-eval task on a local JSON-lines file (no dataset download)."""
    directory.mkdir()
    rows = []
    for _ in range(10):
        a, b = random.sample(tokenizer_words, 2)
        rows.append({"question": f"the {a} and the", "choices": [a, b], "answer": 0})
    (directory / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "task.yaml").write_text(
        "task: lowbit_local_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n")
    return rows


def test_eval_runs_local_lm_eval_tasks_on_the_loaded_checkpoint(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """The accuracy lm-eval reports is recomputed here from the checkpoint's log-likelihoods of
    each choice after its question (the continuation tokens: those the whole text adds)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = local_choice_task(tmp_path / "tasks")
    code, out, err = run(["eval", str(tiny_checkpoint), "--tasks", "lowbit_local_choice", "--tasks-path",
                          str(tmp_path / "tasks"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["versions"]["lm_eval"] != "not installed"

    model, tokenizer = lowbit.load_quantized(tiny_checkpoint), lowbit.load_tokenizer(tiny_checkpoint)

    def loglikelihood(context, continuation):
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        ids = tokenizer(context + " " + continuation, add_special_tokens=False).input_ids
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))

    correct = [max(range(2), key=lambda c: loglikelihood(row["question"], row["choices"][c])) == row["answer"]
               for row in rows]
    assert result["results"]["lowbit_local_choice"]["acc,none"] == pytest.approx(sum(correct) / len(rows))


def test_eval_tasks_refusals(tiny_checkpoint, tmp_path, capsys):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "task.yaml").write_text("task: x\nprocess_docs: !function utils.process\n")
    code, _, err = run(["eval", str(tiny_checkpoint), "--tasks", "x", "--tasks-path", str(code_dir)], capsys)
    assert_one_line_error(code, err, match=r"runs Python code \(!function\)")
    code, _, err = run(["eval", str(tiny_checkpoint), "--tasks", "x", "--reference", str(tiny_checkpoint)], capsys)
    assert_one_line_error(code, err, match="does not apply to --tasks")
    code, _, err = run(["eval", str(tiny_checkpoint), "--tasks", ","], capsys)
    assert_one_line_error(code, err, expected_code=2, match="task names")
