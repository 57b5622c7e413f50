"""Datasets, evaluation protocols and input pipelines."""
