"""Evaluation: saliency / object-discovery methods, metrics, bilateral solver, Ray Data batch job, reports."""
