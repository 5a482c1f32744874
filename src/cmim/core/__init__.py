"""The bottom layer: what every other layer shares (errors, distributed helpers, schedules, atomic file
writes, weights-only reading, k-NN math). It imports nothing else from cmim."""
