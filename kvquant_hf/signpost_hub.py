"""Signposts on the Hugging Face Hub: the explicit ``hf://owner/name[@revision]`` form and its download.

Only this form reaches the Hub; :func:`kvquant_hf.signposts.load_signposts` treats every other string as a local
path. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is honoured at call time: then only the local Hugging
Face cache is read and the network is never tried.
"""

from __future__ import annotations

import os
import re

from .errors import SignpostError
from .signpost_checks import METADATA_FILE, bits_dirname

HUB_PREFIX = "hf://"
HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_hub_path(path: str, revision: str | None = None) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``hf://owner/name`` or ``hf://owner/name@revision`` (`revision` as a fallback)."""
    spec = path[len(HUB_PREFIX):]
    repo_id, sep, rev = spec.partition("@")
    if sep and revision is not None and rev != revision:
        raise SignpostError(f"signposts={path!r} names revision {rev!r} but revision={revision!r} was also given; "
                            "give the revision once.")
    rev = rev if sep else revision
    if not HUB_REPO_RE.match(repo_id) or (rev is not None and (not rev or any(c.isspace() for c in rev))):
        raise SignpostError(
            f"signposts={path!r} is not a Hugging Face Hub reference; write {HUB_PREFIX}owner/name or "
            f"{HUB_PREFIX}owner/name@revision (a branch, tag or commit), or pass a local folder."
        )
    return repo_id, rev


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access, read at call time."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def download_signposts(path: str, bits: int | None, revision: str | None = None) -> str:
    """Snapshot a Hub repository holding signpost folders (only the requested nuqX when bits is given).

    With ``HF_HUB_OFFLINE`` set only the local Hugging Face cache is read (``local_files_only=True``).
    """
    repo_id, rev = parse_hub_path(path, revision)
    which = f"repo {repo_id!r} at revision {rev or 'main'!r}"
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise SignpostError(f"signposts={path!r} needs huggingface_hub (pip install huggingface_hub).") from exc
    patterns = [f"{bits_dirname(bits)}/*", METADATA_FILE, "*.safetensors"] if bits is not None else None
    offline = hub_offline()
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=rev, allow_patterns=patterns,
                                                 local_files_only=offline)
    except Exception as exc:  # the Hub client raises many types (offline, 404, auth)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if offline:
            raise SignpostError(
                f"signposts={path!r}: HF_HUB_OFFLINE is set, so the Hugging Face Hub was not contacted, and {which} "
                f"is not in the local Hugging Face cache ({reason}); unset HF_HUB_OFFLINE to download it, or pass "
                "a local folder written by calibrate.py."
            ) from exc
        raise SignpostError(
            f"signposts={path!r}: could not download {which} from the Hugging Face Hub ({reason}); check the repo "
            "id, the revision, network access (and HF_TOKEN for a private repo), or pass a local folder written "
            "by calibrate.py."
        ) from exc


__all__ = ["HUB_PREFIX", "HUB_REPO_RE", "download_signposts", "hub_offline", "parse_hub_path"]
