"""Load a universal-segmentation checkpoint: a hub id, a local directory or an fsspec URL.

Every source is first made a local directory (hub snapshot, or a copy of the remote directory
cached once per node), then loaded with `from_pretrained` from there: safetensors only, never
remote code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.remote import StorageConfig, explained, file_system, file_version, request, transfer_seconds

SUPPORTED_MODEL_TYPES = ("maskformer", "mask2former")
BUNDLED = "bundled"  # the trained checkpoint shipped in the package, found on every node
BUNDLED_DIR = Path(__file__).parent / "data" / "model"
CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # what is fetched and read of a checkpoint: configs and weights
PROCESSOR_CONFIG = "preprocessor_config.json"


class ModelError(ValueError):
    """The checkpoint cannot be used; the message says why, for the user."""


@dataclass(frozen=True)
class ModelSource:
    """Where the checkpoint lives: a local path, an fsspec URL (s3://...) or a hub id."""

    uri: str
    storage: StorageConfig = StorageConfig()

    @property
    def is_remote_dir(self) -> bool:
        return "://" in self.uri and not self.uri.startswith("file://")

    @property
    def path(self) -> Path:
        """What the uri names on this machine's disk, if it names a local path (`file://` or none)."""
        return Path(self.uri.removeprefix("file://")).expanduser()

    @property
    def is_local_path(self) -> bool:
        """Whether the uri names a local path: written as one (`file://`, `./`, `/`, `~`), or naming
        something on this disk. Else it is an fsspec URL or a hub id (`org/name`), which are fetched."""
        return self.uri.startswith(("file://", ".", "/", "~")) or self.path.exists()


def _cache_root() -> Path:
    return Path(os.environ.get("PANOPTIC_MODEL_CACHE", Path.home() / ".cache" / "panoptic-pipeline" / "models"))


def _copy_remote_dir(uri: str, storage: StorageConfig) -> Path:
    """Copy a remote checkpoint directory into the node's cache once per version of its files;
    atomic by rename."""
    fs, root = file_system(uri, storage)
    fs.invalidate_cache(root)  # fsspec keeps listings per file-system instance: this one is current
    try:
        # files only: a sub-folder named like one (`backup.safetensors/`) is no file to copy
        entries = [f for f in request(fs, "ls", root, detail=True) if f.get("type") == "file"]
    except FileNotFoundError as exc:
        raise ModelError(f"model directory {uri} does not exist") from exc
    if [f["name"].rstrip("/") for f in entries] == [root.rstrip("/")]:  # `ls` of a file lists the file
        raise ModelError(f"model {uri!r} is a file, not a checkpoint directory")
    files = [f for f in entries if f["name"].endswith(CHECKPOINT_SUFFIXES)]
    if not any(f["name"].endswith(".safetensors") for f in files):  # refused before anything is copied
        raise _no_safetensors(uri, pickled=any(f["name"].endswith(".bin") for f in entries))
    # keyed by the files' names, sizes and ETags too: new weights uploaded to the same URI are
    # copied again, not served stale from the cache
    version = sorted(file_version(f) for f in files)
    target = _cache_root() / hashlib.sha256(json.dumps([uri.rstrip("/"), version]).encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        for name, size, _ in version:  # `get` would expand glob characters
            request(fs, "get_file", name, str(staging / Path(name).name), seconds=transfer_seconds(size or 0))
        staging.rename(target)
    except OSError:  # another worker on this node finished first, or the copy failed
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _no_safetensors(uri: str, pickled: bool) -> ModelError:
    return ModelError(f"model {uri!r} has no safetensors weights"
                      + (" (only pickle .bin files, which are refused: convert them to safetensors)" if pickled else ""))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[f"*{suffix}" for suffix in CHECKPOINT_SUFFIXES]))
    except Exception as exc:  # offline, unknown repo, gated: all are "cannot use this model"
        raise ModelError(f"cannot fetch model {repo_id!r} from the Hugging Face hub ({exc.__class__.__name__}), "
                         "and no local directory has that name") from exc


@lru_cache(maxsize=8)
def local_dir(source: ModelSource) -> Path:
    """The checkpoint as a local directory on this node, checked to hold config + safetensors
    weights. Cached per process, so every task on a node resolves (and copies) it once."""
    path = BUNDLED_DIR if source.uri == BUNDLED else source.path
    if source.uri == BUNDLED and not path.is_dir():
        raise ModelError(f"the bundled checkpoint is missing from {path}; reinstall, or pass --model")
    if path.is_dir():
        directory = path
    elif source.is_remote_dir:
        try:
            directory = _copy_remote_dir(source.uri, source.storage)
        except Exception as exc:  # a ModelError naming the model: an inference actor reports it as one error line
            reason = explained(exc)
            if reason is None:
                raise
            raise ModelError(f"model {source.uri} could not be copied: {reason}") from exc
    elif path.exists():
        raise ModelError(f"model {source.uri!r} is a file, not a checkpoint directory")
    elif source.is_local_path:
        raise ModelError(f"model directory {source.uri} does not exist")
    else:
        directory = _hub_snapshot(source.uri)
    if not (directory / "config.json").is_file():
        raise ModelError(f"model {source.uri!r} has no config.json")
    if not any(directory.glob("*.safetensors")):
        raise _no_safetensors(source.uri, pickled=any(directory.glob("*.bin")))
    _check_weights(source.uri, directory)
    if not (directory / PROCESSOR_CONFIG).is_file():  # found here, not when every inference actor dies
        raise ModelError(f"model {source.uri!r} has no {PROCESSOR_CONFIG} (the image processor's settings)")
    return directory


