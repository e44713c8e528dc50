"""The DeepSpeed backend: the only code of the package that imports deepspeed (tests/test_architecture.py)."""
