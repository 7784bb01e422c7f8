"""Twin of the seed's `model` package (only its GateModel module)."""
