"""xorserve trainer: the XOR classifier of the course notes, its training, export and parity."""
