"""The ``dist-ft`` command line: one module per subcommand."""
