"""`_state/`: what made this output (refuse to mix models) and the history of runs.

_state/settings.json       the fingerprint of what changes results: model weights, image processor
                           settings, label map, post-processing parameters, dtype; and the input's root, which keys
                           are relative to. A run with other settings on the same output is
                           refused unless the user asks to overwrite.
_state/runs/<run_id>.json  one record per run: start, end (how it ended), input, settings, counts.
(Also under _state/: lease.json, see lease.py; coco.json, see coco.py.)
"""

from __future__ import annotations

import json

from pipeline.lease import LEASE
from pipeline.storage import DamagedOutput, OutputStore

STATE_DIR = "_state"
SETTINGS = f"{STATE_DIR}/settings.json"
RUNS_DIR = f"{STATE_DIR}/runs"
# the tables first: they hold the commit records, and a clear cut off after deleting a shard's PNGs
# but not its record would leave that shard "done" without its PNGs
OUTPUT_DIRS = ("tables", "panoptic", "semantic", "previews", "coco", RUNS_DIR)
OUTPUT_FILES = ("report.json",)
# the top-level folders runs write in (and --overwrite deletes)
WRITTEN_FOLDERS = frozenset(name.split("/")[0] for name in OUTPUT_DIRS) | {STATE_DIR}


class SettingsMismatch(ValueError):
    """The output was made with other settings; the message says which differ."""


def _differences(recorded: dict, now: dict, prefix: str = "") -> list[str]:
    """'name: recorded -> now' for each setting that differs, nested ones by their full name."""
    lines = []
    for name in sorted(set(recorded) | set(now)):
        old, new = recorded.get(name), now.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{name}.")
        elif isinstance(old, list) and len(json.dumps(old)) > 80:  # e.g. the label map's categories
            lines.append(f"{prefix}{name} differ")
        else:
            lines.append(f"{prefix}{name}: {json.dumps(old)} -> {json.dumps(new)}")
    return lines


def check_settings(store: OutputStore, fingerprint: dict, committed: bool) -> None:
    """Record `fingerprint` on an output that holds no results yet; on one that does, refuse a
    fingerprint that differs from the recorded one. The same weights under another name (a
    local copy of a hub checkpoint, say) are the same model."""
    recorded = _recorded(store) if committed and store.exists(SETTINGS) else None
    if recorded is None:
        store.write_bytes(SETTINGS, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        return
    if recorded.get("model_digest") == fingerprint.get("model_digest"):
        recorded = recorded | {"model": fingerprint.get("model")}
    # an output recorded before a setting was (its processor's, say) is compared on what it holds
    changed = _differences(recorded, {name: value for name, value in fingerprint.items() if name in recorded})
    if changed:
        raise SettingsMismatch(
            f"{store.root} was made with other settings ({'; '.join(changed)}); mixing them would give "
            "an inconsistent dataset. Use another --output, or pass --overwrite to delete it and start again."
        )


def _recorded(store: OutputStore) -> dict:
    try:
        recorded = json.loads(store.read_bytes(SETTINGS))
    except ValueError as exc:  # not JSON, or not UTF-8
        recorded = exc
    if not isinstance(recorded, dict):
        raise DamagedOutput(
            f"{store.url(SETTINGS)} cannot be read ({recorded}): it was damaged after a run wrote it. Pass "
            "--overwrite to start the output again or, if this run's settings are the output's, delete the file: "
            "this run then records them")
    return recorded


class NotAnOutput(ValueError):
    """A folder that holds files of the names a run writes, but no run made it."""


def check_is_output(store: OutputStore) -> None:
    """NotAnOutput if the folder holds names a run writes but no run of this pipeline made it:
    a run deletes the errors parts of shards it finds uncommitted, and --overwrite everything of
    those names, so a mistyped --output must not cost a user their own coco/ or tables/."""
    present = [name for name in (*OUTPUT_DIRS, *OUTPUT_FILES) if store.exists(name)]
    # any file of _state/ will do: settings.json may have been deleted as DamagedOutput advises, and
    # a run killed outright records no run but leaves its lease (one clearing the output holds it)
    if present and not store.list(STATE_DIR) and not store.list(RUNS_DIR):
        raise NotAnOutput(
            f"{store.root} holds {', '.join(present)} but is not an output of this pipeline (it has no "
            f"{STATE_DIR}/): nothing in it was changed; choose another --output")


def clear_outputs(store: OutputStore) -> None:
    """Delete everything a run writes under the output (for --overwrite), on a folder
    `check_is_output` accepted."""
    for name in OUTPUT_DIRS:
        if store.exists(name):
            store.delete_tree(name)
    for name in OUTPUT_FILES:
        if store.exists(name):
            store.delete(name)
    for name in store.list(STATE_DIR):  # not the lease: the run that clears the output holds it
        if f"{STATE_DIR}/{name}" != LEASE:
            store.delete(f"{STATE_DIR}/{name}")


def record_run(store: OutputStore, record: dict) -> None:
    store.write_bytes(f"{RUNS_DIR}/{record['run_id']}.json", json.dumps(record, indent=2).encode())

