"""A run's local paths (`--input`, `--output`, a local `--model`): absolute, and the same files on
every node.

Tasks run on every node of a cluster, each in a folder of Ray's choosing. A relative path would
name another place in each, and a path on the driver's machine alone names nothing, or other
files, on the others: there a task would fail every image it reads, or write PNGs and commit
records where the driver's COCO rebuild never looks. So the driver hands out absolute paths
(`absolute`), and before any work each node reports what it sees at them (`seen`); a run where a
node sees otherwise than the driver is refused (`check_every_node_sees`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

Seen = int | str | None  # a file's size in bytes, FOLDER, or None: nothing there
FOLDER = "folder"


def absolute(path: str) -> str:
    """A local path (`file://` or none) made absolute against this process's folder; URLs, and
    fsspec's chained ones (`simplecache::s3://...`), as they are."""
    if ("://" in path and not path.startswith("file://")) or "::" in path:
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def seen(paths: list[str]) -> list[Seen]:
    """What this node sees at each path."""
    views: list[Seen] = []
    for path in paths:
        try:
            views.append(FOLDER if os.path.isdir(path) else os.path.getsize(path))
        except OSError:
            views.append(None)
    return views


@dataclass(frozen=True)
class Probe:
    flag: str  # the command-line flag the path comes from, for the message
    path: str  # absolute
    driver_sees: Seen


def probes(paths: list[tuple[str, str]]) -> list[Probe]:
    """(flag, absolute path) pairs -> probes of what the driver sees there."""
    return [Probe(flag, path, view) for (flag, path), view in zip(paths, seen([path for _, path in paths]))]


class NotOnEveryNode(ValueError):
    """A local path that some node of the cluster does not see as the driver does."""


def _described(view: Seen) -> str:
    return "nothing" if view is None else "a folder" if view == FOLDER else f"a file of {view} bytes"


def check_every_node_sees(checks: list[Probe], views: dict[str, list[Seen]]) -> None:
    """NotOnEveryNode unless every node (name -> its `seen` of the probes' paths) sees what the driver does."""
    for node, node_views in views.items():
        for probe, view in zip(checks, node_views):
            if view != probe.driver_sees:
                raise NotOnEveryNode(
                    f"{probe.flag}: node {node} sees {_described(view)} at {probe.path}, where the driver sees "
                    f"{_described(probe.driver_sees)}. On a cluster of several machines every node reads the inputs "
                    "and the model and writes the outputs: use object storage (s3://...) or a file system mounted "
                    "at the same path on every node")
