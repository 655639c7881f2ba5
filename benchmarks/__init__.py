"""Benchmarks: our forms against the authors' (emulated) and baselines (:mod:`.forms`), int8 against float32
(:mod:`.int8`), on the interleaved timing of :mod:`.timing`."""
