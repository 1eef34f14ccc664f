"""Core package shared by the gateway, the trainer and the clients.

Rewards, Best-of-N math, sampling defaults, prompt formatting, model preparation and the vLLM
engine factory live here so that every app samples, scores and formats the same way.
"""

__version__ = "0.1.0"
