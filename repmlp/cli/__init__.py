"""The command-line tools: each module's ``main(argv)`` is one tool (``tools/*.py`` in a clone run them)."""
