"""`_state/`: what made this output (refuse to mix models) and the history of runs.

_state/settings.json       the fingerprint of what changes results: model weights, label map,
                           post-processing parameters, dtype. A run with other settings on the
                           same output is refused unless the user asks to overwrite.
_state/runs/<run_id>.json  one record per run: start, end, input, settings, counts.
"""

from __future__ import annotations

import json

from pipeline.storage import OutputStore

SETTINGS = "_state/settings.json"
RUNS_DIR = "_state/runs"
OUTPUT_DIRS = ("panoptic", "semantic", "previews", "tables", "coco", "_state")
OUTPUT_FILES = ("report.json",)


class SettingsMismatch(ValueError):
    """The output was made with other settings; the message says which differ."""


def check_settings(store: OutputStore, fingerprint: dict) -> None:
    """Record `fingerprint` on a new output; refuse one that differs from the recorded one."""
    if not store.exists(SETTINGS):
        store.write_bytes(SETTINGS, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        return
    recorded = json.loads(store.read_bytes(SETTINGS))
    changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
    if changed:
        raise SettingsMismatch(
            f"{store.root} was made with other settings ({', '.join(changed)} differ); mixing them would give "
            "an inconsistent dataset. Use another --output, or pass --overwrite to delete it and start again."
        )


def clear_outputs(store: OutputStore) -> None:
    """Delete everything a run writes under the output (for --overwrite)."""
    fs = store.fs
    for name in OUTPUT_DIRS:
        if store.exists(name):
            fs.rm(store.path(name), recursive=True)
    for name in OUTPUT_FILES:
        if store.exists(name):
            store.delete(name)


def record_run(store: OutputStore, record: dict) -> None:
    store.write_bytes(f"{RUNS_DIR}/{record['run_id']}.json", json.dumps(record, indent=2).encode())


def run_history(store: OutputStore) -> list[dict]:
    return [json.loads(store.read_bytes(f"{RUNS_DIR}/{name}")) for name in store.list(RUNS_DIR, ".json")]
