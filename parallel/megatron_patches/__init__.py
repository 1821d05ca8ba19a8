"""Every change mimo makes to megatron-core's behaviour (and to the torch.cuda entry points megatron calls), in
one place, under one version policy.

Each patch is named, says which upstream assumption it replaces, and has a scope: where that assumption breaks.

* ``no_cuda``: megatron-core assumes a GPU (device arguments, streams, the CUDA RNG, tensor type names); these
  let the real stack run on CPU tensors with gloo. Never applied when CUDA is present: a GPU run must not
  silently compute on the CPU.
* ``no_transformer_engine``: names megatron only binds when Transformer Engine imports.
* ``no_fused_adam``: megatron-core's distributed optimizer and gradient-norm fallbacks used when neither
  Transformer Engine nor Apex is installed (torch's Adam, ``torch.norm``), on CPU and GPU alike.
* ``always``: bugs that change what a run computes or saves on every device.

Policy: the patches reach into megatron-core internals verified on ``VERIFIED_MEGATRON_VERSIONS`` only. Any other
installed version is refused before anything is patched, naming the supported range, because a failure deep
inside a training step is much harder to read than a refusal at start-up.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mimo.recipes.errors import MimoError

logger = logging.getLogger(__name__)

VERIFIED_MEGATRON_VERSIONS: tuple[str, ...] = ("0.16.1",)
SUPPORTED_RANGE = "megatron-core>=0.16.1,<0.17 (verified: 0.16.1)"
"""What setup.py asks for and what the patches were checked against."""

SCOPES = ("always", "no_cuda", "no_transformer_engine", "no_fused_adam")


class UnsupportedMegatronVersion(MimoError, RuntimeError):
    """The installed megatron-core was never checked against mimo's patches."""


@dataclass(frozen=True)
class Patch:
    name: str
    scope: str
    """One of SCOPES: the machines where the upstream assumption does not hold."""
    replaces: str
    """The upstream assumption the patch replaces, in one sentence."""
    apply: Callable[[], None]


_applied: set[str] = set()


def megatron_version() -> str:
    """The installed megatron-core version string (read at call time so a test can fake it)."""
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version() -> None:
    """Refuse an unverified megatron-core before any patch touches its internals."""
    version = megatron_version()
    if version not in VERIFIED_MEGATRON_VERSIONS:
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is installed but mimo supports {SUPPORTED_RANGE}: its patches"
            " (mimo/parallel/megatron_patches) reach into megatron-core internals that may have moved. Install"
            f" a supported version (pip install megatron-core=={VERIFIED_MEGATRON_VERSIONS[-1]}), or re-verify the"
            " patches against the new version and add it to VERIFIED_MEGATRON_VERSIONS."
        )


def all_patches() -> tuple[Patch, ...]:
    """Every patch, in the order they are applied (device stand-ins before what runs on them)."""
    from mimo.parallel.megatron_patches import data_parallel, device, moe, optimizer

    return (*device.PATCHES, *moe.PATCHES, *optimizer.PATCHES, *data_parallel.PATCHES)


def wanted_scopes(*, cuda: bool, transformer_engine: bool, fused_adam: bool) -> set[str]:
    scopes = {"always"}
    if not cuda:
        scopes.add("no_cuda")
    if not transformer_engine:
        scopes.add("no_transformer_engine")
    if not fused_adam:
        scopes.add("no_fused_adam")
    return scopes


def apply_megatron_patches(*, cuda: bool, transformer_engine: bool, fused_adam: bool) -> list[str]:
    """Apply, once per process, every patch whose scope matches this machine; returns the names applied now."""
    check_megatron_version()
    scopes = wanted_scopes(cuda=cuda, transformer_engine=transformer_engine, fused_adam=fused_adam)
    applied_now = []
    for patch in all_patches():
        if patch.scope in scopes and patch.name not in _applied:
            patch.apply()
            _applied.add(patch.name)
            applied_now.append(patch.name)
    if applied_now:
        logger.debug("megatron-core patches applied: %s", ", ".join(applied_now))
    return applied_now


def applied_patches() -> frozenset[str]:
    """Names of the patches active in this process."""
    return frozenset(_applied)
