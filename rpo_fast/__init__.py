"""rpo_fast: preference alignment for Stable Diffusion 1.5 and SDXL UNets.

Light to import: diffusers, deepspeed and bitsandbytes are imported where they are used.
"""

__version__ = "0.1.0"
