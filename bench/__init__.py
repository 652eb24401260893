"""pmlmd's benchmarks against GNU parallel and xargs: ``python3 -m bench [--quick] [--only NAME]``.

See bench/RESULTS.md for what each scenario measures and the committed results.
"""
