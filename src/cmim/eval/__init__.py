"""cmim.eval: k-NN, linear probe and fine-tuning of any cmim encoder (checkpoint or exported file).

Kept import-free: the trainer imports :mod:`cmim.eval.monitor`, and the heavier modules load only when used.
"""
