"""Reading and writing weights: safe loading, safetensors, released-weights layouts."""
