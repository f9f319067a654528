"""Device profiles (the data in ``devices/``, one TOML file per device) read into typed records, checked."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from edgekit.devices import PROFILE_DIR
from edgekit.export.methods import PRECISIONS
from edgekit.runtimes.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # jetson | gpu | cpu
    memory_gb: float
    memory_budget_gb: float  # what the model (weights + KV cache + workspace) may use
    runtime_overhead_mb: int
    precisions: tuple[str, ...]  # precisions that run well there, preferred first
    default_precision: str
    default_max_context: int
    execution_providers: tuple[str, ...]  # what it has: a bundle for it records its target's providers among these
    compute_capability: str | None = None
    onnxruntime: str | None = None  # the oldest onnxruntime its platform ships (bundles for it are made to run there)
    sparse_tensor_cores: bool = False


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (a file in this folder) or by path to a TOML file of the same shape."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = list_profiles()
        raise ConfigError(
            f"Unknown device '{name_or_path}'. Known: {', '.join(known)}.{did_you_mean(name_or_path, known)} "
            "(or pass a path to your own .toml profile)"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"Device profile {path} is not valid TOML: {e}") from None
    allowed = {f.name for f in fields(DeviceProfile)}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"Device profile {path} has unknown keys: {', '.join(sorted(unknown))}.")
    try:
        profile = DeviceProfile(**{**raw, "precisions": tuple(raw.get("precisions", ())),
                                   "execution_providers": tuple(raw.get("execution_providers", ()))})
    except TypeError as e:
        raise ConfigError(f"Device profile {path} is missing a key: {e}") from None
    bad = [p for p in (*profile.precisions, profile.default_precision) if p not in PRECISIONS]
    if bad or profile.memory_budget_gb <= 0 or profile.memory_budget_gb > profile.memory_gb:
        raise ConfigError(f"Device profile {path} is inconsistent (precisions {bad or 'ok'}, budget "
                          f"{profile.memory_budget_gb} GB of {profile.memory_gb} GB).")
    return profile
