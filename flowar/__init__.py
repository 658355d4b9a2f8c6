"""FlowAR: scale-wise autoregressive image generation with flow matching.

The package is layered; imports only go downwards:
``cli`` -> ``train`` / ``sample`` / ``eval`` / ``analysis`` / ``bench`` -> ``model`` ->
``attention``, ``flow``, ``nn``, ``pyramid``, ``config``.
"""

from flowar.config import AttentionConfig, FlowARConfig, FlowHeadConfig, SamplingConfig

__version__ = "0.1.0"

__all__ = ["AttentionConfig", "FlowARConfig", "FlowHeadConfig", "SamplingConfig", "__version__"]
