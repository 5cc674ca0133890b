"""Benchmarks of vmupdate: guest pause by mode and RAM size, the agent's overhead over a
hand-made QMP sequence, what the pause is made of against the new QEMU's start-up floor.

`python -m bench --help`; method and results in `docs/benchmarks.md`.
"""
