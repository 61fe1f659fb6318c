"""The measurement harness: metrics, timing, baselines, bench (and sweep/report from other modules).

The harness imports the library; the library never imports the harness. Submodules are imported
explicitly (`from dqar.harness.metrics import psnr`) so `import dqar.harness` stays cheap.
"""
