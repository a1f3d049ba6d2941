"""Data: storage-agnostic image sources, dataset layouts, generated scenes and Ray Data pipelines."""
