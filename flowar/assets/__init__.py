"""Weights shipped with the package (safetensors) and their JSON configs."""
