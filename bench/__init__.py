"""apmatrixd benchmarks: ``sudo tools/bench`` (or ``.venv/bin/python -m bench``) writes
``bench/RESULTS.md`` and ``bench/results.json``. Never run by the test suite (bar a smoke test).
"""
