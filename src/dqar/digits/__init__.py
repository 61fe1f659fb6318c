"""The digits test bed: the embedded trained DiT, its data, its training recipe and its evaluator.

It lets every command and benchmark run offline on CPU with images whose quality can be measured.
"""
