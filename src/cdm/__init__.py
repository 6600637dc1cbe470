"""cdm: Compartmentalized Diffusion Models (Golatkar et al., arXiv 2308.01937)."""

__version__ = "0.1.0"

from .app import api  # noqa: E402,F401 - `from cdm import api`: a lazy facade, it imports no layer until used
