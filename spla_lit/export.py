"""``python -m spla_lit.export ckpt_path=... out=<dir>``: export a checkpoint as a Hugging Face model folder
(the implementation: :mod:`spla_lit.hf.exporter`)."""

from __future__ import annotations

from .hf.exporter import export, main

__all__ = ["export", "main"]

if __name__ == "__main__":
    main()
