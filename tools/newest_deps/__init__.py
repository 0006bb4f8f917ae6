"""The newest-dependencies run of CI: the test suite on the newest releases the package index serves.

    python -m tools.newest_deps                         # what CI runs (.ci/run), after the locked suite
    python -m tools.newest_deps --lock old.lock --tests tests/unit/test_text_render.py   # a smaller run

``make test`` proves the locked versions (requirements.lock); a release published since is not tested until
someone runs ``make lock``. This asks the index for the newest release of every dependency in pyproject.toml
(and of tokenizers, huggingface-hub and fsspec, which moeprobe imports itself), prints them against the lock,
and when any is newer installs those into a venv layered over the locked environment (overlay.py) and runs
the whole suite there. torch stays at the locked CPU build (plan.HELD says why). Exit status 1 when the
upgraded run fails, 2 when the index cannot be asked.
"""
