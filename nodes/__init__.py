"""Node programs for operators: the ``cocoon-node`` command line."""
