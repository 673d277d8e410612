"""Model directories for actors on any node: read in place, or shipped through Ray's object store.

Every actor loads its model by path (engines, learner and critic ranks, reference, reward model).
On one node, or when every node mounts the same filesystem, the driver's path is all an actor
needs. On a multi-node cluster without shared storage the path does not exist on the other nodes
(the tiny model the driver builds, the warm-up SFT model, a trained reward model): the driver puts
each file into the object store once, and an actor on another node writes them to a local cache
directory named by their content hash before loading. Weights a learner rank saves on its own
node (warm-up SFT, reward model, `final/`) come back to the driver the same way (`bring_back`).

    driver:  spec = model_dir(path, cluster.shared_dir, cluster.ship_models)   # nothing copied yet
             ActorGroup: kwargs = ship_to(kwargs, node_id of the actor's bundle) # packs if needed
    actor:   path = local_model_path(spec)                                       # first line

`cluster.shared_dir`: paths under it are the same on every node (NFS, Lustre, a directory baked
into the image) and are never copied. `cluster.ship_models=true` copies even to actors on the
driver's own node (tests; a driver directory that other processes must not read).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from rlhf_dist.errors import ModelPathError

CACHE_ENV = "RLHF_DIST_MODEL_CACHE"  # where shipped models land on each node
DEFAULT_CACHE = "~/.cache/rlhf_dist/shipped"


@dataclass(frozen=True)
class ModelDir:
    """A model directory on the driver's node, and how an actor anywhere gets to read it."""

    path: str  # absolute path on the driver's node
    origin_node: str  # Ray node id of the driver
    shared: bool = False  # under cluster.shared_dir: every node reads `path` in place
    always: bool = False  # cluster.ship_models: copy even on the driver's node
    digest: str = ""  # sha256 over names and contents; set when packed
    files: tuple = ()  # ((relative name, ObjectRef of the file's bytes), ...) once packed

    def needs_copy_on(self, node_id: str) -> bool:
        return not self.shared and (self.always or node_id != self.origin_node)


ModelSpec = Union[str, ModelDir]


def current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def is_under(path: str, shared_dir: Optional[str]) -> bool:
    if not shared_dir:
        return False
    root = os.path.realpath(os.path.expanduser(shared_dir))
    return os.path.commonpath([root, os.path.realpath(path)]) == root


# ------------------------------------------------------------------ driver side
def model_dir(path: Optional[str], shared_dir: Optional[str], always: bool) -> Optional[ModelDir]:
    """The spec actors receive for `path` (None stays None). Nothing is copied until `ship_to`."""
    if path is None:
        return None
    path = os.path.abspath(os.path.expanduser(str(path)))
    return ModelDir(path, current_node_id(), shared=is_under(path, shared_dir), always=always)


_PACKED: dict[tuple, ModelDir] = {}  # one upload per directory and driver, reused by every group


def ship_to(kwargs: dict[str, Any], node_id: str) -> dict[str, Any]:
    """`kwargs` for an actor placed on `node_id`: every ModelDir that must be copied there is
    packed into the object store (once per directory content) and travels with its refs."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, ModelDir) and value.needs_copy_on(node_id) and not value.files:
            out[key] = _packed(value)
    return out


def _packed(spec: ModelDir) -> ModelDir:
    names = _list_files(spec.path)
    stamp = tuple((name, os.stat(Path(spec.path) / name).st_mtime_ns) for name in names)
    key = (spec.path, spec.origin_node, stamp)
    if key not in _PACKED:
        import ray

        digest, refs = hashlib.sha256(), []
        for name in names:
            data = (Path(spec.path) / name).read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(hashlib.sha256(data).digest())
            refs.append((name, ray.put(data)))
        _PACKED[key] = replace(spec, digest=digest.hexdigest(), files=tuple(refs))
    return replace(_PACKED[key], shared=spec.shared, always=spec.always)


def _list_files(path: str) -> list[str]:
    """Relative names of the files to ship; hidden entries (.git, .cache) are left out."""
    root = Path(path)
    if not root.is_dir():
        raise ModelPathError(f"model directory {path} does not exist on the driver's node, so it "
                             "cannot be shipped to the actors. Fix: point at an existing HF model dir.")
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names += [str((Path(dirpath) / f).relative_to(root)) for f in sorted(filenames)
                  if not f.startswith(".")]
    return names


# ------------------------------------------------------------------ actor side
def local_model_path(spec: Optional[ModelSpec]) -> Optional[str]:
    """A path this process can read: the spec's own path, or the shipped copy in the node cache."""
    if spec is None or isinstance(spec, str):
        return spec
    if not spec.needs_copy_on(current_node_id()):
        return spec.path
    if not spec.files:
        raise ModelPathError(
            f"{spec.path} lives on another node and was not shipped with this actor. Pass model "
            "directories through ActorGroup (which ships them), or put them under cluster.shared_dir.")
    dest = Path(os.path.expanduser(os.environ.get(CACHE_ENV, DEFAULT_CACHE)))
    dest = dest / f"{Path(spec.path).name}-{spec.digest[:16]}"
    if not dest.is_dir():
        _materialise(spec, dest)
    return str(dest)


def _materialise(spec: ModelDir, dest: Path) -> None:
    """Write the shipped files to `dest` atomically: a temp dir, checked, then renamed (two
    actors on one node may race; the loser drops its copy)."""
    import ray

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    digest = hashlib.sha256()
    try:
        for name, ref in spec.files:  # one file in memory at a time
            data = ray.get(ref)
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(hashlib.sha256(data).digest())
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if digest.hexdigest() != spec.digest:
            raise ModelPathError(f"the shipped copy of {spec.path} does not match its digest "
                                 f"({digest.hexdigest()[:16]} != {spec.digest[:16]}).")
        try:
            os.rename(tmp, dest)
        except OSError:  # another actor on this node finished first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ results back to the driver
def read_dir(path: str) -> dict[str, bytes]:
    """Every file of a directory written on this node (an actor method returns it)."""
    return {name: (Path(path) / name).read_bytes() for name in _list_files(path)}


def write_dir(files: dict[str, bytes], path: str) -> None:
    for name, data in files.items():
        target = Path(path) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def bring_back(group, path: str, shared_dir: Optional[str], always: bool) -> bool:
    """After rank 0 of `group` saved a model to `path` on its own node: copy it to the same path
    on the driver's node unless both nodes already see it. Returns whether files were copied."""
    import ray

    path = os.path.abspath(path)
    rank0_node = group.node_ids[0]
    if is_under(path, shared_dir) or (rank0_node == current_node_id() and not always):
        return False
    files = ray.get(group.actors[0].read_dir.remote(path), timeout=600)
    write_dir(files, path)
    return True
