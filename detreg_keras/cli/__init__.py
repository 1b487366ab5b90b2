"""The command-line programs, importable (``main(argv) -> exit status``) and installed by ``pip install``.

============================  ==========================================  ==============================
installed command             module                                      script beside it
============================  ==========================================  ==============================
``detreg-train``              :mod:`detreg_keras.cli.train`               ``scripts/train.py``
``detreg-evaluate``           :mod:`detreg_keras.cli.evaluate`            ``scripts/evaluate.py``
``detreg-ablate``             :mod:`detreg_keras.cli.ablate`              ``scripts/ablate.py``
``detreg-omniglot-benchmark`` :mod:`detreg_keras.cli.omniglot_benchmark`  ``scripts/omniglot_benchmark.py``
============================  ==========================================  ==============================

The scripts set ``TF_CPP_MIN_LOG_LEVEL=3`` before TensorFlow loads (no C++
log line at all); the installed commands import the package first, which sets
level 2 when the variable is unset (no INFO or WARNING line).
"""
