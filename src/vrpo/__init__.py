"""vrpo: diffusion transformers trained with representation alignment (REPA, VRPO, peers)."""

__version__ = "0.1.0"