def _check_weights(uri: str, directory: Path) -> None:
    """Read each weights file's header here, so that a truncated or corrupt file is one clear
    error before the run starts, not an inference actor dying in a loop."""
    from safetensors import SafetensorError, safe_open

    for weights in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="numpy"):  # "pt" would import torch: seconds
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"model {uri!r}: {weights.name} is not a readable safetensors file ({exc})") from exc


def weights_digest(directory: Path) -> str:
    """A short digest of the weights, so outputs record exactly which model made them."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def processor_settings(directory: Path) -> dict:
    """The checkpoint's image processor settings (its preprocessor_config.json): with the weights,
    what decides its results."""
    path = directory / PROCESSOR_CONFIG
    try:
        settings = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} cannot be read ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(settings, dict):
        raise ModelError(f"{path} is not a processor config (a JSON object)")
    return settings


def load_processor(directory: Path) -> Any:
    """The checkpoint's image processor."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(directory, trust_remote_code=False)


def _checked_config(directory: Path) -> tuple[str, dict[int, str]]:
    """The checkpoint's model type and class names by label id, from its config.json read as JSON
    (importing transformers for them took seconds); a ModelError for a config this pipeline cannot use."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
        labels = {int(i): str(name) for i, name in config["id2label"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path} is not a model config with id2label ({exc.__class__.__name__}: {exc})") from exc
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model type {config.get('model_type')!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if sorted(labels) != list(range(len(labels))):  # the class head's outputs are label ids 0 to N-1
        raise ModelError(f"{path}: id2label's label ids must be 0 to {len(labels) - 1}, one per class the model "
                         f"predicts; they are {sorted(labels)[:10]}{' ...' if len(labels) > 10 else ''}")
    return config["model_type"], labels


def model_labels(directory: Path) -> dict[int, str]:
    """The checkpoint's class names by label id: the driver needs nothing else of the config."""
    return _checked_config(directory)[1]


def load_model_and_processor(directory: Path, device: str) -> tuple[Any, Any]:
    """`load_model` and `load_processor`, a failure of either as a ModelError: weights that do not
    fit the config, a processor config transformers cannot read."""
    try:
        return load_model(directory, device), load_processor(directory)
    except ModelError as exc:
        raise ModelError(f"model in {directory} cannot be loaded: {exc}") from exc
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model in {directory} cannot be loaded: {why(exc)}") from exc


def why(exc: BaseException) -> str:
    """An error of transformers or torch as `Type: the first line of its message`, for a ModelError's one line."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    # transformers points to a load report it logs, which the job silences (TRANSFORMERS_VERBOSITY)
    return f"{type(exc).__name__}: {first_line.split(' For details look at')[0]}"


def load_model(directory: Path, device: str) -> Any:
    """The model in eval mode on `device`; weights from safetensors only."""
    from transformers import AutoModelForUniversalSegmentation

    model_type, _ = _checked_config(directory)  # a clear error for an unsupported model type
    model, loading = AutoModelForUniversalSegmentation.from_pretrained(
        directory, use_safetensors=True, trust_remote_code=False,
        # transformers 5 runs inference with one setting of this training option only: MaskFormer's
        # forward fails with it on, Mask2Former's with it off (its hub checkpoints ship those)
        use_auxiliary_loss=model_type == "mask2former",
        # both reported below, by name: transformers fills a missing or misfit tensor with random
        # values and only logs it (or raises naming none), and its log is silenced in the job
        ignore_mismatched_sizes=True, output_loading_info=True,
    )
    _check_loaded(model, loading)
    return model.to(device).eval()


def _check_loaded(model: Any, loading: dict) -> None:
    """Refuse weights that do not fit the config: a parameter of the model that the files lack,
    or one whose shape differs. Buffers the model computes from its config (the loss's class
    weights) may be absent."""
    parameters = dict(model.named_parameters())
    missing = sorted(name for name in loading["missing_keys"] if name in parameters)
    misfit = sorted(f"{name} {tuple(saved)} where the config makes {tuple(made)}"
                    for name, saved, made in loading["mismatched_keys"] if name in parameters)
    problems = ([f"{len(misfit)} tensors differ in shape, e.g. {misfit[0]}"] if misfit else []) + (
        [f"{len(missing)} of the model's tensors are missing (they would be random), e.g. {', '.join(missing[:2])}"]
        if missing else [])
    if problems:
        raise ModelError(f"its weights do not fit its config: {'; '.join(problems)}")
