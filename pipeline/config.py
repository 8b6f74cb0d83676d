"""Configuration, one small frozen dataclass per concern, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from pipeline.remote import StorageConfig


TASKS = ("panoptic", "semantic", "instance")


def canonical_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """`tasks` in the order of TASKS; ValueError unless they include panoptic and are all known."""
    if "panoptic" not in tasks or not set(tasks) <= set(TASKS):
        raise ValueError(f"tasks must include panoptic and be among {', '.join(TASKS)}, got "
                         f"{', '.join(tasks) or 'an empty list'}")
    return tuple(t for t in TASKS if t in tasks)


@dataclass(frozen=True)
class PostprocessConfig:
    """Which outputs to make and the post-processing parameters; defaults are transformers' own.

    Panoptic is always made: its segments table is the commit record every run resumes from.
    """

    threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_mask_area_threshold: float = 0.8
    label_ids_to_fuse: frozenset[int] = field(default_factory=frozenset)
    tasks: tuple[str, ...] = ("panoptic",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", canonical_tasks(self.tasks))
        for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        object.__setattr__(self, "label_ids_to_fuse", frozenset(int(i) for i in self.label_ids_to_fuse))


DTYPES = ("float32", "bfloat16", "float16")


def resolved_dtype(dtype: str, on_gpu: bool) -> str:
    """`auto` as it runs (bfloat16 on a GPU, float32 on a CPU); any other dtype as named."""
    return ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype


@dataclass(frozen=True)
class InferenceConfig:
    """What each inference actor loads and how it runs it."""

    model: str  # checkpoint URI; each node resolves it to its local copy
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    postprocess: PostprocessConfig = PostprocessConfig()
    compile: bool = False
    storage: StorageConfig = StorageConfig()
    actors: int = 1  # the most inference actors at once: on a CPU node they share its cores

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
