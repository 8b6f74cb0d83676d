"""Configuration, one small frozen dataclass per concern, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of panoptic post-processing; defaults are transformers' own."""

    threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_mask_area_threshold: float = 0.8
    label_ids_to_fuse: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        object.__setattr__(self, "label_ids_to_fuse", frozenset(int(i) for i in self.label_ids_to_fuse))
