"""Seeded mutation fuzz of a tiny checkpoint's safetensors header and config.json, run on
every load path: `load_quantized`, `from_pretrained` after `import lowbit`, `load_gptq`
(on a GPTQ export) and `lowbit info`.

Each mutated checkpoint must give the identical model (quantized tensors bit for bit;
full-precision tensors equal up to the cast the config's dtype asks for) or lowbit's
CheckpointError (for `lowbit info`: exit status 0, or 1 with one error line and no
traceback). Anything else is counted: a hang (a case over its time limit), another
exception, a wrong load (loaded, but other weights). Cases run in batches, one worker
process per load path; a worker that overruns is killed and the case it was on counted
as a hang.

    python tests/io/fuzz_checkpoints.py --cases 300 --seed 0     # counts per load path

from_pretrained is transformers' function: where a mutated config.json no longer names
lowbit, or transformers' own config parser refuses it before lowbit's quantizer is reached,
the outcome is transformers' own and counted apart.

tests/io/test_fuzz.py runs a small count in the default suite.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOADERS = ("load_quantized", "from_pretrained", "load_gptq", "lowbit info")
CASE_SECONDS = 20  # one load of the tiny model takes well under a second
TRANSFORMERS_ERROR = "transformers' own error (lowbit not reached)"
TRANSFORMERS_LOAD = "transformers' own load (config not lowbit's)"
TRANSFORMERS_OWN = (TRANSFORMERS_ERROR, TRANSFORMERS_LOAD)
OUTCOMES = ("clean error", "identical load", "loaded other weights (valid edit)", *TRANSFORMERS_OWN,
            "other exception", "wrong load", "hang", "traceback")
GOOD = ("clean error", "identical load", "loaded other weights (valid edit)")

JUNK = [None, True, False, 0, -1, 1, 3, 3.0, 64.0, "64", "", "bogus", [], {}, [1, 2], {"a": 1}, 2**40, 1e12,
        20000, -2**31, "float16", "lowbit", "../../etc/passwd", "(.*)*x$", float("nan"), float("inf")]
DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I64", "U32", "U8", "I8", "BOOL", "F8_E4M3", "XX", 5]


# --- the reference checkpoints ------------------------------------------------------------------


def build_references(root: Path) -> None:
    """root/lowbit (a lowbit checkpoint), root/gptq (its GPTQ export) and the state dicts their
    loaders give (root/*.pt)."""
    sys.path.insert(0, str(HERE.parent))
    import torch
    from tiny import tiny_llama

    import lowbit

    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=True)
    lowbit.quantize_rtn(model, 3, 32, overrides={"down_proj": {"bits": 2}})
    lowbit.save_quantized(model, root / "lowbit")
    lowbit.export_gptq(model, root / "gptq", dynamic=True)
    (root / "gptq" / "quantize_config.json").unlink()  # one config to mutate
    torch.save(lowbit.load_quantized(root / "lowbit").state_dict(), root / "lowbit.pt")
    torch.save(lowbit.load_gptq(root / "gptq").state_dict(), root / "gptq.pt")


# --- mutations ----------------------------------------------------------------------------------


def _read_safetensors(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_safetensors(file: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _nodes(value, path=()):
    """Every (path, value) of a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def _set(document, path, value):
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value


def _delete(document, path):
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


def mutate_config(directory: Path, rng: random.Random) -> str:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    if rng.random() < 0.05:
        data = file.read_bytes()
        file.write_bytes(rng.choice([data[: rng.randrange(len(data))], data.replace(b'"', b"\xff", 1)]))
        return "config.json bytes"
    nodes = [(p, v) for p, v in _nodes(config) if p]
    # weight the quantization config as much as the rest: it is where lowbit's own schema is
    quant = [n for n in nodes if n[0][0] == "quantization_config"]
    path, value = rng.choice(quant if quant and rng.random() < 0.5 else nodes)
    kind = rng.choice(["junk", "junk", "delete", "nudge", "retype"])
    if kind == "delete":
        _delete(config, path)
        if path == ("quantization_config", "checkpoint_format"):
            kind = "delete (valid edit: the documented default, GPTQ v1)"
    elif kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        _set(config, path, rng.choice([value + 1, value - 1, value * 2, -value, value // 2 if value else 1]))
    elif kind == "retype" and not isinstance(value, (dict, list)):
        _set(config, path, rng.choice([str(value), [value], {"value": value}, float(value) if isinstance(
            value, int) and not isinstance(value, bool) else not value]))
    else:
        _set(config, path, copy.deepcopy(rng.choice(JUNK)))
    file.write_text(json.dumps(config))
    return f"config {'.'.join(map(str, path))} {kind}"


def mutate_header(directory: Path, rng: random.Random) -> tuple[str, bool]:
    """A mutation of model.safetensors' header; True when it is a valid edit of the weights
    (two tensors of one dtype and shape trading their data)."""
    file = directory / "model.safetensors"
    header, body = _read_safetensors(file)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "swap", "rename", "delete", "junk", "bytes", "metadata"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], [*shape, 1], shape[:-1], [s + 1 for s in shape],
                                     [2**40, *shape[1:]], [-1, *shape[1:]], [], "big"])
    elif kind == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[start + 4, end + 4], [start, end - 4], [end, start], [0, end - start],
                                            [start, len(body) + 8], [-8, end], [start, 2**62]])
    elif kind == "swap":
        other = rng.choice(names)
        mine, theirs = entry["data_offsets"], header[other]["data_offsets"]
        entry["data_offsets"], header[other]["data_offsets"] = theirs, mine
        _write_safetensors(file, header, body)
        # tensors of one byte size trading their bytes: a well-formed checkpoint of other values
        return f"header swap {name} {other}", name != other and mine[1] - mine[0] == theirs[1] - theirs[0]
    elif kind == "rename":
        header[name + rng.choice(["x", ".weight", "", "/../x"]) if rng.random() < 0.8 else "lm_head.weight"] = (
            header.pop(name))
    elif kind == "delete":
        del header[name]
    elif kind == "junk":
        header[name] = copy.deepcopy(rng.choice(JUNK))
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "tf"}, {"x": 5}, [], "pt", {"format": "pt", "y": "z"}])
    else:
        data = bytearray(file.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        where = rng.choice(["length", "byte", "truncate"])
        if where == "length":
            data[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 8, 2**40, 2**63]))
        elif where == "byte":
            i = rng.randrange(8, 8 + n)
            data[i] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)):]
        file.write_bytes(bytes(data))
        return f"header {where} bytes", False
    _write_safetensors(file, header, body)
    return f"header {name} {kind}", False


def make_cases(root: Path, count: int, seed: int) -> list[dict]:
    """`count` mutated copies of each reference, half of them in config.json, half in the header."""
    cases = []
    for kind in ("lowbit", "gptq"):
        for i in range(count):
            rng = random.Random(f"{seed}/{kind}/{i}")
            directory = root / f"{kind}-{i:04d}"
            shutil.copytree(root / kind, directory)
            if rng.random() < 0.5:
                what = mutate_config(directory, rng)
                valid_edit = "valid edit" in what
            else:
                what, valid_edit = mutate_header(directory, rng)
            cases.append({"kind": kind, "dir": str(directory), "mutation": what, "valid_edit": valid_edit})
    return cases


# --- loading (in the worker) ---------------------------------------------------------------------


def _same_weights(loaded: dict, reference: dict) -> bool:
    """Quantized tensors bit for bit; full-precision floats equal to the reference cast to the
    loaded dtype (the config may ask for another dtype)."""
    import torch

    if loaded.keys() != reference.keys():
        return False
    for key, ref in reference.items():
        t = loaded[key]
        quantized = key.rpartition(".")[2] in ("packed", "scales", "zeros", "input_perm") or ".adapter." in key
        if quantized or not ref.is_floating_point():
            if t.dtype != ref.dtype or not torch.equal(t, ref):
                return False
        elif not t.is_floating_point() or not torch.equal(t, ref.to(t.dtype)):
            return False
    return True


def run_case(loader: str, case: dict, references: dict) -> str:
    import contextlib
    import io
    import traceback

    from lowbit.errors import CheckpointError

    if loader == "lowbit info":
        from lowbit import cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(["info", case["dir"]])
            except SystemExit as exc:
                code = exc.code
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = "raised"
        text = err.getvalue()
        lines = [line for line in text.splitlines() if line.strip()]
        if "Traceback" in text or code not in (0, 1):
            return "traceback"
        if code == 1:
            return "clean error" if len(lines) == 1 and lines[0].startswith("lowbit: error:") else "traceback"
        return "identical load"

    import lowbit

    load = {
        "load_quantized": lowbit.load_quantized,
        "load_gptq": lowbit.load_gptq,
        "from_pretrained": _from_pretrained,
    }[loader]
    REACHED.clear()
    try:
        model = load(case["dir"])
    except CheckpointError:
        return "clean error"
    except Exception:  # noqa: BLE001
        return TRANSFORMERS_ERROR if loader == "from_pretrained" and not REACHED else "other exception"
    if _same_weights(model.state_dict(), references[case["kind"]]):
        return "identical load"
    if case["valid_edit"]:
        return "loaded other weights (valid edit)"
    if loader == "from_pretrained" and not REACHED:
        return TRANSFORMERS_LOAD
    return "wrong load"


REACHED: list[bool] = []  # whether from_pretrained got as far as lowbit's quantization config


def _from_pretrained(path):
    import transformers

    from lowbit.io import hf

    if not hasattr(hf.LowbitConfig, "_fuzz_wrapped"):
        init = hf.LowbitConfig.__init__

        def noting_init(self, **fields):
            REACHED.append(True)
            init(self, **fields)

        hf.LowbitConfig.__init__ = noting_init
        hf.LowbitConfig._fuzz_wrapped = True
    return transformers.AutoModelForCausalLM.from_pretrained(path)


class _Overrun(BaseException):
    pass


def worker(loader: str, root: str, cases: list[dict]) -> None:
    """Prints one JSON line per case: its index and outcome."""
    import logging
    import warnings

    import torch
    import transformers

    import lowbit  # noqa: F401  (registers with transformers)

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    references = {kind: torch.load(Path(root) / f"{kind}.pt") for kind in ("lowbit", "gptq")}

    def overrun(signum, frame):
        raise _Overrun

    signal.signal(signal.SIGALRM, overrun)
    for case in cases:
        start = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            outcome = run_case(loader, case, references)
        except _Overrun:
            outcome = "hang"
        finally:
            signal.alarm(0)
        print(json.dumps({"index": case["index"], "outcome": outcome,
                          "seconds": round(time.perf_counter() - start, 3)}), flush=True)


# --- the driver -----------------------------------------------------------------------------------


def _cases_of(loader: str, cases: list[dict]) -> list[dict]:
    kind = "gptq" if loader == "load_gptq" else "lowbit"
    return [c for c in cases if c["kind"] == kind]


def run_loader(loader: str, root: Path, cases: list[dict]) -> dict[int, str]:
    """Outcomes by case index, from worker processes (restarted after an overrun)."""
    outcomes: dict[int, str] = {}
    pending = _cases_of(loader, cases)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    while pending:
        batch = root / f"batch-{loader.replace(' ', '_')}.json"
        batch.write_text(json.dumps(pending))
        command = [sys.executable, "-c", "import json, fuzz_checkpoints as f; "
                   f"f.worker({loader!r}, {str(root)!r}, json.load(open({str(batch)!r})))"]
        budget = 60 + CASE_SECONDS * 2 * len(pending)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=budget, env=env, cwd=ROOT)
            stdout = done.stdout
        except subprocess.TimeoutExpired as exc:
            stdout = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        for line in stdout.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                outcomes[result["index"]] = result["outcome"]
        remaining = [c for c in pending if c["index"] not in outcomes]
        if remaining:  # the worker died or overran on the first case it did not report
            outcomes[remaining[0]["index"]] = "hang"
        pending = remaining[1:]
    return outcomes


def fuzz(count: int, seed: int, loaders=LOADERS, jobs: int = 2, keep: Path | None = None) -> dict:
    """{loader: {outcome: count}} and the cases with bad outcomes."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(keep or tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    try:
        build_references(root)
        cases = make_cases(root, count, seed)
        for i, case in enumerate(cases):
            case["index"] = i
        with ThreadPoolExecutor(jobs) as pool:
            results = dict(zip(loaders, pool.map(lambda name: run_loader(name, root, cases), loaders)))
        counts = {name: dict(collections.Counter(results[name].values())) for name in loaders}
        bad = [(name, cases[i]["mutation"], outcome) for name in loaders for i, outcome in results[name].items()
               if outcome not in (*GOOD, *TRANSFORMERS_OWN)]
        return {"counts": counts, "bad": bad, "cases": len(cases)}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="mutations of each reference checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    result = fuzz(args.cases, args.seed, jobs=args.jobs)
    print(f"seed {args.seed}, {args.cases} mutations of each checkpoint (lowbit, GPTQ export), "
          f"{time.perf_counter() - start:.0f} s")
    for loader, counts in result["counts"].items():
        print(f"  {loader:16s} " + ", ".join(f"{o}: {counts.get(o, 0)}" for o in OUTCOMES if counts.get(o)))
    for loader, mutation, outcome in result["bad"]:
        print(f"  BAD {loader}: {mutation} -> {outcome}")


if __name__ == "__main__":
    main()
