"""``python -m harness.bench``."""
from harness.bench import main

main()
