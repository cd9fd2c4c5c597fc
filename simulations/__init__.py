"""cocoon-sim: the network at scale in virtual time (model) and with real processes (emulation)."""
