"""The model: where each family's residual writers live (arch), loading (load), running it in batches (forward),
and the real models that ship inside PyPI packages (packaged)."""
