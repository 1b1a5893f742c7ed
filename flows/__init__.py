"""Prefect orchestration of the vqflow pipeline (the library in vqflow/ knows nothing of Prefect)."""
