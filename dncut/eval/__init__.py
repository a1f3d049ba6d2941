"""Evaluation: the methods (``methods``, ``most``, ``found``), the one inference path (``predict``),
metrics, the bilateral solver, the segmentation protocol, the pipeline stages (``stages``), the Ray
Data jobs on them (``jobs``), training-time validation (``validate``) and reports (``report``)."""
