"""Repository tooling for tests, the demo and the examples: the built-in synthetic dataset. Not part of the model API."""
