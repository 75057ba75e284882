"""The ``mixtral`` command line: one module per subcommand, dispatched by ``mixtral.cli.main``."""
