"""cdm: Compartmentalized Diffusion Models (Golatkar et al., arXiv 2308.01937)."""

__version__ = "0.1.0"
