"""The miniature lab: micro models of the real classes, procedural subjects, evaluation (see README.md here).

It lives beside the benchmarks (DESIGN.md §2: miniatures are not a layer of the pack) and imports the pack's
mechanisms; its core is tested by ``tests/test_lab.py``.
"""
