"""Analysis the papers draw on: refusal features and gradient conflict, usable by any stage."""
