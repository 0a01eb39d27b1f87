"""One way to say "unknown name": close matches for a typo of any name the package knows.

Hook names, model names, release names, SAE ids, architectures and CLI choices all go through
:func:`close_matches` and :func:`unknown_name_message`, so every typo gets the same kind of answer:
what was not found, the nearest known names, and where the full list is.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Optional

__all__ = ["close_matches", "expand_unet_alias", "unknown_name_message"]


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` known names nearest to ``name``: difflib's ratio first, then case-insensitive
    substring matches, then names that share the last dotted component (``hook_resid_post``)."""
    known = list(dict.fromkeys(str(k) for k in known))
    found = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if len(found) < n:
        lowered = {k.lower(): k for k in known}
        found += [k for lk, k in lowered.items() if name.lower() in lk and k not in found][: n - len(found)]
    if not found and "." in name:
        tail = name.rsplit(".", 1)[-1]
        found = [k for k in known if k.endswith(tail)][:n]
    return found[:n]


def unknown_name_message(what: str, name: object, known: Iterable[str], see: Optional[str] = None) -> str:
    """``Unknown <what> 'name'. Did you mean: 'a', 'b'? <see>`` — ``see`` says where the whole list is
    (a command, an attribute or a document); without it, up to 20 known names are listed."""
    known = list(dict.fromkeys(str(k) for k in known))
    close = close_matches(str(name), known)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    if see:
        where = f" {see}"
    elif known:
        shown = ", ".join(repr(k) for k in known[:20])
        where = f" Known ({len(known)}): {shown}{', ...' if len(known) > 20 else ''}."
    else:
        where = ""
    return f"Unknown {what} {name!r}.{hint}{where}"


# Short names of UNet transformer blocks: up.<block>.<index> / down.<block>.<index> / mid.<index>.
_UNET_ALIAS = re.compile(r"^(?:(down|up)\.(\d+)\.(\d+)|mid\.(\d+))(?=\.|$)")


def expand_unet_alias(name: str) -> str:
    """A hook name with a short UNet block alias spelled out as the diffusers path
    (``up.0.1.hook_out`` -> ``up_blocks.0.attentions.1.hook_out``); any other name unchanged. Needs no model,
    so a cache's recorded hook can be matched without loading one."""
    match = _UNET_ALIAS.match(name)
    if match is None:
        return name
    kind, block, index, mid = match.groups()
    prefix = f"mid_block.attentions.{mid}" if mid is not None else f"{kind}_blocks.{block}.attentions.{index}"
    return prefix + name[match.end():]
