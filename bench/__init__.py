"""Rerunnable benchmarks (``python bench/<name>.py``), and the fixtures they share with the tests.

``bench/corpus.py`` (the bad-input corpus) and ``bench/s3server.py`` (a moto S3 server in a
subprocess) are imported by the benches as ``import corpus`` (a script's folder is on ``sys.path``)
and by the tests as ``from bench import corpus`` (the repository root is on pytest's ``pythonpath``).
Tests may import bench; nothing under bench imports tests (``tests/test_packaging.py`` checks it).
"""
