"""HONES: head-oriented neuron explanation and steering for vision-language models."""

__version__ = "0.1.0"
