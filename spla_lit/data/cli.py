"""``key=value`` command lines of the data tools (``python -m spla_lit.data.prepare input=... out=...``).

The same style as ``train.py``'s Hydra overrides, with a fixed set of keys: an unknown key, a missing
required key or a bad value exits with one line naming the key (exit code 2).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One ``key=value`` argument: ``parse`` turns the text into the value (raising ``ValueError``)."""

    key: str
    parse: Callable[[str], Any]
    default: Any = REQUIRED
    help: str = ""


def as_list(text: str) -> list[str]:
    """``a,b,c`` (or Hydra's ``[a,b,c]``) -> ``["a", "b", "c"]``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty list")
    return items


def as_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(f"expected true or false, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def usage(prog: str, doc: str, options: Sequence[Option]) -> str:
    lines = [doc.strip(), "", f"usage: python -m {prog} " + " ".join(
        f"{o.key}=..." if o.default is REQUIRED else f"[{o.key}=...]" for o in options), ""]
    for o in options:
        default = "required" if o.default is REQUIRED else f"default {o.default!r}"
        lines.append(f"  {o.key:<14} {o.help} ({default})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str], options: Sequence[Option]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: parsed value}`` with every option (defaults filled in).
    Raises ``ValueError`` naming the key."""
    known = {o.key: o for o in options}
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ValueError(f"{arg}: expected key=value (keys: {', '.join(known)})")
        if key not in known:
            raise ValueError(f"{key}: unknown key (keys: {', '.join(known)})")
        try:
            values[key] = known[key].parse(text)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from e
    for o in options:
        if o.key not in values:
            if o.default is REQUIRED:
                needed = " ".join(f"{p.key}=..." for p in options if p.default is REQUIRED)
                raise ValueError(f"{o.key}: required (usage: {needed})")
            values[o.key] = o.default
    return values


def main(prog: str, doc: str, options: Sequence[Option], run: Callable[..., Any],
         argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and call ``run(**values)``; bad arguments and ``ValueError``s
    of ``run`` exit 2 with one line, ``--help`` prints the usage."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage(prog, doc, options))
        return
    try:
        run(**parse_args(argv, options))
    except (ValueError, ImportError) as e:
        log.error("error: %s", e)
        sys.exit(2)
