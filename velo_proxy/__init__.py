"""VELO proxy: a semantic-cache reverse proxy for OpenAI-compatible chat APIs."""

import os

# litellm reaches for the internet at import unless told to use its bundled cost map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
