"""Test-wide setup. Its presence puts ``tests/`` on ``sys.path`` so helpers such as ``rigs``
can be imported from every test directory."""
